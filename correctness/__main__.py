"""``python -m correctness``: print the agreement matrix; exit 1 on any WRONG or crash.

``--dtype NAME`` runs every case in a precision of ``correctness.precision`` (float64, float32,
bf16 parameters, bf16 autocast) against the float64 oracle of the same parameters, with that
precision's tolerances; ``--rounding`` prints instead what a plain per-example loop in that
precision gets on each case (what the tolerances are derived from).

Bad arguments are one line on stderr and exit code 2 (``correctness.cli``, what every command
line of pegbench shares).
"""

from __future__ import annotations

import argparse
import sys

import torch

import impls
from correctness import cli, status
from correctness import precision as precisions
from correctness.cases import CASES
from correctness.harness import QUANTITIES, loop_rounding, run
from correctness.report import format_matrix, format_rounding


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m correctness", description=__doc__.splitlines()[0])
    cli.add_impls_argument(parser, f"from {impls.names()}")
    parser.add_argument("--cases", nargs="+", default=None, help="zoo case names")
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument(
        "--dtype",
        default=None,
        choices=list(precisions.PRECISIONS),
        help="run every case in this precision, with its tolerances (default: each case in its "
        "own dtype)",
    )
    parser.add_argument(
        "--rounding",
        action="store_true",
        help="with --dtype: print the relative error of a plain per-example loop in that "
        "precision on each case, and the tolerances it gives (no implementation is run)",
    )
    parser.add_argument("--threads", type=cli.THREADS, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--update-status",
        action="store_true",
        help="record these outcomes in correctness/status.json (status-DTYPE.json with --dtype: "
        "the snapshots the tests compare against); refused while any check is WRONG or an error",
    )
    return parser


def parse_and_validate(argv=None) -> argparse.Namespace:
    """Parsed and checked arguments; ``cli.UsageError`` (one line) on bad input."""
    args = build_parser().parse_args(argv)
    with cli.usage("correctness"):
        cli.check_known("implementation", args.impls, impls.names())
        cli.check_known("case", args.cases, [c.name for c in CASES])
        if args.rounding and args.dtype is None:
            raise ValueError("--rounding measures a precision: give it with --dtype")
        if args.rounding and args.update_status:
            raise ValueError("--rounding runs no implementation: there is no status to update")
    return args


def evaluate(args: argparse.Namespace) -> int:
    """The agreement matrix on validated arguments: 1 on any WRONG or crash, else 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounding:
        return rounding(args)
    path = status.path_for(args.dtype)
    if args.dtype is not None:
        chosen = precisions.get(args.dtype)
        limits = ", ".join(f"{family} <= {value:g}" for family, value in chosen.tolerance.items())
        print(f"precision {chosen.name}: {chosen.description}; tolerances {limits}")
    outcomes = run(args.impls, args.cases, args.quantities, precision=args.dtype)
    print(format_matrix(outcomes))
    failed = any(o.failed for o in outcomes)
    if args.update_status and not failed:
        status.update(outcomes, path)
        print(f"recorded {len(outcomes)} statuses in {path}")
    else:
        changed = status.differences(outcomes, status.load(path))
        if changed:
            print(f"{len(changed)} statuses differ from {path.name} (the tests compare "
                  "against it; --update-status records them):")  # fmt: skip
            print("\n".join(f"  {line}" for line in changed[:20]))
    return 1 if failed else 0


def rounding(args: argparse.Namespace) -> int:
    """A plain per-example loop's error per case and quantity, the tolerances it gives; 1 when
    a stated tolerance is below what the loop's rounding gives."""
    cases = args.cases or [c.name for c in CASES]
    errors = {case: loop_rounding(case, args.dtype, args.quantities) for case in cases}
    text, too_tight = format_rounding(errors, precisions.get(args.dtype))
    print(text)
    return 1 if too_tight else 0


def main(argv=None) -> int:
    try:
        args = parse_and_validate(argv)
    except cli.UsageError as error:
        return cli.fail(error)
    return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
