"""The float64 oracle: every example's gradient by its own forward and backward, in float64.

Deliberately independent of ``impls``: a deep copy of the model is moved to float64 and each
example is run alone, so nothing an implementation does (hooks, factored forms, vmap) is shared
with the reference it is judged against.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from impls.base import check_per_example_gradients_defined


def _to_float64(x):
    if isinstance(x, Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return type(x)({k: _to_float64(v) for k, v in x.items()})
    if isinstance(x, (tuple, list)):
        return type(x)(_to_float64(t) for t in x)
    return x


def _example(x, i):
    """Example i of a batch value (top-level tensors sliced, anything else as it is)."""
    if isinstance(x, Tensor):
        return x[i : i + 1]
    if isinstance(x, Mapping):
        return type(x)({k: v[i : i + 1] if isinstance(v, Tensor) else v for k, v in x.items()})
    if isinstance(x, (tuple, list)):
        return type(x)(t[i : i + 1] if isinstance(t, Tensor) else t for t in x)
    return x


def call(model: nn.Module, inputs):
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` as the batch holds them."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def batch_size_of(inputs) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return next(v for v in values if isinstance(v, Tensor)).shape[0]


def per_example_gradients(
    model: nn.Module,
    loss_fn,
    batch,
    *,
    reference: nn.Module | None = None,
    in_model_dtype: bool = False,
    forward: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, Tensor]:
    """name -> Tensor[B, *shape] over the trainable parameters (first name of a tied one), in
    float64.

    Raises ``impls.Unsupported`` when per-example gradients are undefined (BatchNorm in train
    mode). With ``reference`` (a float64 copy of the model) the gradients keep their graph, so
    they can be differentiated again w.r.t. the reference's parameters. ``in_model_dtype``: the
    same loop in the model's own dtype (how far a plain per-example loop in, say, float32 is from
    float64 on this model: the rounding any implementation in that dtype is allowed).
    ``forward``: a context each example's forward (model and loss_fn, not the backward) runs
    in, such as ``torch.autocast``'s (with ``in_model_dtype``: the loop a caller training under
    autocast runs).
    """
    check_per_example_gradients_defined(model)
    create_graph = reference is not None
    if not create_graph:
        reference = copy.deepcopy(model) if in_model_dtype else copy.deepcopy(model).double()
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    inputs, targets = batch
    if not in_model_dtype:
        inputs, targets = _to_float64(inputs), _to_float64(targets)
    size = batch_size_of(inputs)
    rows = []
    for i in range(size):
        with forward():
            loss = loss_fn(call(reference, _example(inputs, i)), _example(targets, i))
        grads = torch.autograd.grad(
            loss.sum(), list(params.values()), allow_unused=True, create_graph=create_graph
        )
        rows.append(
            [
                torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
                for p, g in zip(params.values(), grads, strict=False)
            ]
        )
    dtype = None if in_model_dtype else torch.float64
    return {
        n: (torch.stack([r[k] for r in rows]) if rows else torch.zeros(0, *p.shape)).to(
            dtype or p.dtype
        )
        for k, (n, p) in enumerate(params.items())
    }


def norms(grads: dict[str, Tensor]) -> Tensor:
    return sum(g.flatten(1).pow(2).sum(1) for g in grads.values()).sqrt()


def per_param_norms(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: g.flatten(1).norm(dim=1) for n, g in grads.items()}


def inner(left: dict[str, Tensor], right: dict[str, Tensor]) -> Tensor:
    return sum(left[n].flatten(1) @ right[n].flatten(1).T for n in left)


def objective(norms_: Tensor, gram: Tensor, weights: Tensor) -> Tensor:
    """A scalar function of the results, differentiated by the ``double_backward`` check."""
    return norms_.sum() + (gram * weights).sum()


def double_backward(model: nn.Module, loss_fn, batch, weights: Tensor) -> dict[str, Tensor]:
    """name -> float64 d objective(norms, Gram) / dθ, through per-example gradients in float64."""
    reference = copy.deepcopy(model).double()
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    # the math attention kernel: the fused CPU kernels have no double backward
    with sdpa_kernel([SDPBackend.MATH]):
        grads = per_example_gradients(model, loss_fn, batch, reference=reference)
    value = objective(norms(grads), inner(grads, grads), weights.double())
    result = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for (n, p), g in zip(params.items(), result, strict=False)
    }
