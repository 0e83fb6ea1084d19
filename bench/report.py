"""REPORT.md and the plots, generated from the result tables (never edited by hand).

``write_report(root)`` reads every ``<root>/<device>/cells.csv`` and its ``environment.json``
and writes ``<root>/REPORT.md`` and ``<root>/<device>/plots/<case>.png`` (``<case>-<dtype>.png``
for a case in another precision than its own: each dtype gets its own section, plots and
headline rows); ``check(root)`` reads the same files and checks where they go first, writing
nothing (``bench.store.ResultsError``).
The pieces (``fastest``, ``pivot``, ``markdown_table``, ``format_bytes``, ``format_seconds``)
are importable for other reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from bench import store
from bench.cases import DESCRIPTIONS
from bench.floor import FLOOR
from bench.timing import NOISY_RELATIVE_IQR
from correctness.precision import PRECISIONS

REPORT_NAME = "REPORT.md"
#: the columns that make one comparison: the implementations of a row of a table
GROUP = ["device", "case", "dtype", "quantity", "batch_size"]
NOISY_MARK = "~"
WRONG_MARK = " WRONG"


def _ok(frame: pd.DataFrame) -> pd.Series:
    return frame["status"] == "ok"


def _correct(frame: pd.DataFrame) -> pd.Series:
    return _ok(frame) & (frame["correct"] == "ok")


def fastest(frame: pd.DataFrame, by: str = "ratio") -> pd.DataFrame:
    """Per (device, case, dtype, quantity, batch_size): the correct measured row with the least
    ``by``.

    ``by`` is "ratio" (time) or "memory_ratio". Rows whose oracle check is not ``ok`` never win.
    """
    rows = frame[_correct(frame)].dropna(subset=[by])
    if rows.empty:
        return rows
    keys = GROUP
    best = rows.loc[rows.groupby(keys)[by].idxmin()]
    return best.sort_values(keys).reset_index(drop=True)


def floor_ratios(frame: pd.DataFrame) -> pd.Series:
    """Each row's time as a multiple of the floor measured beside it: its ratio to a plain step
    over the floor's ratio to its own plain step (both interleaved, so machine drift cancels).
    NaN where there is no floor row or either is missing."""
    keys = GROUP
    floors = frame[(frame["implementation"] == FLOOR) & _ok(frame)].set_index(keys)["ratio"]
    if floors.empty:
        return pd.Series(math.nan, index=frame.index)
    joined = frame.join(floors.rename("floor_ratio"), on=keys)
    return joined["ratio"] / joined["floor_ratio"]


def _format_ratio(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    if value >= 100:
        return f"{value:.0f}x"
    if value >= 10:
        return f"{value:.1f}x"
    return f"{value:.2f}x"


def format_bytes(value) -> str:
    """``12 MiB`` / ``0.5 MiB`` (two significant digits below 10 MiB); ``?`` when missing."""
    if value is None or pd.isna(value):
        return "?"
    mib = float(value) / 2**20
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.2g} MiB"


def format_seconds(value) -> str:
    """``3.2 ms`` below a second, ``1.5 s`` above; ``?`` when missing."""
    if value is None or pd.isna(value):
        return "?"
    value = float(value)
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _time_cell(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    text = _format_ratio(float(row["ratio"]))
    to_floor = row.get("to_floor")
    if row["implementation"] != FLOOR and to_floor is not None and not pd.isna(to_floor):
        text += f" ({_format_ratio(float(to_floor))} floor)"
    if isinstance(row["flags"], str) and row["flags"].startswith("noisy"):
        text += NOISY_MARK
    if row["correct"] == "WRONG":
        text += WRONG_MARK
    return text


def _memory_cell(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    if pd.isna(row["memory_peak_bytes"]):
        return "n/a"
    ratio = row["memory_ratio"]
    text = f"{_format_ratio(float(ratio))} ({format_bytes(row['memory_peak_bytes'])})"
    return text + (WRONG_MARK if row["correct"] == "WRONG" else "")


def pivot(rows: pd.DataFrame, cell) -> pd.DataFrame:
    """implementation x batch_size table of ``cell(row)`` strings (rows in first-seen order)."""
    order = list(dict.fromkeys(rows["implementation"]))
    text = rows.assign(text=rows.apply(cell, axis=1))
    table = text.pivot_table(
        index="implementation", columns="batch_size", values="text", aggfunc="first"
    )
    table = table.reindex(order).fillna("")
    table.columns = [f"B={int(b)}" for b in table.columns]
    return table


def _plain_row(rows: pd.DataFrame, column: str, formatter) -> dict:
    ok = rows[_ok(rows)].dropna(subset=[column])
    values = ok.groupby("batch_size")[column].median()
    return {f"B={int(b)}": formatter(v) for b, v in values.items()}


def markdown_table(table: pd.DataFrame, index_name: str = "") -> str:
    """A GitHub-flavoured markdown table of a DataFrame of strings (index as first column)."""
    header = [index_name or (table.index.name or "")] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        cells = [str(index)] + ["" if pd.isna(v) else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def headline(frame: pd.DataFrame, device: str) -> pd.DataFrame:
    """(case, quantity) x batch size: the fastest correct implementation, its time ratio and its
    distance to the floor."""
    if len(frame) and "to_floor" not in frame:
        frame = frame.assign(to_floor=floor_ratios(frame))
    best = fastest(frame[frame["device"] == device])
    if best.empty:
        return pd.DataFrame()
    to_floor = best.get("to_floor", pd.Series(math.nan, index=best.index))
    floor_text = to_floor.map(lambda v: "" if pd.isna(v) else f" ({_format_ratio(v)} floor)")
    best = best.assign(
        text=best["implementation"] + " " + best["ratio"].map(_format_ratio) + floor_text,
        row=[f"{_title(c, d)} {q}" for c, d, q in zip(best["case"], best["dtype"],
                                                       best["quantity"], strict=True)],
    )  # fmt: skip
    rows = frame[frame["device"] == device]
    order = [
        f"{_title(c, d)} {q}"
        for c, d in _case_dtypes(rows)
        for q in dict.fromkeys(rows["quantity"])
        if f"{_title(c, d)} {q}" in set(best["row"])
    ]
    table = best.pivot_table(index="row", columns="batch_size", values="text", aggfunc="first")
    table = table.reindex(order).fillna("")
    table.columns = [f"B={int(b)}" for b in table.columns]
    return table


def _case_dtypes(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(case, dtype) pairs in first-seen order of the cases, each case's float32 first."""
    pairs = list(dict.fromkeys(zip(rows["case"], rows["dtype"], strict=True)))
    cases = list(dict.fromkeys(c for c, _ in pairs))
    return sorted(pairs, key=lambda p: (cases.index(p[0]), p[1] != store.DEFAULT_DTYPE))


def _title(case: str, dtype: str) -> str:
    """``mlp_mnist``, or ``mlp_mnist in bf16`` for another dtype than float32."""
    return case if dtype == store.DEFAULT_DTYPE else f"{case} in {dtype}"


def _plot_name(case: str, dtype: str) -> str:
    return f"{case}.png" if dtype == store.DEFAULT_DTYPE else f"{case}-{dtype}.png"


def _not_measured(rows: pd.DataFrame) -> list[str]:
    lines = []
    bad = rows[rows["status"] != "ok"]
    for (implementation, quantity, status), group in bad.groupby(
        ["implementation", "quantity", "status"], sort=False
    ):
        sizes = ", ".join(str(int(b)) for b in sorted(group["batch_size"]))
        reason = str(group.sort_values("batch_size")["reason"].iloc[0])
        lines.append(f"- {implementation} {quantity} B={sizes}: **{status}**: {reason}")
    checks = rows[rows["correct"].isin(["WRONG", "error"])].drop_duplicates(
        ["implementation", "quantity"]
    )
    for _, row in checks.iterrows():
        detail = f"relative error {row['check_error']:.2e}" if row["correct"] == "WRONG" else ""
        lines.append(
            f"- {row['implementation']} {row['quantity']}: oracle check **{row['correct']}** "
            f"{detail}".rstrip()
        )
    return lines


def _environment_line(environment: dict, rows: pd.DataFrame | None = None) -> str:
    if not environment:
        return "_no environment.json beside the table_"
    versions = environment.get("versions", {})
    parts = [
        f"torch {versions.get('torch')}",
        f"opacus {versions.get('opacus')}",
        f"backpack {versions.get('backpack-for-pytorch')}",
        f"CPU {environment.get('cpu')} ({environment.get('cpu_count')} cores)",
        f"threads: {environment.get('threads')}",
        f"malloc: {environment.get('malloc', 'not recorded')}",
    ]
    if environment.get("gpu"):
        parts.append(f"GPU {environment['gpu'].get('name')}")
    parts.append(f"commit {environment.get('git_commit')}")
    settings = environment.get("settings", {})
    if settings:
        parts.append(
            "settings: "
            + ", ".join(f"{k}={settings[k]}" for k in sorted(settings) if k != "threads")
        )
    started = environment.get("recorded_at")
    if environment.get("previous") and rows is not None and started:
        earlier = int((rows["measured_at"].astype(str) < str(started)).sum())
        parts.append(
            f"merged table: {earlier} of {len(rows)} rows were measured by earlier sweeps "
            "(their environments are listed under 'previous' in environment.json)"
        )
    return "; ".join(str(p) for p in parts)


# -- plots -------------------------------------------------------------------------------------


def plot_case(rows: pd.DataFrame, path: Path) -> Path | None:
    """Time and peak memory against batch size (log-log) for one device and case, as a PNG.

    Top row: seconds per call; bottom row: peak MiB; one column per quantity; the plain
    forward+backward is the dashed black line. Returns None when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = rows[_ok(rows)]
    quantities = list(dict.fromkeys(rows["quantity"]))
    implementations = list(dict.fromkeys(rows["implementation"]))
    palette = plt.get_cmap("tab10")
    colors = {name: palette(k % 10) for k, name in enumerate(implementations)}
    sizes = sorted(int(b) for b in rows["batch_size"].unique())
    figure, axes = plt.subplots(
        2, len(quantities), figsize=(5 * len(quantities), 7.5), squeeze=False
    )
    for column, quantity in enumerate(quantities):
        these = ok[ok["quantity"] == quantity]
        panels = [
            (axes[0][column], "time_median_s", "plain_median_s", "seconds per call", 1.0),
            (axes[1][column], "memory_peak_bytes", "plain_peak_bytes", "peak MiB", 2.0**-20),
        ]
        for axis, value, plain, label, scale in panels:
            for implementation in implementations:
                group = these[these["implementation"] == implementation]
                group = group.dropna(subset=[value]).sort_values("batch_size")
                if not len(group):
                    continue
                if implementation == FLOOR:  # a line, not an implementation
                    if value == "time_median_s":
                        axis.plot(group["batch_size"].astype(int), group[value].astype(float),
                                  ":", color="grey", linewidth=2, label="floor")  # fmt: skip
                    continue
                axis.plot(
                    group["batch_size"].astype(int),
                    group[value].astype(float) * scale,
                    "o-",
                    color=colors[implementation],
                    label=implementation,
                )
            reference = these.dropna(subset=[plain]).groupby("batch_size")[plain].median()
            if len(reference):
                axis.plot(
                    reference.index.astype(int),
                    reference.to_numpy(dtype=float) * scale,
                    "k--",
                    label="plain fwd+bwd",
                )
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(sizes, [str(b) for b in sizes])
            axis.set_xlabel("batch size")
            axis.set_ylabel(label)
            axis.set_title(f"{quantity}: {label}")
            axis.grid(True, which="both", alpha=0.3)
    handles = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    labels = [n for n in [*implementations, "plain fwd+bwd"] if n in handles]
    if labels:
        figure.legend([handles[n] for n in labels], labels, loc="lower center", ncol=5, fontsize=8)
    dtype = rows["dtype"].iloc[0] if "dtype" in rows else store.DEFAULT_DTYPE
    title = _title(rows["case"].iloc[0], dtype)
    figure.suptitle(f"{title} on {rows['device'].iloc[0]} (log-log)")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=80)
    plt.close(figure)
    temporary.replace(path)
    return path


# -- the report --------------------------------------------------------------------------------


def render(frame: pd.DataFrame, environments: dict[str, dict], plots: dict) -> str:
    """REPORT.md's text from the concatenated tables."""
    frame = frame.assign(to_floor=floor_ratios(frame)) if len(frame) else frame
    lines = [
        "# pegbench benchmark report",
        "",
        "Generated by `python -m bench report` from `results/<device>/cells.csv`; do not edit.",
        "",
        "**Time ratio** = median seconds of the call / median seconds of a plain forward + "
        "`loss.sum().backward()` on the same model and batch, timed interleaved in the same "
        "process (torch.utils.benchmark `blocked_autorange`). "
        f"`{NOISY_MARK}`: IQR above {NOISY_RELATIVE_IQR:.0%} of the median for the call or the "
        "plain step (after the rounds a noisy cell adds within its budget, `--noisy-rounds`). "
        "**Memory ratio** = peak memory of one call above its baseline (CPU: heap "
        "peak read by memray; CUDA: `max_memory_allocated`) / the same for the plain step.",
        "",
        "**Correct** = the implementation's answer on an 8-example batch of the same bench "
        "model agrees with the float64 oracle (`correctness.oracle`, a per-example loop) within "
        "the agreement harness's tolerance, or ten times the rounding of a per-example loop in "
        "the model's dtype on that model; only correct implementations can be *fastest*. "
        f"Cells marked `{WRONG_MARK.strip()}` failed that check.",
        "",
        "**Floor** = what any exact per-layer method pays on that model and batch "
        "(`bench/floor.py`): a forward and a backward to the outputs of every parameter use "
        "(no parameter gradient), plus each parameter group's reduction alone, on factors "
        "captured beforehand (a convolution's input; its patches are built inside the "
        "reduction), in its fastest exact form. `(1.05x floor)` beside a time is the "
        "implementation's time as a multiple of the floor measured beside it. "
        "`python -m bench floor CASE --batch-size N` prints the floor in parts, and `ghost`'s "
        "time in the same parts beside it.",
        "",
    ]
    devices = list(dict.fromkeys(frame["device"]))
    if not devices:
        lines.append("_No results yet: run `python -m bench`._")
    for device in devices:
        table = headline(frame, device)
        lines += [
            f"## Headline ({device}): fastest correct implementation, time ratio to a plain "
            "step (and to the floor)",
            "",
        ]
        lines += [markdown_table(table, "case, quantity") if len(table) else "_none_", ""]
    for device in devices:
        rows_device = frame[frame["device"] == device]
        environment = _environment_line(environments.get(device, {}), rows_device)
        lines += [f"## {device}", "", environment, ""]
        for case, dtype in _case_dtypes(rows_device):
            rows = rows_device[(rows_device["case"] == case) & (rows_device["dtype"] == dtype)]
            lines += [f"### {_title(case, dtype)}", ""]
            if case in DESCRIPTIONS:
                lines += [DESCRIPTIONS[case], ""]
            if dtype in PRECISIONS and dtype != store.DEFAULT_DTYPE:
                lines += [f"In {dtype}: {PRECISIONS[dtype].description}.", ""]
            for quantity in dict.fromkeys(rows["quantity"]):
                these = rows[rows["quantity"] == quantity]
                times = pivot(these, _time_cell)
                plain = pd.DataFrame(
                    [_plain_row(these, "plain_median_s", format_seconds)],
                    index=["plain step (s)"],
                )
                lines += [f"#### {quantity}: time ratio", ""]
                lines += [markdown_table(pd.concat([times, plain]).fillna(""), "implementation")]
                memory = pivot(these, _memory_cell)
                plain_memory = pd.DataFrame(
                    [_plain_row(these, "plain_peak_bytes", format_bytes)],
                    index=["plain step peak"],
                )
                lines += ["", f"#### {quantity}: peak memory, ratio to the plain step (peak)", ""]
                table = pd.concat([memory, plain_memory]).fillna("")
                lines += [markdown_table(table, "implementation"), ""]
                best = fastest(these)
                if len(best):
                    winners = ", ".join(
                        f"B={int(r.batch_size)}: {r.implementation} ({_format_ratio(r.ratio)})"
                        for r in best.itertuples()
                    )
                    lines += [f"Fastest correct ({quantity}): {winners}", ""]
            missing = _not_measured(rows)
            if missing:
                lines += ["Not measured, or not correct:", "", *missing, ""]
            plot = plots.get((device, case, dtype), "")
            if plot:
                lines += [f"![{_title(case, dtype)} on {device}]({plot})", ""]
            elif (device, case, dtype) in plots:
                lines += ["_No plot: matplotlib is not installed here._", ""]
    return "\n".join(lines).rstrip() + "\n"


def check(root: Path = Path("results"), replaced: Iterable[Path] = ()) -> None:
    """Read what ``write_report(root)`` reads and check where it writes, writing nothing.

    Raises ``bench.store.ResultsError`` (one line naming the file and the first problem) for a
    missing results folder, a table or environment.json that is not what a sweep writes, or
    a report or plots path taken by something else. ``replaced``: device folders whose table
    and environment.json a sweep is about to replace (not read).
    """
    root = Path(root)
    skipped = {Path(folder).resolve() for folder in replaced}
    if not root.is_dir():
        raise store.ResultsError(f"{root}: no such results folder")
    if (root / REPORT_NAME).exists() and not (root / REPORT_NAME).is_file():
        raise store.ResultsError(f"{root / REPORT_NAME}: is not a file")
    for table in sorted(root.glob(f"*/{store.TABLE_NAME}")):
        if table.parent.resolve() in skipped:
            continue
        frame = store.read_table(table)
        for device in dict.fromkeys(frame["device"]):
            folder = root / str(device).split(":")[0]
            store.read_environment(folder)
            plots = folder / "plots"
            if plots.exists() and not plots.is_dir():
                raise store.ResultsError(f"{plots}: is not a folder (the plots go there)")


def write_report(root: Path = Path("results")) -> Path:
    """Regenerate ``<root>/REPORT.md`` and the plots from the tables under ``root``."""
    root = Path(root)
    frame = store.read_tables(root)
    environments = {}
    plots = {}
    for device in dict.fromkeys(frame["device"]):
        folder = root / str(device).split(":")[0]  # the store's folder: the device type
        environments[device] = store.read_environment(folder)
        rows_device = frame[frame["device"] == device]
        for case, dtype in _case_dtypes(rows_device):
            rows = rows_device[(rows_device["case"] == case) & (rows_device["dtype"] == dtype)]
            path = plot_case(rows, folder / "plots" / _plot_name(case, dtype))
            plots[(device, case, dtype)] = path.relative_to(root).as_posix() if path else ""
    path = root / REPORT_NAME
    store.write_atomically(path, render(frame, environments, plots))
    return path
