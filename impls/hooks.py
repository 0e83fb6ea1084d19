"""``hooks``: the capture (``impls._capture``) records each parameter use and its output
gradient from one backward pass, and the per-layer rules (``impls.layers``) build every
example's gradient from them.

Parameters are never among autograd's requested inputs, so the batch weight gradient is never
computed; calls without a rule use the per-module vmap fallback.
"""

from __future__ import annotations

import torch

from impls._capture import parameter_factors
from impls.base import MaterialisingImplementation
from impls.factors import groups


class Hooks(MaterialisingImplementation):
    name = "hooks"
    differentiable = False

    def _grad_samples(self, side, loss_fn, create_graph):
        samples: dict[str, torch.Tensor] = {}

        def consume(group):
            # in float32 at the least (factors of a bfloat16 or autocast forward may mix dtypes)
            (group,) = groups.accumulating(group)
            for name, factors in group.items():
                samples[name] = factors.materialise()

        parameter_factors(side, loss_fn, create_graph, consume)
        n = side.batch_size
        return {
            name: samples[name]
            if name in samples
            else torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device)
            for name, p in side.params.items()
        }
