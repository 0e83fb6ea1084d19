"""Give the caller's model back exactly as it was.

Peers (Opacus, BackPACK) add hooks, attributes and per-parameter fields to the modules they
touch, and some models update buffers in forward (running statistics) or even parameters
(``nn.Embedding(max_norm=...)`` renormalises the rows it looks up, in place).
``preserved_model`` records what a caller can observe and restores it on exit, whatever
happened inside; a parameter whose values changed is restored (it was copied beforehand when
its module is known to write it) and the call is refused: one forward of such a model does not
define per-example gradients of the parameters the caller holds.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import nn

# per-module dicts that hold hooks or children; restored by content, not just by identity
_MODULE_DICTS = (
    "_parameters",
    "_buffers",
    "_modules",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)

_hook_dicts = operator.itemgetter(*_MODULE_DICTS)


@contextlib.contextmanager
def preserved_model(model: nn.Module):
    """Yields the model's parameters (each once, trainable or not)."""
    # Costs a few Python steps per module and parameter (it runs on every call, and a small
    # model's whole step takes a few hundred microseconds): each module's dict and its hook
    # dicts are written back whole on exit (C-level clear and update, cheaper than comparing
    # them), a hook dict only if one is non-empty; parameter names are looked up only when a
    # parameter changed.
    modules = list(model.modules())
    saved_modules = []
    for m in modules:
        attrs = m.__dict__
        try:
            dicts = _hook_dicts(attrs)
        except KeyError:  # a module that skipped Module.__init__ for some of them
            dicts = tuple(attrs.get(key) for key in _MODULE_DICTS)
        saved_modules.append((attrs, attrs.copy(), dicts, [(d, dict(d)) for d in dicts if d]))
    params = {id(p): p for m in modules for p in m._parameters.values() if p is not None}
    saved_params = [
        (p, p.requires_grad, p.grad, p.__dict__.copy() if p.__dict__ else None, _hooks_of(p))
        for p in params.values()
    ]
    buffers = {id(b): b for m in modules for b in m._buffers.values() if b is not None}
    saved_buffers = [(b, b._version, b.detach().clone()) for b in buffers.values()]
    versions = [(p, p._version) for p in params.values()]
    copies = {id(p): p.detach().clone() for p in _written_in_forward(modules)}
    changed: list[tuple[torch.Tensor, bool]] = []
    try:
        yield list(params.values())
    finally:
        for p, version in versions:
            if p._version != version:
                restored = id(p) in copies
                if restored:
                    with torch.no_grad():
                        p.copy_(copies[id(p)])
                changed.append((p, restored))
        for current, attrs, dicts, filled in saved_modules:
            current.clear()
            current.update(attrs)
            if filled or any(dicts):
                for d in dicts:
                    if d:
                        d.clear()
                for d, content in filled:
                    d.update(content)
        for p, requires_grad, grad, attrs, hooks in saved_params:
            if attrs is not None or p.__dict__:
                p.__dict__.clear()
                p.__dict__.update(attrs or {})  # the caller's own attributes (e.g. grad_sample)
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
            if p._backward_hooks is not None:  # tensor hooks someone added: gone again
                p._backward_hooks.clear()
                p._backward_hooks.update(hooks or {})
        for b, version, value in saved_buffers:
            if b._version != version:
                with torch.no_grad():
                    b.copy_(value)
    if changed:
        from impls.base import Unsupported

        p, restored = changed[0]
        name = next((n for n, q in model.named_parameters(remove_duplicate=False) if q is p), "?")
        state = "its values were restored" if restored else "its old values could not be restored"
        raise Unsupported(
            f"the model modified parameter '{name}' in place during the call ({state}): "
            "per-example gradients of a model that rewrites its parameters (nn.Embedding with "
            "max_norm?) are not defined by one forward"
        )


def _written_in_forward(modules) -> list[torch.nn.Parameter]:
    """Parameters of modules known to rewrite them during the forward."""
    out = []
    for m in modules:
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.max_norm is not None:
            out.append(m.weight)
    return out


def _hooks_of(p: torch.Tensor) -> dict | None:
    return dict(p._backward_hooks) if p._backward_hooks is not None else None
