"""The agreement matrix: implementation x case, one table per family of quantities."""

from __future__ import annotations

import pandas as pd

from correctness.harness import Outcome

FAMILIES = {
    "norms": ("norms", "per_param"),
    "inner": ("gram", "cross_batch", "cross_checkpoint"),
    "double_backward": ("double_backward",),
}


def _cell(outcomes: list[Outcome], notes: dict[str, int]) -> str:
    bad = [o for o in outcomes if o.failed]
    if bad:
        worst = bad[0]
        if worst.status == "WRONG":
            return f"WRONG {worst.error:.0e} ({worst.quantity})"
        return f"error [{notes.setdefault(worst.detail, len(notes) + 1)}]"
    ok = [o for o in outcomes if o.status == "ok"]
    refused = [o for o in outcomes if o.status == "unsupported"]
    if refused and not ok:
        return f"unsupported [{notes.setdefault(refused[0].detail, len(notes) + 1)}]"
    text = f"ok {max(o.error for o in ok):.0e}"
    if refused:
        parts = "+".join(o.quantity for o in refused)
        text += f" ({parts} unsupported [{notes.setdefault(refused[0].detail, len(notes) + 1)}])"
    return text


def matrices(outcomes: list[Outcome]) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """One DataFrame (rows: case, columns: implementation) per family, and the footnotes."""
    notes: dict[str, int] = {}
    tables = {}
    cases = list(dict.fromkeys(o.case for o in outcomes))
    impls = list(dict.fromkeys(o.implementation for o in outcomes))
    for family, quantities in FAMILIES.items():
        rows = {}
        for case in cases:
            row = {}
            for impl in impls:
                cell = [
                    o
                    for o in outcomes
                    if o.case == case and o.implementation == impl and o.quantity in quantities
                ]
                if cell:
                    row[impl] = _cell(cell, notes)
            if row:
                rows[case] = row
        if rows:
            tables[family] = pd.DataFrame.from_dict(rows, orient="index")
    return tables, notes


def format_matrix(outcomes: list[Outcome]) -> str:
    tables, notes = matrices(outcomes)
    lines = []
    for family, table in tables.items():
        quantities = ", ".join(FAMILIES[family])
        lines.append(f"== {family} ({quantities}): max relative error vs the float64 oracle ==")
        with pd.option_context("display.width", 250, "display.max_columns", None):
            lines.append(table.to_string())
        lines.append("")
    if notes:
        lines.append("Notes:")
        lines += [f"  [{k}] {text}" for text, k in sorted(notes.items(), key=lambda kv: kv[1])]
    lines.append("")
    lines.append(
        f"{len(outcomes)} checks: {sum(o.status == 'ok' for o in outcomes)} ok, "
        f"{sum(o.status == 'unsupported' for o in outcomes)} unsupported, "
        f"{sum(o.status == 'WRONG' for o in outcomes)} WRONG, "
        f"{sum(o.status == 'error' for o in outcomes)} error"
    )
    return "\n".join(lines)
