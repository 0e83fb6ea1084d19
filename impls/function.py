"""``function``: the custom ``torch.autograd.Function`` route (the notebook's second route).

During one call, every ``F.linear``, ``F.conv1d/2d/3d`` and ``F.embedding`` call that uses a
trainable parameter (nn.Linear, nn.Conv*, nn.Embedding, or any module calling them) computes its
output through an autograd Function of this module. Its forward computes what the call computes;
its backward records the output gradient g and returns the gradient of the input only: ``None``
for weight and bias, so autograd never forms a weight-gradient product. One backward pass fills
every call's record; the records are the same :class:`~impls.layers.Use` that ``ghost`` reduces,
and they are reduced by ghost's engine (``impls.factors``): only how the output gradients travel
differs (a Function's backward instead of a gradient edge).

The calls are found by the same watch as ``ghost``'s (a ``TorchFunctionMode`` on the calling
thread: another thread running the model meanwhile computes as usual). Any other use of a
trainable parameter (LayerNorm, attention, RNNs, a bare ``nn.Parameter``, a parameter used in
``loss_fn``), a call on a tensor shared by all examples, or ``create_graph``: ``Unsupported``
naming the parameter and where it is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from impls._capture import Capture, no_values
from impls._layouts import canonical
from impls._watch import tensor_arguments
from impls.base import Implementation, Unsupported, differentiate, per_example_losses
from impls.factors import combine, groups
from impls.layers import Use
from impls.layers.conv import ConvRule, explicit_padding
from impls.layers.embedding import EmbeddingRule
from impls.layers.linear import LinearRule

_CONV_INPUT_GRAD = {
    1: torch.nn.grad.conv1d_input,
    2: torch.nn.grad.conv2d_input,
    3: torch.nn.grad.conv3d_input,
}

# Each Function is given the list that receives its output gradient, never the use itself: the
# use holds the output, whose grad_fn holds ctx, so a ctx holding the use would make a reference
# cycle that keeps every activation and the graph alive after the answer is returned.


class LinearFunction(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; backward records g and returns only ∂/∂x = g W."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink):
        ctx.save_for_backward(weight)
        ctx.sink = sink
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ctx.sink.append(grad_output)
        (weight,) = ctx.saved_tensors
        # under autocast the forward multiplied by the weight cast to the output's dtype; the
        # backward runs outside autocast, so it casts the same way (autograd casts ∂/∂x to x's)
        grad_x = grad_output @ weight.to(grad_output.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class ConvFunction(torch.autograd.Function):
    """``F.conv{1,2,3}d``; backward records g and returns only ∂/∂x."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, sink):
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        ctx.sink = sink
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ctx.sink.append(grad_output)
        grad_x = None
        if ctx.needs_input_grad[0]:
            (weight,) = ctx.saved_tensors
            shape, stride, padding, dilation, groups = ctx.conv
            grad_x = _CONV_INPUT_GRAD[weight.dim() - 2](
                shape, weight.to(grad_output.dtype), grad_output, stride, padding, dilation, groups
            )
        return grad_x, None, None, None, None, None, None, None


class EmbeddingFunction(torch.autograd.Function):
    """``F.embedding(indices, weight, padding_idx)``; backward records g, returns nothing."""

    @staticmethod
    def forward(ctx, indices, weight, padding_idx, sink):
        ctx.sink = sink
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ctx.sink.append(grad_output)
        return None, None, None, None


class StandInFunction(torch.autograd.Function):
    """A call computed inside a larger one (``Capture.record_computed``): the identity on its
    stand-in, whose backward records g. The call's weights are inputs, so that asking for their
    gradients runs it; they get none."""

    @staticmethod
    def forward(ctx, stand_in, weight, bias, sink):
        ctx.sink = sink
        return stand_in.view_as(stand_in)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ctx.sink.append(grad_output)
        return grad_output, None, None, None


_COVERED = (LinearRule, ConvRule, EmbeddingRule)


def _through_function(use, sink: list) -> Tensor:
    """What the recorded call computes, through its Function (g goes to ``sink``)."""
    binding = use.binding
    x = binding.activations[0]
    weight, bias = binding.weights.get("weight"), binding.weights.get("bias")
    if isinstance(use.rule, LinearRule):
        return LinearFunction.apply(x, weight, bias, sink)
    if isinstance(use.rule, EmbeddingRule):
        return EmbeddingFunction.apply(x, weight, use.config["padding_idx"], sink)
    config = use.config
    padding = config["padding"]
    if isinstance(padding, str):
        x, padding = explicit_padding(x, padding, weight.shape[2:], config["dilation"]), 0
    return ConvFunction.apply(x, weight, bias, config["stride"], padding, config["dilation"],
                              config["groups"], sink)  # fmt: skip


class FunctionCapture(Capture):
    """The capture, with recorded calls run through the Functions and anything else refused."""

    def __init__(self, side):
        super().__init__(side, create_graph=False)
        self.sinks: list[tuple[Use, list]] = []

    def _refuse(self, weights, func):
        named = next((w for w in weights if id(w) in self.names), None)
        what = f"parameter '{self.names[id(named)]}'" if named is not None else "a shared tensor"
        raise Unsupported(
            f"'function' covers only F.linear, convolutions and embeddings: {what} is used by "
            f"{self.where(func)}"
        )

    def _record(self, rule, binding, func, args, kwargs, stand_in=None):
        if not isinstance(rule, _COVERED):
            self._refuse([w for w in binding.weights.values() if w is not None], func)
        for role, w in binding.weights.items():
            if w is not None and w.requires_grad and self.resolve(w) is None:
                raise Unsupported(
                    f"'function' cannot account for the {role} of {self.where(func)}: it is "
                    "computed from parameters, not a parameter"
                )
        return super()._record(rule, binding, func, args, kwargs, stand_in=stand_in)

    def _compute(self, use, func, args, kwargs):
        self._check_per_example(use)
        sink: list = []
        self.sinks.append((use, sink))
        return _through_function(use, sink)

    def _stand_in(self, use, stand_in):
        self._check_per_example(use)
        sink: list = []
        self.sinks.append((use, sink))
        weights = use.binding.weights
        return StandInFunction.apply(stand_in, weights.get("weight"), weights.get("bias"), sink)

    def _check_per_example(self, use):
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            raise Unsupported(
                f"{use.where} runs under saved-tensor hooks (activation checkpointing?): its "
                "recomputation in the backward would not go through 'function''s Function"
            )
        if any(layout is None for layout in use.layouts):
            raise Unsupported(
                f"'function' cannot compute {use.where} per example: it is called on a tensor "
                "shared by all examples"
            )

    def _meet(self, func, args, kwargs, weights):
        self._refuse(weights, func)

    def _alias(self, func, args, kwargs):
        if no_values(func):
            return NotImplemented
        weights = [x for x in tensor_arguments(args, kwargs) if id(x) in self.names]
        if weights:
            self._refuse(weights, func)
        return NotImplemented

    def _unknown(self, func, weights, where):
        self._refuse(weights, func)


FunctionCapture.own_functions = tuple(
    f._backward_cls for f in (LinearFunction, ConvFunction, EmbeddingFunction, StandInFunction)
)


class CustomFunction(Implementation):
    name = "function"
    differentiable = False

    def _run(self, side, loss_fn) -> dict:
        """name -> the factors of each trainable parameter's per-example gradients."""
        capture = FunctionCapture(side)
        with torch.enable_grad():
            with capture, side.forward_precision():
                outputs = side.call_model()
                losses = per_example_losses(loss_fn, outputs, side.targets, side.batch_size)
                capture.check_losses(losses)
            used = list({id(p): p for u in capture.uses for p in u.wanted.values()}.values())
            # asking for the parameters' gradients makes autograd run every recorded Function's
            # backward; those return None for the parameters, so no weight gradient is formed
            if losses.requires_grad and used:
                differentiate(losses.sum(), used, allow_unused=True)
        parts: dict[str, list] = {}
        for use, sink in capture.sinks:
            grad = sink[0] if sink else torch.zeros_like(use.output)
            use.grad_output = canonical(grad, use.output_layout, side.batch_size)
            use.check_inputs_unchanged()
            for role, factors in use.rule.factors(use).items():
                name, row = capture.resolve(use.wanted[role])
                shape = side.params[name].shape
                parts.setdefault(name, []).append(factors.placed(shape, row))
        return {name: combine(factors) for name, factors in parts.items()}

    def _factor_groups(self, side, loss_fn):
        return [self._run(side, loss_fn)]

    def _squared_norms(self, side, loss_fn, create_graph):
        factors = self._run(side, loss_fn)
        norms = groups.squared_norms(factors)
        zeros = torch.zeros(side.batch_size, dtype=side.result_dtype, device=side.device)
        return {name: norms.get(name, zeros) for name in side.params}

    def _inner(self, side, other, loss_fn, create_graph):
        left = self._run(side, loss_fn)
        right = left if other is side else self._run(other, loss_fn)
        total = groups.inner_sum(left, right, other is side)
        if total is None:
            return torch.zeros(side.batch_size, other.batch_size, dtype=side.result_dtype,
                               device=side.device)  # fmt: skip
        return total
