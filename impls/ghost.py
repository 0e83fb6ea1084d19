"""``ghost``: per-example gradient norms and inner products without per-example gradients
where a factored form is cheaper.

One forward under the capture (``impls._capture``) records every use of the trainable
parameters; one backward asks autograd only for the gradients of those uses' outputs, so the
weight-gradient products of a training step are never formed. Each rule describes each
parameter's per-example gradients as factors (``impls.factors``: outer-product sums for Linear,
Conv and the projections inside attention and recurrent layers, token rows for Embedding, dense
values for small parameters and the vmap fallback), and the reductions pick, per parameter and
per quantity, the cheaper of the factored form and materialising.

A parameter is reduced as soon as its factors are complete, and each use's activations and
output gradients are released once its factors are known. On large models (captured outputs
above ``impls._capture.STREAM_BYTES``) that happens during the backward pass: the memory of a
plain backward plus one layer's reduction, not every layer's tensors at once.

Tensors shared by all examples (position tables, relative attention biases, parameters read by
a parent module) get each example's share of their gradient where they meet the batch. A
parameter used at several places (tied weights, a module called twice) gets the sum of its uses,
with the exact cross terms between the places. ``create_graph=True`` keeps the graph through the
captured activations and output gradients, so the results can be differentiated w.r.t. the
parameters.

Low precision. With bfloat16 / float16 parameters, or called inside ``torch.autocast`` (the
caller's forward runs under it, ghost's backward and reductions do not), the factors are in the
low dtype the forward and backward produced them in (activations and output gradients, exactly
as the training step uses them). Every reduction converts a group's factors to float32 first
(``impls.factors.groups``), so all products and sums accumulate in float32 — the per-position
products, the materialised tiles, the token matches — whatever autocast is active; results are
float32 (float64 for float64 parameters). Only one group's float32 copy exists at a time.
"""

from __future__ import annotations

import torch

from impls._capture import parameter_factors
from impls.base import Implementation
from impls.factors import groups


class Ghost(Implementation):
    name = "ghost"
    differentiable = True

    def _squared_norms(self, side, loss_fn, create_graph):
        norms = {}

        def consume(group):
            norms.update(groups.squared_norms(group))

        parameter_factors(side, loss_fn, create_graph, consume)
        if len(norms) < len(side.params):  # parameters the loss does not reach
            zeros = torch.zeros(side.batch_size, dtype=side.result_dtype, device=side.device)
            return {name: norms.get(name, zeros) for name in side.params}
        return {name: norms[name] for name in side.params}

    def _factor_groups(self, side, loss_fn):
        found: list = []
        parameter_factors(side, loss_fn, False, found.append)
        return found

    def _inner(self, side, other, loss_fn, create_graph):
        same = other is side
        left: dict = {}
        if not same:
            parameter_factors(side, loss_fn, create_graph, left.update)
        total = torch.zeros(
            side.batch_size, other.batch_size, dtype=side.result_dtype, device=side.device
        )

        def consume(group):
            nonlocal total
            value = groups.inner_sum(group if same else left, group, same)
            if value is not None:
                total = total + value

        parameter_factors(other, loss_fn, create_graph, consume)
        return total
