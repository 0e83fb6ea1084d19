"""The bench's dtype axis: a bench case run in a precision of ``correctness.precision``.

``--dtype bf16`` converts the model and the batch to bfloat16; ``--dtype autocast-bf16`` keeps
float32 parameters and calls each implementation inside ``torch.autocast(device_type,
dtype=torch.bfloat16)``, the plain step's forward (model and loss) under the same autocast and its
backward outside it, as a mixed-precision training step runs. A cell's ``dtype`` column holds the
precision's name; a case as built is labelled by its own dtype (``float32`` for every bench case).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from correctness import precision as precisions
from correctness.precision import Precision

#: the precisions a sweep can run a case in (``--dtype``)
NAMES = tuple(precisions.PRECISIONS)

#: the label of a case run as built, by its parameters' dtype
_LABELS = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bf16",
           torch.float16: "fp16"}  # fmt: skip


@dataclass(frozen=True)
class PrecisionCase:
    """A bench case (``name``, ``make_model``, ``make_batch``, ``loss_fn``) in a precision."""

    case: Any
    precision: Precision

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def loss_fn(self):
        return self.case.loss_fn

    @property
    def tags(self) -> tuple:
        return getattr(self.case, "tags", ())

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.parameters

    def make_model(self, seed: int = 0, device="cpu") -> torch.nn.Module:
        return self.case.make_model(seed, device).to(self.precision.parameters)

    def make_batch(self, batch_size: int, seed: int = 0, device="cpu") -> tuple[Any, Any]:
        return self.precision.batch(self.case.make_batch(batch_size, seed, device))


def in_precision(case, name: str | None):
    """``case`` in the precision ``name``; None, or the case's own precision: the case itself."""
    if name is None or name == label(case):
        return case
    return PrecisionCase(case, precisions.get(name))


def label(case) -> str:
    """The ``dtype`` column of a case's cells: its precision's name, or its own dtype's."""
    if isinstance(case, PrecisionCase):
        return case.precision.name
    dtype = getattr(case, "dtype", torch.float32)
    return _LABELS.get(dtype, str(dtype).removeprefix("torch."))


def unwrapped(case):
    """The bench case a precision case was made from (the case itself otherwise)."""
    return case.case if isinstance(case, PrecisionCase) else case


def forward_context(case, device: str):
    """A zero-argument factory of the context the case's forward runs in on ``device``: its
    precision's autocast, or nothing."""
    if isinstance(case, PrecisionCase) and case.precision.autocast is not None:
        device_type = torch.device(device).type
        return lambda: case.precision.context(device_type)
    return contextlib.nullcontext


def tolerances(case) -> dict[str, float] | None:
    """quantity ("norms", "gram") -> the agreement harness's tolerance in the case's precision,
    or None for a case as built (the sweep then uses the harness's for its dtype)."""
    if not isinstance(case, PrecisionCase):
        return None
    return {"norms": case.precision.tolerance_for("norms"),
            "gram": case.precision.tolerance_for("gram")}  # fmt: skip
