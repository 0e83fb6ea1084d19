"""``python -m bench compare FILE``: every implementation on your own model, before adopting one.

FILE defines ``make_case()`` returning ``(model, loss_fn, make_batch)`` (see
``bench.user_model`` and ``examples/small_transformer.py``). The command

1. loads and checks the file (one forward and loss on a batch of 2; a mistake is one line on
   stderr and exit code 2);
2. checks every implementation's norms and Gram matrix against the float64 oracle on a small
   batch (ok with its relative error / unsupported with the reason / WRONG / error);
3. times and memory-profiles every implementation at each batch size with ``bench.sweep``
   (time and peak memory as ratios to a plain forward+backward of the same model and batch);
4. prints, per batch size, a verdict table: which implementations are correct, which refuse
   and why, the fastest, the smallest memory, and a one-line recommendation.

See docs/compare.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

#: the default run: the sweep's own defaults, three batch sizes
DEFAULT = dict(batch_sizes=(16, 64, 256), rounds=3, min_run_time=0.1, budget=10.0)
#: ``--quick``: two small batch sizes, two short rounds
QUICK = dict(batch_sizes=(8, 32), rounds=2, min_run_time=0.05, budget=5.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", type=Path, help="a Python file defining make_case() -> (model, loss_fn, make_batch)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run: batch sizes {list(QUICK['batch_sizes'])}, {QUICK['rounds']} rounds",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=None,
        help=f"batch sizes to time (default {list(DEFAULT['batch_sizes'])})",
    )
    parser.add_argument(
        "--impls",
        "--implementations",
        dest="impls",
        nargs="+",
        default=None,
        help="implementations (default: every registered one)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steady ratios on a shared machine; give the "
        f"number your training uses, up to {torch.get_num_threads()} here, to time that)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument(
        "--min-run-time", type=float, default=None, help="seconds per blocked_autorange round"
    )
    parser.add_argument("--budget", type=float, default=None, help="wall seconds per cell")
    parser.add_argument(
        "--check-batch-size",
        type=int,
        default=8,
        help="examples in the oracle check's batch (default %(default)s)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip memory readings")
    parser.add_argument(
        "--out", type=Path, default=None, help="also keep the measured table in OUT/<device>/"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _error(message: str) -> int:
    print(f"compare: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """The ``compare`` command: 0 when measured, 2 on bad input (one line on stderr)."""
    import impls
    from bench import user_model
    from bench.store import ResultStore
    from bench.sweep import QUANTITIES, Settings, Sweep, plan

    known = impls.names()
    for name in args.impls or []:
        if name not in known:
            return _error(f"unknown implementation '{name}'; known: {', '.join(known)}")
    preset = QUICK if args.quick else DEFAULT
    batch_sizes = args.batch_sizes or list(preset["batch_sizes"])
    bad = [b for b in batch_sizes if b < 1]
    if bad:
        return _error(f"batch sizes must be at least 1; got {', '.join(map(str, bad))}")
    if args.check_batch_size < 1:
        return _error(f"--check-batch-size must be at least 1; got {args.check_batch_size}")
    for name, value in (("--threads", args.threads), ("--rounds", args.rounds)):
        if value is not None and value < 1:
            return _error(f"{name} must be at least 1; got {value}")
    try:
        case = user_model.load(args.path)
    except user_model.UserModelError as error:
        return _error(str(error))

    def pick(value, key):
        return preset[key] if value is None else value

    settings = Settings(
        threads=args.threads,
        rounds=pick(args.rounds, "rounds"),
        min_run_time=pick(args.min_run_time, "min_run_time"),
        budget_s=pick(args.budget, "budget"),
        check=True,
        check_batch_size=args.check_batch_size,
        measure_memory=not args.no_memory,
    )
    names = list(args.impls or known)
    cells = plan([case], names, devices=[case.device], batch_sizes=batch_sizes)
    print(
        f"compare {args.path}: {type(case.model).__name__}, {case.parameter_count:,} trainable "
        f"parameters, {str(case.dtype).removeprefix('torch.')} on {case.device}, "
        f"{settings.threads} thread(s); {len(names)} implementations x {len(QUANTITIES)} "
        f"quantities x batch sizes {', '.join(map(str, sorted(set(batch_sizes))))}",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pegbench-compare-") as folder:
        root = args.out if args.out is not None else Path(folder)
        store = ResultStore(root / torch.device(case.device).type)
        rows = Sweep(store, settings, progress=not args.no_progress).run(cells)
    print()
    print(agreement_table(rows, names, settings.check_batch_size, case.dtype))
    for batch_size in sorted(set(batch_sizes)):
        print()
        print(verdict(rows, names, batch_size))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


# -- the tables ----------------------------------------------------------------------------------


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns, the last one left ragged."""
    everything = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in everything) for i in range(len(header) - 1)]
    lines = []
    for r in everything:
        padded = [t.ljust(w) for t, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*padded, r[-1]]).rstrip())
    lines.insert(1, "  ".join("-" * w for w in [*widths, len(header[-1])]))
    return "\n".join(lines)


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
    rows: Sequence[Mapping], names: Sequence[str], examples: int, dtype: torch.dtype
) -> str:
    """Per implementation: norms and Gram vs the float64 oracle (relative error, or why not)."""
    from correctness.harness import TOLERANCE

    first: dict[tuple, Mapping] = {}
    for row in sorted(rows, key=lambda r: int(r["batch_size"])):
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
    title = (
        f"agreement with the float64 oracle on {examples} examples (max relative error; "
        f"tolerance {tolerance:.0e}):"
    )
    return title + "\n" + _table(("implementation", "norms", "gram", "why not"), lines)


def _ratio(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}x" if value >= 100 else f"{value:.3g}x"


def _mib(value) -> str:
    value = _number(value)
    if value is None:
        return "?"
    mib = value / 2**20
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.2g} MiB"


def _ms(value) -> str:
    value = _number(value)
    if value is None:
        return "?"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _correct(row: Mapping | None) -> bool:
    return bool(row) and row.get("status") == "ok" and row.get("correct") == "ok"


def _time_cell(row: Mapping | None) -> str:
    if not row:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    text = f"{_ratio(_number(row.get('ratio')))} ({_ms(row.get('time_median_s'))})"
    return text + (" WRONG" if row.get("correct") == "WRONG" else "")


def _memory_cell(row: Mapping | None) -> str:
    if not row or row["status"] != "ok":
        return "-"
    ratio = _number(row.get("memory_ratio"))
    if ratio is None:
        return "?"
    return f"{_ratio(ratio)} ({_mib(row.get('memory_peak_bytes'))})"


def _best(rows: Mapping[tuple, Mapping], names, quantity: str, batch_size: int, column: str):
    """(name, row) of the correct measured implementation with the least ``column``."""
    candidates = []
    for name in names:
        row = rows.get((name, quantity, batch_size))
        value = _number(row.get(column)) if _correct(row) else None
        if value is not None:
            candidates.append((value, name, row))
    if not candidates:
        return None, None
    _, name, row = min(candidates, key=lambda c: c[0])
    return name, row


def _geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def recommendation(rows: Sequence[Mapping], names: Sequence[str], batch_size: int) -> str:
    """One line: the implementation to adopt at this batch size, and why."""
    index = _index(rows)
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
            quantity: _best(index, names, quantity, batch_size, "ratio")[0]
            for quantity in ("norms", "gram")
        }
        found = [f"{name} for {q}" for q, name in partial.items() if name]
        if found:
            return (
                "recommendation: no implementation is correct on both norms and Gram here; "
                f"fastest correct: {', '.join(found)}"
            )
        return "recommendation: no implementation answers this model correctly (see above)"
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
    return line


def verdict(rows: Sequence[Mapping], names: Sequence[str], batch_size: int) -> str:
    """The verdict at one batch size: table, refusals, fastest, smallest memory, recommendation."""
    index = _index(rows)
    at_size = [r for r in rows if int(r["batch_size"]) == batch_size]
    plain_times = sorted(t for r in at_size if (t := _number(r.get("plain_median_s"))) is not None)
    plain_peaks = [p for r in at_size if (p := _number(r.get("plain_peak_bytes"))) is not None]
    title = f"B={batch_size}"
    if plain_times:
        # every cell times its own plain step, interleaved with the call; this is their median
        title += f": a plain forward+backward takes {_ms(plain_times[len(plain_times) // 2])}"
        title += f", peak {_mib(max(plain_peaks))}" if plain_peaks else ""
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
    table = _table((*header, "gram memory"), lines)
    parts = [title, table]
    if refusals:
        parts.append("not measured or not correct:\n" + "\n".join(refusals))
    for label, column, unit in (
        ("fastest", "ratio", "a plain step"),
        ("smallest memory", "memory_ratio", "the plain step's peak"),
    ):
        found = []
        for quantity in ("norms", "gram"):
            name, row = _best(index, names, quantity, batch_size, column)
            if name:
                found.append(f"{quantity} {name} ({_ratio(_number(row[column]))} {unit})")
        parts.append(f"{label}: {'; '.join(found) if found else 'none correct and measured'}")
    parts.append(recommendation(rows, names, batch_size))
    return "\n".join(parts)
