"""The performance-regression gate: ``python -m bench regress`` (``nox -s regress``).

A short sweep of a fixed set of cells (``gate_cells``: the MLP, the CNN, the T=64
transformer and the LSTM at B=16 and B=64, norms and Gram, every registered implementation,
the per-example-loop ones only at B=16) is measured with ``bench.sweep`` and compared, cell by
cell (implementation, case, batch size, quantity), with a committed baseline
(``results/baseline-cpu.json``).

What is compared is machine-independent as far as it goes: the time ratio to a plain
forward+backward step timed interleaved in the same run, and the peak-memory ratio to the same
plain step. A cell **regresses** when

- time: its ratio is worse than the baseline's by more than ``threshold`` (0.25: 1.25x the
  baseline's ratio) *and* a one-sided Mann-Whitney rank test of this run's per-round ratios
  against the baseline's agrees (p <= ``alpha``). With too few rounds for the test to reach
  ``alpha`` at all (a cell so slow that its budget cut the rounds), the threshold alone decides;
- memory: its memory ratio is worse than the baseline's by more than ``memory_threshold`` and
  the peak grew by more than ``MEMORY_FLOOR_BYTES`` at the baseline's plain peak. memray's
  CPU peaks repeat to within 0.3% between runs of the same code, so no rank test: the floor
  only keeps a few KiB of allocator slack on a tiny cell from counting;
- status: it was ok in the baseline and now is unsupported, fails, times out, runs out of
  memory or is skipped.

A cell that looks regressed is measured again (``--confirm``, once by default) and counts
only if it regresses again: a burst of load on a shared machine spans a whole cell.

Improvements are found the same way in the other direction and reported, never gated. Cells
that are not ok on either side, or present on one side only, are listed, not gated. The exit
code is 1 on any regression, 0 otherwise (2 for bad arguments or a missing baseline).

Regenerate the baseline on a quiet machine with::

    python -m bench regress --update-baseline

``--inject-slowdown IMPL=FACTOR`` and ``--inject-memory IMPL=MIB`` are the gate's self-test,
without editing any source: they wrap that implementation so that each call takes FACTOR times
as long (the call, then a busy loop for FACTOR - 1 times its duration) or holds MIB more memory
during the call. ``--inject-slowdown ghost=10`` must fail the gate.

This module is the command: its cells, the measuring, the self-test wrapper, the arguments and
their checks (``validate``, before anything is measured). The decisions are ``bench.gate`` (pure
functions), the baseline file is ``bench.baseline``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bench import cli
from bench.baseline import (
    UPDATE_COMMAND,
    Baseline,
    BaselineError,
    default_baseline,
    load_baseline,
    write_baseline,
)
from bench.gate import (
    DEFAULT_ALPHA,
    DEFAULT_MEMORY_THRESHOLD,
    DEFAULT_THRESHOLD,
    IMPROVEMENT,
    MEMORY_FLOOR_BYTES,
    NOT_CONFIRMED,
    NOT_GATED,
    REGRESSION,
    CellResult,
    Decision,
    Thresholds,
    confirm,
    decide,
    format_not_gated,
    format_table,
    regressions,
    summary,
)

#: the gate's cells: cases, batch sizes, and the implementations gated at the smallest size only
GATE_CASES = ("mlp_mnist", "cnn_cifar", "transformer_t64", "lstm")
GATE_BATCH_SIZES = (16, 64)
#: per-example loops (one backward per example, vmap over examples, Opacus's materialised
#: per-sample gradients): at B=64 a call of the MLP takes ~0.2 s and a cell seconds, so they are
#: gated at the smallest batch size only; a regression in them shows there as well
SLOW_IMPLEMENTATIONS = ("naive", "vmap", "opacus")

#: gate timing settings: 1 thread (2 threads on a shared 2-core machine gave 100x outliers),
#: 6 interleaved rounds (so that the rank test can reach p = 1/924 on 6 against 6), short rounds.
#: The oracle check stays on: it is each group's first call, so one-time costs (vmap's lazy
#: imports, ~2 s) land there instead of in the probe, where they would cut the rounds
GATE_THREADS, GATE_ROUNDS, GATE_MIN_RUN_TIME, GATE_BUDGET_S = 1, 6, 0.05, 10.0


# -- cells ---------------------------------------------------------------------------------------


def gate_cells(
    cases: Sequence[str] = GATE_CASES,
    implementations: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = GATE_BATCH_SIZES,
    device: str = "cpu",
    quantities: Sequence[str] | None = None,
) -> list:
    """The gate's cells (``bench.sweep.Cell``); the slow implementations at the smallest size."""
    import impls
    from bench.cases import get_case
    from bench.sweep import QUANTITIES, plan

    names = list(implementations or impls.names())
    cells = plan(
        [get_case(c) for c in cases],
        names,
        devices=[device],
        quantities=quantities or QUANTITIES,
        batch_sizes=batch_sizes,
    )
    smallest = min(batch_sizes)
    return [
        c for c in cells if c.implementation not in SLOW_IMPLEMENTATIONS or c.batch_size == smallest
    ]


class Injected:
    """An implementation with extra cost of a known size: the gate's self-test.

    Each call takes ``slowdown`` times as long as the wrapped one's (the call, then a busy loop
    of ``slowdown - 1`` times its duration: CPU work, no allocation) and holds ``extra_bytes``
    more memory while it runs (a buffer allocated before the call; untouched, so it costs no
    time). Same answer.
    """

    def __init__(self, implementation: Any, slowdown: float = 1.0, extra_bytes: int = 0):
        if slowdown < 1 or extra_bytes < 0:
            raise ValueError(f"slowdown >= 1 and extra_bytes >= 0, got {slowdown}, {extra_bytes}")
        self.implementation = implementation
        self.slowdown = float(slowdown)
        self.extra_bytes = int(extra_bytes)

    def _call(self, method: str, *args, **kwargs):
        started = time.perf_counter()
        # untouched: memray and CUDA's allocator count its size, but filling it would cost time
        ballast = torch.empty(self.extra_bytes, dtype=torch.uint8) if self.extra_bytes else None
        result = getattr(self.implementation, method)(*args, **kwargs)
        del ballast
        if self.slowdown > 1:
            now = time.perf_counter()
            deadline = now + (self.slowdown - 1) * (now - started)
            while time.perf_counter() < deadline:
                pass
        return result

    def norms(self, *args, **kwargs):
        return self._call("norms", *args, **kwargs)

    def inner(self, *args, **kwargs):
        return self._call("inner", *args, **kwargs)


def parse_injection(text: str, option: str = "--inject-slowdown", least: float = 1.0):
    """``"ghost=10"`` -> ("ghost", 10.0); ValueError naming ``option`` when malformed."""
    name, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not name or not (math.isfinite(number) and number >= least):
        raise ValueError(f"{option} takes IMPL=NUMBER (a number >= {least:g}), got {text!r}")
    return name, number


# -- measuring -----------------------------------------------------------------------------------


def gate_settings(
    threads: int = GATE_THREADS,
    rounds: int = GATE_ROUNDS,
    min_run_time: float = GATE_MIN_RUN_TIME,
    budget_s: float = GATE_BUDGET_S,
):
    from bench.sweep import Settings

    return Settings(
        threads=threads,
        rounds=rounds,
        min_run_time=min_run_time,
        budget_s=budget_s,
        check=True,
        measure_memory=True,
    )


def measure(
    cells: Sequence,
    settings,
    implementations: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[CellResult]:
    """Measure the cells with ``bench.sweep.Sweep`` (into a throw-away table)."""
    from bench.store import ResultStore
    from bench.sweep import Sweep

    with tempfile.TemporaryDirectory(prefix="pegbench-regress-") as folder:
        store = ResultStore(Path(folder) / "cells")
        rows = Sweep(store, settings, implementations, progress=progress).run(cells)
    return [CellResult.from_row(r) for r in rows]


def environment_notes(baseline: Baseline, environment: Mapping, settings: Mapping) -> list[str]:
    """Differences between the baseline's machine and settings and this run's, one per line."""
    notes = []
    old_env = baseline.environment
    for name, old, new in (
        ("cpu", old_env.get("cpu"), environment.get("cpu")),
        ("torch", old_env.get("torch_build"), environment.get("torch_build")),
        ("threads", baseline.settings.get("threads"), settings.get("threads")),
        ("rounds", baseline.settings.get("rounds"), settings.get("rounds")),
    ):
        if old is not None and new is not None and old != new:
            notes.append(f"note: the baseline was measured with {name} {old}, this run {new}")
    return notes


# -- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Regenerate the baseline (on a quiet machine) with:\n"
        f"  {UPDATE_COMMAND}\n"
        "Self-test of the gate (must exit 1):\n"
        "  python -m bench regress --inject-slowdown ghost=10"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="baseline JSON (default results/baseline-<device>.json)",
    )
    parser.add_argument(
        "--threshold",
        type=cli.number(least=0),
        default=DEFAULT_THRESHOLD,
        help="relative worsening of a time ratio that counts as a regression "
        f"(default {DEFAULT_THRESHOLD:g}: 1.25x the baseline's ratio; 1.0: 2x)",
    )
    parser.add_argument(
        "--memory-threshold",
        type=cli.number(least=0),
        default=DEFAULT_MEMORY_THRESHOLD,
        help="the same for the memory ratio (default %(default)g; plus an absolute floor of "
        f"{MEMORY_FLOOR_BYTES // 2**20} MiB)",
    )
    parser.add_argument(
        "--alpha",
        type=cli.number(above=0, most=1),
        default=DEFAULT_ALPHA,
        help="one-sided Mann-Whitney level the rank test must reach (default %(default)g)",
    )
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="write the baseline from this run (and exit 0)",
    )
    parser.add_argument(
        "--confirm",
        type=cli.whole(0),
        default=1,
        help="measure regressed cells again this many times; a regression must repeat "
        "(default %(default)s; 0: believe the first measurement)",
    )
    parser.add_argument(
        "--save", type=Path, default=None, help="also write this run, in the baseline's format"
    )
    parser.add_argument(
        "--inject-slowdown",
        action="append",
        default=[],
        metavar="IMPL=FACTOR",
        help="self-test: every call of IMPL takes FACTOR times as long (repeatable)",
    )
    parser.add_argument(
        "--inject-memory",
        action="append",
        default=[],
        metavar="IMPL=MIB",
        help="self-test: every call of IMPL holds MIB more memory (repeatable)",
    )
    parser.add_argument("--device", default="cpu", help="device (default cpu)")
    parser.add_argument("--cases", nargs="+", default=list(GATE_CASES), help="default: %(default)s")
    cli.add_impls_argument(parser, "default: every registered implementation")
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=cli.BATCH_SIZE,
        default=list(GATE_BATCH_SIZES),
        help="%(default)s",
    )
    parser.add_argument(
        "--threads", type=cli.THREADS, default=GATE_THREADS, help="default %(default)s"
    )
    parser.add_argument(
        "--rounds", type=cli.ROUNDS, default=GATE_ROUNDS, help="default %(default)s"
    )
    parser.add_argument(
        "--min-run-time", type=cli.SECONDS, default=GATE_MIN_RUN_TIME, help="default %(default)s s"
    )
    parser.add_argument(
        "--budget",
        type=cli.SECONDS,
        default=GATE_BUDGET_S,
        help="seconds per cell (default %(default)s)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print every cell's decision, not only changes"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def validate(args: argparse.Namespace) -> None:
    """Check names, injections, the device, the output paths and the baseline file before
    anything is measured: ``cli.UsageError`` (one line) on a problem. Adds ``slowdowns``,
    ``extra_mib`` (name -> number), ``baseline_path`` and ``reference`` (the loaded
    ``Baseline``, None when it is to be written) to ``args``."""
    import impls
    from bench.cases import BY_NAME

    known = impls.names()
    with cli.usage("regress"):
        cli.check_known("implementation", args.impls, known)
        cli.check_known("bench case", args.cases, list(BY_NAME))
        cli.check_device(args.device, "--device")
        slowdowns = dict(parse_injection(t) for t in args.inject_slowdown)
        extra_mib = dict(parse_injection(t, "--inject-memory", 0) for t in args.inject_memory)
        for name in [*slowdowns, *extra_mib]:
            if name not in known:
                raise ValueError(
                    f"--inject-slowdown/--inject-memory: unknown implementation '{name}'"
                )
        if (slowdowns or extra_mib) and args.update_baseline:
            raise ValueError(
                "an injection with --update-baseline would write a slowed-down baseline"
            )
        path = args.baseline or default_baseline(args.device)
        if args.update_baseline:
            cli.check_output_file(path, "--baseline")
        if args.save:
            cli.check_output_file(args.save, "--save")
        reference = None
        try:
            reference = load_baseline(path)
        except BaselineError as error:
            if not args.update_baseline:
                raise ValueError(str(error)) from None
    args.slowdowns, args.extra_mib = slowdowns, extra_mib
    args.baseline_path, args.reference = path, reference


def run(args: argparse.Namespace) -> int:
    """The ``regress`` command on validated arguments: exit 1 on a regression, 0 otherwise."""
    import impls
    from bench import environment

    path, baseline = args.baseline_path, args.reference
    thresholds = Thresholds(args.threshold, args.memory_threshold, args.alpha)
    settings = gate_settings(args.threads, args.rounds, args.min_run_time, args.budget)
    cells = gate_cells(args.cases, args.impls, args.batch_sizes, args.device)
    implementations = {
        n: Injected(impls.get(n), args.slowdowns.get(n, 1.0), int(args.extra_mib.get(n, 0) * 2**20))
        for n in {*args.slowdowns, *args.extra_mib}
    }
    for name, wrapped in implementations.items():
        print(
            f"regress: self-test: every call of {name} takes {wrapped.slowdown:g}x as long and "
            f"holds {wrapped.extra_bytes / 2**20:g} MiB more"
        )
    print(f"regress: {len(cells)} cells on {args.device}, baseline {path}", flush=True)
    started = time.perf_counter()
    results = measure(cells, settings, implementations, progress=not args.no_progress)
    wall = time.perf_counter() - started
    info = environment.describe(args.device, settings.threads)
    measured = Baseline(results, info, dict(settings.as_dict(), wall_s=round(wall, 1)))
    if args.save:
        write_baseline(args.save, measured)
        print(f"regress: wrote this run to {args.save}")

    decisions: list[Decision] = []
    if baseline is not None:
        for note in environment_notes(baseline, info, settings.as_dict()):
            print(note)
        decisions = decide(baseline.cells, results, thresholds)
        for attempt in range(1, args.confirm + 1):
            suspects = {d.key for d in regressions(decisions)}
            if not suspects or args.update_baseline:
                break
            print(
                f"regress: {len(suspects)} cells look regressed; measuring them again "
                f"({attempt}/{args.confirm})",
                flush=True,
            )
            again = [
                c
                for c in cells
                if (c.case.name, c.implementation, c.quantity, c.batch_size) in suspects
            ]
            remeasured = measure(again, settings, implementations, progress=not args.no_progress)
            decisions = confirm(decisions, decide(baseline.cells, remeasured, thresholds))
        wall = time.perf_counter() - started
        shown = [d for d in decisions if args.verbose or d.verdict in (REGRESSION, IMPROVEMENT)]
        shown += [d for d in decisions if d.note.startswith(NOT_CONFIRMED) and d not in shown]
        if shown:
            print(format_table(shown))
        quiet = [d for d in decisions if d.verdict == NOT_GATED and d.metric == "status"]
        if quiet and not args.verbose:
            print(format_not_gated(quiet))
        print(summary(decisions, thresholds) + f" ({wall:.0f} s)")
    if args.update_baseline:
        write_baseline(path, measured)
        print(f"regress: wrote the baseline {path} ({len(results)} cells, {wall:.0f} s)")
        return 0
    return 1 if regressions(decisions) else 0
