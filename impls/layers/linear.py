"""nn.Linear with any number of leading dimensions: a [n, *, i], g [n, *, o].

∇W ℓ_n = Σ_t g_nt a_ntᵀ (o × i);  ∇b ℓ_n = Σ_t g_nt.
"""

from __future__ import annotations

from torch import nn

from impls.layers.base import LayerRule, register_rule


def flatten_positions(x, batch_size):
    """[n, *, f] -> [n, t, f]: every leading dimension after the batch becomes a position."""
    return x.reshape(batch_size, -1, x.shape[-1])


class LinearRule(LayerRule):
    types = (nn.Linear,)

    def grad_samples(self, call):
        a = flatten_positions(call.input, call.batch_size)
        g = flatten_positions(call.grad_output, call.batch_size)
        out = {}
        if "weight" in call.wanted:
            out["weight"] = g.transpose(1, 2) @ a  # [n, o, t] @ [n, t, i]
        if "bias" in call.wanted:
            out["bias"] = g.sum(1)
        return out


register_rule(LinearRule())
