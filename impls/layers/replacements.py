"""Opaque calls replaced by the same computation in followable steps.

``F.multi_head_attention_forward`` (nn.MultiheadAttention) and the fused recurrent kernels
(``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``/``rnn_relu``) use their parameters inside one
call, where nothing can see each use. The capture runs the replacement registered here instead,
under the watch, so each projection inside is an ``F.linear`` call the linear rule accounts for.
A replacement returns NotImplemented for configurations it does not reproduce (the call then runs
as it is, and its module gets the vmap fallback).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: torch function -> replacement(args, kwargs, capture) -> the same result, or NotImplemented
#: (``capture``: the :class:`~impls._capture.Capture` recording the forward; the replacement runs
#: under its ``watch``, and ``capture.create_graph`` says the result must be differentiable twice)
REPLACEMENTS: dict[Any, Callable[[tuple, dict, Any], Any]] = {}


#: custom autograd Functions the replacements run (exact backward; the capture does not refuse them)
REPLACEMENT_FUNCTIONS: list[type] = []


def register_replacement(func: Any, replacement: Callable[[tuple, dict, Any], Any]) -> None:
    if func in REPLACEMENTS:
        raise ValueError(f"a replacement for {getattr(func, '__name__', func)} is registered")
    REPLACEMENTS[func] = replacement
