"""Per-example gradients of one parameter kept as factors, and the reductions between two.

A layer rule describes example n's gradient of one parameter, from one use, as one of

- :class:`Dense` (``base``): the gradients themselves [n, *shape];
- :class:`Outer` (``outer``): Σ_t g_nt a_ntᵀ per group, output gradients and activations (or,
  :class:`Unbuilt`, what builds the activations on first use: a convolution's patches); and
  :class:`GradientSums`, Σ_t g_nt, the bias beside it;
- :class:`Indexed` (``indexed``): Σ_p e_{row_p} values_pᵀ, an Embedding's rows;
- :class:`Sum` (``base``): several of the above (a parameter used at places whose forms differ).

``pairs.inner`` / ``pairs.diagonal`` reduce two factors by the pair of their kinds (one table),
choosing between the factored form and materialising by ``costs.COSTS``; ``combine.combine``
sums the uses of one parameter.
"""

from impls.factors.base import Dense, Factors, Sum
from impls.factors.combine import combine
from impls.factors.costs import COSTS, Costs, gram, squared_row_norms
from impls.factors.indexed import Indexed
from impls.factors.outer import (
    GradientSums,
    Outer,
    Unbuilt,
    is_layer_pair,
    layer_inner,
    layer_squared_norms,
)
from impls.factors.pairs import diagonal, inner

__all__ = [
    "COSTS",
    "Costs",
    "Dense",
    "Factors",
    "GradientSums",
    "Indexed",
    "Outer",
    "Sum",
    "Unbuilt",
    "combine",
    "diagonal",
    "gram",
    "inner",
    "is_layer_pair",
    "layer_inner",
    "layer_squared_norms",
    "squared_row_norms",
]
