"""pegbench implementations of per-example gradient norms and inner products.

>>> import impls
>>> impls.names()
>>> impls.get("hooks").norms(model, loss_fn, (inputs, targets))      # Tensor[B]
>>> impls.get("hooks").inner(model, loss_fn, batch, other)            # Tensor[B, B']

Implementations are registered by name with the module that holds them; a strategy module is
imported only when it is first asked for, so a missing optional peer does not break the rest.
"""

from __future__ import annotations

import importlib

from impls.base import Implementation, Unsupported

__all__ = ["Implementation", "Unsupported", "get", "names", "register"]

_REGISTRY: dict[str, str] = {}
_INSTANCES: dict[str, Implementation] = {}


def register(name: str, target: str) -> None:
    """Register ``name`` for ``"module:Class"``; a name can be registered once."""
    if name in _REGISTRY:
        raise ValueError(f"implementation '{name}' is already registered")
    _REGISTRY[name] = target


def names() -> list[str]:
    """The registered implementation names, in registration order."""
    return list(_REGISTRY)


def get(name: str, **options) -> Implementation:
    """The implementation called ``name``; options (e.g. ``chunk_size``) make a new instance."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown implementation '{name}'; known: {', '.join(_REGISTRY)}")
    if not options and name in _INSTANCES:
        return _INSTANCES[name]
    module_name, class_name = _REGISTRY[name].split(":")
    instance = getattr(importlib.import_module(module_name), class_name)(**options)
    if not options:
        _INSTANCES[name] = instance
    return instance


register("naive", "impls.naive:NaiveLoop")
register("vmap", "impls.vmap:Vmap")
register("hooks", "impls.hooks:Hooks")

register("function", "impls.function:CustomFunction")
register("ghost", "impls.ghost:Ghost")
register("opacus", "impls.peers.opacus:Opacus")
register("opacus_ghost", "impls.peers.opacus:OpacusGhost")
register("backpack", "impls.peers.backpack:BackPACK")
