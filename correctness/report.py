"""The agreement matrix: implementation x case, one table per family of quantities."""

from __future__ import annotations

import pandas as pd

from correctness.harness import Outcome
from correctness.precision import FAMILY, Precision, tolerance_from

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
    precision = next((o.precision for o in outcomes if o.precision), None)
    where = f" in {precision}" if precision else ""
    for family, table in tables.items():
        quantities = ", ".join(FAMILIES[family])
        lines.append(
            f"== {family} ({quantities}){where}: max relative error vs the float64 oracle =="
        )
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


def format_rounding(errors: dict[str, dict[str, float]], precision: Precision) -> tuple[str, bool]:
    """(the text, whether a stated tolerance is tighter than the loop's rounding allows).

    ``errors``: case -> quantity -> relative error of a plain per-example loop in ``precision``
    (cases whose gradients are undefined have none). Per family: the largest error, the
    tolerance it gives (``tolerance_from``) and the one ``precision`` states.
    """
    rows = {case: {q: f"{e:.1e}" for q, e in by.items()} for case, by in errors.items() if by}
    lines = [
        f"== a plain per-example loop in {precision.name} ({precision.description}): relative "
        "error vs the float64 oracle ==",
    ]
    with pd.option_context("display.width", 250, "display.max_columns", None):
        lines.append(pd.DataFrame.from_dict(rows, orient="index").to_string())
    lines.append("")
    too_tight = False
    for family in dict.fromkeys(FAMILY.values()):
        found = [(e, case, q) for case, by in errors.items() for q, e in by.items()
                 if FAMILY[q] == family]  # fmt: skip
        if not found:
            continue
        worst, case, quantity = max(found)
        derived = tolerance_from(worst, precision.floor)
        stated = precision.tolerance[family]
        verdict = "ok" if stated >= derived else "BELOW the loop's rounding: raise it"
        too_tight |= stated < derived
        where = f"{case}, {quantity}" if worst > 0 else "on every case"
        lines.append(
            f"{family}: loop's largest error {worst:.2e} ({where}) -> tolerance "
            f"{derived:g}; stated {stated:g}: {verdict}"
        )
    return "\n".join(lines), too_tight
