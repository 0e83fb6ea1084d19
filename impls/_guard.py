"""Give the caller's model back exactly as it was.

Peers (Opacus, BackPACK) add hooks, attributes and per-parameter fields to the modules they
touch, and some models update buffers in forward (running statistics). ``preserved_model``
records what a caller can observe and restores it on exit, whatever happened inside.
"""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def preserved_model(model: nn.Module):
    modules = list(model.modules())
    saved_modules = []
    for m in modules:
        dicts = {k: dict(getattr(m, k)) for k in _MODULE_DICTS if hasattr(m, k)}
        saved_modules.append((m, dict(m.__dict__), dicts, m.training))
    params = {id(p): p for m in modules for p in m._parameters.values() if p is not None}
    saved_params = [
        (p, p.requires_grad, p.grad, dict(p.__dict__), _hooks_of(p)) for p in params.values()
    ]
    buffers = {id(b): b for m in modules for b in m._buffers.values() if b is not None}
    saved_buffers = [(b, b._version, b.detach().clone()) for b in buffers.values()]
    try:
        yield
    finally:
        for m, attrs, dicts, training in saved_modules:
            for key in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[key]
            m.__dict__.update(attrs)
            for key, content in dicts.items():
                target = getattr(m, key)
                target.clear()
                target.update(content)
            m.training = training
        for p, requires_grad, grad, attrs, hooks in saved_params:
            for key in [k for k in p.__dict__ if k not in attrs]:
                del p.__dict__[key]
            p.__dict__.update(attrs)  # the caller's own attributes (e.g. their grad_sample)
            p.requires_grad_(requires_grad)
            p.grad = grad
            if p._backward_hooks is not None:  # tensor hooks someone added: gone again
                p._backward_hooks.clear()
                p._backward_hooks.update(hooks or {})
        with torch.no_grad():
            for b, version, value in saved_buffers:
                if b._version != version:
                    b.copy_(value)


def _hooks_of(p: torch.Tensor) -> dict | None:
    return dict(p._backward_hooks) if p._backward_hooks is not None else None
