"""nn.Embedding: indices x [n, *], output gradients g [n, *, D].

∇E ℓ_n = Σ_t e_{x_nt} g_ntᵀ: each position adds its gradient to its token's row; the row of
``padding_idx`` gets nothing. Kept as token rows (``Indexed``): norms sum each example's
gradients per distinct token (O(T·D), no vocabulary-sized tensor), inner products pair the
entries of equal tokens — Σ_{t,s}[x_nt = x'_ms](g_nt·g'_ms) — or materialise when the
vocabulary is small.
"""

from __future__ import annotations

import torch
from torch import nn

from impls.base import Unsupported
from impls.layers.base import LayerRule, register_rule
from impls.layers.factored import Indexed


class EmbeddingRule(LayerRule):
    types = (nn.Embedding,)

    def check(self, module, name):
        if module.max_norm is not None:
            raise Unsupported(f"nn.Embedding '{name}' with max_norm rewrites its weight in forward")
        if module.scale_grad_by_freq:
            raise Unsupported(
                f"nn.Embedding '{name}' with scale_grad_by_freq scales by batch-wide counts"
            )

    def factors(self, call):
        module = call.module
        if "weight" not in call.wanted:
            return {}
        n = call.batch_size
        index = call.input.reshape(n, -1)  # [n, t]
        g = call.grad_output.reshape(n, index.shape[1], -1)  # [n, t, D]
        example = torch.arange(n, device=index.device).repeat_interleave(index.shape[1])
        row, values = index.reshape(-1), g.reshape(-1, g.shape[-1])
        if module.padding_idx is not None:
            keep = row != module.padding_idx
            example, row, values = example[keep], row[keep], values[keep]
        return {"weight": Indexed(example, row, values, n, module.num_embeddings)}


register_rule(EmbeddingRule())
