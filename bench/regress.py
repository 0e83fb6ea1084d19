"""The performance-regression gate: ``python -m bench regress`` (``nox -s regress``).

A short sweep of a fixed set of cells (``gate_cells``: the MLP, the CNN, the T=64
transformer and the LSTM at B=16 and B=64, norms and Gram, every registered implementation,
the per-example-loop ones only at B=16) is measured with ``bench.sweep`` and compared, cell by
cell (implementation, case, batch size, quantity), with a committed baseline of the same
processor (``results/baseline-cpu-<processor>.json``, ``bench.baseline``; on another processor
only the counters are compared). The decisions are ``bench.gate``; in short:

- **counters**, once per cell: FLOPs, aten operators, bytes allocated and peak bytes of one
  call (``bench.counters``, ``bench.memory``). Deterministic, so held to 5%: an algorithmic
  regression (a materialised form chosen where the factored one was cheaper, a fallback to
  vmap, an extra copy of the activations) fails on any machine, whatever its load;
- **time**: the ratio of a call's CPU time to an interleaved plain step's, per round, 10 short
  rounds; a cell regresses beyond its own threshold (set from the run-to-run spread measured
  when the baseline was written) when a rank test agrees, a second measurement repeats it, and
  this tree is also slower than the baseline's own commit measured here, in fresh processes
  (``bench.baseline_commit``: a host's difference or a process's level is not our regression);
- status: a cell ok in the baseline must stay ok.

The failing report names the cell, the counter or time that moved, by how much, and the
command that measures that cell alone. Cells that are not ok on either side, or present on
one side only, are listed, not gated. The exit code is 1 on any regression, 0 otherwise (2
for bad arguments or a missing baseline).

Regenerate the baseline on a quiet machine with (it measures the gate ``--repeat`` times, 3 by
default, each in a fresh process, to find each cell's spread)::

    python -m bench regress --update-baseline

Self-tests, without editing any source: ``--inject-slowdown IMPL=FACTOR`` (each call of IMPL
takes FACTOR times its CPU time: the call, then a busy loop), ``--inject-memory IMPL=MIB`` (each
call holds MIB more) and ``--inject-materialise`` (the factor engine's cost model always
materialises per-example gradients: ghost's and function's algorithm gets worse, their answer
does not). ``--no-time`` gates counters and status only.

This module is the command: its cells, the measuring, the self-test wrappers, the arguments and
their checks (``validate``, before anything is measured). The decisions are ``bench.gate`` (pure
functions), the baseline file is ``bench.baseline``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.baseline import (
    UPDATE_COMMAND,
    Baseline,
    BaselineError,
    baseline_for,
    default_baseline,
    load_baseline,
    write_baseline,
)
from bench.baseline_commit import (
    PROCESSES,
    REPOSITORY,
    CommitUnavailable,
    baseline_commit,
    measure_against_commit,
    measure_tree,
)
from bench.gate import (
    DEFAULT_ALPHA,
    DEFAULT_COUNTER_THRESHOLD,
    IMPROVEMENT,
    MEMORY_FLOOR_BYTES,
    MIN_TIME_THRESHOLD,
    NOT_CONFIRMED,
    NOT_GATED,
    REGRESSION,
    SPREAD_MARGIN,
    CellResult,
    Decision,
    Thresholds,
    confirm,
    decide,
    format_not_gated,
    format_table,
    group_spreads,
    merge_repeats,
    regressions,
    reproduce,
    summary,
)
from correctness import cli

#: the gate's cells: cases, batch sizes, and the implementations gated at the smallest size only
GATE_CASES = ("mlp_mnist", "cnn_cifar", "transformer_t64", "lstm")
GATE_BATCH_SIZES = (16, 64)
#: per-example loops (one backward per example, vmap over examples, Opacus's materialised
#: per-sample gradients): at B=64 a call of the MLP takes ~0.2 s and a cell seconds, so they are
#: gated at the smallest batch size only; a regression in them shows there as well
SLOW_IMPLEMENTATIONS = ("naive", "vmap", "opacus")

#: gate timing settings: 1 thread (2 threads on a shared 2-core machine gave 100x outliers),
#: 10 short interleaved rounds in CPU time (the rank test can reach p < 1e-5 on 10 against the
#: baseline's 30). The oracle check stays on: it is each group's first call, so one-time costs
#: (vmap's lazy imports, ~2 s) land there instead of in the probe, where they would cut rounds
GATE_THREADS, GATE_ROUNDS, GATE_MIN_RUN_TIME, GATE_BUDGET_S = 1, 10, 0.02, 10.0
#: runs of the gate that --update-baseline measures to find each cell's spread
GATE_REPEATS = 3


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

    Each call takes ``slowdown`` times as long as the wrapped one's on ``clock`` (the call, then
    a busy loop of ``slowdown - 1`` times its duration: CPU work, no allocation, no aten
    operator) and holds ``extra_bytes`` more memory while it runs (a buffer allocated before the
    call; untouched, so it costs no time). Same answer.
    """

    def __init__(
        self,
        implementation: Any,
        slowdown: float = 1.0,
        extra_bytes: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if slowdown < 1 or extra_bytes < 0:
            raise ValueError(f"slowdown >= 1 and extra_bytes >= 0, got {slowdown}, {extra_bytes}")
        self.implementation = implementation
        self.slowdown = float(slowdown)
        self.extra_bytes = int(extra_bytes)
        self.clock = clock

    def _call(self, method: str, *args, **kwargs):
        started = self.clock()
        # untouched: memray and CUDA's allocator count its size, but filling it would cost time
        ballast = torch.empty(self.extra_bytes, dtype=torch.uint8) if self.extra_bytes else None
        result = getattr(self.implementation, method)(*args, **kwargs)
        del ballast
        if self.slowdown > 1:
            now = self.clock()
            deadline = now + (self.slowdown - 1) * (now - started)
            while self.clock() < deadline:
                pass
        return result

    def norms(self, *args, **kwargs):
        return self._call("norms", *args, **kwargs)

    def inner(self, *args, **kwargs):
        return self._call("inner", *args, **kwargs)


@contextlib.contextmanager
def always_materialise(enabled: bool = True):
    """Self-test: the factor engine's cost model (``impls.factors.COSTS``) picks materialising
    per-example gradients for every reduction while this is active. The answers stay exact;
    the work grows, which the counters must catch without any timing."""
    from impls.factors import COSTS

    previous = COSTS.force
    if enabled:
        COSTS.force = "materialised"
    try:
        yield
    finally:
        COSTS.force = previous


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
    device: str = "cpu",
):
    """CPU time on the CPU (steadier on a shared machine), wall time on CUDA; counters on."""
    from bench.sweep import Settings

    return Settings(
        threads=threads,
        rounds=rounds,
        min_run_time=min_run_time,
        budget_s=budget_s,
        check=True,
        measure_memory=True,
        clock="cpu" if torch.device(device).type == "cpu" else "wall",
        count=True,
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


def counters_comparable(baseline: Baseline, environment: Mapping) -> bool:
    """Counters are compared only against a baseline of the same torch build: another build
    dispatches other operators and allocates differently."""
    old, new = baseline.environment.get("torch_build"), environment.get("torch_build")
    return old is not None and old == new


def times_comparable(baseline: Baseline, environment: Mapping) -> bool:
    """Time ratios are compared only against a baseline of the same processor model: how fast
    each kernel runs against a plain step differs between processors (the fused LSTM kernel
    made every other LSTM implementation 1.3-1.6x slower, in ratio, on an AMD EPYC than on the
    Intel Xeon of the baseline, with the same code)."""
    old, new = baseline.environment.get("cpu"), environment.get("cpu")
    return old is not None and old == new


def environment_notes(baseline: Baseline, environment: Mapping, settings: Mapping) -> list[str]:
    """Differences between the baseline's machine and settings and this run's, one per line."""
    notes = []
    if not counters_comparable(baseline, environment):
        notes.append(
            "note: the baseline's torch build is not this run's: counters are not gated "
            f"(regenerate the baseline with {UPDATE_COMMAND})"
        )
    if not times_comparable(baseline, environment):
        notes.append(
            "note: the baseline was measured on another processor: time ratios are not gated "
            f"(record this processor's baseline with {UPDATE_COMMAND})"
        )
    old_env = baseline.environment
    for name, old, new in (
        ("cpu", old_env.get("cpu"), environment.get("cpu")),
        ("torch", old_env.get("torch_build"), environment.get("torch_build")),
        ("threads", baseline.settings.get("threads"), settings.get("threads")),
        ("rounds", baseline.settings.get("rounds"), settings.get("rounds")),
        ("clock", baseline.settings.get("clock"), settings.get("clock")),
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
        "Self-tests of the gate (each must exit 1):\n"
        "  python -m bench regress --inject-slowdown ghost=1.3\n"
        "  python -m bench regress --inject-materialise --no-time"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="baseline JSON (default results/baseline-<device>-<processor>.json: this "
        "processor's, or another processor's for its counters only)",
    )
    parser.add_argument(
        "--threshold",
        type=cli.number(least=0),
        default=None,
        help="one relative worsening of a time ratio for every cell (0.25: 1.25x the "
        "baseline's ratio); default: each cell's own threshold from the measured spread of "
        "its implementation on its case "
        f"({SPREAD_MARGIN:g} x (spread - 1), at least {MIN_TIME_THRESHOLD:g})",
    )
    parser.add_argument(
        "--counter-threshold",
        type=cli.number(least=0),
        default=DEFAULT_COUNTER_THRESHOLD,
        help="relative growth of a counter (FLOPs, aten operators, bytes allocated, peak "
        f"bytes) that counts (default %(default)g; bytes also need {MEMORY_FLOOR_BYTES // 2**20}"
        " MiB more)",
    )
    parser.add_argument(
        "--alpha",
        type=cli.number(above=0, most=1),
        default=DEFAULT_ALPHA,
        help="one-sided Mann-Whitney level the rank test must reach (default %(default)g)",
    )
    parser.add_argument(
        "--no-time", action="store_true", help="gate counters and status only, not time"
    )
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="write the baseline from this run (and exit 0)",
    )
    parser.add_argument(
        "--repeat",
        type=cli.whole(1),
        default=GATE_REPEATS,
        help="with --update-baseline: runs to measure, each in a fresh process, for each "
        "cell's spread (default %(default)s)",
    )
    parser.add_argument(
        "--confirm",
        type=cli.whole(0),
        default=1,
        help="measure cells whose time or status regressed again this many times; a regression "
        "must repeat (default %(default)s; 0: believe the first measurement)",
    )
    parser.add_argument(
        "--no-against-commit",
        action="store_true",
        help="believe a confirmed time regression without measuring the baseline's own commit "
        "on this machine (default: measure it; the regression must show against it too)",
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
    parser.add_argument(
        "--inject-materialise",
        action="store_true",
        help="self-test: the factor engine always materialises per-example gradients "
        "(ghost, function)",
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
        "--quantities",
        nargs="+",
        choices=("norms", "gram"),
        default=["norms", "gram"],
        help="default: %(default)s",
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
        if (slowdowns or extra_mib or args.inject_materialise) and args.update_baseline:
            raise ValueError("an injection with --update-baseline would write a worse baseline")
        path = args.baseline or (
            default_baseline(args.device) if args.update_baseline else baseline_for(args.device)
        )
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


def _timing_options(args: argparse.Namespace) -> list[str]:
    """This run's timing options, for the baseline's commit to measure the same way."""
    return [
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--rounds",
        str(args.rounds),
        "--min-run-time",
        str(args.min_run_time),
        "--budget",
        str(args.budget),
    ]


def measure_in_fresh_processes(cells: Sequence, repeats: int, args: argparse.Namespace) -> list:
    """``repeats`` runs of the cells, each by this tree's gate in a fresh process
    (``bench.baseline_commit.measure_tree``). A cell's time can take one of several levels per
    process and keep it for the process's life, so a spread measured within one process sets
    thresholds that a fresh process (CI's) can exceed with unchanged code."""
    keys = {(c.case.name, c.implementation, c.quantity, c.batch_size) for c in cells}
    options = [*_timing_options(args), *_malloc(args), *_injections(args)]
    runs = []
    for k in range(1, repeats + 1):
        started = time.perf_counter()
        runs.append(measure_tree(REPOSITORY, keys, options))
        print(
            f"regress: run {k}/{repeats} in a fresh process: {len(runs[-1])} cells "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return runs


def against_baseline_commit(
    decisions: list[Decision],
    baseline: Baseline,
    thresholds: Thresholds,
    args: argparse.Namespace,
) -> list[Decision]:
    """Time regressions that survived ``--confirm`` judged once more: the baseline's commit and
    this tree, each measured in fresh processes on this machine, alternately
    (``bench.baseline_commit``); one stands only when this tree is slower than that commit by
    more than the cell's threshold. The rounds of one process share its level, so the rank test
    over them is overconfident: the means over processes against the threshold decide. Status
    and counter regressions stand as they are; so do time regressions when the commit cannot be
    measured (the reason is printed)."""
    suspects = {d.key for d in regressions(decisions) if d.metric == "time"}
    if not suspects:
        return decisions
    try:
        commit = baseline_commit(baseline)
        print(
            f"regress: {len(suspects)} cells are still slower; measuring them on the baseline's "
            f"commit {commit[:10]} and on this tree, {PROCESSES} fresh processes each, "
            "alternately",
            flush=True,
        )
        # --default-malloc reaches the old tree only if it knows it (its baseline records the
        # allocator); an older tree never fixes the thresholds, and inherits them when this
        # process fixed them (bench.allocator exports them)
        known = "malloc" in baseline.environment
        old, new = measure_against_commit(
            commit,
            suspects,
            [*_timing_options(args), *(_malloc(args) if known else [])],
            [*_injections(args), *([] if known else _malloc(args))],
        )
    except CommitUnavailable as error:
        print(
            f"regress: the baseline's commit cannot be measured here ({error}); the time "
            "regressions stand"
        )
        return decisions
    spreads = group_spreads(baseline.cells)
    second = decide(old, new, replace(thresholds, alpha=1.0), spreads=spreads)
    judged = confirm(
        [d for d in decisions if d.key in suspects],
        [d for d in second if d.metric in ("time", "status")],
        how=f"against {commit[:10]} measured here",
    )
    rejudged = {(d.key, d.metric): d for d in judged}
    return [rejudged.get((d.key, d.metric), d) for d in decisions]


def _malloc(args: argparse.Namespace) -> list[str]:
    """``--default-malloc`` when this run has it, for the processes it starts to measure alike
    (by default they fix the allocator's thresholds, as this process did)."""
    return ["--default-malloc"] if args.default_malloc else []


def _injections(args: argparse.Namespace) -> list[str]:
    """The run's self-test injections as options (``--inject-slowdown=ghost=1.5``)."""
    options = [f"--inject-slowdown={t}" for t in args.inject_slowdown]
    options += [f"--inject-memory={t}" for t in args.inject_memory]
    return options + (["--inject-materialise"] if args.inject_materialise else [])


def _injection_arguments(args: argparse.Namespace) -> list[str]:
    """The run's options that change what is measured, for the reproduce commands."""
    extra = [option.replace("=", " ", 1) for option in _injections(args)]
    extra += ["--no-time"] if args.no_time else []
    if args.baseline is not None:
        extra.append(f"--baseline {args.baseline}")
    return extra


def run(args: argparse.Namespace) -> int:
    """The ``regress`` command on validated arguments: exit 1 on a regression, 0 otherwise."""
    import impls
    from bench import environment

    path, baseline = args.baseline_path, args.reference
    settings = gate_settings(args.threads, args.rounds, args.min_run_time, args.budget, args.device)
    clock = time.process_time if settings.clock == "cpu" else time.perf_counter
    cells = gate_cells(args.cases, args.impls, args.batch_sizes, args.device, args.quantities)
    implementations = {
        n: Injected(
            impls.get(n),
            args.slowdowns.get(n, 1.0),
            int(args.extra_mib.get(n, 0) * 2**20),
            clock,
        )
        for n in {*args.slowdowns, *args.extra_mib}
    }
    for name, wrapped in implementations.items():
        print(
            f"regress: self-test: every call of {name} takes {wrapped.slowdown:g}x as long and "
            f"holds {wrapped.extra_bytes / 2**20:g} MiB more"
        )
    if args.inject_materialise:
        print("regress: self-test: the factor engine always materialises per-example gradients")
    repeats = args.repeat if args.update_baseline else 1
    print(
        f"regress: {len(cells)} cells on {args.device} ({settings.clock} time"
        + (f", {repeats} runs" if repeats > 1 else "")
        + f"), baseline {path}",
        flush=True,
    )
    started = time.perf_counter()
    with always_materialise(args.inject_materialise):
        if repeats > 1:  # each run in a fresh process: the spread sees the processes' levels
            results = merge_repeats(measure_in_fresh_processes(cells, repeats, args))
        else:
            results = measure(cells, settings, implementations, progress=not args.no_progress)
        wall = time.perf_counter() - started
        info = environment.describe(args.device, settings.threads)
        measured = Baseline(
            results, info, dict(settings.as_dict(), wall_s=round(wall, 1), repeats=repeats)
        )
        if args.save:
            write_baseline(args.save, measured)
            print(f"regress: wrote this run to {args.save}")

        decisions: list[Decision] = []
        if baseline is not None:
            for note in environment_notes(baseline, info, settings.as_dict()):
                print(note)
            thresholds = Thresholds(
                time=args.threshold,
                counters=args.counter_threshold,
                alpha=args.alpha,
                gate_time=not args.no_time and times_comparable(baseline, info),
                gate_counters=counters_comparable(baseline, info),
            )
            decisions = decide(baseline.cells, results, thresholds)
            for attempt in range(1, args.confirm + 1):
                suspects = {d.key for d in regressions(decisions) if d.metric in ("time", "status")}
                if not suspects or args.update_baseline:
                    break
                print(
                    f"regress: {len(suspects)} cells look slower or failed; measuring them "
                    f"again ({attempt}/{args.confirm})",
                    flush=True,
                )
                again = [
                    c
                    for c in cells
                    if (c.case.name, c.implementation, c.quantity, c.batch_size) in suspects
                ]
                remeasured = measure(
                    again, settings, implementations, progress=not args.no_progress
                )
                decisions = confirm(decisions, decide(baseline.cells, remeasured, thresholds))
            if not args.update_baseline and not args.no_against_commit:
                decisions = against_baseline_commit(decisions, baseline, thresholds, args)
    wall = time.perf_counter() - started
    if baseline is not None:
        shown = [d for d in decisions if args.verbose or d.verdict in (REGRESSION, IMPROVEMENT)]
        shown += [d for d in decisions if d.note.startswith(NOT_CONFIRMED) and d not in shown]
        if shown:
            print(format_table(shown))
        quiet = [d for d in decisions if d.verdict == NOT_GATED and d.metric == "status"]
        if quiet and not args.verbose:
            print(format_not_gated(quiet))
        commands = reproduce(decisions, _injection_arguments(args))
        if commands:
            print("reproduce each regressed cell alone with:")
            print("\n".join(f"  {c}" for c in commands))
        print(summary(decisions, thresholds) + f" ({wall:.0f} s)")
    if args.update_baseline:
        write_baseline(path, measured)
        spreads = sorted(c.spread for c in results if c.spread is not None)
        if spreads:
            print(
                f"regress: run-to-run spread of the cells' time ratios over {repeats} runs: "
                f"median x{spreads[len(spreads) // 2]:.3f}, largest x{spreads[-1]:.3f}"
            )
        print(f"regress: wrote the baseline {path} ({len(results)} cells, {wall:.0f} s)")
        return 0
    return 1 if regressions(decisions) else 0
