"""The per-layer rule interface and its registry.

Every use of a trainable parameter is a torch call (``F.linear``, ``torch.addmm``,
``F.embedding``, ``F.conv2d``, ``F.layer_norm``, ...), whichever module makes it. A rule
(:class:`OpRule`) knows one family of calls: :meth:`OpRule.bind` says which arguments are the
activations and which the weights, and :meth:`OpRule.factors` describes each weight's
per-example gradients from one recorded call (a :class:`Use`): its activations and output
gradient in per-example form, ``[B, rows, ...]``, and the call's non-tensor configuration.

Shapes use the project's einsum letters: n = batch, t/s = positions, i = input features,
o = output features. A use whose activations carry no batch (``torch.arange`` position ids, a
learned table) has its output shared by all examples; its per-example output gradients come from
where that output meets the batch, and its activations are every example's (expanded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from impls._layouts import Layout, canonical
from impls.base import Unsupported
from impls.factors import Factors


@dataclass
class Binding:
    """How one call's arguments split into activations, weights and configuration."""

    activations: tuple[Tensor, ...]
    weights: dict[str, Tensor | None]  # role -> the tensor the call uses in that role
    config: dict = field(default_factory=dict)


@dataclass(eq=False)
class Use:
    """One recorded call that uses trainable parameters, and its output gradient after the
    backward pass: everything a rule needs and nothing else."""

    rule: OpRule
    where: str  # for messages: the call and the module that made it
    binding: Binding
    layouts: tuple[Layout | None, ...]  # per activation: its layout, None when shared
    output: Tensor
    output_layout: Layout | None  # None: the output is shared by every example
    batch_size: int
    create_graph: bool = False
    wanted: dict[str, Tensor] = field(default_factory=dict)  # role -> weight to differentiate
    grad_output: Tensor | None = None  # d(summed losses)/d(output), [B, rows, ...] per example
    versions: list[tuple[Tensor, int]] = field(default_factory=list)
    frames: tuple = ()  # the module calls running when it was made (innermost last)
    #: the output's place in the autograd graph, taken when the call returned (a later in-place
    #: op on the output, ReLU(inplace=True), does not move it)
    edge: Any = None

    @property
    def config(self) -> dict:
        return self.binding.config

    @property
    def shared(self) -> bool:
        return self.output_layout is None

    def activation(self, index: int = 0) -> Tensor:
        """Activation ``index`` per example: [B, rows, *the other dims]. A shared activation is
        every example's: ``[B, *its shape]`` (its own first dimension as the rows)."""
        x = self.binding.activations[index]
        if not self.create_graph:
            x = x.detach()
        layout = self.layouts[index]
        if layout is None:
            return x.unsqueeze(0).expand(self.batch_size, *x.shape)
        return canonical(x, layout, self.batch_size)

    def layout(self, index: int = 0) -> Layout | None:
        return self.layouts[index]

    def output_gradient(self) -> Tensor:
        """[B, rows, *the other dims of the output]."""
        if self.grad_output is None:
            raise RuntimeError(f"{self.where}: no output gradient (the backward has not run)")
        return self.grad_output

    def check_inputs_unchanged(self) -> None:
        for tensor, version in self.versions:
            if tensor._version != version:
                raise Unsupported(f"an input of {self.where} was modified in place after the call")

    def release(self) -> None:
        self.binding = Binding((), {k: None for k in self.binding.weights}, self.binding.config)
        self.output = None
        self.grad_output = None
        self.versions = []


class OpRule:
    """How one family of torch calls' parameters get their per-example gradients."""

    #: the torch functions this rule handles
    functions: tuple[Any, ...] = ()

    def bind(self, func: Any, args: tuple, kwargs: dict, is_weight: Callable) -> Binding | None:
        """Activations and weights of this call, or None when this call is none of the rule's
        (``is_weight(x)``: x is a trainable parameter or a tensor computed from them alone)."""
        raise NotImplementedError

    def check(self, use: Use) -> None:
        """Raise Unsupported when this call's configuration has no exact answer."""

    def output_layout(self, use: Use, batch_layout: Layout) -> Layout:
        """The output's layout given the first activation's (the same, for most rules)."""
        return batch_layout

    def factors(self, use: Use) -> dict[str, Factors]:
        """Role -> the per-example gradients of that weight from this use, for every role in
        ``use.wanted``."""
        raise NotImplementedError


_RULES: dict[Any, OpRule] = {}


def register_rule(rule: OpRule, *, overwrite: bool = False) -> OpRule:
    for func in rule.functions:
        if func in _RULES and not overwrite:
            raise ValueError(f"a rule for {getattr(func, '__name__', func)} is already registered")
        _RULES[func] = rule
    return rule


def rule_for(func: Any) -> OpRule | None:
    return _RULES.get(func)


def registered_functions() -> set:
    return set(_RULES)


def require_first_dimension(use: Use, what: str) -> None:
    """Refuse a use whose call treats dimension 0 as its batch (a convolution, group or batch
    norm) while the examples are along another dimension."""
    layout = use.layout()
    if layout is not None and layout.dim != 0:
        raise Unsupported(
            f"{use.where} {what} along dimension 0, but the examples are along {layout.dim}"
        )


def flatten_positions(x: Tensor) -> Tensor:
    """[n, rows, *, f] -> [n, t, f]: every dimension but the first and last becomes a position."""
    return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


def weight_of(binding: Binding, role: str) -> Tensor | None:
    return binding.weights.get(role)


def same_dtype(x: Tensor, like: Tensor) -> Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


def zeros_for(use: Use) -> dict[str, Factors]:
    from impls.factors import Dense

    n = use.batch_size
    return {
        role: Dense(torch.zeros(n, *w.shape, dtype=w.dtype, device=w.device))
        for role, w in use.wanted.items()
    }
