"""The precisions the agreement harness checks in, and what each allows.

A precision says how a zoo case is run and how close to the float64 oracle an answer must be:

- ``parameters``: the dtype the model and the batch's floating tensors are converted to (a
  ``model.to(dtype)``, as a user training in that dtype holds them);
- ``autocast``: when set, the implementation is called inside ``torch.autocast(device_type,
  dtype=autocast)`` (its forward runs under it: ``impls._precision``), the model in
  ``parameters`` (float32);
- ``tolerance``: per family of quantities (norms; per-parameter norms; Gram, cross-batch and
  cross-checkpoint inner products; the double backward), the largest relative error against the
  float64 oracle of the *same* parameter values (the converted model, made float64 exactly).

The tolerances are derived from measurement, not chosen: ``python -m correctness --dtype NAME
--rounding`` prints the relative error of a plain per-example loop in that precision (each
example's forward and backward in the precision, its gradients then reduced in float64) on every
case of the zoo. Each tolerance is :data:`LOOP_MARGIN` times the largest such error over the zoo,
rounded up to one significant digit, and never below ``floor``, the default harness's tolerance
for the dtype the reductions run in (:data:`TOLERANCE`: float32 for bf16, whose reductions
accumulate in float32; a float64 loop *is* the oracle, so float64 keeps its floor):
:func:`tolerance_from`. The README lists the measurements beside the tolerances. An
implementation far worse than a plain loop in the same precision shows WRONG.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: the default harness's tolerance for a case in its own dtype (relative error vs the oracle)
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}

#: quantity -> the family its tolerance is stated for
FAMILY = {
    "norms": "norms",
    "per_param": "per_param",
    "gram": "inner",
    "cross_batch": "inner",
    "cross_checkpoint": "inner",
    "double_backward": "double_backward",
}

#: a tolerance is this many times the largest error of a plain per-example loop over the zoo:
#: an implementation in the precision rounds in its forward and backward as the loop does, and
#: may round as much again in its own order of operations
LOOP_MARGIN = 2.0


@dataclass(frozen=True)
class Precision:
    name: str
    parameters: torch.dtype
    autocast: torch.dtype | None = None
    #: family ("norms", "per_param", "inner", "double_backward") -> largest relative error
    tolerance: Mapping[str, float] = field(default_factory=dict)
    description: str = ""

    @property
    def floor(self) -> float:
        """The smallest tolerance: the default harness's for the dtype reductions run in."""
        return TOLERANCE[torch.promote_types(self.parameters, torch.float32)]

    def tolerance_for(self, quantity: str) -> float:
        return self.tolerance[FAMILY[quantity]]

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``model`` with its floating parameters and buffers in ``parameters``."""
        return copy.deepcopy(model).to(self.parameters)

    def batch(self, value: Any) -> Any:
        """A batch value with its floating tensors in ``parameters`` (indices untouched)."""
        if isinstance(value, torch.Tensor):
            return value.to(self.parameters) if value.is_floating_point() else value
        if isinstance(value, Mapping):
            return type(value)({k: self.batch(v) for k, v in value.items()})
        if isinstance(value, (tuple, list)):
            return type(value)(self.batch(v) for v in value)
        return value

    def context(self, device_type: str = "cpu"):
        """What the implementation is called inside: ``torch.autocast`` or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast)

    def __str__(self) -> str:
        return self.name


def tolerance_from(loop_error: float, floor: float) -> float:
    """:data:`LOOP_MARGIN` x a loop's largest error, rounded up to one significant digit, and
    at least ``floor``."""
    value = LOOP_MARGIN * loop_error
    if value <= floor:
        return floor
    scale = 10.0 ** math.floor(math.log10(value))
    return math.ceil(round(value / scale, 9)) * scale


def _tolerances(norms, per_param, inner, double_backward) -> dict[str, float]:
    return {"norms": norms, "per_param": per_param, "inner": inner,
            "double_backward": double_backward}  # fmt: skip


# The tolerances below are tolerance_from(the largest loop error over the zoo, floor), measured
# with ``python -m correctness --dtype NAME --rounding --threads 1`` (torch 2.13, CPU; the
# README's "Precision" section has the numbers); the command says when one falls below them.
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in [
        Precision(
            "float64",
            torch.float64,
            tolerance=_tolerances(1e-6, 1e-6, 1e-6, 1e-6),
            description="every case in float64",
        ),
        Precision(
            "float32",
            torch.float32,
            tolerance=_tolerances(1e-4, 1e-4, 1e-4, 1e-4),
            description="every case in float32",
        ),
        Precision(
            "bf16",
            torch.bfloat16,
            tolerance=_tolerances(2e-2, 3e-2, 3e-2, 9e-2),
            description="parameters and inputs in bfloat16",
        ),
        Precision(
            "autocast-bf16",
            torch.float32,
            autocast=torch.bfloat16,
            tolerance=_tolerances(8e-3, 2e-2, 2e-2, 6e-2),
            description="float32 parameters, called inside torch.autocast(dtype=torch.bfloat16)",
        ),
    ]
}


def get(name: str) -> Precision:
    if name not in PRECISIONS:
        raise KeyError(f"unknown precision '{name}'; known: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]
