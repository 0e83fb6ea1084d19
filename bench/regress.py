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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

#: the gate's cells: cases, batch sizes, and the implementations gated at the smallest size only
GATE_CASES = ("mlp_mnist", "cnn_cifar", "transformer_t64", "lstm")
GATE_BATCH_SIZES = (16, 64)
#: per-example loops (one backward per example, vmap over examples, Opacus's materialised
#: per-sample gradients): at B=64 a call of the MLP takes ~0.2 s and a cell seconds, so they are
#: gated at the smallest batch size only; a regression in them shows there as well
SLOW_IMPLEMENTATIONS = ("naive", "vmap", "opacus")

DEFAULT_THRESHOLD = 0.25
DEFAULT_MEMORY_THRESHOLD = 0.25
DEFAULT_ALPHA = 0.01
#: a memory regression must also add at least this many bytes (at the baseline's plain peak)
MEMORY_FLOOR_BYTES = 2**20

#: gate timing settings: 1 thread (2 threads on a shared 2-core machine gave 100x outliers),
#: 6 interleaved rounds (so that the rank test can reach p = 1/924 on 6 against 6), short rounds.
#: The oracle check stays on: it is each group's first call, so one-time costs (vmap's lazy
#: imports, ~2 s) land there instead of in the probe, where they would cut the rounds
GATE_THREADS, GATE_ROUNDS, GATE_MIN_RUN_TIME, GATE_BUDGET_S = 1, 6, 0.05, 10.0

BASELINE_FORMAT = "pegbench-regress-baseline/1"
UPDATE_COMMAND = "python -m bench regress --update-baseline"


def default_baseline(device: str = "cpu") -> Path:
    return Path("results") / f"baseline-{torch.device(device).type}.json"


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
    if not name or not number >= least:
        raise ValueError(f"{option} takes IMPL=NUMBER (a number >= {least:g}), got {text!r}")
    return name, number


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellResult:
    """One gate cell as measured (a run) or committed (the baseline).

    ``ratio``: median call time / median plain-step time; ``ratio_samples``: the same per
    interleaved round; ``memory_ratio``: peak bytes of a call / peak bytes of the plain step.
    Times in seconds, memory in bytes; None where not measured.
    """

    case: str
    implementation: str
    quantity: str
    batch_size: int
    status: str
    reason: str = ""
    ratio: float | None = None
    ratio_samples: tuple[float, ...] = ()
    memory_ratio: float | None = None
    memory_peak_bytes: int | None = None
    plain_peak_bytes: int | None = None
    time_median_s: float | None = None
    plain_median_s: float | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.case, self.implementation, self.quantity, self.batch_size)

    @property
    def label(self) -> str:
        return f"{self.implementation} {self.case} B={self.batch_size} {self.quantity}"

    def to_json(self) -> dict:
        data = asdict(self)
        data["ratio_samples"] = [float(f"{x:.6g}") for x in self.ratio_samples]
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> CellResult:
        data = dict(data)
        data["ratio_samples"] = tuple(float(x) for x in data.get("ratio_samples", ()))
        data["batch_size"] = int(data["batch_size"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_row(cls, row: Mapping) -> CellResult:
        """From a row of ``bench.sweep.Sweep.measure``."""

        def number(name, kind=float):
            value = row.get(name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                return None
            return None if math.isnan(value) else kind(value)

        return cls(
            case=str(row["case"]),
            implementation=str(row["implementation"]),
            quantity=str(row["quantity"]),
            batch_size=int(row["batch_size"]),
            status=str(row["status"]),
            reason=str(row.get("reason") or ""),
            ratio=number("ratio"),
            ratio_samples=tuple(float(x) for x in row.get("round_ratios", ()) or ()),
            memory_ratio=number("memory_ratio"),
            memory_peak_bytes=number("memory_peak_bytes", int),
            plain_peak_bytes=number("plain_peak_bytes", int),
            time_median_s=number("time_median_s"),
            plain_median_s=number("plain_median_s"),
        )


@dataclass
class Baseline:
    """The committed reference: cells plus the environment and settings they were measured in."""

    cells: list[CellResult]
    environment: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def by_key(self) -> dict[tuple, CellResult]:
        return {c.key: c for c in self.cells}

    def to_json(self) -> dict:
        return {
            "format": BASELINE_FORMAT,
            "regenerate_with": UPDATE_COMMAND,
            "environment": self.environment,
            "settings": self.settings,
            "cells": [c.to_json() for c in self.cells],
        }


class BaselineError(Exception):
    """A baseline file that is missing or unreadable (one line, for the command line)."""


def load_baseline(path: Path) -> Baseline:
    path = Path(path)
    if not path.exists():
        raise BaselineError(f"no baseline at {path}: create one with {UPDATE_COMMAND}")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != BASELINE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {BASELINE_FORMAT!r}")
        cells = [CellResult.from_json(c) for c in data["cells"]]
    except (ValueError, KeyError, TypeError) as error:
        raise BaselineError(
            f"baseline {path} is unreadable ({error}): regenerate it with {UPDATE_COMMAND}"
        ) from error
    return Baseline(cells, data.get("environment", {}), data.get("settings", {}))


def write_baseline(path: Path, baseline: Baseline) -> None:
    from bench.store import write_atomically

    write_atomically(Path(path), json.dumps(baseline.to_json(), indent=1, default=str) + "\n")


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


# -- deciding ------------------------------------------------------------------------------------

REGRESSION, IMPROVEMENT, UNCHANGED, NOT_GATED = "REGRESSION", "improvement", "ok", "not gated"


@dataclass(frozen=True)
class Thresholds:
    """``time``/``memory``: relative worsening of a ratio that counts (0.25 = 1.25x);
    ``alpha``: the rank test's one-sided significance level."""

    time: float = DEFAULT_THRESHOLD
    memory: float = DEFAULT_MEMORY_THRESHOLD
    alpha: float = DEFAULT_ALPHA


@dataclass(frozen=True)
class Decision:
    """The verdict on one cell and one metric ("time", "memory" or "status")."""

    key: tuple[str, str, str, int]
    metric: str
    verdict: str  # REGRESSION | improvement | ok | not gated
    baseline: float | None = None  # the baseline's ratio (time, memory)
    run: float | None = None  # this run's ratio
    p_value: float | None = None
    note: str = ""

    @property
    def change(self) -> float | None:
        """run / baseline: 2.0 means twice the baseline's ratio."""
        if self.baseline is None or self.run is None or self.baseline <= 0:
            return None
        return self.run / self.baseline


def smallest_p_value(n_run: int, n_baseline: int) -> float:
    """The smallest one-sided p-value an exact Mann-Whitney test of these sizes can give."""
    if n_run < 1 or n_baseline < 1:
        return 1.0
    return 1.0 / math.comb(n_run + n_baseline, n_run)


def rank_test(run: Sequence[float], baseline: Sequence[float], alternative: str) -> float | None:
    """One-sided Mann-Whitney p-value that ``run`` is "greater"/"less" than ``baseline``;
    None when either side has no samples."""
    if not run or not baseline:
        return None
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(run, baseline, alternative=alternative).pvalue)


def _time_decision(base: CellResult, run: CellResult, thresholds: Thresholds) -> Decision:
    if base.ratio is None or run.ratio is None:
        return Decision(run.key, "time", NOT_GATED, base.ratio, run.ratio, note="no time ratio")
    change = run.ratio / base.ratio
    factor = 1 + thresholds.time
    if 1 / factor <= change <= factor:
        return Decision(run.key, "time", UNCHANGED, base.ratio, run.ratio)
    worse = change > factor
    verdict = REGRESSION if worse else IMPROVEMENT
    alternative = "greater" if worse else "less"
    p = rank_test(run.ratio_samples, base.ratio_samples, alternative)
    reachable = smallest_p_value(len(run.ratio_samples), len(base.ratio_samples))
    if p is None or reachable > thresholds.alpha:
        note = (
            f"{len(run.ratio_samples)} vs {len(base.ratio_samples)} rounds: too few for the "
            f"rank test to reach p <= {thresholds.alpha:g}; the threshold decides"
        )
        return Decision(run.key, "time", verdict, base.ratio, run.ratio, p, note)
    if p <= thresholds.alpha:
        return Decision(run.key, "time", verdict, base.ratio, run.ratio, p)
    note = f"beyond the threshold but the rank test disagrees (p={p:.2g} > {thresholds.alpha:g})"
    return Decision(run.key, "time", UNCHANGED, base.ratio, run.ratio, p, note)


def _memory_decision(base: CellResult, run: CellResult, thresholds: Thresholds) -> Decision:
    if base.memory_ratio is None or run.memory_ratio is None:
        return Decision(
            run.key, "memory", NOT_GATED, base.memory_ratio, run.memory_ratio, note="no memory"
        )
    change = run.memory_ratio / base.memory_ratio if base.memory_ratio > 0 else math.inf
    plain = base.plain_peak_bytes or run.plain_peak_bytes or 0
    grown = abs(run.memory_ratio - base.memory_ratio) * plain
    factor = 1 + thresholds.memory
    if 1 / factor <= change <= factor or grown <= MEMORY_FLOOR_BYTES:
        return Decision(run.key, "memory", UNCHANGED, base.memory_ratio, run.memory_ratio)
    verdict = REGRESSION if change > factor else IMPROVEMENT
    note = f"{'+' if change > 1 else '-'}{grown / 2**20:.3g} MiB at the baseline's plain peak"
    return Decision(run.key, "memory", verdict, base.memory_ratio, run.memory_ratio, note=note)


def decide(
    baseline: Sequence[CellResult],
    run: Sequence[CellResult],
    thresholds: Thresholds = Thresholds(),
) -> list[Decision]:
    """Every cell of the run judged against the baseline (cells only in the baseline are left
    out: the run did not ask for them)."""
    reference = {c.key: c for c in baseline}
    decisions = []
    for cell in run:
        base = reference.get(cell.key)
        if base is None:
            decisions.append(
                Decision(cell.key, "status", NOT_GATED, note=f"new cell ({cell.status})")
            )
        elif base.status == "ok" and cell.status != "ok":
            decisions.append(
                Decision(
                    cell.key,
                    "status",
                    REGRESSION,
                    base.ratio,
                    note=f"ok in the baseline, now {cell.status}: {cell.reason}".rstrip(": "),
                )
            )
        elif base.status != "ok" and cell.status == "ok":
            decisions.append(
                Decision(
                    cell.key,
                    "status",
                    IMPROVEMENT,
                    run=cell.ratio,
                    note=f"{base.status} in the baseline, now ok",
                )
            )
        elif cell.status != "ok":
            note = cell.status if cell.status == base.status else f"{base.status} -> {cell.status}"
            decisions.append(Decision(cell.key, "status", NOT_GATED, note=note))
        else:
            decisions.append(_time_decision(base, cell, thresholds))
            decisions.append(_memory_decision(base, cell, thresholds))
    return decisions


def regressions(decisions: Sequence[Decision]) -> list[Decision]:
    return [d for d in decisions if d.verdict == REGRESSION]


NOT_CONFIRMED = "not confirmed"


def confirm(first: Sequence[Decision], second: Sequence[Decision]) -> list[Decision]:
    """``first`` with each regression kept only if ``second`` (the same cells measured again,
    judged against the same baseline) regresses again: on the same metric, or on any metric
    when either is a status regression (a cell that timed out once and was 10x slower the next
    time). Otherwise it becomes "ok" with a note. A burst of load on a shared machine spans a
    whole cell (a second or so), so one cell can look 2.5x slower; it rarely does so twice."""
    confirmed = []
    for d in first:
        if d.verdict != REGRESSION:
            confirmed.append(d)
            continue
        same_cell = [o for o in second if o.key == d.key]
        repeated = [
            o
            for o in same_cell
            if o.verdict == REGRESSION
            and (o.metric == d.metric or "status" in (o.metric, d.metric))
        ]
        if repeated:
            seen = _seen(repeated[0])
            note = "; ".join(n for n in (d.note, f"confirmed: measured again, {seen}") if n)
            confirmed.append(replace(d, note=note))
            continue
        other = next((o for o in same_cell if o.metric == d.metric), None)
        other = other or next((o for o in same_cell if o.metric == "time"), None)
        seen = "not measured" if other is None else _seen(other)
        confirmed.append(
            replace(d, verdict=UNCHANGED, note=f"{NOT_CONFIRMED}: measured again, {seen}")
        )
    return confirmed


def _seen(decision: Decision) -> str:
    if decision.change is not None:
        return f"x{decision.change:.2f}"
    return decision.note or decision.verdict


# -- printing ------------------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"


def format_table(decisions: Sequence[Decision]) -> str:
    """A plain-text table of decisions (verdict, cell, metric, ratios, change, p, note)."""
    header = ("verdict", "implementation", "case", "B", "quantity", "metric", "baseline", "now")
    header += ("change", "p", "note")
    rows = [header]
    for d in decisions:
        case, implementation, quantity, batch_size = d.key
        change = d.change
        rows.append(
            (
                d.verdict,
                implementation,
                case,
                str(batch_size),
                quantity,
                d.metric,
                _ratio(d.baseline),
                _ratio(d.run),
                "-" if change is None else f"x{change:.2f}",
                "-" if d.p_value is None else f"{d.p_value:.2g}",
                d.note,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        cells = [text.ljust(width) for text, width in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ----")
    return "\n".join(lines)


def format_not_gated(decisions: Sequence[Decision]) -> str:
    """Cells not gated, one line per (implementation, case, why)."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for d in decisions:
        case, implementation, quantity, batch_size = d.key
        groups.setdefault((implementation, case, d.note), []).append(f"B={batch_size} {quantity}")
    lines = [f"not gated ({len(decisions)} cells: not ok on both sides, or new):"]
    for (implementation, case, note), cells in groups.items():
        lines.append(f"  {implementation} {case}: {note} ({', '.join(cells)})")
    return "\n".join(lines)


def summary(decisions: Sequence[Decision], thresholds: Thresholds) -> str:
    cells = {d.key for d in decisions}
    gated = {d.key for d in decisions if d.metric in ("time", "memory")}
    not_gated = {d.key for d in decisions if d.verdict == NOT_GATED and d.metric == "status"}
    bad = regressions(decisions)
    better = [d for d in decisions if d.verdict == IMPROVEMENT]
    verdict = "FAIL" if bad else "PASS"
    return (
        f"regress: {verdict}: {len(cells)} cells, {len(gated)} gated on time and memory "
        f"(threshold {thresholds.time:g} = {1 + thresholds.time:.3g}x the baseline's time "
        f"ratio with a rank test at p <= {thresholds.alpha:g}; memory {thresholds.memory:g}), "
        f"{len(not_gated)} not gated; {len(bad)} regressions, {len(better)} improvements"
    )


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
        type=float,
        default=DEFAULT_THRESHOLD,
        help="relative worsening of a time ratio that counts as a regression "
        f"(default {DEFAULT_THRESHOLD:g}: 1.25x the baseline's ratio; 1.0: 2x)",
    )
    parser.add_argument(
        "--memory-threshold",
        type=float,
        default=DEFAULT_MEMORY_THRESHOLD,
        help="the same for the memory ratio (default %(default)g; plus an absolute floor of "
        f"{MEMORY_FLOOR_BYTES // 2**20} MiB)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
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
        type=int,
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
    parser.add_argument(
        "--impls",
        "--implementations",
        dest="impls",
        nargs="+",
        default=None,
        help="default: every registered implementation",
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, default=list(GATE_BATCH_SIZES), help="%(default)s"
    )
    parser.add_argument("--threads", type=int, default=GATE_THREADS, help="default %(default)s")
    parser.add_argument("--rounds", type=int, default=GATE_ROUNDS, help="default %(default)s")
    parser.add_argument(
        "--min-run-time", type=float, default=GATE_MIN_RUN_TIME, help="default %(default)s s"
    )
    parser.add_argument(
        "--budget", type=float, default=GATE_BUDGET_S, help="seconds per cell (default %(default)s)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print every cell's decision, not only changes"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _error(message: str) -> int:
    print(f"regress: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """The ``regress`` command: exit 1 on a regression, 0 otherwise, 2 on bad arguments."""
    import impls
    from bench import environment
    from bench.cases import BY_NAME

    known = impls.names()
    for name in args.impls or []:
        if name not in known:
            return _error(f"unknown implementation '{name}'; known: {', '.join(known)}")
    for name in args.cases:
        if name not in BY_NAME:
            return _error(f"unknown bench case '{name}'; known: {', '.join(BY_NAME)}")
    if min(args.threshold, args.memory_threshold, args.confirm) < 0 or not 0 < args.alpha <= 1:
        return _error("thresholds and --confirm must be >= 0, --alpha in (0, 1]")
    if any(b < 1 for b in args.batch_sizes):
        return _error(f"batch sizes must be at least 1, got {args.batch_sizes}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        return _error(f"device '{args.device}' asked for, but CUDA is not available")
    try:
        slowdowns = dict(parse_injection(t) for t in args.inject_slowdown)
        extra_mib = dict(parse_injection(t, "--inject-memory", 0) for t in args.inject_memory)
    except ValueError as error:
        return _error(str(error))
    for name in [*slowdowns, *extra_mib]:
        if name not in known:
            return _error(f"--inject-slowdown/--inject-memory: unknown implementation '{name}'")
    if (slowdowns or extra_mib) and args.update_baseline:
        return _error("an injection with --update-baseline would write a slowed-down baseline")
    path = args.baseline or default_baseline(args.device)
    baseline = None
    try:
        baseline = load_baseline(path)
    except BaselineError as error:
        if not args.update_baseline:
            return _error(str(error))
    thresholds = Thresholds(args.threshold, args.memory_threshold, args.alpha)

    settings = gate_settings(args.threads, args.rounds, args.min_run_time, args.budget)
    cells = gate_cells(args.cases, args.impls, args.batch_sizes, args.device)
    implementations = {
        n: Injected(impls.get(n), slowdowns.get(n, 1.0), int(extra_mib.get(n, 0) * 2**20))
        for n in {*slowdowns, *extra_mib}
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
            again = [c for c in cells if c.key[1:] in suspects]
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
