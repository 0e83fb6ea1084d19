"""``python -m correctness``: print the agreement matrix; exit 1 on any WRONG or crash.

Bad arguments are one line on stderr and exit code 2 (``bench.cli``, the command lines' shared
helper: the only piece of ``bench`` this imports).
"""

from __future__ import annotations

import argparse
import sys

import torch

import impls
from bench import cli
from correctness import status
from correctness.cases import CASES
from correctness.harness import QUANTITIES, run
from correctness.report import format_matrix


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m correctness", description=__doc__.splitlines()[0])
    cli.add_impls_argument(parser, f"from {impls.names()}")
    parser.add_argument("--cases", nargs="+", default=None, help="zoo case names")
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument("--threads", type=cli.THREADS, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--update-status",
        action="store_true",
        help="record these outcomes in correctness/status.json (the snapshot the tests compare "
        "against); refused while any check is WRONG or an error",
    )
    return parser


def parse_and_validate(argv=None) -> argparse.Namespace:
    """Parsed and checked arguments; ``cli.UsageError`` (one line) on bad input."""
    args = build_parser().parse_args(argv)
    with cli.usage("correctness"):
        cli.check_known("implementation", args.impls, impls.names())
        cli.check_known("case", args.cases, [c.name for c in CASES])
    return args


def evaluate(args: argparse.Namespace) -> int:
    """The agreement matrix on validated arguments: 1 on any WRONG or crash, else 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    outcomes = run(args.impls, args.cases, args.quantities)
    print(format_matrix(outcomes))
    failed = any(o.failed for o in outcomes)
    if args.update_status and not failed:
        status.update(outcomes)
        print(f"recorded {len(outcomes)} statuses in {status.PATH}")
    else:
        changed = status.differences(outcomes, status.load())
        if changed:
            print(f"{len(changed)} statuses differ from {status.PATH.name} (the tests compare "
                  "against it; --update-status records them):")  # fmt: skip
            print("\n".join(f"  {line}" for line in changed[:20]))
    return 1 if failed else 0


def main(argv=None) -> int:
    try:
        args = parse_and_validate(argv)
    except cli.UsageError as error:
        return cli.fail(error)
    return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
