"""Opacus, during the run: our hooks beside Opacus's, refusing what it would get wrong.

Opacus records activations only for modules in training mode: for a model in eval mode each
hooked module is marked as training between its forward and Opacus's hook, so the forward itself
runs in the caller's mode. Refused here: inputs without the batch along the axis Opacus assumes,
layers re-run through functorch that take several inputs, return several outputs or draw random
numbers, a layer called several times when not every call reaches the loss (Opacus pairs inputs
and output gradients last-in-first-out), for ``opacus_ghost`` layers called twice, Linear inputs
of 4 or more dimensions and non-contiguous Embedding indices, and DP layers that do not
reproduce the module they replace.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from impls.base import Unsupported
from impls.peers.opacus_plan import Plan, dp_rnn
from impls.peers.support import ForwardWatch, label


def watch_run(hook_sets: list, plan: Plan, batch_size: int, ghost: bool, working: dict,
              handles) -> ForwardWatch:  # fmt: skip
    """Our hooks on every module Opacus hooks, plus the swapped DP layers."""
    names = {id(m): n for n, m in plan.model.named_modules()}
    roots = [plan.model, *plan.islands]
    hooked = [
        (m, hooks)
        for hooks, root in zip(hook_sets, roots, strict=True)
        for m in hooks.iterate_submodules(root)
        if not isinstance(m, dp_rnn.DPRNNBase)  # Opacus hooks their RNNLinear cells instead
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


def check_pairing(watch: ForwardWatch) -> None:
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
