"""The committed status of every implementation x zoo case x quantity: ok or unsupported.

A refusal that appears where the snapshot says ok (or an answer where it says unsupported) fails
the tests until someone updates the snapshot on purpose (``python -m correctness
--update-status``), so that neither a new refusal nor one of our own bugs can pass as a peer's
limitation. WRONG and error are never recorded: they always fail. Each precision of
``correctness.precision`` has its own snapshot (``status-bf16.json``, ..., :func:`path_for`;
``python -m correctness --dtype bf16 --update-status``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from correctness.harness import Outcome

PATH = Path(__file__).with_name("status.json")


def path_for(precision: str | None) -> Path:
    """The snapshot of a precision of ``correctness.precision`` (``status-NAME.json``), or the
    default one (each case in its own dtype) for None."""
    return PATH if precision is None else PATH.with_name(f"status-{precision}.json")


def load(path: Path = PATH) -> dict[str, dict[str, dict[str, str]]]:
    """implementation -> case -> quantity -> "ok" | "unsupported"."""
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def expected(snapshot: dict, outcome: Outcome) -> str | None:
    return snapshot.get(outcome.implementation, {}).get(outcome.case, {}).get(outcome.quantity)


def update(outcomes: Iterable[Outcome], path: Path = PATH) -> dict:
    """Record the outcomes' statuses (other entries kept); refuse to record a failure."""
    snapshot = load(path)
    for o in outcomes:
        if o.failed:
            raise ValueError(f"{o.implementation} x {o.case} x {o.quantity} is {o.status}: "
                             "fix it before recording a status")  # fmt: skip
        snapshot.setdefault(o.implementation, {}).setdefault(o.case, {})[o.quantity] = o.status
    ordered = {
        impl: {case: dict(sorted(q.items())) for case, q in sorted(cases.items())}
        for impl, cases in sorted(snapshot.items())
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ordered, indent=1) + "\n")
    tmp.replace(path)
    return ordered


def differences(outcomes: Iterable[Outcome], snapshot: dict) -> list[str]:
    """One line per outcome whose status differs from the snapshot (or is missing from it)."""
    lines = []
    for o in outcomes:
        want = expected(snapshot, o)
        if want is None:
            lines.append(f"{o.implementation} x {o.case} x {o.quantity}: {o.status}, not in the "
                         "snapshot")  # fmt: skip
        elif want != o.status:
            why = f" ({o.detail})" if o.detail else ""
            lines.append(
                f"{o.implementation} x {o.case} x {o.quantity}: {o.status}{why}, the snapshot "
                f"says {want}"
            )
    return lines
