"""Opacus, before the run: what Opacus wraps and how its parameters answer for the caller's.

- nn.MultiheadAttention, nn.LSTM and nn.GRU are swapped for DPMultiheadAttention, DPLSTM and
  DPGRU by Opacus's fixers, on a copy of the module tree that shares every other parameter with
  the caller's model (only swapped modules get weights of their own, loaded in the model's dtype).
- DPMultiheadAttention is always run sequence-first, hooked by its own ``GradSampleHooks(...,
  batch_first=False)``: Opacus 1.6's batch_first=True path splices heads into positions (fixed
  upstream after 1.6: meta-pytorch/opacus#825). A batch-first attention gets a wrapper that
  transposes around it.
- ``opacus``: layers whose specialised sampler ignores part of their configuration (Conv with
  padding_mode other than "zeros", Embedding with padding_idx, LayerNorm without bias) go
  through Opacus's functorch path (vmap over that layer), which is exact; ``opacus_ghost``
  refuses them (its layer paths cannot be rerouted), tied parameters too.
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from impls.base import Side, Unsupported
from impls.peers.support import (
    disable_inplace,
    label,
    library_errors,
    refuse_callers_hooks,
    refuse_tied_parameters,
)


def _import_quietly(module: str) -> Any:
    # opacus.utils.module_utils calls logging.basicConfig() on import, which gives the root logger
    # of the whole process a stderr handler; importing an adapter must not reconfigure logging
    handlers = logging.root.handlers[:]
    try:
        return importlib.import_module(module)
    finally:
        logging.root.handlers[:] = handlers


grad_sample = _import_quietly("opacus.grad_sample")
dp_rnn = _import_quietly("opacus.layers.dp_rnn")
validators = _import_quietly("opacus.validators")

_OpacusGradSampleModule = grad_sample.GradSampleModule
_OpacusGhostModule = grad_sample.GradSampleModuleFastGradientClipping

# modules Opacus's fixers replace by a DP layer computing the same function
_SWAPPABLE = (nn.MultiheadAttention, nn.LSTM, nn.GRU)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _UseFunctorch:
    """A module type Opacus has no sampler for."""


class _Routing:
    """Mixin for Opacus's hook classes: per-instance functorch routing, subtrees left alone.

    Opacus picks a sampler by ``_get_module_type``; answering a type it has no sampler for makes
    it use its own functorch path (``prepare_layer`` / ``ft_compute_per_sample_gradient``).
    Subtrees in ``islands`` get hooks of their own (sequence-first attention).
    """

    def _route(self, functorch: set[int], islands: set[int]) -> None:
        # before Opacus's __init__, which adds the hooks (nn.Module.__init__ has not run yet)
        object.__setattr__(self, "_functorch_modules", functorch)
        object.__setattr__(self, "_islands", islands)

    def _get_module_type(self, module: nn.Module) -> type:
        return _UseFunctorch if id(module) in self._functorch_modules else type(module)

    def iterate_submodules(self, module: nn.Module):
        if id(module) not in self._islands:
            yield from super().iterate_submodules(module)


class GradSampleModule(_Routing, _OpacusGradSampleModule):
    def __init__(self, m: nn.Module, functorch: set[int], islands: set[int], **kwargs):
        self._route(functorch, islands)
        super().__init__(m, **kwargs)


class GhostModule(_Routing, _OpacusGhostModule):
    def __init__(self, m: nn.Module, islands: set[int], **kwargs):
        self._route(set(), islands)
        super().__init__(m, **kwargs)


class _BatchFirstAttention(nn.Module):
    """Runs a sequence-first DPMultiheadAttention on batch-first inputs (same function).

    Other attributes (``embed_dim``, ``batch_first``, ...) read through to the replaced module,
    so model code that inspects its attention still sees nn.MultiheadAttention's.
    """

    def __init__(self, attention: nn.Module, replaced: nn.Module):
        super().__init__()
        self.attention = attention
        self.__dict__["_replaced"] = replaced  # not a submodule: its parameters stay out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_replaced"], name)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if need_weights and not average_attn_weights:
            raise Unsupported("DPMultiheadAttention returns head-averaged weights only")
        out, weights = self.attention(
            query.transpose(0, 1),
            key.transpose(0, 1),
            value.transpose(0, 1),
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            is_causal=is_causal,
        )
        return out.transpose(0, 1), weights


@dataclass
class Plan:
    """What Opacus wraps and how its parameters answer for the caller's."""

    model: nn.Module  # the caller's model, or a copy with DP layers swapped in
    # caller's parameter name -> working-model parameters whose per-example gradients,
    # concatenated along the parameter's dim 0, are the caller's (one unless a packed
    # in_proj_weight was split into q, k, v)
    parts: dict[str, list[nn.Parameter]]
    shapes: dict[str, tuple[int, ...]]  # caller's parameter name -> its shape
    functorch: set[int] = field(default_factory=set)  # ids of modules sent through functorch
    swapped: list[tuple[str, nn.Module, nn.Module]] = field(default_factory=list)  # name, dp, old
    islands: list[nn.Module] = field(default_factory=list)  # sequence-first DPMultiheadAttention


def make_plan(side: Side, ghost: bool) -> Plan:
    model = side.model
    refuse_callers_hooks(model, "Opacus")
    if ghost:
        refuse_tied_parameters(
            model, side.params, "Opacus ghost clipping supports no parameter tying"
        )
    swaps = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) in _SWAPPABLE and any(p.requires_grad for p in m.parameters())
    ]
    shapes = {n: tuple(p.shape) for n, p in side.params.items()}
    if swaps:
        plan = _swap(model, swaps, shapes)
    else:
        plan = Plan(model, {n: [p] for n, p in side.params.items()}, shapes)
    for name, module in plan.model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            _check_layer(name, module, ghost, plan)
    # on the caller's model, preserved_model puts the flags back with the other attributes
    disable_inplace(plan.model)
    return plan


def _check_layer(name: str, module: nn.Module, ghost: bool, plan: Plan) -> None:
    """Refuse, or route through functorch, a trainable layer Opacus would get wrong."""
    what = label(name, module)
    if list(module.buffers()):
        raise Unsupported(
            f"Opacus refuses {what}: a trainable layer with buffers (e.g. running statistics)"
        )
    exact = type(module)
    functorch_reason = None
    if exact is nn.Embedding:
        if module.max_norm is not None:
            raise Unsupported(f"{what} with max_norm rewrites its weight in forward")
        if module.scale_grad_by_freq:
            raise Unsupported(f"{what} with scale_grad_by_freq scales by batch-wide counts")
        if module.padding_idx is not None:
            functorch_reason = "Opacus's Embedding samplers give the padding_idx row a gradient"
    elif exact is nn.EmbeddingBag:
        if (
            module.mode not in ("sum", "mean")
            or module.padding_idx is not None
            or module.include_last_offset
            or module.max_norm is not None
            or module.scale_grad_by_freq
        ):
            raise Unsupported(
                f"Opacus's EmbeddingBag sampler covers mode sum/mean only, without padding_idx, "
                f"include_last_offset, max_norm or scale_grad_by_freq ({what})"
            )
    elif exact in _CONV and module.padding_mode != "zeros":
        functorch_reason = (
            f"Opacus's conv samplers assume zero padding, not '{module.padding_mode}'"
        )
    elif exact is nn.LayerNorm and module.bias is None:
        functorch_reason = "Opacus's LayerNorm sampler needs a bias"
    if functorch_reason is None:
        return
    if ghost:
        # ghost clipping picks its layer paths by type(module): no reroute is possible
        raise Unsupported(f"Opacus ghost clipping would be wrong for {what}: {functorch_reason}")
    plan.functorch.add(id(module))


def _swap(model: nn.Module, swaps: list[tuple[str, nn.Module]], shapes: dict) -> Plan:
    """A copy of the module tree with Opacus's DP layers in place of ``swaps``.

    The copy shares the caller's parameters and buffers (no tensor is copied); the DP layers
    own new parameters holding the same values, in the original dtype and device.
    """
    for name, old in swaps:
        inside, prefix = {id(p) for p in old.parameters()}, f"{name}." if name else ""
        outside = [
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if id(p) in inside and not n.startswith(prefix)
        ]
        if outside:
            raise Unsupported(
                f"parameter '{outside[0]}' is tied to {label(name, old)}, which Opacus's DP "
                "layer swap gives weights of its own"
            )
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copied = copy.deepcopy(model, memo)
    parts = {n: [p] for n, p in trainable(model)}  # tied parameters keep their first name
    plan = Plan(copied, parts, shapes)
    for name, old in swaps:
        stale = copied.get_submodule(name)
        with library_errors("Opacus's DP layer swap", "opacus"):
            dp = validators.ModuleValidator.FIXERS[type(old)](old)
            first = next(old.parameters())
            dp.to(device=first.device, dtype=first.dtype)
            # the fixer loaded the weights in the default dtype: load them again, exactly
            dp.load_state_dict(old.state_dict())
        dp.train(old.training)
        mapping = _dp_names(old, dp)
        if isinstance(old, nn.MultiheadAttention):
            plan.islands.append(dp)
            if old.batch_first:
                dp.batch_first = False  # read in forward only: the layout of q, k, v
                dp = _BatchFirstAttention(dp, stale)
                mapping = {k: [f"attention.{n}" for n in v] for k, v in mapping.items()}
        dp_params = dict(dp.named_parameters())
        for local, p in old.named_parameters():
            targets = [dp_params[n] for n in mapping[local]]
            for target in targets:
                target.requires_grad_(p.requires_grad)
            if p.requires_grad:
                plan.parts[f"{name}.{local}" if name else local] = targets
        if name:
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent), child, dp)
        else:  # the model itself is the layer to swap
            plan.model = dp
        plan.swapped.append((name, dp, stale))
    return plan


def _dp_names(old: nn.Module, dp: nn.Module) -> dict[str, list[str]]:
    """Original local parameter name -> the DP layer's parameter names that make it up."""
    if isinstance(old, nn.MultiheadAttention):
        return {
            "in_proj_weight": ["qlinear.weight", "klinear.weight", "vlinear.weight"],
            "in_proj_bias": ["qlinear.bias", "klinear.bias", "vlinear.bias"],
            "q_proj_weight": ["qlinear.weight"],
            "k_proj_weight": ["klinear.weight"],
            "v_proj_weight": ["vlinear.weight"],
            "out_proj.weight": ["out_proj.weight"],
            "out_proj.bias": ["out_proj.bias"],
            "bias_k": ["seq_bias_k.bias"],  # [1, 1, E] there, [E] here
            "bias_v": ["seq_bias_v.bias"],
        }
    # DPLSTM / DPGRU register their parameters under nn.LSTM's / nn.GRU's names
    return {n: [n] for n, _ in old.named_parameters()}


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
