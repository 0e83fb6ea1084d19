"""Per-module vmap fallback: per-example gradients of a module without a formula.

With the module's captured inputs x_n and output gradients g_n, example n's gradient of the
module's parameters is ∇θ ⟨module_θ(x_n), g_n⟩, computed by ``vmap(grad(...))`` over the batch
on the module alone (its children are constants unless the rule is recursive).

The batch dimension of each argument and output is dimension 0 when its size is the batch size;
recurrent modules declare theirs (``batch_first``; hidden states carry it in dimension 1). An
argument whose batch dimension cannot be told is refused rather than guessed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from impls.base import Unsupported
from impls.layers.base import LayerRule


def _tensor_batch_dim(module: nn.Module, path_index: int, tensor, batch_size: int):
    if isinstance(module, nn.RNNBase):
        # input / output sequence: batch_first decides; hidden states (h, c): dimension 1
        if path_index == 0:
            return 0 if module.batch_first else 1
        return 1
    if tensor.dim() >= 1 and tensor.shape[0] == batch_size:
        return 0
    return None


class VmapFallback(LayerRule):
    """Any module, through ``vmap(grad)`` of ⟨module(x_n), g_n⟩ over the examples."""

    def __init__(self, recursive: bool = False):
        self.recursive = recursive

    def grad_samples(self, call):
        module, n = call.module, call.batch_size
        create_graph = call.create_graph
        leaves, spec = tree_flatten((call.args, call.kwargs))
        dims = []
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                dims.append(_tensor_batch_dim(module, k, leaf, n))
                if not create_graph:
                    leaves[k] = leaf.detach()
            else:
                dims.append(None)
        if isinstance(module, nn.RNNBase) and len([x for x in leaves if torch.is_tensor(x)]) > 1:
            raise Unsupported(
                f"vmap fallback for '{call.name}': an initial hidden state is not supported"
            )
        output_leaves = _all_output_leaves(call.outputs)
        keep = [k for k, leaf in enumerate(output_leaves) if _carries(leaf)]
        batched_out = [_tensor_batch_dim(module, k, output_leaves[k], n) for k in keep]
        if any(d is None for d in batched_out):
            raise Unsupported(f"vmap fallback for '{call.name}': an output has no batch dimension")
        params = {name: (p if create_graph else p.detach()) for name, p in call.wanted.items()}
        grad_outputs = call.grad_outputs

        def contribution(params, batched_leaves, grad_outputs):
            full = list(leaves)
            for k, (d, leaf) in enumerate(zip(dims, batched_leaves, strict=True)):
                if d is not None:
                    full[k] = leaf.unsqueeze(d)
            args, kwargs = tree_unflatten(full, spec)
            outputs = functional_call(module, params, args, kwargs, strict=False)
            out_leaves = _all_output_leaves(outputs)
            total = 0
            for k, g, d in zip(keep, grad_outputs, batched_out, strict=False):
                total = total + (out_leaves[k].squeeze(d) * g).sum()
            return total

        batched_leaves = [
            leaf if d is not None else None for leaf, d in zip(leaves, dims, strict=True)
        ]
        in_dims = (None, dims, batched_out)
        per_example = vmap(grad(contribution), in_dims=in_dims)
        try:
            return per_example(params, batched_leaves, list(grad_outputs))
        except RuntimeError as exc:
            # torch.func cannot batch every module (random ops, some kernels): a refusal
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Unsupported(f"vmap fallback for '{call.name}' failed: {reason}") from exc


def _all_output_leaves(outputs):
    leaves, _ = tree_flatten(outputs)
    return leaves


def _carries(leaf) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.requires_grad
