"""Per-module vmap fallback: per-example gradients of parameters used by calls no rule knows.

With a module call's arguments x and its output gradients g, example n's gradient of the
parameters θ is ∇θ ⟨module_θ(x_n), g_n⟩, computed by ``vmap(grad(...))`` over the examples on
the module alone (its other parameters and its children are constants). Where each argument and
output carries the examples is its layout from the watch (``impls._layouts``), never a size:
arguments that carry no batch are passed to every example unbatched (a call on a shared tensor
is vmapped over its per-example output gradients alone), folded batches are unfolded, and an
argument whose examples cannot be located is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from impls._layouts import Layout
from impls.base import Unsupported


@dataclass(eq=False)
class ModuleCall:
    """One call of a module whose parameters (``wanted``, local name -> parameter) need the
    fallback, with the layouts of its argument and output leaves and, after the backward, the
    gradients of its output leaves that carry gradient."""

    name: str  # for messages
    module: nn.Module
    args: tuple
    kwargs: dict
    arg_layouts: list[Layout | None]  # per leaf of (args, kwargs)
    outputs: Any
    output_layouts: list[Layout | None]  # per output leaf; None: shared by every example
    wanted: dict[str, nn.Parameter]
    batch_size: int
    create_graph: bool = False
    grads: dict[int, Tensor] = field(default_factory=dict)  # output leaf index -> gradient
    frame: Any = None  # the watch's record of the call (which uses it redoes)
    #: the context the module is redone in: the caller's autocast, as in the forward
    forward_precision: Callable[[], Any] = contextlib.nullcontext

    def output_leaves(self) -> list[Tensor]:
        leaves, _ = tree_flatten(self.outputs)
        return leaves

    def gradient_leaves(self) -> list[int]:
        return [
            k
            for k, leaf in enumerate(self.output_leaves())
            if isinstance(leaf, Tensor) and leaf.requires_grad
        ]


class _ForwardOnly(nn.Module):
    """A module's ``forward`` alone, the call the watch recorded (``impls._watch``): its own
    forward hooks and pre-hooks ran outside that record, in the calling module's, and redoing
    the call must not apply them again."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module.forward(*args, **kwargs)


def _exposed(x: Tensor, layout: Layout, batch_size: int) -> tuple[Tensor, int]:
    """(x with the examples as a dimension of their own, that dimension)."""
    if layout.plain:
        return x, layout.dim
    shape = (layout.outer, batch_size, layout.inner)
    return x.unflatten(layout.dim, shape), layout.dim + 1


def _one(x: Tensor, layout: Layout) -> Tensor:
    """Inside vmap: example n's slice back in the layout the module saw (its rows in place)."""
    if layout.plain:
        return x.unsqueeze(layout.dim)
    return x.flatten(layout.dim, layout.dim + 1)


def grad_samples(call: ModuleCall) -> dict[str, Tensor]:
    """Local name -> Tensor[B, *param.shape] for every parameter in ``call.wanted``."""
    n, create_graph = call.batch_size, call.create_graph
    leaves, spec = tree_flatten((call.args, call.kwargs))
    batched, dims = [], []
    for leaf, layout in zip(leaves, call.arg_layouts, strict=True):
        if isinstance(leaf, Tensor) and layout is not None:
            x, d = _exposed(leaf if create_graph else leaf.detach(), layout, n)
            batched.append(x)
            dims.append(d)
        else:
            batched.append(None)
            dims.append(None)
    constants = [
        (leaf if create_graph else leaf.detach()) if isinstance(leaf, Tensor) else leaf
        for leaf in leaves
    ]
    keep = call.gradient_leaves()
    out_layouts = [call.output_layouts[k] for k in keep]
    grads, grad_dims = [], []
    for k, layout in zip(keep, out_layouts, strict=True):
        g = call.grads[k]
        if layout is None:  # shared output: per-example gradients [B, *shape]
            grads.append(g)
            grad_dims.append(0)
        else:
            g, d = _exposed(g, layout, n)
            grads.append(g)
            grad_dims.append(d)
    params = {name: (p if create_graph else p.detach()) for name, p in call.wanted.items()}
    forward_only = _ForwardOnly(call.module)

    def contribution(params, batched_leaves, grads):
        full = list(constants)
        for k, (layout, leaf) in enumerate(zip(call.arg_layouts, batched_leaves, strict=True)):
            if leaf is not None:
                full[k] = _one(leaf, layout)
        args, kwargs = tree_unflatten(full, spec)
        with call.forward_precision():
            outputs = functional_call(forward_only, {f"module.{n}": p for n, p in params.items()},
                                      args, kwargs, strict=False)  # fmt: skip
        out_leaves, _ = tree_flatten(outputs)
        total = 0
        for k, g, layout in zip(keep, grads, out_layouts, strict=True):
            if layout is not None:
                g = _one(g, layout)
            total = total + (out_leaves[k] * g).sum()
        return total

    per_example = vmap(grad(contribution), in_dims=(None, dims, grad_dims))
    try:
        return per_example(params, batched, grads)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        # torch.func cannot batch every module (random ops, some kernels): a refusal
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise Unsupported(f"vmap fallback for {call.name} failed: {reason}") from exc
