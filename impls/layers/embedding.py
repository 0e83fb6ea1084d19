"""nn.Embedding: indices x [n, *], output gradients g [n, *, D].

∇E ℓ_n = Σ_t e_{x_nt} g_ntᵀ: each position adds its gradient to its token's row; the row of
``padding_idx`` gets nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from impls.base import Unsupported
from impls.layers.base import LayerRule, register_rule


class EmbeddingRule(LayerRule):
    types = (nn.Embedding,)

    def check(self, module, name):
        if module.max_norm is not None:
            raise Unsupported(f"nn.Embedding '{name}' with max_norm rewrites its weight in forward")
        if module.scale_grad_by_freq:
            raise Unsupported(
                f"nn.Embedding '{name}' with scale_grad_by_freq scales by batch-wide counts"
            )

    def grad_samples(self, call):
        module = call.module
        n = call.batch_size
        index = call.input.reshape(n, -1)  # [n, t]
        g = call.grad_output.reshape(n, index.shape[1], -1)  # [n, t, D]
        if module.padding_idx is not None:
            g = g.masked_fill((index == module.padding_idx).unsqueeze(-1), 0)
        weight = torch.zeros(n, *module.weight.shape, dtype=g.dtype, device=g.device)
        weight = weight.scatter_add(1, index.unsqueeze(-1).expand_as(g), g)
        return {"weight": weight}


register_rule(EmbeddingRule())
