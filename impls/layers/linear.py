"""nn.Linear with any number of leading dimensions: a [n, *, i], g [n, *, o].

∇W ℓ_n = Σ_t g_nt a_ntᵀ (o × i);  ∇b ℓ_n = Σ_t g_nt.

The weight's per-example gradients stay factored (``Outer``: rows g, cols a); the reductions
choose between Σ_{t,s}(a_nt·a'_ms)(g_nt·g'_ms) and materialising by cost. The bias Σ_t g_nt
(``RowSums``) reuses the products g_nt·g'_ms the weight's factored reductions form.
"""

from __future__ import annotations

from torch import nn

from impls.layers.base import LayerRule, register_rule
from impls.layers.factored import Outer, RowSums


def flatten_positions(x, batch_size):
    """[n, *, f] -> [n, t, f]: every leading dimension after the batch becomes a position."""
    return x.reshape(batch_size, -1, x.shape[-1])


def linear_factors(a, g, weight_shape, wanted, weight="weight", bias="bias"):
    """Factors of ``F.linear`` with input a [n, t, i] and output gradient g [n, t, o]."""
    out = {}
    outer = Outer(g.unsqueeze(1), a.unsqueeze(1), weight_shape)
    if weight in wanted:
        out[weight] = outer
    if bias in wanted:
        out[bias] = RowSums(outer, (weight_shape[0],))
    return out


class LinearRule(LayerRule):
    types = (nn.Linear,)

    def factors(self, call):
        a = flatten_positions(call.input, call.batch_size)
        g = flatten_positions(call.grad_output, call.batch_size)
        return linear_factors(a, g, call.module.weight.shape, call.wanted)


register_rule(LinearRule())
