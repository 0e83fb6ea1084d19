"""``function``: the custom ``torch.autograd.Function`` route (the notebook's second route).

During one call, every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` that owns a
trainable parameter computes its output through an autograd Function of this module. Its forward
computes what the module computes; its backward records the layer's per-example factors (the
input a, kept from the forward, and the output gradient g) and returns the gradient of the input
only: ``None`` for weight and bias, so autograd never forms a weight-gradient product. One
backward pass fills every layer's record; the reductions are the layer rules' ``squared_norms``
and ``inner`` (``impls.layers``), so the factored forms the rules provide are used as they are.

How the modules are switched, and why: a scoped *instance-level* ``forward`` attribute on each
covered module, removed in a ``finally`` (``impls._guard`` restores every module's ``__dict__``
after the call as well). The module's own ``__call__`` still runs, so the user's hooks see the
same calls; the override knows its module, hence its padding mode, ``padding='same'`` and
``padding_idx`` and the module the rules expect in a ``LayerCall``. A ``TorchFunctionMode``
swapping ``F.conv2d`` calls instead would see an already padded input and no module, so the rule
could not be given a faithful call. The mode is used only to *watch*: a trainable parameter
used outside the forward of a module that owns it (a parent's ``F.linear(x, self.fc.weight)``,
a parameter in ``loss_fn``) makes the answer impossible to get from the records, so it is
refused.

Covered: Linear (any leading dimensions), Conv1d/2d/3d (stride, dilation, groups, numeric /
'same' / 'valid' padding, every padding mode), Embedding (``padding_idx``, ``sparse``). A layer
called several times, or a parameter shared by covered layers (a tied embedding and decoder),
gets the cross terms between its uses. Any other module that owns a trainable parameter
(LayerNorm, attention, RNNs, a bare ``nn.Parameter``), a covered type whose ``forward`` was
replaced, or a parameter used outside its modules: ``Unsupported`` naming it. ``create_graph``:
``Unsupported`` (the backward is not itself differentiable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impls._capture import _ParameterUseWatch
from impls.base import Implementation, LossFn, Side, Unsupported, per_example_losses
from impls.layers import LayerCall, rule_for
from impls.layers.conv import explicit_padding

_CONV_INPUT_GRAD = {
    1: torch.nn.grad.conv1d_input,
    2: torch.nn.grad.conv2d_input,
    3: torch.nn.grad.conv3d_input,
}
#: covered module types -> the local names of the parameters their Function accounts for
_COVERED = {
    nn.Linear: ("weight", "bias"),
    nn.Conv1d: ("weight", "bias"),
    nn.Conv2d: ("weight", "bias"),
    nn.Conv3d: ("weight", "bias"),
    nn.Embedding: ("weight",),
}


# -- the Functions ---------------------------------------------------------------------------


# Each Function is given the list that receives its output gradient (its call's
# ``grad_outputs``), never the call itself: the call holds the output, whose grad_fn holds ctx,
# so a ctx holding the call would make a reference cycle that keeps every activation and the
# graph alive after the answer is returned, until the cyclic garbage collector runs.


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
        grad_x = grad_output @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class ConvFunction(torch.autograd.Function):
    """``F.conv{1,2,3}d`` with numeric padding; backward records g and returns only ∂/∂x."""

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
                shape, weight, grad_output, stride, padding, dilation, groups
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


def _apply(module: nn.Module, x: Tensor, call: LayerCall) -> Tensor:
    """What ``module(x)`` computes, through the module's Function (g goes to the call)."""
    sink = call.grad_outputs
    if not isinstance(module, nn.Embedding) and isinstance(x, Tensor):
        batched = 2 if isinstance(module, nn.Linear) else module.weight.dim()
        if x.dim() < batched:  # an unbatched call: its first dimension is no batch dimension
            raise Unsupported(
                f"{type(module).__name__} '{call.name}' was called on an unbatched input of "
                f"shape {tuple(x.shape)}: its output is shared by all examples"
            )
    if isinstance(module, nn.Linear):
        return LinearFunction.apply(x, module.weight, module.bias, sink)
    if isinstance(module, nn.Embedding):
        return EmbeddingFunction.apply(x, module.weight, module.padding_idx, sink)
    # convolution: pad as the module does (padding mode, 'same'), then a padding-free Function;
    # plain zero padding goes into the convolution itself, as the module does it
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        x, padding = explicit_padding(module, x), 0
    return ConvFunction.apply(
        x, module.weight, module.bias, module.stride, padding, module.dilation, module.groups, sink
    )


# -- recording one side ----------------------------------------------------------------------


@dataclasses.dataclass
class _Planned:
    name: str
    module: nn.Module
    wanted: dict[str, nn.Parameter]


def _plan(side: Side) -> list[_Planned]:
    """The covered modules that own a trainable parameter; Unsupported for any other owner."""
    trainable = {id(p) for p in side.params.values()}
    names = {id(p): n for n, p in side.params.items()}
    planned = []
    for name, module in side.model.named_modules():
        owned = {
            local: p
            for local, p in module._parameters.items()
            if p is not None and id(p) in trainable
        }
        if not owned:
            continue
        label = f"{type(module).__name__} '{name or type(side.model).__name__}'"
        base = next((t for t in type(module).__mro__ if t in _COVERED), None)
        if base is None:
            local, p = next(iter(owned.items()))
            raise Unsupported(
                f"'function' covers only Linear, Conv1d/2d/3d and Embedding: parameter "
                f"'{names[id(p)]}' belongs to {label}"
            )
        if type(module).forward is not base.forward or "forward" in module.__dict__:
            raise Unsupported(
                f"{label} replaces the {base.__name__} forward: 'function' cannot tell what it "
                "computes"
            )
        extra = sorted(set(owned) - set(_COVERED[base]))
        if extra:
            raise Unsupported(
                f"'function' cannot account for parameter '{names[id(owned[extra[0]])]}' of {label}"
            )
        rule = rule_for(module)
        if rule is None:
            raise Unsupported(f"no layer rule for {label}")
        rule.check(module, name or type(side.model).__name__)
        planned.append(_Planned(name or type(side.model).__name__, module, owned))
    return planned


@contextlib.contextmanager
def recording(side: Side, calls: list[LayerCall]) -> Iterator[None]:
    """Route the covered modules of ``side.model`` through the Functions while inside.

    Each call of a covered module appends its :class:`LayerCall` to ``calls`` (its
    ``grad_outputs`` are filled by the backward pass). On exit the instance-level overrides are
    removed, whatever happened; a trainable parameter used where no covered module accounts for
    it raises ``Unsupported`` (after a forward that completed).
    """
    planned = _plan(side)
    coverage: dict[int, int] = defaultdict(int)
    watch = _ParameterUseWatch({id(p): n for n, p in side.params.items()}, coverage)
    watch.track_batch(side.inputs)  # a layer fed a tensor shared by all examples is refused
    overridden = []
    try:
        for plan in planned:
            plan.module.forward = _forward_override(plan, side.batch_size, calls, coverage, watch)
            overridden.append(plan.module)
        with watch:
            yield
    finally:
        for module in overridden:
            module.__dict__.pop("forward", None)
    if watch.uncovered is not None:
        raise Unsupported(
            f"parameter '{watch.uncovered}' is used outside the forward of the covered module "
            "that owns it: 'function' cannot account for that use"
        )


def _forward_override(plan: _Planned, batch_size: int, calls: list, coverage: dict, watch):
    module, keys = plan.module, [id(p) for p in plan.wanted.values()]
    rule = rule_for(module)
    owner = threading.get_ident()

    def forward(*args, **kwargs):
        if threading.get_ident() != owner:  # another thread using the model meanwhile
            return type(module).forward(module, *args, **kwargs)
        if len(args) + len(kwargs) != 1:
            raise TypeError(f"{type(module).__name__}.forward takes one input")
        x = args[0] if args else next(iter(kwargs.values()))
        call = LayerCall(
            module=module,
            name=plan.name,
            rule=rule,
            args=(x,),
            kwargs={},
            outputs=None,
            output_tensors=[],
            wanted=plan.wanted,
            batch_size=batch_size,
            versions=[(x, x._version)] if isinstance(x, Tensor) else [],
            input_batched=watch.is_batched(x),
        )
        for key in keys:
            coverage[key] += 1
        try:
            output = _apply(module, x, call)
        finally:
            for key in keys:
                coverage[key] -= 1
        call.outputs, call.output_tensors = output, [output]
        calls.append(call)
        return output

    return forward


def recorded_calls(side: Side, loss_fn: LossFn) -> list[LayerCall]:
    """One forward and one backward of ``side``: every covered call with its a and g."""
    calls: list[LayerCall] = []
    with torch.enable_grad():
        with recording(side, calls):
            outputs = side.model(*side.inputs)
            losses = per_example_losses(loss_fn, outputs, side.targets, side.batch_size)
        # asking for the parameters' gradients makes autograd run every recorded Function's
        # backward; those return None for the parameters, so no weight gradient is formed
        used = list({id(p): p for c in calls for p in c.wanted.values()}.values())
        if losses.requires_grad and used:
            torch.autograd.grad(losses.sum(), used, allow_unused=True)
    for call in calls:
        if not call.grad_outputs:  # the layer's output did not reach the loss
            call.grad_outputs.append(torch.zeros_like(call.output_tensors[0]))
        call.check_inputs_unchanged()
    return calls


# -- reductions with the layer rules ---------------------------------------------------------


def _uses(calls: list[LayerCall]) -> dict[int, list[tuple[LayerCall, str]]]:
    """id(parameter) -> every (call, local name) that uses it."""
    uses: dict[int, list[tuple[LayerCall, str]]] = defaultdict(list)
    for call in calls:
        for local, p in call.wanted.items():
            uses[id(p)].append((call, local))
    return uses


def _only(call: LayerCall, locals_: set[str]) -> LayerCall:
    if set(call.wanted) == locals_:
        return call
    return dataclasses.replace(call, wanted={n: call.wanted[n] for n in locals_})


def _pair_inner(
    left: LayerCall, right: LayerCall, pairs: list[tuple[str, str, str]]
) -> dict[str, Tensor]:
    """Tensor[B, B'] per parameter name for ``pairs`` of (name, left local, right local).

    Two calls of one rule with the same local names use the rule's ``inner`` (its factored form
    where it has one); anything else (a parameter shared by two layer types) is the inner
    product of the two rules' per-example gradients.
    """
    out: dict[str, Tensor] = {}
    same = [(n, a) for n, a, b in pairs if a == b and left.rule is right.rule]
    if same:
        locals_ = {a for _, a in same}
        values = left.rule.inner(_only(left, locals_), _only(right, locals_))
        for name, local in same:
            out[name] = values[local]
    mixed = [(n, a, b) for n, a, b in pairs if not (a == b and left.rule is right.rule)]
    if mixed:
        left_samples = left.rule.grad_samples(_only(left, {a for _, a, _ in mixed}))
        right_samples = right.rule.grad_samples(_only(right, {b for _, _, b in mixed}))
        for name, a, b in mixed:
            value = left_samples[a].flatten(1) @ right_samples[b].flatten(1).T
            out[name] = out[name] + value if name in out else value
    return out


def _shared(
    left: LayerCall, right: LayerCall, left_names: dict[int, str], right_names: dict[int, str]
) -> list[tuple[str, str, str]]:
    """(name, left local, right local) for the parameter names the two calls both use."""
    by_name = {right_names[id(p)]: local for local, p in right.wanted.items()}
    return [
        (left_names[id(p)], local, by_name[left_names[id(p)]])
        for local, p in left.wanted.items()
        if left_names[id(p)] in by_name
    ]


class CustomFunction(Implementation):
    name = "function"
    differentiable = False

    def _squared_norms(self, side, loss_fn, create_graph):
        calls = recorded_calls(side, loss_fn)
        names = {id(p): n for n, p in side.params.items()}
        zeros = torch.zeros(side.batch_size, dtype=side.dtype, device=side.device)
        squared = {n: zeros for n in side.params}
        for call in calls:
            for local, value in call.rule.squared_norms(call).items():
                name = names[id(call.wanted[local])]
                squared[name] = squared[name] + value
        # a parameter used by several calls: ‖Σ_k g_k‖² = Σ_k ‖g_k‖² + 2 Σ_{k<l} ⟨g_k, g_l⟩
        done: set[tuple[int, int]] = set()
        for uses in _uses(calls).values():
            for k, (left, _) in enumerate(uses):
                for right, _ in uses[k + 1 :]:
                    if left is right or (id(left), id(right)) in done:
                        continue
                    done.add((id(left), id(right)))
                    pairs = _shared(left, right, names, names)
                    for name, value in _pair_inner(left, right, pairs).items():
                        squared[name] = squared[name] + 2 * value.diagonal()
        return squared

    def _inner(self, side, other, loss_fn, create_graph):
        left_calls = recorded_calls(side, loss_fn)
        right_calls = left_calls if other is side else recorded_calls(other, loss_fn)
        left_names = {id(p): n for n, p in side.params.items()}
        right_names = {id(p): n for n, p in other.params.items()}
        right_uses = _uses(right_calls)
        by_name = {n: right_uses.get(id(p), []) for n, p in other.params.items()}
        total = torch.zeros(side.batch_size, other.batch_size, dtype=side.dtype, device=side.device)
        for left in left_calls:
            partners = {
                id(call): call
                for p in left.wanted.values()
                for call, _ in by_name[left_names[id(p)]]
            }
            for right in partners.values():
                pairs = _shared(left, right, left_names, right_names)
                for value in _pair_inner(left, right, pairs).values():
                    total = total + value
        return total
