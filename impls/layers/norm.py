"""Affine parameters of LayerNorm, RMSNorm and GroupNorm: with x̂ the normalised input,
∇w ℓ_n = Σ_positions g_n ⊙ x̂_n and ∇b ℓ_n = Σ_positions g_n. The parameters are small:
materialised (``Dense``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from impls.layers.base import LayerRule, register_rule
from impls.layers.factored import Dense


class LastDimsNormRule(LayerRule):
    """LayerNorm and RMSNorm normalise over the trailing ``normalized_shape`` dimensions."""

    types = (nn.LayerNorm, nn.RMSNorm)

    def factors(self, call):
        module = call.module
        a = call.input
        shape = tuple(module.normalized_shape)
        if isinstance(module, nn.LayerNorm):
            normalised = F.layer_norm(a, shape, eps=module.eps)
        else:
            normalised = F.rms_norm(a, shape, eps=module.eps)
        g = call.grad_output.reshape(call.batch_size, -1, *shape)
        out = {}
        if "weight" in call.wanted:
            out["weight"] = Dense((g * normalised.reshape(g.shape)).sum(1))
        if "bias" in call.wanted:
            out["bias"] = Dense(g.sum(1))
        return out


class GroupNormRule(LayerRule):
    types = (nn.GroupNorm,)

    def factors(self, call):
        module = call.module
        normalised = F.group_norm(call.input, module.num_groups, eps=module.eps)
        g = call.grad_output
        out = {}
        if "weight" in call.wanted:
            out["weight"] = Dense((g * normalised).flatten(2).sum(2))
        if "bias" in call.wanted:
            out["bias"] = Dense(g.flatten(2).sum(2))
        return out


register_rule(LastDimsNormRule())
register_rule(GroupNormRule())
