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
    versions = {id(p): p._version for p in params.values()}
    copies = {id(p): p.detach().clone() for p in _written_in_forward(modules)}
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    changed: list[tuple[str, bool]] = []
    try:
        yield
    finally:
        with torch.no_grad():
            for key, p in params.items():
                if p._version != versions[key]:
                    restored = key in copies
                    if restored:
                        p.copy_(copies[key])
                    changed.append((names.get(key, "?"), restored))
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
    if changed:
        from impls.base import Unsupported

        name, restored = changed[0]
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
