"""Gradient geometry from inner products: cosine similarities between examples' gradients, and
each example's gradient split against a direction made of example gradients.

Everything here is computed from ``impl.inner`` (any registered implementation, by name or
instance); no gradient is ever materialised by this module, so the cost is that of the Gram
blocks the implementation computes. With ``create_graph=True`` the implementation's
differentiable inner products are used and every result is differentiable w.r.t. the model's
parameters (double backward).

Notation: g_i is example i's gradient of ``batch`` at ``model``; the direction is
d = Σ_k w_k g'_k over the examples k of a direction batch (by default ``batch`` itself, at
``model``), with weights w (by default 1/B': d is the batch's mean gradient). From

    G = ⟨g_i, g_j⟩ (only its diagonal is needed), C = ⟨g_i, g'_k⟩ [B, B'], H = ⟨g'_k, g'_l⟩:

    ⟨g_i, d⟩ = (C w)_i,   ‖d‖² = wᵀ H w,   ‖g_i⊥‖² = G_ii − (C w)_i² / wᵀ H w,

where g_i⊥ = g_i − (⟨g_i, d⟩ / ‖d‖²) d is the part of g_i orthogonal to d (when the direction
comes from the batch itself, C = H = G). An example whose gradient is zero has no direction:
its cosines are NaN. A direction of zero norm is a ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import impls
from impls.base import Implementation, LossFn, split_batch

__all__ = [
    "OrthogonalParts",
    "cosine_similarity",
    "cosines_from_inner",
    "orthogonal_parts",
    "orthogonal_parts_from_inner",
]

#: ‖d‖² at or below this fraction of its largest possible value (Σ_k |w_k| ‖g'_k‖)² is zero
ZERO_DIRECTION_TOLERANCE = 64


@dataclass(frozen=True)
class OrthogonalParts:
    """Each example's gradient g_i split against a direction d; every field is Tensor[B] but
    ``direction_norm`` (a scalar Tensor).

    - ``norm``: ‖g_i‖
    - ``along``: ⟨g_i, d⟩ / ‖d‖, the signed length of g_i's projection on d
    - ``orthogonal_norm``: ‖g_i⊥‖, g_i⊥ = g_i − (⟨g_i, d⟩ / ‖d‖²) d (so norm² = along² +
      orthogonal_norm²)
    - ``cosine_to_direction``: cos(g_i, d) = along / norm
    - ``cosine_to_orthogonal``: cos(g_i, g_i⊥) = orthogonal_norm / norm (≥ 0; the two cosines'
      squares add up to 1)
    - ``direction_norm``: ‖d‖
    """

    norm: Tensor
    along: Tensor
    orthogonal_norm: Tensor
    cosine_to_direction: Tensor
    cosine_to_orthogonal: Tensor
    direction_norm: Tensor


# -- from inner products ---------------------------------------------------------------------


def cosines_from_inner(cross: Tensor, left_squared: Tensor, right_squared: Tensor) -> Tensor:
    """cos(g_i, g'_j) = ⟨g_i, g'_j⟩ / (‖g_i‖ ‖g'_j‖): Tensor[B, B'] from the cross inner products
    ``cross`` [B, B'] and the squared norms ``left_squared`` [B], ``right_squared`` [B'].

    Entries of a zero gradient are NaN.
    """
    left = left_squared.clamp_min(0).sqrt()
    right = right_squared.clamp_min(0).sqrt()
    return cross / (left[:, None] * right[None, :])


def orthogonal_parts_from_inner(
    cross: Tensor, squared_norms: Tensor, direction_gram: Tensor, weights: Tensor
) -> OrthogonalParts:
    """Split every g_i against d = Σ_k w_k g'_k, from inner products only.

    Args:
        cross: [B, B'] ⟨g_i, g'_k⟩ (the Gram matrix G when the direction comes from the batch).
        squared_norms: [B] ‖g_i‖².
        direction_gram: [B', B'] ⟨g'_k, g'_l⟩.
        weights: [B'] the w_k.

    Raises:
        ValueError: ``weights`` does not have B' entries, or d has zero norm.
    """
    size = direction_gram.shape[0]
    if weights.dim() != 1 or weights.shape[0] != size:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)} but the direction is made of {size} "
            f"example gradients (expected shape ({size},))"
        )
    along_unnormalised = cross @ weights  # ⟨g_i, d⟩, [B]
    direction_squared = weights @ direction_gram @ weights  # ‖d‖²
    # the largest ‖d‖² can be, given the weights and ‖g'_k‖ (triangle inequality): the scale
    # below which rounding in the inner products cannot tell ‖d‖² from zero
    bound = (weights.abs() * direction_gram.diagonal().clamp_min(0).sqrt()).sum() ** 2
    tolerance = ZERO_DIRECTION_TOLERANCE * torch.finfo(direction_gram.dtype).eps * bound
    if size == 0 or direction_squared.item() <= tolerance.item():
        raise ValueError(
            "the direction d = Σ_k w_k g_k has zero norm: the parts of the gradients "
            "orthogonal to it are undefined"
        )
    direction_norm = direction_squared.sqrt()
    norm = squared_norms.clamp_min(0).sqrt()
    along = along_unnormalised / direction_norm
    # rounding can make the difference slightly negative when g_i is parallel to d
    orthogonal_norm = (squared_norms - along**2).clamp_min(0).sqrt()
    return OrthogonalParts(
        norm=norm,
        along=along,
        orthogonal_norm=orthogonal_norm,
        cosine_to_direction=along / norm,
        cosine_to_orthogonal=orthogonal_norm / norm,
        direction_norm=direction_norm,
    )


# -- from a model, through an implementation ------------------------------------------------


def _implementation(impl: Implementation | str) -> Implementation:
    return impls.get(impl) if isinstance(impl, str) else impl


def cosine_similarity(
    impl: Implementation | str,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    other: Any = None,
    *,
    other_model: nn.Module | None = None,
    create_graph: bool = False,
) -> Tensor:
    """Tensor[B, B']: cos(g_i, g'_j) between example i's gradient of ``batch`` at ``model`` and
    example j's gradient of ``other`` at ``other_model``.

    ``other=None``: the batch itself (within-batch similarities, Tensor[B, B], from one Gram
    matrix); ``other_model=None``: the same model (set it to compare two checkpoints). Across
    batches or models it takes three ``inner`` calls: the cross block and each side's Gram
    matrix, for the norms. Entries of a zero gradient are NaN.
    """
    impl = _implementation(impl)
    options = {"create_graph": create_graph}
    if other is None and other_model is None:
        gram = impl.inner(model, loss_fn, batch, **options)
        return cosines_from_inner(gram, gram.diagonal(), gram.diagonal())
    cross = impl.inner(model, loss_fn, batch, other, other_model=other_model, **options)
    left = impl.inner(model, loss_fn, batch, **options).diagonal()
    right_model = model if other_model is None else other_model
    right_batch = batch if other is None else other
    right = impl.inner(right_model, loss_fn, right_batch, **options).diagonal()
    return cosines_from_inner(cross, left, right)


def orthogonal_parts(
    impl: Implementation | str,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    weights: Tensor | None = None,
    *,
    direction_batch: Any = None,
    direction_model: nn.Module | None = None,
    create_graph: bool = False,
) -> OrthogonalParts:
    """Split each example's gradient g_i (``batch`` at ``model``) against d = Σ_k w_k g'_k.

    The g'_k are the gradients of ``direction_batch`` (default: ``batch``) at
    ``direction_model`` (default: ``model``), e.g. a validation batch's mean gradient, or the
    batch's own mean gradient at another checkpoint. ``weights``: Tensor[B'] (default 1/B', the
    mean gradient). From the batch itself this takes one Gram matrix; otherwise three ``inner``
    calls (the cross block C [B, B'], the direction's Gram H [B', B'] and the batch's own Gram
    for ‖g_i‖).

    Returns:
        :class:`OrthogonalParts`, fields Tensor[B] (``direction_norm``: a scalar Tensor).

    Raises:
        ValueError: ``weights`` does not have one entry per direction example, or d has zero
            norm (e.g. all weights zero, or weights that cancel equal gradients).
    """
    impl = _implementation(impl)
    options = {"create_graph": create_graph}
    own = direction_batch is None and direction_model is None
    direction_batch = batch if direction_batch is None else direction_batch
    *_, direction_size = split_batch(direction_batch)
    weights = _weights(weights, direction_size)
    if own:
        gram = impl.inner(model, loss_fn, batch, **options)
        weights = weights.to(dtype=gram.dtype, device=gram.device)
        return orthogonal_parts_from_inner(gram, gram.diagonal(), gram, weights)
    other_model = direction_model if direction_model is not model else None
    cross = impl.inner(model, loss_fn, batch, direction_batch, other_model=other_model, **options)
    direction_gram = impl.inner(
        model if direction_model is None else direction_model,
        loss_fn,
        direction_batch,
        **options,
    )
    squared_norms = impl.inner(model, loss_fn, batch, **options).diagonal()
    weights = weights.to(dtype=cross.dtype, device=cross.device)
    return orthogonal_parts_from_inner(cross, squared_norms, direction_gram, weights)


def _weights(weights: Tensor | None, size: int) -> Tensor:
    if weights is None:
        if size == 0:
            raise ValueError("the direction batch is empty: the direction has zero norm")
        return torch.full((size,), 1.0 / size, dtype=torch.float64)
    weights = torch.as_tensor(weights)
    if weights.dim() != 1 or weights.shape[0] != size:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)} but the direction batch has {size} "
            f"examples (expected shape ({size},))"
        )
    return weights
