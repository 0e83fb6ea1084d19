"""nn.MultiheadAttention: its projections are used inside ``F.multi_head_attention_forward``
(the packed in_proj_weight is no Linear module, and out_proj's own forward never runs), so the
whole module is one unit: per-example gradients of all its parameters by the vmap fallback.
"""

from __future__ import annotations

from torch import nn

from impls.layers.base import register_rule
from impls.layers.fallback import VmapFallback


class MultiheadAttentionRule(VmapFallback):
    types = (nn.MultiheadAttention,)

    def __init__(self):
        super().__init__(recursive=True)


register_rule(MultiheadAttentionRule())
