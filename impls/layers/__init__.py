"""Per-layer math: each family of torch calls' per-example gradients from one recorded call.

One file per family registers an :class:`OpRule` for its functions: ``linear`` (F.linear,
addmm, a weight in a matmul), ``conv``, ``embedding``, ``norm``. ``attention`` and ``recurrent``
register replacements: nn.MultiheadAttention's and the RNNs' opaque calls recomputed in steps the
linear rule accounts for. A rule describes per-example gradients as factors
(``impls.factors``), whose reductions choose the cheaper of the factored form and
materialising. Whole-model strategies (``impls/ghost.py``, ``impls/hooks.py``,
``impls/function.py``) get rules from :func:`rule_for` through the capture and never re-derive
the math. Calls with a parameter that no rule knows get the per-module vmap fallback
(``fallback``).
"""

from impls.layers import (  # noqa: F401  (registration)
    attention,
    conv,
    embedding,
    linear,
    norm,
    recurrent,
)
from impls.layers.base import Binding, OpRule, Use, register_rule, rule_for
from impls.layers.replacements import REPLACEMENT_FUNCTIONS, REPLACEMENTS

__all__ = [
    "REPLACEMENTS",
    "REPLACEMENT_FUNCTIONS",
    "Binding",
    "OpRule",
    "Use",
    "register_rule",
    "rule_for",
]
