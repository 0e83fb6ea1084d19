"""Per-layer math: each module family's per-example gradients from one captured call.

One file per layer family registers a :class:`LayerRule` for its module types (linear, conv,
embedding, norm, attention, recurrent). A rule describes the per-example gradients as factors
(``factored``: outer-product sums, token rows, dense values) whose reductions — squared norms,
inner products, per-example gradients — choose the cheaper of the factored form and
materialising. Whole-model strategies (``impls/hooks.py``, ``impls/ghost.py``,
``impls/function.py``) look rules up with :func:`rule_for` and never re-derive the math. A
module with trainable parameters and no rule gets :class:`VmapFallback`.
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
