"""The per-layer rule interface and its registry.

Shapes use the project's einsum letters: n = batch, t/s = positions, i = input features,
o = output features. A rule sees one :class:`LayerCall` (a module's inputs, outputs and the
gradients of the summed per-example losses w.r.t. those outputs) and describes, for each of the
module's parameters it was asked for, the per-example gradients: as factors
(``impls.layers.factored``: an outer-product sum, token rows, or the dense Tensor[B, *shape]),
from which the reductions (squared norms, inner products) choose the cheaper of the factored
form and materialising.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from impls.base import Unsupported
from impls.layers import factored
from impls.layers.factored import Dense, Factors


@dataclass
class LinearUse:
    """One ``F.linear(input, weight, bias)`` run inside a module's forward, seen by the capture.

    ``weight`` and ``bias`` are parameters of the module or row slices of them (views, as
    MultiheadAttention's packed ``in_proj_weight.split(...)``); ``edge`` addresses ``output`` in
    the autograd graph and ``grad_output`` is filled by the capture's backward.
    """

    input: Tensor
    weight: Tensor
    bias: Tensor | None
    output: Tensor
    edge: Any
    version: int = 0  # input._version at the call
    grad_output: Tensor | None = None


_RECORDING = threading.local()


@contextlib.contextmanager
def recording(uses: list[LinearUse]):
    """While inside, :func:`record_linear` calls on this thread append to ``uses``."""
    previous = getattr(_RECORDING, "uses", None)
    _RECORDING.uses = uses
    try:
        yield uses
    finally:
        _RECORDING.uses = previous


def record_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, recorded as a :class:`LinearUse` inside :func:`recording` (thread-local)."""
    output = F.linear(input, weight, bias)
    uses = getattr(_RECORDING, "uses", None)
    if uses is not None and output.requires_grad:
        edge = get_gradient_edge(output)
        uses.append(LinearUse(input, weight, bias, output, edge, input._version))
    return output


@dataclass
class LayerCall:
    """One call of a module during the forward pass, and its output gradients after backward."""

    module: nn.Module
    name: str  # qualified module name, for messages
    rule: LayerRule
    args: tuple
    kwargs: dict
    outputs: Any  # what forward returned
    output_tensors: list[Tensor]  # the tensor leaves of ``outputs`` that carry gradient
    wanted: dict[str, nn.Parameter]  # local parameter name -> parameter, trainable only
    batch_size: int
    create_graph: bool = False
    grad_outputs: list[Tensor] = field(default_factory=list)  # aligned with output_tensors
    versions: list[tuple[Tensor, int]] = field(default_factory=list)
    edges: list[Any] = field(default_factory=list)  # autograd gradient edges of output_tensors
    input_batched: bool | None = None  # computed from the model's inputs (None: unknown)
    uses: list[LinearUse] = field(default_factory=list)  # linear calls inside (intercepting rules)

    @property
    def input(self) -> Tensor:
        """The first positional input (the activation a of a formula layer)."""
        x = self.args[0] if self.args else self.kwargs.get("input")
        if not isinstance(x, Tensor):
            raise Unsupported(f"module '{self.name}' was called without a tensor input")
        if self.input_batched is False:
            raise Unsupported(
                f"module '{self.name}' was called on a tensor not computed from the batch's "
                "inputs (e.g. torch.arange position ids): its output is shared by all examples"
            )
        if x.dim() == 0 or x.shape[0] != self.batch_size:
            raise Unsupported(
                f"module '{self.name}' was called on a tensor of shape {tuple(x.shape)} without "
                f"the batch dimension ({self.batch_size}) first: its output is shared by all "
                "examples"
            )
        return x if self.create_graph else x.detach()

    @property
    def grad_output(self) -> Tensor:
        """Gradient w.r.t. the (single) output, g."""
        return self.grad_outputs[0]

    def release(self) -> None:
        """Drop the tensors of this call (once its factors are known), keeping its identity."""
        self.args, self.kwargs, self.outputs = (), {}, None
        self.output_tensors, self.grad_outputs, self.versions, self.edges = [], [], [], []
        self.uses = []

    def check_inputs_unchanged(self) -> None:
        for tensor, version in self.versions:
            if tensor._version != version:
                raise Unsupported(
                    f"an input of module '{self.name}' was modified in place after its forward"
                )
        for use in self.uses:
            if use.input._version != use.version:
                raise Unsupported(
                    f"an input of a projection inside '{self.name}' was modified in place"
                )


class LayerRule:
    """How one module family's per-example gradients follow from a captured call."""

    #: module types handled
    types: tuple[type[nn.Module], ...] = ()
    #: whether the rule covers the parameters of the module's submodules too
    recursive: bool = False

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """Local name -> parameter for every parameter this rule accounts for."""
        return dict(module.named_parameters(recurse=self.recursive))

    def check(self, module: nn.Module, name: str) -> None:
        """Raise Unsupported when this module's configuration has no exact answer."""

    #: whether the capture offers this rule the torch calls made inside its module's forward
    intercepts: bool = False

    def intercept(
        self, func, args: tuple, kwargs: dict, uses: list[LinearUse], create_graph: bool
    ) -> Any:
        """Run ``func`` for the capture, appending the linear calls it makes to ``uses``; or
        return ``NotImplemented`` to let it run as usual. Only called when ``intercepts``.
        ``create_graph``: the results will be differentiated twice (pick kernels that can be).
        """
        return NotImplemented

    def factors(self, call: LayerCall) -> dict[str, Factors]:
        """Local name -> the per-example gradients of that parameter from this call, as factors.

        Rules with a factored form override this; the default wraps :meth:`grad_samples`.
        """
        return {n: Dense(g) for n, g in self.grad_samples(call).items()}

    def grad_samples(self, call: LayerCall) -> dict[str, Tensor]:
        """Local name -> Tensor[B, *param.shape] for every name in ``call.wanted``."""
        if type(self).factors is LayerRule.factors:
            raise NotImplementedError(f"{type(self).__name__} defines no per-example gradients")
        return {n: f.materialize() for n, f in self.factors(call).items()}

    # Reductions that need no per-example gradient: each pair of factors is reduced by the
    # cheaper of its factored form and materialising (``impls.layers.factored``). ``left`` and
    # ``right`` are two calls of this rule (possibly of two models, two batches, or two call
    # sites of one tied parameter).

    def squared_norms(self, call: LayerCall) -> dict[str, Tensor]:
        """Local name -> Tensor[B]: ‖example n's gradient from this call‖²."""
        return {n: f.squared_norms() for n, f in self.factors(call).items()}

    def inner(self, left: LayerCall, right: LayerCall) -> dict[str, Tensor]:
        """Local name -> Tensor[B, B']: ⟨left example n's gradient, right example m's⟩."""
        same = left is right
        a = self.factors(left)
        b = a if same else self.factors(right)
        return {n: factored.inner(a[n], b[n], same=same) for n in a if n in b}


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_rule(rule: LayerRule, *, overwrite: bool = False) -> LayerRule:
    for module_type in rule.types:
        if module_type in _RULES and not overwrite:
            raise ValueError(f"a layer rule for {module_type.__name__} is already registered")
        _RULES[module_type] = rule
    return rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for the module's type, or for a registered base type whose forward it keeps.

    A subclass that overrides ``forward`` computes something else: it gets no rule (and so the
    vmap fallback), never its base's formula.
    """
    for module_type in type(module).__mro__:
        if module_type in _RULES:
            return _RULES[module_type] if type(module).forward is module_type.forward else None
    return None
