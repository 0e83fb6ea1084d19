"""``opacus`` and ``opacus_ghost``: Opacus 1.6 behind the pegbench interface.

``opacus`` wraps the model in ``GradSampleModule(loss_reduction="sum")`` and backpropagates the
sum of the per-example losses once. With a sum Opacus scales nothing (with ``"mean"`` it would
multiply every output gradient by B), so ``p.grad_sample`` [B, *p.shape] is each example's own
gradient ∇θ ℓ_i, for any loss_fn. Norms and inner products are reduced from those tensors.

``opacus_ghost`` wraps it in ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``:
Linear and Embedding get their norms from Opacus's norm samplers without materialising, other
layers materialise one layer at a time; ``p._norm_sample`` [B] is each parameter's per-example
norm. It answers norms only. No loss wrapper (``DPLossFastGradientClipping``) is needed: that
wrapper's second, clipped backward is for training; the norms exist after the first one.

What the adapters do so Opacus answers our question, by Opacus's own means:

- nn.MultiheadAttention, nn.LSTM and nn.GRU are swapped for DPMultiheadAttention, DPLSTM and
  DPGRU by Opacus's fixers, on a copy of the module tree that shares every other parameter with
  the caller's model (only swapped modules get weights of their own, loaded in the model's dtype).
  Each call of a swapped module is checked against the original module on the same inputs.
- DPMultiheadAttention is always run sequence-first, hooked by its own ``GradSampleHooks(...,
  batch_first=False)``: its projections see [T, B, E], and Opacus 1.6's batch_first=True path
  splices heads into positions (fixed upstream after 1.6: meta-pytorch/opacus#825). A batch-first
  attention gets a wrapper that transposes around it.
- ``inplace`` is switched off on activation modules: an in-place op on a hooked module's output
  breaks Opacus's full backward hooks, and the flag changes no value.
- Opacus records activations only for modules in training mode. For a model in eval mode the
  adapter marks each hooked module as training between its forward and Opacus's hook, so the
  forward itself runs in the caller's mode.
- ``opacus``: layers whose specialised sampler ignores part of their configuration (Conv with
  padding_mode other than "zeros", Embedding with padding_idx, LayerNorm without bias) go
  through Opacus's functorch path (vmap over that layer), which is exact.

Everything else Opacus would get wrong is refused (``Unsupported``) before a number exists:
trainable layers with buffers (Opacus's own rule), inputs without the batch first, layers Opacus
re-runs through functorch that take several inputs, return several outputs or draw random
numbers, parameters used outside their module, a layer called several times when not every call
reaches the loss (Opacus pairs inputs and output gradients last-in-first-out), layers re-run in
backward (activation checkpointing); for ``opacus_ghost`` also tied parameters, layers called
twice, Linear inputs of 4 or more dimensions, non-contiguous Embedding indices, Embedding
padding_idx and non-zero conv padding modes (its layer paths cannot be rerouted).
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from impls._peer_support import (
    ForwardWatch,
    disable_inplace,
    label,
    library_errors,
    quiet,
    refuse_tied_parameters,
)
from impls.base import (
    Implementation,
    MaterializingImplementation,
    Side,
    Unsupported,
    differentiate,
    per_example_losses,
)


def _import_quietly(module: str) -> Any:
    # opacus.utils.module_utils calls logging.basicConfig() on import, which gives the root logger
    # of the whole process a stderr handler; importing an adapter must not reconfigure logging
    handlers = logging.root.handlers[:]
    try:
        return importlib.import_module(module)
    finally:
        logging.root.handlers[:] = handlers


_grad_sample = _import_quietly("opacus.grad_sample")
_dp_rnn = _import_quietly("opacus.layers.dp_rnn")
_validators = _import_quietly("opacus.validators")

GradSampleModule = _grad_sample.GradSampleModule
GradSampleModuleFastGradientClipping = _grad_sample.GradSampleModuleFastGradientClipping

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


class _GradSampleModule(_Routing, GradSampleModule):
    def __init__(self, m: nn.Module, functorch: set[int], islands: set[int], **kwargs):
        self._route(functorch, islands)
        super().__init__(m, **kwargs)


class _GhostModule(_Routing, GradSampleModuleFastGradientClipping):
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
class _Plan:
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


def _opacus_run(side: Side, loss_fn, ghost: bool) -> dict[str, Tensor]:
    """One forward and backward under Opacus.

    Returns caller's parameter name -> per-example gradients Tensor[B, *shape] (``opacus``) or
    squared per-example norms Tensor[B] (``opacus_ghost``).
    """
    plan = _plan(side, ghost)
    library = "Opacus ghost clipping" if ghost else "Opacus"
    islands = {id(m) for m in plan.islands}
    hook_sets: list[Any] = []  # Opacus's hook objects: the model's, then one per island
    handles: list[Any] = []
    watch = None
    # Opacus's Embedding sampler sets this process-wide flag and restores it only on success
    deterministic = torch.backends.cudnn.deterministic
    try:
        with library_errors(library, "opacus"), quiet("opacus"):
            if ghost:
                hook_sets.append(
                    _GhostModule(plan.model, islands, batch_first=True, loss_reduction="sum")
                )
            else:
                hook_sets.append(
                    _GradSampleModule(
                        plan.model, plan.functorch, islands, batch_first=True, loss_reduction="sum"
                    )
                )
            island_hooks = (
                _grad_sample.GradSampleHooksFastGradientClipping
                if ghost
                else _grad_sample.GradSampleHooks
            )
            for island in plan.islands:
                hook_sets.append(island_hooks(island, batch_first=False, loss_reduction="sum"))
        working = dict(_trainable(plan.model))
        watch = _watch(hook_sets, plan, side.batch_size, ghost, working, handles)
        with torch.enable_grad(), quiet("opacus"):
            exempt = [m for _, dp, _ in plan.swapped for m in dp.modules()]
            watch.track_batch(side.batched_tensors(), side.batch_size, exempt)
            with watch:
                with library_errors(library, "opacus"):
                    outputs = hook_sets[0](*side.args, **side.kwargs)
                losses = per_example_losses(loss_fn, outputs, side.targets, side.batch_size)
            if losses.requires_grad:
                with library_errors(library, "opacus"):
                    differentiate(losses.sum(), list(working.values()), allow_unused=True)
        _check_pairing(watch)
        return _collect(plan, side.batch_size, ghost)
    finally:
        if watch is not None:
            watch.remove()
        for handle in handles:
            handle.remove()
        # drops Opacus's hooks and the grad_sample / _norm_sample / counters on the parameters
        # (the caller's, which the working model shares)
        for hooks in reversed(hook_sets):
            hooks.cleanup()
        torch.backends.cudnn.deterministic = deterministic


# -- before the run: swaps, refusals, functorch choices ---------------------------------------


def _plan(side: Side, ghost: bool) -> _Plan:
    model = side.model
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
        plan = _Plan(model, {n: [p] for n, p in side.params.items()}, shapes)
    for name, module in plan.model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            _check_layer(name, module, ghost, plan)
    # on the caller's model, preserved_model puts the flags back with the other attributes
    disable_inplace(plan.model)
    return plan


def _check_layer(name: str, module: nn.Module, ghost: bool, plan: _Plan) -> None:
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


def _swap(model: nn.Module, swaps: list[tuple[str, nn.Module]], shapes: dict) -> _Plan:
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
    parts = {n: [p] for n, p in _trainable(model)}  # tied parameters keep their first name
    plan = _Plan(copied, parts, shapes)
    for name, old in swaps:
        stale = copied.get_submodule(name)
        with library_errors("Opacus's DP layer swap", "opacus"):
            dp = _validators.ModuleValidator.FIXERS[type(old)](old)
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


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -- during the run: hooks beside Opacus's ------------------------------------------------------


def _watch(hook_sets: list, plan: _Plan, batch_size: int, ghost: bool, working: dict, handles):
    """Our hooks on every module Opacus hooks, plus the swapped DP layers."""
    names = {id(m): n for n, m in plan.model.named_modules()}
    roots = [plan.model, *plan.islands]
    hooked = [
        (m, hooks)
        for hooks, root in zip(hook_sets, roots, strict=True)
        for m in hooks.iterate_submodules(root)
        if not isinstance(m, _dp_rnn.DPRNNBase)  # Opacus hooks their RNNLinear cells instead
    ]
    sequence_first = {id(m) for m, hooks in hooked if not hooks.batch_first}
    functorch = {id(m) for m, hooks in hooked if _uses_functorch(hooks, m, ghost)}
    norm_sampled = {id(m) for m, hooks in hooked if ghost and type(m) in hooks.NORM_SAMPLERS}
    covered = [(names[id(m)], m, list(m.parameters(recurse=id(m) in functorch))) for m, _ in hooked]
    was_training: dict[int, bool] = {}
    rng_before: dict[int, Tensor] = {}
    watch: ForwardWatch

    def force_training(module, args, output):
        # runs after the forward, before Opacus's activation hook (which skips eval modules)
        was_training[id(module)] = module.training
        module.training = True

    def check(name, module, args, kwargs):
        if ghost and id(module) in norm_sampled and watch.calls[id(module)] > 1:
            raise Unsupported(
                f"{label(name, module)} is called more than once per forward: Opacus's ghost "
                "norm sampler keeps one call's norm"
            )
        if not args:
            raise Unsupported(f"{label(name, module)} is called without positional inputs")
        # Opacus reads the batch size from the last positional input
        watch.check_batch_axis(name, module, args[-1], int(id(module) in sequence_first))
        if id(module) in functorch:
            if len(args) != 1 or kwargs:
                raise Unsupported(
                    f"{label(name, module)} goes through Opacus's functorch path, which re-runs "
                    "it on its first input alone, but it takes several inputs"
                )
            rng_before[id(module)] = _rng_state(args[0])
        if ghost and type(module) is nn.Embedding and not args[0].is_contiguous():
            raise Unsupported(
                f"{label(name, module)} gets non-contiguous indices (e.g. expanded position ids): "
                "Opacus's ghost norm sampler calls .view on them and fails"
            )
        if ghost and type(module) is nn.Linear and args[0].dim() not in (2, 3):
            raise Unsupported(
                f"{label(name, module)} gets a {args[0].dim()}-D input: Opacus's ghost norm "
                "sampler handles 2-D and 3-D inputs only and returns nothing otherwise"
            )
        if type(module) is nn.EmbeddingBag and (len(args) != 2 or kwargs):
            raise Unsupported(
                f"{label(name, module)}: Opacus's EmbeddingBag sampler needs (input, offsets) "
                "and no per_sample_weights"
            )

    def after(name, module, args, kwargs, output):
        module.training = was_training.pop(id(module), module.training)
        if id(module) in functorch:
            if not isinstance(output, Tensor):
                raise Unsupported(
                    f"{label(name, module)} goes through Opacus's functorch path, which needs "
                    "a single tensor output"
                )
            if not torch.equal(rng_before.pop(id(module)), _rng_state(args[0])):
                raise Unsupported(
                    f"{label(name, module)} draws random numbers in forward: Opacus's functorch "
                    "path re-runs it in backward with other draws"
                )

    for m, _ in hooked:
        handles.append(m.register_forward_hook(force_training, prepend=True))
    for name, dp, stale in plan.swapped:
        handles += _check_swap(name, dp, stale)
    watch = ForwardWatch(working, covered, check, after)
    return watch


def _check_pairing(watch: ForwardWatch) -> None:
    """Refuse when Opacus may have paired one call's inputs with another call's gradients.

    Opacus keeps a module's inputs in a list and pops the last one for each backward hook that
    fires. If some call's output never reaches the loss its hook never fires, and a later call's
    inputs can meet an earlier call's output gradient.
    """
    for name, module, _ in watch.covered:
        if watch.calls[id(module)] > 1 and getattr(module, "activations", None):
            raise Unsupported(
                f"{label(name, module)} is called {watch.calls[id(module)]} times but not every "
                "call reaches the loss: Opacus would pair inputs and output gradients of "
                "different calls"
            )


def _uses_functorch(hooks, module: nn.Module, ghost: bool) -> bool:
    kind = hooks._get_module_type(module)
    return kind not in hooks.GRAD_SAMPLERS and not (ghost and kind in hooks.NORM_SAMPLERS)


def _rng_state(x: Tensor) -> Tensor:
    if x.device.type == "cuda":
        return torch.cuda.get_rng_state(x.device)
    return torch.get_rng_state()


def _check_swap(name: str, dp: nn.Module, stale: nn.Module) -> list[Any]:
    """Hooks proving each call of the DP layer computes what the original would have."""
    state = {"checking": False}

    def compare(module, args, kwargs, output):
        state["checking"] = True
        try:
            with torch.no_grad():
                expected = stale(*args, **kwargs)
        finally:
            state["checking"] = False
        got, _ = tree_flatten(output)
        want, _ = tree_flatten(expected)
        if len(got) != len(want) or not all(_same(g, w) for g, w in zip(got, want, strict=True)):
            raise Unsupported(
                f"Opacus's {type(dp).__name__} does not reproduce {label(name, stale)} on these "
                "inputs (different outputs), so its per-example gradients would not be the model's"
            )

    def stale_call(module, args, kwargs):
        if not state["checking"]:
            raise Unsupported(
                f"the model reaches {label(name, stale)} other than through its module tree, so "
                "Opacus's DP layer swap cannot replace it"
            )

    return [
        dp.register_forward_hook(compare, with_kwargs=True),
        stale.register_forward_pre_hook(stale_call, with_kwargs=True),
    ]


def _same(got: Any, want: Any) -> bool:
    if not isinstance(got, Tensor) or not isinstance(want, Tensor):
        return got is None and want is None
    if got.shape != want.shape:
        return False
    # a reimplementation rounds differently: allow a few hundred ulps of the output's scale
    tol = 256 * torch.finfo(want.dtype).eps * max(1.0, want.abs().max().item())
    return bool((got.detach() - want).abs().max() <= tol) if want.numel() else True


# -- after the run: Opacus's per-parameter results, in the caller's names ----------------------


def _collect(plan: _Plan, batch_size: int, ghost: bool) -> dict[str, Tensor]:
    results = {}
    for name, parts in plan.parts.items():
        pieces = [_per_example(name, p, batch_size, ghost) for p in parts]
        if ghost:
            results[name] = sum(pieces)
        else:
            sample = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            results[name] = sample.reshape(batch_size, *plan.shapes[name])
    return results


def _per_example(name: str, p: nn.Parameter, batch_size: int, ghost: bool) -> Tensor:
    """p's per-example gradients [B, *p.shape], or its squared per-example norms [B] (ghost)."""
    # _current_grad_sample: a tied parameter one of whose modules never reached the loss (its
    # call count stays above zero); that module contributes exactly zero, so the sum is complete
    # (_check_pairing has refused the case where a skipped call could shift Opacus's pairing)
    sample = getattr(p, "grad_sample", None)
    if sample is None:
        sample = getattr(p, "_current_grad_sample", None)
    if isinstance(sample, list):
        raise Unsupported(f"Opacus accumulated several backward passes into '{name}'")
    if ghost:
        norm = getattr(p, "_norm_sample", None)
        if norm is not None:
            squared = norm.pow(2)
        elif sample is not None:
            squared = sample.flatten(1).pow(2).sum(1)
        else:  # no hook fired: the parameter does not reach the loss
            squared = torch.zeros(batch_size, dtype=p.dtype, device=p.device)
        if tuple(squared.shape) != (batch_size,):
            raise Unsupported(f"Opacus returned norms of shape {tuple(squared.shape)} for '{name}'")
        return squared
    if sample is None:  # no hook fired: the parameter does not reach the loss
        return torch.zeros(batch_size, *p.shape, dtype=p.dtype, device=p.device)
    if tuple(sample.shape) != (batch_size, *p.shape):
        raise Unsupported(
            f"Opacus returned per-example gradients of shape {tuple(sample.shape)} for '{name}' "
            f"(expected {(batch_size, *p.shape)})"
        )
    return sample


# -- the implementations --------------------------------------------------------------------------


class Opacus(MaterializingImplementation):
    """Opacus GradSampleModule: every example's gradient from ``p.grad_sample``."""

    name = "opacus"
    differentiable = False

    def _grad_samples(self, side: Side, loss_fn, create_graph: bool) -> dict[str, Tensor]:
        return _opacus_run(side, loss_fn, ghost=False)


class OpacusGhost(Implementation):
    """Opacus ghost clipping: per-example norms from ``p._norm_sample``; no inner products."""

    name = "opacus_ghost"
    differentiable = False

    def _squared_norms(self, side: Side, loss_fn, create_graph: bool) -> dict[str, Tensor]:
        return _opacus_run(side, loss_fn, ghost=True)

    def _inner(self, side: Side, other: Side, loss_fn, create_graph: bool) -> Tensor:
        raise Unsupported(
            "opacus_ghost gives per-example norms only: ghost clipping never forms per-example "
            "gradients, so it has no inner products (use 'opacus')"
        )
