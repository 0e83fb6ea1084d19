"""The regression gate's decisions: pure functions of measured cells, no files, no measuring.

A cell of a run is judged against the same cell of the baseline (``decide``), per metric:

- time: its ratio to the plain step is worse than the baseline's by more than
  ``Thresholds.time`` (0.25: 1.25x) *and* a one-sided Mann-Whitney rank test of this run's
  per-round ratios against the baseline's agrees (p <= ``alpha``); with too few rounds for the
  test to reach ``alpha`` at all, the threshold alone decides;
- memory: its memory ratio is worse by more than ``Thresholds.memory`` and the peak grew by more
  than ``MEMORY_FLOOR_BYTES`` at the baseline's plain peak;
- status: ok in the baseline and now unsupported, failing, timed out, out of memory or skipped.

Improvements are found the same way in the other direction. ``confirm`` keeps a regression only
when a second measurement of the cell regresses again. ``format_table``, ``format_not_gated``
and ``summary`` turn decisions into text. The command line is ``bench.regress``; the baseline
file ``bench.baseline``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from bench.cli import text_table

DEFAULT_THRESHOLD = 0.25
DEFAULT_MEMORY_THRESHOLD = 0.25
DEFAULT_ALPHA = 0.01
#: a memory regression must also add at least this many bytes (at the baseline's plain peak)
MEMORY_FLOOR_BYTES = 2**20


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


# -- text --------------------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"


def format_table(decisions: Sequence[Decision]) -> str:
    """A plain-text table of decisions (verdict, cell, metric, ratios, change, p, note)."""
    header = ("verdict", "implementation", "case", "B", "quantity", "metric", "baseline", "now")
    header += ("change", "p", "note")
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
                _ratio(d.baseline),
                _ratio(d.run),
                "-" if change is None else f"x{change:.2f}",
                "-" if d.p_value is None else f"{d.p_value:.2g}",
                d.note,
            )
        )
    return text_table(header, rows)


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
