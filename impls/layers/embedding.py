"""Embedding lookups: ``F.embedding(ids, weight, padding_idx, ...)`` (nn.Embedding) and
``torch.embedding(weight, ids, padding_idx, ...)``.

∇E ℓ_n = Σ_t e_{x_nt} g_ntᵀ: each position adds its gradient to its token's row; the row of
``padding_idx`` gets nothing. Kept as token rows (``Indexed``). ``max_norm`` rewrites the weight
in place during the forward and ``scale_grad_by_freq`` scales by counts over the whole batch:
both are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from impls.base import Unsupported
from impls.factors import Indexed
from impls.layers.base import Binding, OpRule, register_rule


class EmbeddingRule(OpRule):
    functions = (F.embedding, torch.embedding)

    def bind(self, func, args, kwargs, is_weight):
        if func is torch.embedding:  # (weight, indices, padding_idx=-1, scale_grad_by_freq, sparse)
            weight, ids = args[0], args[1]
            padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
            padding_idx = None if padding_idx is None or padding_idx < 0 else padding_idx
            by_freq = args[3] if len(args) > 3 else kwargs.get("scale_grad_by_freq", False)
            max_norm = None
        else:
            ids = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx")
            max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
            by_freq = args[5] if len(args) > 5 else kwargs.get("scale_grad_by_freq", False)
            if padding_idx is not None and padding_idx < 0:
                padding_idx += weight.shape[0]
        if not isinstance(ids, Tensor) or not isinstance(weight, Tensor) or not is_weight(weight):
            return None
        config = {"padding_idx": padding_idx, "max_norm": max_norm, "by_freq": bool(by_freq)}
        return Binding((ids,), {"weight": weight}, config)

    def check(self, use):
        if use.config["max_norm"] is not None:
            raise Unsupported(f"{use.where} with max_norm rewrites its weight in forward")
        if use.config["by_freq"]:
            raise Unsupported(f"{use.where} with scale_grad_by_freq scales by batch-wide counts")

    def factors(self, use):
        if "weight" not in use.wanted:
            return {}
        n = use.batch_size
        weight = use.wanted["weight"]
        index = use.activation().reshape(n, -1)  # [n, t]
        g = use.output_gradient().reshape(n, index.shape[1], -1)  # [n, t, D]
        padding_idx = use.config["padding_idx"]
        keep = None if padding_idx is None else index != padding_idx
        return {"weight": Indexed(index, g, weight.shape[0], keep)}


register_rule(EmbeddingRule())
