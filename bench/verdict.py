"""The verdict of ``bench.compare`` as text, from its table (one row per implementation x
quantity x batch size, the columns of ``bench.store.COLUMNS``).

- ``agreement_table``: per implementation, norms and Gram against the float64 oracle;
- ``verdict``: at one batch size, a table of correctness, time and memory, the refusals, the
  fastest and the smallest memory, and the recommendation;
- ``recommend`` / ``recommendation``: the implementation to adopt at one batch size (the
  correct one with the least geometric mean of its norms and Gram time ratios) and why.

Only rows whose oracle check is ``ok`` can be fastest, smallest or recommended.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from bench.floor import FLOOR
from bench.report import fastest, format_bytes, format_seconds
from correctness.cli import text_table


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _index(rows: Sequence[Mapping]) -> dict[tuple, Mapping]:
    return {(r["implementation"], r["quantity"], int(r["batch_size"])): r for r in rows}


def _check_text(row: Mapping) -> str:
    status = row.get("correct", "")
    error = _number(row.get("check_error"))
    if status == "ok":
        return f"ok ({error:.1e})" if error is not None else "ok"
    if status == "WRONG":
        return f"WRONG ({error:.1e})" if error is not None else "WRONG"
    return status


def _reason(row: Mapping) -> str:
    return str(row.get("reason") or "").strip()


def agreement_table(
    frame: pd.DataFrame, names: Sequence[str], examples: int, dtype: torch.dtype
) -> str:
    """Per implementation: norms and Gram vs the float64 oracle (relative error, or why not)."""
    from correctness.harness import TOLERANCE

    first: dict[tuple, Mapping] = {}
    for row in sorted(frame.to_dict("records"), key=lambda r: int(r["batch_size"])):
        first.setdefault((row["implementation"], row["quantity"]), row)
    lines = []
    for name in names:
        norms, gram = first.get((name, "norms"), {}), first.get((name, "gram"), {})
        why = ""
        for row in (norms, gram):
            if row.get("correct") in ("unsupported", "error", "timeout") and _reason(row):
                text = f"{row['quantity']}: {_reason(row)}"
                why = text if not why else why
                if _reason(norms) == _reason(gram):
                    why = _reason(row)
                elif text not in why:
                    why += f"; {text}"
        lines.append((name, _check_text(norms) or "-", _check_text(gram) or "-", why))
    tolerance = TOLERANCE.get(dtype, 1e-4)
    allowance = "" if dtype == torch.float64 else ", or 10x a per-example loop's own rounding"
    title = (
        f"agreement with the float64 oracle on {examples} examples (max relative error; "
        f"tolerance {tolerance:.0e}{allowance}):"
    )
    return title + "\n" + text_table(("implementation", "norms", "gram", "why not"), lines)


def _ratio(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}x" if value >= 100 else f"{value:.3g}x"


def _correct(row: Mapping | None) -> bool:
    return bool(row) and row.get("status") == "ok" and row.get("correct") == "ok"


def _time_cell(row: Mapping | None) -> str:
    if not row:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    seconds = format_seconds(_number(row.get("time_median_s")))
    text = f"{_ratio(_number(row.get('ratio')))} ({seconds})"
    return text + (" WRONG" if row.get("correct") == "WRONG" else "")


def _memory_cell(row: Mapping | None) -> str:
    if not row or row["status"] != "ok":
        return "-"
    ratio = _number(row.get("memory_ratio"))
    if ratio is None:
        return "?"
    return f"{_ratio(ratio)} ({format_bytes(_number(row.get('memory_peak_bytes')))})"


def _best(frame: pd.DataFrame, names, quantity: str, batch_size: int, column: str):
    """(name, row) of the correct measured implementation with the least ``column``."""
    rows = frame[
        frame["implementation"].isin(list(names))
        & (frame["quantity"] == quantity)
        & (frame["batch_size"].astype(int) == batch_size)
    ]
    best = fastest(rows, by=column)
    if best.empty:
        return None, None
    row = best.iloc[0]
    return row["implementation"], row


def _agreeing_but_unmeasured(index: Mapping, names: Sequence[str], batch_size: int) -> list[str]:
    """Implementations whose answers agree with the oracle on both quantities but that have no
    time at this batch size (timed out, or skipped as extrapolated past the budget)."""
    found = []
    for name in names:
        rows = [index.get((name, q, batch_size)) for q in ("norms", "gram")]
        if all(r and r.get("correct") == "ok" for r in rows) and any(
            r.get("status") in ("timeout", "skipped") for r in rows
        ):
            found.append(name)
    return found


def _geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def recommend(frame: pd.DataFrame, names: Sequence[str], batch_size: int) -> tuple[str | None, str]:
    """(the implementation to adopt at this batch size or None, a line saying why)."""
    index = _index(frame.to_dict("records"))
    scored = []
    for name in names:
        norms, gram = index.get((name, "norms", batch_size)), index.get((name, "gram", batch_size))
        if _correct(norms) and _correct(gram):
            times = [_number(norms.get("ratio")), _number(gram.get("ratio"))]
            memory = [_number(norms.get("memory_ratio")), _number(gram.get("memory_ratio"))]
            if all(t is not None and t > 0 for t in times):
                mem = _geometric_mean(memory) if all(m and m > 0 for m in memory) else None
                scored.append((_geometric_mean(times), mem, name))
    if not scored:
        partial = {
            quantity: _best(frame, names, quantity, batch_size, "ratio")[0]
            for quantity in ("norms", "gram")
        }
        found = [f"{name} for {q}" for q, name in partial.items() if name]
        if found:
            return None, (
                "recommendation: no implementation is correct on both norms and Gram here; "
                f"fastest correct: {', '.join(found)}"
            )
        unmeasured = _agreeing_but_unmeasured(index, names, batch_size)
        if unmeasured:
            return None, (
                "recommendation: none measured at this batch size: "
                f"{', '.join(unmeasured)} agree with the oracle but ran past or were skipped for "
                "the cell budget (raise --budget, or see a smaller batch size)"
            )
        return None, "recommendation: no implementation answers this model correctly (see above)"
    scored.sort()
    time_ratio, memory_ratio, name = scored[0]
    line = (
        f"recommendation: {name}: correct on norms and Gram, "
        f"{'the fastest' if len(scored) > 1 else 'the only one'} "
        f"({time_ratio:.3g}x a plain step, geometric mean of norms and Gram)"
    )
    lighter = [s for s in scored if s[1] is not None]
    if memory_ratio is not None and lighter:
        _, least_memory, least_name = min(lighter, key=lambda s: s[1])
        if least_name == name:
            line += ", and the smallest memory" if len(lighter) > 1 else ""
        elif least_memory < 0.8 * memory_ratio:
            line += (
                f"; if memory is tight, {least_name} "
                f"({least_memory:.3g}x the plain step's peak against {memory_ratio:.3g}x)"
            )
    return name, line


def recommendation(frame: pd.DataFrame, names: Sequence[str], batch_size: int) -> str:
    """One line: the implementation to adopt at this batch size, and why."""
    return recommend(frame, names, batch_size)[1]


def floor_line(frame: pd.DataFrame, names: Sequence[str], batch_size: int) -> str:
    """The floor at one batch size, and how far the fastest correct implementation is from it."""
    index = _index(frame.to_dict("records"))
    parts = []
    for quantity in ("norms", "gram"):
        floor = index.get((FLOOR, quantity, batch_size))
        floor_ratio = _number(floor.get("ratio")) if floor and floor["status"] == "ok" else None
        if floor_ratio is None:
            continue
        text = f"{quantity} {_ratio(floor_ratio)} a plain step"
        name, row = _best(frame, names, quantity, batch_size, "ratio")
        if name:
            text += f" ({name} is {_ratio(_number(row['ratio']) / floor_ratio)} the floor)"
        parts.append(text)
    if not parts:
        return "floor: not measured"
    return (
        "floor (the forward and activation backward any per-layer method pays, plus the "
        "fastest exact reductions): " + "; ".join(parts)
    )


def verdict(frame: pd.DataFrame, names: Sequence[str], batch_size: int) -> str:
    """The verdict at one batch size: table, refusals, fastest, smallest memory, recommendation."""
    rows = frame.to_dict("records")
    index = _index(rows)
    at_size = [r for r in rows if int(r["batch_size"]) == batch_size]
    plain_times = sorted(t for r in at_size if (t := _number(r.get("plain_median_s"))) is not None)
    plain_peaks = [p for r in at_size if (p := _number(r.get("plain_peak_bytes"))) is not None]
    title = f"B={batch_size}"
    if plain_times:
        # every cell times its own plain step, interleaved with the call; this is their median
        title += (
            f": a plain forward+backward takes {format_seconds(plain_times[len(plain_times) // 2])}"
        )
        title += f", peak {format_bytes(max(plain_peaks))}" if plain_peaks else ""
        title += "; ratios are to the plain step timed beside each call"
    lines, refusals = [], []
    for name in names:
        norms, gram = index.get((name, "norms", batch_size)), index.get((name, "gram", batch_size))
        both = [r for r in (norms, gram) if r]
        checks = [r.get("correct") for r in both]
        # the oracle check's verdict, whether or not this batch size could be timed
        if checks and all(c == "ok" for c in checks):
            correct = "yes"
        elif "WRONG" in checks:
            correct = "WRONG"
        elif "ok" in checks:
            correct = "partly"
        elif checks and all(c == "unsupported" for c in checks):
            correct = "refuses"
        else:
            correct = "/".join(sorted(set(map(str, checks)))) or "-"
        lines.append(
            (
                name,
                correct,
                _time_cell(norms),
                _memory_cell(norms),
                _time_cell(gram),
                _memory_cell(gram),
            )
        )
        problems = [
            (row["quantity"], row["status"], _reason(row) or row.get("correct", ""))
            for row in both
            if row["status"] != "ok" or row.get("correct") not in ("ok", None)
        ]
        if len(problems) == 2 and problems[0][1:] == problems[1][1:]:
            problems = [("norms and gram", *problems[0][1:])]
        refusals += [f"  {name} {q}: {status}: {reason}" for q, status, reason in problems]
    header = ("implementation", "correct", "norms time", "norms memory", "gram time")
    table = text_table((*header, "gram memory"), lines)
    parts = [title, table]
    if refusals:
        parts.append("not measured or not correct:\n" + "\n".join(refusals))
    for label, column, unit in (
        ("fastest", "ratio", "a plain step"),
        ("smallest memory", "memory_ratio", "the plain step's peak"),
    ):
        found = []
        for quantity in ("norms", "gram"):
            name, row = _best(frame, names, quantity, batch_size, column)
            if name:
                found.append(f"{quantity} {name} ({_ratio(_number(row[column]))} {unit})")
        parts.append(f"{label}: {'; '.join(found) if found else 'none correct and measured'}")
    parts.append(floor_line(frame, names, batch_size))
    parts.append(recommendation(frame, names, batch_size))
    return "\n".join(parts)
