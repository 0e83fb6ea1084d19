"""``python -m bench``: the benchmark's command line.

    python -m bench [sweep options]       the sweep (the default command), then REPORT.md
    python -m bench --quick               a short sweep (at most ~3 minutes on 2 cores)
    python -m bench report                regenerate REPORT.md and the plots from the CSVs

Commands live in ``COMMANDS`` (name -> (add_arguments, run)); the regression gate and
``compare`` register there the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import compare, regress

QUICK = dict(
    batch_sizes=[16, 64],  # per case, those not above the case's default ladder
    rounds=2,
    min_run_time=0.05,
    budget=10.0,
)
DEFAULT_ROUNDS, DEFAULT_MIN_RUN_TIME, DEFAULT_BUDGET = 3, 0.1, 10.0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.cases import BY_NAME
    from bench.sweep import QUANTITIES

    parser.add_argument(
        "--device",
        "--devices",
        dest="devices",
        nargs="+",
        default=None,
        help="devices to sweep (cpu, cuda); default: cpu, plus cuda when present",
    )
    parser.add_argument(
        "--cases", nargs="+", default=None, help=f"bench cases (default all: {', '.join(BY_NAME)})"
    )
    parser.add_argument(
        "--impls",
        "--implementations",
        dest="impls",
        nargs="+",
        default=None,
        help="implementations (default: every registered one, impls.names())",
    )
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=None,
        help="batch sizes for every case (default: per case, bench.cases.CPU_BATCH_SIZES on "
        "CPU, 16..1024 on CUDA)",
    )
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch intra-op threads (default {torch.get_num_threads()})",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"wall seconds per cell (default {DEFAULT_BUDGET:g}; quick {QUICK['budget']:g})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"interleaved timing rounds per cell (default {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help=f"seconds per blocked_autorange round (default {DEFAULT_MIN_RUN_TIME:g})",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in the tables and measure only the missing cells",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short sweep: batch sizes {QUICK['batch_sizes']}, {QUICK['rounds']} rounds",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the oracle checks")
    parser.add_argument("--no-memory", action="store_true", help="skip memory readings")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate REPORT.md")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def quick_batch_sizes(case_name: str) -> list[int]:
    from bench.cases import default_batch_sizes

    largest = max(default_batch_sizes(case_name, "cpu"))
    return [b for b in QUICK["batch_sizes"] if b <= largest] or [min(QUICK["batch_sizes"])]


def settings_from(args):
    from bench.sweep import Settings

    quick = args.quick

    def pick(value, default, quick_value):
        if value is not None:
            return value
        return quick_value if quick else default

    return Settings(
        threads=args.threads or torch.get_num_threads(),
        rounds=pick(args.rounds, DEFAULT_ROUNDS, QUICK["rounds"]),
        min_run_time=pick(args.min_run_time, DEFAULT_MIN_RUN_TIME, QUICK["min_run_time"]),
        budget_s=pick(args.budget, DEFAULT_BUDGET, QUICK["budget"]),
        check=not args.no_check,
        measure_memory=not args.no_memory,
    )


def run_sweep(args) -> int:
    import impls
    from bench import environment
    from bench.cases import BENCH_CASES, get_case
    from bench.report import headline, markdown_table, write_report
    from bench.store import ResultStore
    from bench.sweep import Sweep, default_devices, plan

    known = impls.names()
    for name in args.impls or []:
        if name not in known:
            print(f"unknown implementation '{name}'; known: {', '.join(known)}", file=sys.stderr)
            return 2
    try:
        cases = [get_case(n) for n in args.cases] if args.cases else list(BENCH_CASES)
    except KeyError as error:
        print(error.args[0], file=sys.stderr)
        return 2
    devices = args.devices or default_devices()
    for device in devices:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            print(f"device '{device}' asked for, but CUDA is not available", file=sys.stderr)
            return 2
    settings = settings_from(args)
    batch_sizes = args.batch_sizes
    if batch_sizes is None and args.quick:
        batch_sizes = {c.name: quick_batch_sizes(c.name) for c in cases}
    started = time.perf_counter()
    for device in devices:
        cells = plan(
            cases,
            args.impls or known,
            devices=[device],
            quantities=args.quantities,
            batch_sizes=batch_sizes,
        )
        store = ResultStore(args.out / torch.device(device).type, resume=args.resume)
        info = environment.describe(device, settings.threads)
        info["settings"] = dict(settings.as_dict(), quick=args.quick, resumed=args.resume)
        store.write_environment(info)
        store.save()
        todo = sum(c.key not in store for c in cells)
        print(f"{device}: {len(cells)} cells, {todo} to measure, {len(store)} kept", flush=True)
        Sweep(store, settings, progress=not args.no_progress).run(cells)
        frame = store.frame()
        table = headline(frame, device)
        if len(table):
            print(markdown_table(table, "case, quantity"))
        counts = frame["status"].value_counts().to_dict()
        print(f"{device}: statuses {counts}", flush=True)
    print(f"sweep wall time {time.perf_counter() - started:.0f} s", flush=True)
    if not args.no_report:
        print(f"wrote {write_report(args.out)}")
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder")


def run_report(args) -> int:
    from bench.report import write_report

    print(f"wrote {write_report(args.out)}")
    return 0


#: name -> (add_arguments(parser), run(args) -> exit code, one-line help)
COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "sweep": (add_sweep_arguments, run_sweep, "time and memory sweep, then REPORT.md (default)"),
    "report": (add_report_arguments, run_report, "regenerate REPORT.md and plots from the CSVs"),
    "regress": (regress.add_arguments, regress.run, "performance-regression gate vs a baseline"),
    "compare": (compare.add_arguments, compare.run, "every implementation on your own model file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="pegbench benchmark. Without a command, runs 'sweep'.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["sweep", *argv]
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
