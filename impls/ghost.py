"""``ghost``: per-example gradient norms and inner products without per-example gradients
where a factored form is cheaper.

One forward under :class:`~impls._capture.LayerCapture` records every layer call; one backward
asks autograd only for the gradients of the captured layer outputs, so the weight-gradient
products of a training step are never formed. Each rule then describes each parameter's
per-example gradients as factors (``impls.layers.factored``: outer-product sums for Linear,
Conv, the projections inside MultiheadAttention and the gates of RNN/LSTM/GRU, token rows for
Embedding, dense values for small parameters and the vmap fallback), and the reductions pick,
per parameter and per quantity, the cheaper of the factored form and materialising.

A parameter is reduced as soon as its factors are complete, and each layer's activations and
output gradients are released once its factors are known. On large models (captured outputs
above ``impls._capture.STREAM_BYTES``) that happens during the backward pass: the memory of a
plain backward plus one layer's reduction, not every layer's tensors at once.

A parameter used at several places (tied weights, a module called twice) gets the sum of its
uses, reduced once its last use is in: merged when they share a form, otherwise with the exact
cross terms between the places (an Embedding tied to a Linear decoder included).
``create_graph=True`` keeps the graph through the captured activations and output gradients,
so the results can be differentiated w.r.t. the parameters.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable

import torch

from impls.base import Implementation
from impls.hooks import captured_forward
from impls.layers.factored import Factors, combine, inner


def stream_parameter_factors(
    side, loss_fn, create_graph, consume: Callable[[str, Factors], None]
) -> None:
    """Run the forward and backward, calling ``consume(name, factors)`` once per trainable
    parameter a call reached, with the factors of its per-example gradients (all its uses),
    as soon as its last use's output gradients are known.

    Parameters no call reached are never consumed (their gradient is zero).
    """
    capture, loss = captured_forward(side, loss_fn, create_graph)
    names = {id(p): name for name, p in side.params.items()}
    expected = Counter(id(p) for call in capture.calls for p in call.wanted.values())
    waiting: dict[int, list[Factors]] = defaultdict(list)

    def on_ready(call):
        described = call.rule.factors(call)
        call.release()  # the factors keep what they need; the reductions run without the rest
        for local, factors in described.items():
            key = id(call.wanted[local])
            waiting[key].append(factors)
            if len(waiting[key]) == expected[key]:
                consume(names[key], combine(waiting.pop(key)))

    capture.backward(loss, on_ready)
    for key, parts in waiting.items():  # uses whose rule gave no factors for this parameter
        consume(names[key], combine(parts))


def parameter_factors(side, loss_fn, create_graph) -> dict[str, Factors]:
    """Trainable parameter name -> the factors of its per-example gradients (all its uses)."""
    out: dict[str, Factors] = {}
    stream_parameter_factors(side, loss_fn, create_graph, out.__setitem__)
    return out


class Ghost(Implementation):
    name = "ghost"
    differentiable = True

    def _squared_norms(self, side, loss_fn, create_graph):
        norms = {}

        def consume(name, factors):
            norms[name] = factors.squared_norms()

        stream_parameter_factors(side, loss_fn, create_graph, consume)
        zeros = torch.zeros(side.batch_size, dtype=side.dtype, device=side.device)
        return {name: norms.get(name, zeros) for name in side.params}

    def _inner(self, side, other, loss_fn, create_graph):
        same = other is side
        left = None if same else parameter_factors(side, loss_fn, create_graph)
        total = torch.zeros(side.batch_size, other.batch_size, dtype=side.dtype, device=side.device)

        def consume(name, factors):
            nonlocal total
            if same:
                total = total + inner(factors, factors, same=True)
            elif name in left:
                total = total + inner(left[name], factors)

        stream_parameter_factors(other, loss_fn, create_graph, consume)
        return total
