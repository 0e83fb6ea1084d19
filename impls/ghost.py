"""``ghost``: per-example gradient norms and inner products without per-example gradients
where a factored form is cheaper.

One forward under :class:`~impls._capture.LayerCapture` records every layer call; one backward
asks autograd only for the gradients of the captured layer outputs, so the weight-gradient
products of a training step are never formed. Each rule then describes each parameter's
per-example gradients as factors (``impls.layers.factored``: outer-product sums for Linear,
Conv, the projections inside MultiheadAttention and the gates of RNN/LSTM/GRU, token rows for
Embedding, dense values for small parameters and the vmap fallback), and the reductions pick,
per parameter and per quantity, the cheaper of the factored form and materialising.

A parameter used at several places (tied weights, a module called twice) gets the sum of its
uses: merged when they share a form, otherwise with the exact cross terms between the places
(an Embedding tied to a Linear decoder included). ``create_graph=True`` keeps the graph through
the captured activations and output gradients, so the results can be differentiated w.r.t.
the parameters.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from impls.base import Implementation
from impls.hooks import captured_forward_backward
from impls.layers.factored import Factors, combine, inner


def parameter_factors(side, loss_fn, create_graph) -> dict[str, Factors]:
    """Trainable parameter name -> the factors of its per-example gradients (all its uses).

    Parameters no call reached have no entry (their gradient is zero).
    """
    capture = captured_forward_backward(side, loss_fn, create_graph)
    uses: dict[int, list[Factors]] = defaultdict(list)
    for call in capture.calls:
        for local, factors in call.rule.factors(call).items():
            uses[id(call.wanted[local])].append(factors)
    return {name: combine(uses[id(p)]) for name, p in side.params.items() if id(p) in uses}


class Ghost(Implementation):
    name = "ghost"
    differentiable = True

    def _squared_norms(self, side, loss_fn, create_graph):
        factors = parameter_factors(side, loss_fn, create_graph)
        zeros = torch.zeros(side.batch_size, dtype=side.dtype, device=side.device)
        return {
            name: factors[name].squared_norms() if name in factors else zeros
            for name in side.params
        }

    def _inner(self, side, other, loss_fn, create_graph):
        left = parameter_factors(side, loss_fn, create_graph)
        same = other is side
        right = left if same else parameter_factors(other, loss_fn, create_graph)
        total = torch.zeros(side.batch_size, other.batch_size, dtype=side.dtype, device=side.device)
        for name, factors in left.items():
            if name in right:
                total = total + inner(factors, right[name], same=same)
        return total
