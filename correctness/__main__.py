"""``python -m correctness``: print the agreement matrix; exit 1 on any WRONG or crash."""

from __future__ import annotations

import argparse
import sys

import torch

import impls
from correctness import status
from correctness.cases import CASES
from correctness.harness import QUANTITIES, run
from correctness.report import format_matrix


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m correctness", description=__doc__)
    parser.add_argument("--impls", nargs="+", default=None, help=f"from {impls.names()}")
    parser.add_argument("--cases", nargs="+", default=None, help="zoo case names")
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--update-status",
        action="store_true",
        help="record these outcomes in correctness/status.json (the snapshot the tests compare "
        "against); refused while any check is WRONG or an error",
    )
    args = parser.parse_args(argv)
    known_cases = [c.name for c in CASES]
    for name in args.impls or []:
        if name not in impls.names():
            parser.error(f"unknown implementation '{name}'; known: {', '.join(impls.names())}")
    for name in args.cases or []:
        if name not in known_cases:
            parser.error(f"unknown case '{name}'; known: {', '.join(known_cases)}")
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


if __name__ == "__main__":
    sys.exit(main())
