"""``hooks``: forward hooks capture each layer's inputs, one autograd call gives its output
gradients, and the per-layer rules (``impls.layers``) build every example's gradient.

Parameters are never among autograd's requested inputs, so the batch weight gradient is never
computed; modules without a formula use the per-module vmap fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from impls._capture import LayerCapture
from impls.base import MaterializingImplementation, per_example_losses


def captured_forward(side, loss_fn, create_graph, rules=None) -> tuple[LayerCapture, Tensor]:
    """Run the forward under a capture: the capture (its calls recorded) and the summed loss."""
    with LayerCapture(
        side.model,
        side.params,
        side.batch_size,
        create_graph=create_graph,
        rules=rules,
        inputs=side.inputs,
    ) as capture:
        outputs = side.model(*side.inputs)
        losses = per_example_losses(loss_fn, outputs, side.targets, side.batch_size)
    return capture, losses.sum()


def captured_forward_backward(side, loss_fn, create_graph, rules=None) -> LayerCapture:
    """Run the forward under a capture, then the backward to the captured outputs."""
    capture, loss = captured_forward(side, loss_fn, create_graph, rules)
    capture.backward(loss)
    return capture


class Hooks(MaterializingImplementation):
    name = "hooks"
    differentiable = False

    def _grad_samples(self, side, loss_fn, create_graph):
        capture = captured_forward_backward(side, loss_fn, create_graph)
        by_param: dict[int, torch.Tensor] = {}
        for call in capture.calls:
            for local, sample in call.rule.grad_samples(call).items():
                key = id(call.wanted[local])
                by_param[key] = sample if key not in by_param else by_param[key] + sample
        n = side.batch_size
        return {
            name: by_param.get(id(p), None)
            if id(p) in by_param
            else torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device)
            for name, p in side.params.items()
        }
