"""The regression gate's decisions: pure functions of measured cells, no files, no measuring.

A cell of a run is judged against the same cell of the baseline (``decide``) on two kinds of
evidence:

- **counters** (``COUNTERS``): FLOPs, aten operators dispatched, bytes allocated and peak bytes
  of one call. They do not depend on the machine's load, so they are held tightly: a counter
  regresses when it grew by more than ``Thresholds.counters`` (0.05: 5%) and, for the byte
  counters, by more than ``MEMORY_FLOOR_BYTES`` (allocator slack). Counters are compared only
  when the baseline was measured with the same torch build (``counters_comparable``); another
  build dispatches other operators;
- **time**: the cell's time ratio to the plain step (CPU time, interleaved) is worse than the
  baseline's by more than the cell's own threshold, set from the run-to-run spread measured
  when the baseline was written (``time_threshold``: ``SPREAD_MARGIN`` times the spread, at
  least ``MIN_TIME_THRESHOLD``; the spread is the largest among the cells of the same
  implementation on the same case, ``group_spreads``), *and* a one-sided Mann-Whitney rank
  test of this run's per-round ratios against the baseline's agrees (p <= ``alpha``); with
  too few rounds for the test to reach ``alpha`` at all, the threshold alone decides;
- status: ok in the baseline and now unsupported, failing, timed out, out of memory or skipped.

Improvements are found the same way in the other direction. ``confirm`` keeps a time or status
regression only when a second measurement of the cell regresses again (counters are
deterministic: not measured again). ``merge_repeats`` turns several runs into a baseline with
per-cell spreads and thresholds. ``format_table``, ``reproduce``, ``format_not_gated`` and
``summary`` turn decisions into text. The command line is ``bench.regress``; the baseline file
``bench.baseline``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from correctness.cli import text_table

#: a time ratio's allowed worsening where the baseline has no per-cell threshold
DEFAULT_THRESHOLD = 0.25
#: per-cell time thresholds: SPREAD_MARGIN x the measured run-to-run spread, at least this
MIN_TIME_THRESHOLD, SPREAD_MARGIN = 0.20, 3.0
#: relative growth of a counter that counts (deterministic counts: a few percent)
DEFAULT_COUNTER_THRESHOLD = 0.05
DEFAULT_ALPHA = 0.01
#: a byte counter must also grow by more than this many bytes (allocator and interpreter slack):
#: two of CPython's 1 MiB object arenas, which memray counts as mmaps. A call that happens to map
#: a new one reads 1 MiB more: unchanged code (function, mlp_mnist B=16 Gram, 0.29 MiB) once
#: read +1,050,424 bytes in CI, past a floor of one arena
MEMORY_FLOOR_BYTES = 2 * 2**20
#: (metric name, CellResult field, absolute floor) of every gated counter
COUNTERS = (
    ("flops", "flops", 0),
    ("aten ops", "aten_ops", 0),
    ("bytes allocated", "allocated_bytes", MEMORY_FLOOR_BYTES),
    ("peak bytes", "memory_peak_bytes", MEMORY_FLOOR_BYTES),
)
COUNTERS_BY_NAME = {name: (field, floor) for name, field, floor in COUNTERS}


@dataclass(frozen=True)
class CellResult:
    """One gate cell as measured (a run) or committed (the baseline).

    ``ratio``: median call time / median plain-step time; ``ratio_samples``: the same per
    interleaved round; ``memory_ratio``: peak bytes of a call / peak bytes of the plain step;
    ``flops``, ``aten_ops``, ``allocated_bytes``: the counters of one call (``counts_note`` says
    why they are missing). In a baseline written from several runs, ``ratio`` is the median of
    the runs' ratios, ``ratio_samples`` all their rounds and ``spread`` the largest run's ratio
    over the smallest's, from which the cell's time threshold follows (``time_threshold``).
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
    flops: int | None = None
    aten_ops: int | None = None
    allocated_bytes: int | None = None
    counts_note: str = ""
    spread: float | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.case, self.implementation, self.quantity, self.batch_size)

    @property
    def label(self) -> str:
        return f"{self.implementation} {self.case} B={self.batch_size} {self.quantity}"

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
            flops=number("flops", int),
            aten_ops=number("aten_ops", int),
            allocated_bytes=number("allocated_bytes", int),
            counts_note=str(row.get("counts_note") or ""),
        )


REGRESSION, IMPROVEMENT, UNCHANGED, NOT_GATED = "REGRESSION", "improvement", "ok", "not gated"


@dataclass(frozen=True)
class Thresholds:
    """``time``: relative worsening of a time ratio that counts (0.25 = 1.25x) for every cell;
    None: each cell's own ``time_threshold(spread)`` from the baseline (``DEFAULT_THRESHOLD``
    where it has no spread). ``counters``: relative growth of a counter that counts.
    ``alpha``: the rank test's one-sided level. ``gate_time``/``gate_counters``: False leaves
    that kind ungated (``--no-time``; counters of another torch build)."""

    time: float | None = None
    counters: float = DEFAULT_COUNTER_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    gate_time: bool = True
    gate_counters: bool = True

    def time_for(self, base: CellResult, spread: float | None = None) -> float:
        """The time threshold for a baseline cell; ``spread``: the one to use (its group's,
        ``group_spreads``), default the cell's own."""
        if self.time is not None:
            return self.time
        return time_threshold(base.spread if spread is None else spread)


@dataclass(frozen=True)
class Decision:
    """The verdict on one cell and one metric ("time", "memory" or "status")."""

    key: tuple[str, str, str, int]
    metric: str  # "time", "status" or a counter's name (COUNTERS)
    verdict: str  # REGRESSION | improvement | ok | not gated
    baseline: float | None = None  # the baseline's time ratio or counter
    run: float | None = None  # this run's
    p_value: float | None = None
    note: str = ""
    threshold: float | None = None  # the relative change that counted

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


def time_threshold(spread: float | None) -> float:
    """A cell's time threshold from its run-to-run spread (largest ratio / smallest)."""
    if spread is None or not math.isfinite(spread):
        return DEFAULT_THRESHOLD
    return max(MIN_TIME_THRESHOLD, SPREAD_MARGIN * (spread - 1))


def group_spreads(baseline: Sequence[CellResult]) -> dict[tuple[str, str], float]:
    """(case, implementation) -> the largest run-to-run spread among its cells (both
    quantities, every batch size). Noise is a property of an implementation on a model, and
    three runs rarely see every mode of one cell: measured, vmap on the LSTM switched between
    ~21x and ~29x a plain step from run to run; its norms cell saw both modes in the baseline's
    three runs (spread x1.44), its Gram cell only the low one (x1.07), and a later run in the
    high mode failed the Gram cell at x1.26."""
    spreads: dict[tuple[str, str], float] = {}
    for cell in baseline:
        if cell.spread is not None and math.isfinite(cell.spread):
            key = (cell.case, cell.implementation)
            spreads[key] = max(spreads.get(key, 1.0), cell.spread)
    return spreads


def _time_decision(
    base: CellResult, run: CellResult, thresholds: Thresholds, spread: float | None = None
) -> Decision:
    limit = thresholds.time_for(base, spread)
    if not thresholds.gate_time:
        return Decision(run.key, "time", NOT_GATED, base.ratio, run.ratio, note="time not gated")
    if base.ratio is None or run.ratio is None:
        return Decision(run.key, "time", NOT_GATED, base.ratio, run.ratio, note="no time ratio")
    change = run.ratio / base.ratio
    factor = 1 + limit
    if 1 / factor <= change <= factor:
        return Decision(run.key, "time", UNCHANGED, base.ratio, run.ratio, threshold=limit)
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
        return Decision(run.key, "time", verdict, base.ratio, run.ratio, p, note, limit)
    if p <= thresholds.alpha:
        return Decision(run.key, "time", verdict, base.ratio, run.ratio, p, threshold=limit)
    note = f"beyond the threshold but the rank test disagrees (p={p:.2g} > {thresholds.alpha:g})"
    return Decision(run.key, "time", UNCHANGED, base.ratio, run.ratio, p, note, limit)


def _counter_decisions(base: CellResult, run: CellResult, thresholds: Thresholds) -> list:
    if not thresholds.gate_counters:
        return [Decision(run.key, "counters", NOT_GATED, note="counters not comparable")]
    decisions = []
    for metric, field_name, floor in COUNTERS:
        old, new = getattr(base, field_name), getattr(run, field_name)
        if old is None or new is None:
            why = run.counts_note or base.counts_note or "not counted"
            decisions.append(Decision(run.key, metric, NOT_GATED, old, new, note=why))
            continue
        factor = 1 + thresholds.counters
        grown, shrunk = new > old * factor, new * factor < old
        if (grown or shrunk) and abs(new - old) > floor:
            verdict = REGRESSION if grown else IMPROVEMENT
            note = f"{new - old:+,d}" + (" bytes" if floor else "")
        else:
            verdict, note = UNCHANGED, ""
        decisions.append(
            Decision(run.key, metric, verdict, old, new, note=note, threshold=thresholds.counters)
        )
    return decisions


def decide(
    baseline: Sequence[CellResult],
    run: Sequence[CellResult],
    thresholds: Thresholds = Thresholds(),
    spreads: Mapping[tuple[str, str], float] | None = None,
) -> list[Decision]:
    """Every cell of the run judged against the baseline (cells only in the baseline are left
    out: the run did not ask for them). ``spreads``: (case, implementation) -> the spread that
    sets the time thresholds, default ``group_spreads(baseline)`` (a baseline of one run, such as
    the baseline's commit measured here, takes the committed baseline's)."""
    reference = {c.key: c for c in baseline}
    spreads = group_spreads(baseline) if spreads is None else spreads
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
            spread = spreads.get((base.case, base.implementation), base.spread)
            decisions.append(_time_decision(base, cell, thresholds, spread))
            decisions.extend(_counter_decisions(base, cell, thresholds))
    return decisions


def regressions(decisions: Sequence[Decision]) -> list[Decision]:
    return [d for d in decisions if d.verdict == REGRESSION]


NOT_CONFIRMED = "not confirmed"


def confirm(
    first: Sequence[Decision], second: Sequence[Decision], how: str = "measured again"
) -> list[Decision]:
    """``first`` with each time or status regression kept only if ``second`` (the same cells
    measured again, judged against the same baseline, or against the baseline's commit measured
    here: ``how`` says which in the notes) regresses again: on the same metric, or
    on any metric when either is a status regression (a cell that timed out once and was 10x
    slower the next time). Otherwise it becomes "ok" with a note. A burst of load on a shared
    machine spans a whole cell (a second or so), so one cell can look 2.5x slower; it rarely
    does so twice. Counter regressions stand as they are: counters are deterministic."""
    confirmed = []
    for d in first:
        if d.verdict != REGRESSION or d.metric not in ("time", "status"):
            confirmed.append(d)
            continue
        same_cell = [o for o in second if o.key == d.key]
        repeated = [
            o
            for o in same_cell
            if o.verdict == REGRESSION
            and (o.metric == d.metric or (o.metric == "status" or d.metric == "status"))
            and o.metric in ("time", "status")
        ]
        if repeated:
            seen = _seen(repeated[0])
            note = "; ".join(n for n in (d.note, f"confirmed: {how}, {seen}") if n)
            confirmed.append(replace(d, note=note))
            continue
        other = next((o for o in same_cell if o.metric == d.metric), None)
        other = other or next((o for o in same_cell if o.metric == "time"), None)
        seen = "not measured" if other is None else _seen(other)
        confirmed.append(replace(d, verdict=UNCHANGED, note=f"{NOT_CONFIRMED}: {how}, {seen}"))
    return confirmed


def _seen(decision: Decision) -> str:
    if decision.change is not None:
        return f"x{decision.change:.2f}"
    return decision.note or decision.verdict


# -- a baseline from several runs ------------------------------------------------------------


def merge_repeats(
    runs: Sequence[Sequence[CellResult]], centre: Callable = statistics.median
) -> list[CellResult]:
    """One baseline from several runs of the same cells: per cell the ``centre`` (median) of the
    runs' ratios, all their rounds (for the rank test) and the run-to-run ``spread`` (largest
    ratio over smallest, which sets the cell's time threshold); counters and memory from the
    median run.
    A cell not ok in every run keeps the first run's failing row (it is not gated)."""
    by_key: dict[tuple, list[CellResult]] = {}
    for run in runs:
        for cell in run:
            by_key.setdefault(cell.key, []).append(cell)
    merged = []
    for cells in by_key.values():
        failing = [c for c in cells if c.status != "ok" or c.ratio is None]
        if failing or len(cells) < len(runs):
            first = failing[0] if failing else cells[0]
            note = f"ok in {len(cells) - len(failing)} of {len(runs)} runs"
            merged.append(replace(first, reason="; ".join(r for r in (first.reason, note) if r)))
            continue
        ratios = [c.ratio for c in cells]
        middle = sorted(cells, key=lambda c: c.ratio)[(len(cells) - 1) // 2]
        spread = max(ratios) / min(ratios) if len(cells) > 1 else None
        merged.append(
            replace(
                middle,
                ratio=centre(ratios),
                ratio_samples=tuple(x for c in cells for x in c.ratio_samples),
                spread=spread,
            )
        )
    return merged


# -- text --------------------------------------------------------------------------------------


def _value(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "time":
        return f"{value:.3g}x"
    if "bytes" in metric:
        return f"{value / 2**20:.4g} MiB"
    return f"{value:,.0f}"


def format_table(decisions: Sequence[Decision]) -> str:
    """A plain-text table of decisions (verdict, cell, metric, values, change, threshold, p,
    note). Time values are ratios to the plain step; counters are counts or MiB."""
    header = ("verdict", "implementation", "case", "B", "quantity", "metric", "baseline", "now")
    header += ("change", "threshold", "p", "note")
    rows = []
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
                _value(d.metric, d.baseline),
                _value(d.metric, d.run),
                "-" if change is None else f"x{change:.3f}",
                "-" if d.threshold is None else f"x{1 + d.threshold:.3g}",
                "-" if d.p_value is None else f"{d.p_value:.2g}",
                d.note,
            )
        )
    return text_table(header, rows)


def reproduce(decisions: Sequence[Decision], extra: Sequence[str] = ()) -> list[str]:
    """For each regressed cell, the command that measures it alone against the same baseline
    (``extra``: the run's own options that change what is measured, e.g. an injection)."""
    commands = []
    for d in decisions:
        if d.verdict != REGRESSION:
            continue
        case, implementation, quantity, batch_size = d.key
        command = " ".join(
            [
                "python -m bench regress --cases", case, "--impls", implementation,
                "--batch-sizes", str(batch_size), "--quantities", quantity, *extra,
            ]
        )  # fmt: skip
        if command not in commands:
            commands.append(command)
    return commands


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
    timed = {d.key for d in decisions if d.metric == "time" and d.verdict != NOT_GATED}
    counted = {d.key for d in decisions if d.metric in COUNTERS_BY_NAME and d.verdict != NOT_GATED}
    not_gated = {d.key for d in decisions if d.verdict == NOT_GATED and d.metric == "status"}
    bad = regressions(decisions)
    better = [d for d in decisions if d.verdict == IMPROVEMENT]
    verdict = "FAIL" if bad else "PASS"
    if not thresholds.gate_time:
        time = "time not gated"
    elif thresholds.time is None:
        limits = [d.threshold for d in decisions if d.metric == "time" and d.threshold]
        span = f" x{1 + min(limits):.3g}-x{1 + max(limits):.3g}" if limits else ""
        time = f"time: each cell's own threshold{span} and a rank test at p <= {thresholds.alpha:g}"
    else:
        time = f"time: x{1 + thresholds.time:.3g} and a rank test at p <= {thresholds.alpha:g}"
    return (
        f"regress: {verdict}: {len(cells)} cells; {len(counted)} gated on counters "
        f"(x{1 + thresholds.counters:.3g}), {len(timed)} on time ({time}); "
        f"{len(not_gated)} not gated; {len(bad)} regressions, {len(better)} improvements"
    )
