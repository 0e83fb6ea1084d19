"""``python -m bench``: the benchmark's command line.

    python -m bench [sweep options]       the sweep (the default command), then REPORT.md
    python -m bench --quick               a short sweep (~3 minutes on 2 cores, plus ~1 for bf16)
    python -m bench report                regenerate REPORT.md and the plots from the CSVs

A sweep updates the table: the cells it measures replace their rows, every other row stays
(``--fresh`` starts an empty table, ``--resume`` skips the cells already there), and the
report is regenerated from the whole table.

Commands live in ``COMMANDS`` (name -> ``Command``: add_arguments, validate, run, help); the
regression gate and ``compare`` register there the same way. ``parse_and_validate(argv)``
parses and checks the arguments and input files before any work; bad input is one line on
stderr (``COMMAND: what is wrong``) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import comparison, regress
from bench.floor import FLOOR
from correctness import cli

QUICK = dict(
    batch_sizes=[16, 64],  # per case, those not above the case's default ladder
    low_precision_batch_sizes=[16],  # bench.cases.LOW_PRECISION's cells in the quick sweep
    rounds=2,
    noisy_rounds=0,
    min_run_time=0.05,
    budget=10.0,
)
DEFAULT_ROUNDS, DEFAULT_MIN_RUN_TIME, DEFAULT_BUDGET = 3, 0.1, 10.0
#: rounds a noisy cell may add within its budget (``bench.sweep.Settings.noisy_rounds``)
DEFAULT_NOISY_ROUNDS = 6


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
    cli.add_impls_argument(
        parser, "implementations (default: every registered one, impls.names(), and the floor)"
    )
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    add_dtype_argument(parser)
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=cli.BATCH_SIZE,
        default=None,
        help="batch sizes for every case (default: per case, bench.cases.CPU_BATCH_SIZES on "
        "CPU, 16..1024 on CUDA)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        help="output folder: the sweep updates OUT/<device>/cells.csv (default %(default)s)",
    )
    cli.add_threads_argument(parser)
    parser.add_argument(
        "--budget",
        type=cli.SECONDS,
        default=None,
        help=f"wall seconds per cell (default {DEFAULT_BUDGET:g}; quick {QUICK['budget']:g})",
    )
    parser.add_argument(
        "--rounds",
        type=cli.ROUNDS,
        default=None,
        help=f"interleaved timing rounds per cell (default {DEFAULT_ROUNDS})",
    )
    parser.add_argument(
        "--noisy-rounds",
        type=cli.whole(0),
        default=None,
        help="rounds a cell adds, at most, while its call's or plain step's IQR is above 10%% of "
        f"the median and its budget has room (default {DEFAULT_NOISY_ROUNDS}; quick "
        f"{QUICK['noisy_rounds']})",
    )
    parser.add_argument(
        "--min-run-time",
        type=cli.SECONDS,
        default=None,
        help=f"seconds per blocked_autorange round (default {DEFAULT_MIN_RUN_TIME:g})",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="measure only the cells missing from the table (continue an interrupted sweep)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start an empty table (by default the sweep replaces the rows of the cells it "
        "measures and keeps every other row)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short sweep: batch sizes {QUICK['batch_sizes']}, {QUICK['rounds']} rounds",
    )
    parser.add_argument(
        "--nproc",
        type=cli.whole(1, 64),
        default=1,
        help="processes: above 1, every case under DDP and FSDP2 on that many CPU processes "
        "(gloo), results in OUT/cpu-<N>proc/ (bench/distributed.py)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the oracle checks")
    parser.add_argument("--no-memory", action="store_true", help="skip memory readings")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate REPORT.md")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    from bench.cases import LOW_PRECISION
    from bench.precision import NAMES

    also = ", ".join(f"{c} in {' and '.join(d)}" for c, d in LOW_PRECISION.items())
    parser.add_argument(
        "--dtype",
        "--dtypes",
        dest="dtypes",
        nargs="+",
        default=None,
        choices=NAMES,
        help=f"precisions to run every case in (bench.precision; autocast-*: float32 parameters "
        f"under torch.autocast); default: each case as built (--quick: and {also} at "
        f"B={QUICK['low_precision_batch_sizes']})",
    )


def sweep_dtypes(args, cases) -> dict[str, list[str | None]]:
    """case name -> the precisions its cells run in (None: as built): ``--dtype``'s, else each
    case as built, and in the quick sweep ``bench.cases.LOW_PRECISION``'s too."""
    from bench.cases import LOW_PRECISION

    if args.dtypes:
        return {case.name: list(args.dtypes) for case in cases}
    extra = LOW_PRECISION if args.quick else {}
    return {case.name: [None, *extra.get(case.name, ())] for case in cases}


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
        noisy_rounds=pick(args.noisy_rounds, DEFAULT_NOISY_ROUNDS, QUICK["noisy_rounds"]),
        min_run_time=pick(args.min_run_time, DEFAULT_MIN_RUN_TIME, QUICK["min_run_time"]),
        budget_s=pick(args.budget, DEFAULT_BUDGET, QUICK["budget"]),
        check=not args.no_check,
        measure_memory=not args.no_memory,
    )


#: earlier sweeps' environments kept in a merged table's environment.json, at the most
MAX_PREVIOUS = 20


def validate_sweep(args) -> None:
    """Names, devices, ``--out`` and the tables a sweep will update (and the report read), all
    before measuring: ``cli.UsageError`` on a problem. Sets ``args.devices``."""
    import impls
    from bench import report, store
    from bench.cases import BY_NAME
    from bench.sweep import default_devices

    with cli.usage("sweep"):
        cli.check_known("implementation", args.impls, [*impls.names(), FLOOR])
        cli.check_known("bench case", args.cases, list(BY_NAME))
        devices = args.devices or (["cpu"] if args.nproc > 1 else default_devices())
        for device in devices:
            cli.check_device(device, "--device")
        if args.fresh and args.resume:
            raise ValueError(
                "--fresh starts an empty table, --resume continues the one there: not both"
            )
        cli.check_output_folder(args.out, "--out")
        folders = [args.out / torch.device(device).type for device in devices]
        if args.nproc > 1:
            from bench.distributed import folder_name

            if any(torch.device(device).type != "cpu" for device in devices):
                raise ValueError("--nproc runs CPU processes (gloo): use --device cpu")
            if args.dtypes:
                raise ValueError("--dtype runs in one process only: not with --nproc")
            folders = [args.out / folder_name(device, args.nproc) for device in devices]
        for folder in folders:
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"argument --out: {folder} is not a folder")
            if not args.fresh:
                try:
                    store.read_table(folder / store.TABLE_NAME)
                    store.read_environment(folder)
                except store.ResultsError as error:
                    raise ValueError(f"{error} (--fresh starts an empty table)") from None
        if not args.no_report and args.out.is_dir():
            report.check(args.out, replaced=folders if args.fresh else ())
    args.devices = devices


def _previous_environments(folder: Path, resume: bool) -> list[dict]:
    """The environments of the sweeps whose rows a merged table keeps, newest first: the last
    sweep's (unless this one resumes it) and the ones it kept."""
    from bench.store import read_environment

    old = read_environment(folder)
    if not old:
        return []
    previous = list(old.get("previous", []))
    if not resume:
        previous.insert(0, {k: v for k, v in old.items() if k != "previous"})
    return previous[:MAX_PREVIOUS]


def run_sweep(args) -> int:
    if args.nproc > 1:
        from bench import distributed

        return distributed.run_sweep(args)
    import impls
    from bench import environment
    from bench.cases import BENCH_CASES, LOW_PRECISION, get_case
    from bench.report import headline, markdown_table, write_report
    from bench.store import ResultStore
    from bench.sweep import Sweep, plan

    cases = [get_case(n) for n in args.cases] if args.cases else list(BENCH_CASES)
    settings = settings_from(args)
    batch_sizes = args.batch_sizes
    if batch_sizes is None and args.quick:
        batch_sizes = {c.name: quick_batch_sizes(c.name) for c in cases}
        if not args.dtypes:  # the low-precision cells the quick sweep adds: the smallest size
            smallest = QUICK["low_precision_batch_sizes"]
            for name, dtypes in LOW_PRECISION.items():
                batch_sizes.update({(name, dtype): smallest for dtype in dtypes})
    started = time.perf_counter()
    for device in args.devices:
        cells = plan(
            cases,
            args.impls or [*impls.names(), FLOOR],
            devices=[device],
            quantities=args.quantities,
            batch_sizes=batch_sizes,
            dtypes=sweep_dtypes(args, cases),
        )
        folder = args.out / torch.device(device).type
        store = ResultStore(folder, keep=not args.fresh)
        planned = {c.key for c in cells}
        kept = sum(1 for key in store.rows if args.resume or key not in planned)
        todo = sum(not args.resume or c.key not in store for c in cells)
        info = environment.describe(device, settings.threads)
        info["settings"] = dict(settings.as_dict(), quick=args.quick, resumed=args.resume)
        previous = _previous_environments(folder, args.resume) if kept else []
        if previous:
            info["previous"] = previous
        store.environment = info  # written with the table, at the first measured cell
        print(f"{device}: {len(cells)} cells, {todo} to measure, {kept} kept", flush=True)
        Sweep(store, settings, progress=not args.no_progress).run(cells, remeasure=not args.resume)
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


def validate_report(args) -> None:
    """The results folder, its tables and environments, where the report goes: before writing."""
    from bench import report

    with cli.usage("report"):
        cli.check_output_folder(args.out, "--out")
        report.check(args.out)


def run_report(args) -> int:
    from bench.report import write_report

    print(f"wrote {write_report(args.out)}")
    return 0


def add_floor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("case", help="a bench case (see python -m bench --help for the list)")
    parser.add_argument("--batch-size", type=cli.BATCH_SIZE, default=32, help="default 32")
    parser.add_argument("--quantity", choices=("norms", "gram"), default="norms")
    cli.add_threads_argument(parser)
    parser.add_argument(
        "--rounds",
        type=cli.ROUNDS,
        default=5,
        help="interleaved rounds of the activation step and the plain step, and of ghost's parts",
    )


def validate_floor(args) -> None:
    from bench.cases import BY_NAME

    with cli.usage("floor"):
        cli.check_known("case", [args.case], list(BY_NAME))


def run_floor(args) -> int:
    """The floor of one bench case, in parts: the activation step beside a plain step, each
    parameter group's reduction in every exact form (the fastest is the floor's), and ghost's
    time in the same parts."""
    from bench.cases import get_case
    from bench.floor import floor_report

    if args.threads:
        torch.set_num_threads(args.threads)
    case = get_case(args.case)
    model, batch = case.make_model(), case.make_batch(args.batch_size)
    print(f"{case.name} B={args.batch_size} {args.quantity}, {torch.get_num_threads()} thread(s)")
    print(floor_report(model, case.loss_fn, batch, args.quantity, args.rounds))
    return 0


@dataclass(frozen=True)
class Command:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: checks the parsed arguments and input files (``cli.UsageError``); may add to them
    validate: Callable[[argparse.Namespace], None]
    #: the work, on validated arguments; returns the exit code
    run: Callable[[argparse.Namespace], int]
    help: str


COMMANDS: dict[str, Command] = {
    "sweep": Command(
        add_sweep_arguments,
        validate_sweep,
        run_sweep,
        "time and memory sweep, then REPORT.md (default)",
    ),
    "report": Command(
        add_report_arguments,
        validate_report,
        run_report,
        "regenerate REPORT.md and plots from the CSVs",
    ),
    "regress": Command(
        regress.add_arguments,
        regress.validate,
        regress.run,
        "performance-regression gate vs a baseline",
    ),
    "compare": Command(
        comparison.add_arguments,
        comparison.validate,
        comparison.run,
        "every implementation on your own model file",
    ),
    "floor": Command(
        add_floor_arguments,
        validate_floor,
        run_floor,
        "the floor of a bench case in parts (activation step, each group's fastest reduction) "
        "and ghost's time in the same parts",
    ),
}


#: the commands that time calls: glibc malloc's thresholds are pinned before they run
TIMED = ("sweep", "regress", "compare", "floor")


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = cli.Parser(
        prog="python -m bench",
        description="pegbench benchmark. Without a command, runs 'sweep'.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, command in COMMANDS.items():
        subparsers[name] = commands.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparsers[name])
        if name in TIMED:
            subparsers[name].add_argument(
                "--default-malloc",
                action="store_true",
                help="leave glibc malloc's adaptive thresholds as they are (by default they are "
                "pinned for every measurement: bench/allocator.py)",
            )
    return parser, subparsers


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def parse_and_validate(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of ``python -m bench`` parsed and checked, input files included, before
    any work: ``cli.UsageError`` (one line) on bad input; ``SystemExit(0)`` after --help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["sweep", *argv]
    parser, subparsers = _parsers()
    if argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help: prints it and exits
    # the command's own parser, so that every error names the command
    args = subparsers[argv[0]].parse_args(argv[1:])
    args.command = argv[0]
    COMMANDS[args.command].validate(args)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_and_validate(argv)
    except cli.UsageError as error:
        return cli.fail(error)
    if args.command in TIMED and not args.default_malloc:
        from bench import allocator

        allocator.pin()
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
