"""What every factor kind is: example n's gradient of one parameter, unevaluated."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from impls.factors.costs import squared_row_norms


class Factors:
    """Example n's gradient of one parameter (Tensor[*shape]) for n in the batch, unevaluated."""

    batch_size: int
    shape: torch.Size

    def materialise(self) -> Tensor:
        """Tensor[n, *shape]: every example's gradient."""
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        """The floating tensors the factors hold (what :meth:`to` converts)."""
        raise NotImplementedError

    def to(self, dtype: torch.dtype, converted: dict | None = None) -> Factors:
        """The same factors with their floating tensors in ``dtype`` (self when they are).

        ``converted`` maps id(factors) -> their conversion, shared by the factors of one group
        so that factors referring to others (a bias's gradient sums to its weight's) keep
        referring to the same converted object.
        """
        converted = {} if converted is None else converted
        if all(t.dtype == dtype for t in self.tensors()):
            return self
        if id(self) not in converted:
            converted[id(self)] = self._converted(dtype, converted)
        return converted[id(self)]

    def _converted(self, dtype: torch.dtype, converted: dict) -> Factors:
        raise NotImplementedError

    def squared_norms(self) -> Tensor:
        """Tensor[n]: ‖example n's gradient‖²."""
        return squared_row_norms(self.materialise().flatten(1))

    def placed(self, shape: torch.Size, row_start: int) -> Factors:
        """The same gradients as rows ``row_start``.. of a parameter of ``shape`` (zeros
        elsewhere): a use that read a row slice of the parameter."""
        if row_start == 0 and tuple(shape) == tuple(self.shape):
            return self
        values = self.materialise()
        n, height = values.shape[0], values.shape[1]
        inner = values[0].numel() // max(height, 1)
        flat = values.reshape(n, height, inner)
        padded = F.pad(flat, (0, 0, row_start, shape[0] - row_start - height))
        return Dense(padded.reshape(n, *shape))


@dataclass(eq=False)
class Dense(Factors):
    """The gradients themselves, values [n, *shape] (small parameters, the vmap fallback)."""

    values: Tensor

    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape[1:]

    def materialise(self) -> Tensor:
        return self.values

    def squared_norms(self) -> Tensor:
        return squared_row_norms(self.values.flatten(1))

    def tensors(self) -> list[Tensor]:
        return [self.values]

    def _converted(self, dtype, converted):
        return Dense(self.values.to(dtype))


@dataclass(eq=False)
class Sum(Factors):
    """Σ_k parts_k: one parameter used at several places whose factors cannot be merged."""

    parts: list[Factors]

    @property
    def batch_size(self) -> int:
        return self.parts[0].batch_size

    @property
    def shape(self) -> torch.Size:
        return self.parts[0].shape

    def materialise(self) -> Tensor:
        return sum(p.materialise() for p in self.parts)

    def tensors(self) -> list[Tensor]:
        return [t for p in self.parts for t in p.tensors()]

    def _converted(self, dtype, converted):
        return Sum([p.to(dtype, converted) for p in self.parts])

    def squared_norms(self) -> Tensor:
        from impls.factors.pairs import diagonal

        # ‖Σ_k F_k‖² = Σ_k ‖F_k‖² + 2 Σ_{k<l} ⟨F_k, F_l⟩ per example
        total = None
        for k, f in enumerate(self.parts):
            value = f.squared_norms()
            for g in self.parts[k + 1 :]:
                value = value + 2 * diagonal(f, g)
            total = value if total is None else total + value
        return total
