"""The baseline's own commit, measured here and now: the gate's last word on a time regression.

A committed baseline's times were measured on one machine on one day; CI measures on another.
The processor's name does not pin the host (a virtual "Intel(R) Xeon(R) Processor" can be
several generations), and a cell whose time is mostly Python overhead (a peer's per-step LSTM in
Python against PyTorch's fused kernel) moves its ratio to the plain step with the host: CI once
measured Opacus's ghost clipping on the LSTM at x1.30 and again at x1.25 its baseline ratio with
Opacus and our adapter unchanged, while the same cell passed on the machine that wrote it.

So a time regression that survived its second measurement is measured a third way before it
fails the gate (``measure_against_commit``): the commit the baseline was written at is unpacked
(``git archive``) into a temporary directory, and that commit's own gate and this tree's each
measure the suspect cells in ``PROCESSES`` fresh processes, alternately (``measure_tree``: a
tree's ``python -m bench regress --save``). The regression stands only when this tree's mean over
its processes is slower than the old commit's, here, by more than the cell's threshold: a
slowdown of our code shows on any host, a host's difference does not. ``measure_tree`` also
measures the baseline's repeated runs (``--update-baseline``), each in a fresh process.

Where the commit cannot be measured (not recorded, recorded with uncommitted changes, not in
this clone, no git, or its command fails) the regression stands and the reason is printed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.baseline import Baseline, BaselineError, load_baseline, write_baseline
from bench.gate import CellResult, merge_repeats

#: the repository this package lives in
REPOSITORY = Path(__file__).resolve().parents[1]
#: seconds one process's measurement may take (a few suspect cells: ~10 s each)
TIMEOUT_S = 600.0
#: fresh processes per side: a cell's time can take one of several levels per process and keep
#: it for the process's life (measured: Opacus's ghost clipping on the LSTM at B=64, six fresh
#: processes: 15.6x-20.1x its plain step, each steady within itself), so each side's ratio is a
#: mean over processes
PROCESSES = 3


class CommitUnavailable(Exception):
    """The baseline's commit cannot be measured here; the message says why (one line)."""


def baseline_commit(baseline: Baseline) -> str:
    """The commit the baseline was measured at; CommitUnavailable when it was not recorded or
    the tree had uncommitted changes then (that tree cannot be rebuilt)."""
    recorded = baseline.environment.get("git_commit")
    if not recorded:
        raise CommitUnavailable("the baseline records no commit")
    if recorded.endswith("+dirty"):
        raise CommitUnavailable(
            f"the baseline was measured with uncommitted changes on {recorded[:12]}"
        )
    return recorded


def _git(arguments: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["git", *arguments], cwd=REPOSITORY, capture_output=True, check=True, **kwargs
        )
    except FileNotFoundError:
        raise CommitUnavailable("git is not installed") from None
    except subprocess.CalledProcessError as error:
        message = error.stderr.decode(errors="replace").strip().splitlines()
        raise CommitUnavailable(
            f"git {arguments[0]} failed: {message[-1] if message else error.returncode}"
        ) from None


def _unpack(commit: str, directory: Path) -> None:
    """The commit's tracked files into ``directory`` (no worktree is registered)."""
    _git(["cat-file", "-e", f"{commit}^{{commit}}"])
    archive = _git(["archive", "--format=tar", commit]).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def measure_tree(
    tree: Path,
    keys: Iterable[tuple[str, str, str, int]],
    options: Sequence[str],
    timeout: float = TIMEOUT_S,
) -> list[CellResult]:
    """The cells ``keys`` ((case, implementation, quantity, batch size)) measured by the gate
    of the source tree ``tree`` in a fresh process, with ``options`` (timing, injections), and
    read back from its ``--save``. It judges them against an empty baseline (nothing to gate,
    nothing measured twice). CommitUnavailable when it fails."""
    keys = set(keys)
    with tempfile.TemporaryDirectory(prefix="pegbench-gate-run-") as scratch:
        saved, empty = Path(scratch) / "run.json", Path(scratch) / "empty.json"
        write_baseline(empty, Baseline([], {}, {}))
        command = [
            sys.executable,
            "-m",
            "bench",
            "regress",
            "--baseline",
            str(empty),
            "--cases",
            *sorted({k[0] for k in keys}),
            "--impls",
            *sorted({k[1] for k in keys}),
            "--quantities",
            *sorted({k[2] for k in keys}),
            "--batch-sizes",
            *map(str, sorted({k[3] for k in keys})),
            *options,
            "--no-progress",
            "--save",
            str(saved),
        ]
        path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
        environment = dict(os.environ, PYTHONPATH=path)
        try:
            done = subprocess.run(
                command, cwd=tree, env=environment, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise CommitUnavailable(f"a measurement ran past {timeout:.0f} s") from None
        if done.returncode not in (0, 1) or not saved.exists():
            raise CommitUnavailable(
                f"the gate of {tree} exited {done.returncode}: "
                f"{_last_line(done.stderr or done.stdout)}"
            )
        try:
            cells = load_baseline(saved).cells
        except BaselineError as error:
            raise CommitUnavailable(f"a saved run is unreadable here: {error}") from None
    return [c for c in cells if c.key in keys]


def measure_against_commit(
    commit: str,
    keys: Iterable[tuple[str, str, str, int]],
    options: Sequence[str],
    new_options: Sequence[str],
    processes: int = PROCESSES,
) -> tuple[list[CellResult], list[CellResult]]:
    """(the baseline's commit, this tree): the cells ``keys`` measured ``processes`` times each
    in fresh processes, alternately, on this machine; each side the mean over its processes
    and all their rounds (``merge_repeats``). ``options``: timing options of both;
    ``new_options``: added for this tree only (the self-tests' injections). CommitUnavailable
    when any step fails."""
    keys = set(keys)
    old_runs, new_runs = [], []
    with tempfile.TemporaryDirectory(prefix="pegbench-baseline-commit-") as scratch:
        tree = Path(scratch) / "tree"
        tree.mkdir()
        _unpack(commit, tree)
        for _ in range(processes):
            old_runs.append(measure_tree(tree, keys, options))
            new_runs.append(measure_tree(REPOSITORY, keys, [*options, *new_options]))
    return merge_repeats(old_runs, statistics.fmean), merge_repeats(new_runs, statistics.fmean)
