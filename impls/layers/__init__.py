"""Per-layer math: each module family's per-example gradients from one captured call.

One file per layer family registers a :class:`LayerRule` for its module types. Whole-model
strategies (``impls/hooks.py`` ...) look rules up with :func:`rule_for` and never re-derive the
math. A module with trainable parameters and no rule gets :class:`VmapFallback`.
"""

from impls.layers import (  # noqa: F401  (registration)
    attention,
    conv,
    embedding,
    linear,
    norm,
    recurrent,
)
from impls.layers.base import LayerCall, LayerRule, register_rule, rule_for
from impls.layers.fallback import VmapFallback

__all__ = ["LayerCall", "LayerRule", "VmapFallback", "register_rule", "rule_for"]
