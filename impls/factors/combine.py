"""The sum of the uses of one parameter (tied weights, a layer called twice)."""

from __future__ import annotations

import torch

from impls.factors.base import Dense, Factors, Sum
from impls.factors.indexed import Indexed
from impls.factors.outer import GradientSums, Outer


def combine(factors: list[Factors]) -> Factors:
    """Uses that share a form are merged (Outer with the same groups, features, rows and
    orientation, and Indexed: positions concatenated; Dense: added); the rest stay parts of a
    :class:`Sum`, whose reductions add the cross terms.
    """
    merged: list[Factors] = []
    for f in factors:
        for part in f.parts if isinstance(f, Sum) else [f]:
            for k, g in enumerate(merged):
                joined = _join(g, part)
                if joined is not None:
                    merged[k] = joined
                    break
            else:
                merged.append(part)
    return merged[0] if len(merged) == 1 else Sum(merged)


def _join(a: Factors, b: Factors) -> Factors | None:
    if isinstance(a, Dense) and isinstance(b, Dense):
        return Dense(a.values + b.values)
    if isinstance(a, Outer) and isinstance(b, Outer):
        same_place = (a.row_start, a.groups, a.features, a.transposed) == (
            b.row_start,
            b.groups,
            b.features,
            b.transposed,
        )
        if same_place:
            gradients = torch.cat([a.gradients, b.gradients], 2)
            activations = torch.cat([a.activations, b.activations], 2)
            return Outer(gradients, activations, a.shape, a.row_start, a.transposed)
        return None
    if isinstance(a, (Dense, GradientSums)) and isinstance(b, (Dense, GradientSums)):
        return Dense(a.materialise() + b.materialise())
    if isinstance(a, Indexed) and isinstance(b, Indexed) and a.num_rows == b.num_rows:
        keep = None
        if a.keep is not None or b.keep is not None:
            keep = torch.cat([_kept(a), _kept(b)], 1)
        return Indexed(
            torch.cat([a.rows, b.rows], 1), torch.cat([a.values, b.values], 1), a.num_rows, keep
        )
    return None


def _kept(f: Indexed) -> torch.Tensor:
    if f.keep is not None:
        return f.keep
    return torch.ones(f.rows.shape, dtype=torch.bool, device=f.rows.device)
