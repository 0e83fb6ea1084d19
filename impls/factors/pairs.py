"""Reductions between two factors of one parameter, by the pair of their kinds.

``inner(left, right)`` is Tensor[n, n'] (two batches, or a Gram matrix with ``same``);
``diagonal(left, right)`` is Tensor[n] (two factors of one batch: the cross term of a parameter
used at two places). Each looks the pair of kinds up in one table; a pair with no entry is
reduced by materialising both sides.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from impls.factors import blocks
from impls.factors.base import Factors, Sum
from impls.factors.costs import gram
from impls.factors.indexed import (
    Indexed,
    indexed_diagonal,
    indexed_inner,
    indexed_outer_diagonal,
    indexed_outer_inner,
    pairs_with_outer,
)
from impls.factors.outer import (
    GradientSums,
    Outer,
    outer_diagonal,
    outer_inner,
    sums_diagonal,
    sums_inner,
)

#: (left kind, right kind) -> inner(left, right, same) -> Tensor[n, n'] or None (materialise)
INNER: dict[tuple[type, type], Callable[[Factors, Factors, bool], Tensor | None]] = {
    (Outer, Outer): outer_inner,
    (GradientSums, GradientSums): sums_inner,
    (Indexed, Indexed): indexed_inner,
    (Indexed, Outer): lambda left, right, same: (
        indexed_outer_inner(left, right) if pairs_with_outer(right) else None
    ),
    (Outer, Indexed): lambda left, right, same: (
        indexed_outer_inner(right, left).T if pairs_with_outer(left) else None
    ),
}

#: (left kind, right kind) -> diagonal(left, right) -> Tensor[n] or None (materialise)
DIAGONAL: dict[tuple[type, type], Callable[[Factors, Factors], Tensor | None]] = {
    (Outer, Outer): outer_diagonal,
    (GradientSums, GradientSums): sums_diagonal,
    (Indexed, Indexed): indexed_diagonal,
    (Indexed, Outer): lambda left, right: (
        indexed_outer_diagonal(left, right) if pairs_with_outer(right) else None
    ),
    (Outer, Indexed): lambda left, right: (
        indexed_outer_diagonal(right, left) if pairs_with_outer(left) else None
    ),
}


def inner(left: Factors, right: Factors, *, same: bool = False) -> Tensor:
    """Tensor[n, n']: ⟨left example n's gradient, right example m's⟩.

    ``same``: ``left is right`` (a Gram matrix); the result is symmetric and computed so.
    """
    if isinstance(left, Sum) and same:
        if blocks.materialising_is_cheaper(left.parts, same=True):
            return blocks.tiled_gram(left.parts, None)
        total = None
        for k, f in enumerate(left.parts):
            value = inner(f, f, same=True)
            for g in left.parts[k + 1 :]:
                cross = inner(f, g)
                value = value + cross + cross.T
            total = value if total is None else total + value
        return total
    if isinstance(left, Sum) and isinstance(right, Sum):
        parts = [*left.parts, *right.parts]
        if left.shape == right.shape and blocks.materialising_is_cheaper(parts, same=False):
            return blocks.tiled_gram(left.parts, right.parts)
    if isinstance(left, Sum):
        return sum(inner(f, right) for f in left.parts)
    if isinstance(right, Sum):
        return sum(inner(left, g) for g in right.parts)
    reduce = INNER.get((type(left), type(right)))
    value = reduce(left, right, same) if reduce is not None else None
    if value is not None:
        return value
    return gram(left.materialise().flatten(1), None if same else right.materialise().flatten(1))


def diagonal(left: Factors, right: Factors) -> Tensor:
    """Tensor[n]: ⟨left example n's gradient, right example n's⟩ (two factors of one batch)."""
    if left.batch_size != right.batch_size:
        raise ValueError("diagonal() needs two factors of the same batch")
    if left is right:
        return left.squared_norms()
    if isinstance(left, Sum):
        return sum(diagonal(f, right) for f in left.parts)
    if isinstance(right, Sum):
        return sum(diagonal(left, g) for g in right.parts)
    reduce = DIAGONAL.get((type(left), type(right)))
    value = reduce(left, right) if reduce is not None else None
    if value is not None:
        return value
    return (left.materialise().flatten(1) * right.materialise().flatten(1)).sum(1)
