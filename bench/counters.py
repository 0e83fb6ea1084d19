"""Deterministic counts of one call, for the regression gate: floating-point operations
(``torch.utils.flop_counter.FlopCounterMode``) and aten operators dispatched (a
``TorchDispatchMode`` that counts every call it sees), forward and backward alike.

Unlike times they do not depend on the machine's load: the same code on the same shapes and the
same torch build gives the same numbers, so the gate holds them to a few percent. A counter
moves when the work changes: a reduction choosing a materialised form where the factored one was
cheaper (FLOPs), a layer falling back to vmap or a loop (operators), an extra copy (the bytes
``bench.memory`` counts with ``allocated=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Counts:
    """FLOPs and aten operators of one call; None (with a note saying why) when not counted."""

    flops: int | None
    operators: int | None
    note: str = ""


def count(call: Callable[[], object]) -> Counts:
    """Run ``call()`` once under both counters. A call that fails under them (a library that
    does not tolerate a dispatch mode) gives no counts and a note, never an exception."""
    flops = FlopCounterMode(display=False)
    operators = OperatorCount()
    try:
        with flops, operators:
            result = call()
        del result
    except Exception as error:  # noqa: BLE001 - an uncountable call is not gated on counts
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return Counts(None, None, f"not counted: {type(error).__name__}: {first}"[:200])
    return Counts(int(flops.get_total_flops()), operators.count)
