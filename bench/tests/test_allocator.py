"""glibc malloc's thresholds are pinned for every timed command, recorded, and inherited by the
processes a measurement starts; ``--default-malloc`` and the report leave them alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import allocator

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="not glibc")


def _run(code: str, **environment) -> str:
    """stdout of ``code`` in a fresh interpreter, without the pinning variables unless given."""
    env = {k: v for k, v in os.environ.items() if k not in allocator.ENVIRONMENT}
    env.update(environment)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return done.stdout


def test_pin_sets_both_thresholds_and_exports_them_to_child_processes():
    out = _run("""
        import os, subprocess, sys
        from bench import allocator
        print(allocator.state())
        print(allocator.pin())
        print(allocator.pin())  # idempotent
        print(all(os.environ[k] == v for k, v in allocator.ENVIRONMENT.items()))
        child = "from bench import allocator; print(allocator.state())"
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                             check=True).stdout.strip())
    """)
    before, pinned, again, exported, child = out.splitlines()
    assert before == "default (adaptive thresholds)"
    assert pinned == again == "glibc, mmap threshold 32 MiB, trim threshold 1024 MiB"
    assert exported == "True"
    assert child == "glibc, thresholds inherited from the environment"


def test_timed_commands_pin_it_and_record_it_the_report_and_the_opt_out_do_not(tmp_path):
    out = _run(f"""
        from bench import __main__ as bench_main, allocator, environment
        for name in bench_main.COMMANDS:
            bench_main.COMMANDS[name] = bench_main.COMMANDS[name].__class__(
                bench_main.COMMANDS[name].add_arguments, lambda args: None, lambda args: 0,
                bench_main.COMMANDS[name].help)
        bench_main.main(["report", "--out", {str(tmp_path)!r}])
        print(allocator.state())
        bench_main.main(["floor", "mlp_mnist", "--default-malloc"])
        print(allocator.state())
        bench_main.main(["floor", "mlp_mnist"])
        print(allocator.state())
        print(environment.describe("cpu", 1)["malloc"])
    """)
    report, opted_out, timed, recorded = out.splitlines()
    assert report == opted_out == "default (adaptive thresholds)"
    assert timed == recorded == "glibc, mmap threshold 32 MiB, trim threshold 1024 MiB"
