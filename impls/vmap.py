"""``vmap``: torch.func ``vmap(grad(loss of one example))`` over the batch.

``chunk_size`` bounds how many examples are vectorised at once (memory grows with it);
``None`` vectorises the whole batch.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from impls.base import MaterializingImplementation, Unsupported, per_example_losses

# Ops whose double backward under vmap(grad) is wrong in torch.func (found by the harness's
# double_backward check: ~1e-2 relative error through an affine LayerNorm / RMSNorm, torch 2.13).
_WRONG_DOUBLE_BACKWARD = {
    torch.nn.functional.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm",
    torch.nn.functional.rms_norm: "rms_norm",
    torch.rms_norm: "rms_norm",
}


class _SpotOps(TorchFunctionMode):
    """Remember the first call of an op from ``ops``."""

    def __init__(self, ops):
        super().__init__()
        self.ops, self.seen = ops, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.seen is None and func in self.ops:
            self.seen = self.ops[func]
        return func(*args, **(kwargs or {}))


class Vmap(MaterializingImplementation):
    name = "vmap"
    differentiable = True

    def __init__(self, chunk_size: int | None = 64):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.chunk_size = chunk_size

    def _grad_samples(self, side, loss_fn, create_graph):
        model = side.model
        params = {n: (p if create_graph else p.detach()) for n, p in side.params.items()}
        targets = side.targets
        targets_batched = _batched_dims(targets)

        def loss_of_one(params, inputs, targets):
            inputs = tuple(x.unsqueeze(0) for x in inputs)
            targets = _unsqueeze(targets)
            outputs = functional_call(model, params, inputs, strict=False)
            return per_example_losses(loss_fn, outputs, targets, 1)[0]

        per_example = vmap(
            grad(loss_of_one),
            in_dims=(None, 0, targets_batched),
            chunk_size=self.chunk_size,
        )
        if not create_graph:
            return per_example(params, side.inputs, targets)
        with _SpotOps(_WRONG_DOUBLE_BACKWARD) as spot:
            try:
                samples = per_example(params, side.inputs, targets)
            except RuntimeError as error:  # a batching rule torch.func lacks with create_graph
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise Unsupported(
                    f"torch.func vmap cannot differentiate this model: {first}"
                ) from error
        if spot.seen:
            raise Unsupported(
                f"vmap cannot differentiate through {spot.seen}: torch.func's double backward "
                f"of it is wrong in torch {torch.__version__} (use naive or ghost)"
            )
        return samples


def _batched_dims(targets):
    if isinstance(targets, torch.Tensor):
        return 0
    if isinstance(targets, (tuple, list)):
        return type(targets)(0 if isinstance(t, torch.Tensor) else None for t in targets)
    return None


def _unsqueeze(targets):
    if isinstance(targets, torch.Tensor):
        return targets.unsqueeze(0)
    if isinstance(targets, (tuple, list)):
        return type(targets)(t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in targets)
    return targets
