"""``naive``: one forward and one backward per example. Slow, obviously right."""

from __future__ import annotations

import torch

from impls.base import (
    MaterialisingImplementation,
    differentiate,
    example_slice,
    per_example_losses,
)


class NaiveLoop(MaterialisingImplementation):
    name = "naive"
    differentiable = True

    def _grad_samples(self, side, loss_fn, create_graph):
        params = list(side.params.values())
        rows = []
        for i in range(side.batch_size):
            args, kwargs, targets = example_slice(side, i, i + 1)
            with side.forward_precision():
                loss = per_example_losses(loss_fn, side.call_model(args, kwargs), targets, 1)[0]
            grads = differentiate(loss, params, allow_unused=True, create_graph=create_graph)
            rows.append(
                [
                    torch.zeros_like(p) if g is None else _dense(g)
                    for p, g in zip(params, grads, strict=False)
                ]
            )
        return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(side.params)}


def _dense(grad):
    return grad.to_dense() if grad.is_sparse else grad
