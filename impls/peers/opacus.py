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

How Opacus is made to answer our question by its own means is ``opacus_plan`` (DP layers
swapped in on a copy of the module tree, sequence-first attention, layers rerouted through
Opacus's functorch path where its specialised sampler would be wrong, refusals before a number
exists) and ``opacus_watch`` (our hooks beside Opacus's during the run); this module runs it
(``OpacusRun``, on the structure every peer shares) and reads its per-parameter results in the
caller's parameter names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from impls.base import Implementation, MaterialisingImplementation, Side, Unsupported
from impls.peers.opacus_plan import (
    GhostModule,
    GradSampleModule,
    Plan,
    grad_sample,
    make_plan,
    trainable,
)
from impls.peers.opacus_watch import check_pairing, watch_run
from impls.peers.run import LibraryRun, read_result


class OpacusRun(LibraryRun):
    """One forward and backward under Opacus; ``collect`` gives the caller's parameter name ->
    per-example gradients Tensor[B, *shape] (``opacus``) or squared norms Tensor[B] (ghost)."""

    package = "opacus"

    def __init__(self, side: Side, loss_fn, ghost: bool):
        super().__init__(side, loss_fn)
        self.ghost = ghost
        self.library = "Opacus ghost clipping" if ghost else "Opacus"
        self.plan: Plan = make_plan(side, ghost)
        self.hook_sets: list = []  # Opacus's hook objects: the model's, then one per island
        self.handles: list = []
        # Opacus's Embedding sampler sets this process-wide flag and restores it only on success
        self.deterministic = torch.backends.cudnn.deterministic

    def attach(self):
        plan, islands = self.plan, {id(m) for m in self.plan.islands}
        if self.ghost:
            self.hook_sets.append(
                GhostModule(plan.model, islands, batch_first=True, loss_reduction="sum")
            )
            island_hooks = grad_sample.GradSampleHooksFastGradientClipping
        else:
            self.hook_sets.append(
                GradSampleModule(
                    plan.model, plan.functorch, islands, batch_first=True, loss_reduction="sum"
                )
            )
            island_hooks = grad_sample.GradSampleHooks
        for island in plan.islands:
            self.hook_sets.append(island_hooks(island, batch_first=False, loss_reduction="sum"))

    def watch(self):
        self.working = dict(trainable(self.plan.model))
        return watch_run(self.hook_sets, self.plan, self.side.batch_size, self.ghost,
                         self.working, self.handles)  # fmt: skip

    def exempt(self):
        return [m for _, dp, _ in self.plan.swapped for m in dp.modules()]

    def forward(self):
        return self.hook_sets[0](*self.side.args, **self.side.kwargs)

    def differentiated(self):
        return list(self.working.values())

    def after_backward(self, watch):
        check_pairing(watch)

    def collect(self):
        return _collect(self.plan, self.side.batch_size, self.ghost)

    def detach(self):
        for handle in self.handles:
            handle.remove()
        # drops Opacus's hooks and the grad_sample / _norm_sample / counters on the parameters
        # (the caller's, which the working model shares)
        for hooks in reversed(self.hook_sets):
            hooks.cleanup()
        torch.backends.cudnn.deterministic = self.deterministic


def _collect(plan: Plan, batch_size: int, ghost: bool) -> dict[str, Tensor]:
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
    # (check_pairing has refused the case where a skipped call could shift Opacus's pairing)
    sample = getattr(p, "grad_sample", None)
    if sample is None:
        sample = getattr(p, "_current_grad_sample", None)
    if isinstance(sample, list):
        raise Unsupported(f"Opacus accumulated several backward passes into '{name}'")
    if ghost:
        norm = getattr(p, "_norm_sample", None)
        squared = norm.pow(2) if norm is not None else None
        if squared is None and sample is not None:
            squared = sample.flatten(1).pow(2).sum(1)
        return read_result("Opacus", "norms", name, squared, (batch_size,), p)
    return read_result("Opacus", "per-example gradients", name, sample, (batch_size, *p.shape), p)


class Opacus(MaterialisingImplementation):
    """Opacus GradSampleModule: every example's gradient from ``p.grad_sample``."""

    name = "opacus"
    differentiable = False

    def _grad_samples(self, side: Side, loss_fn, create_graph: bool) -> dict[str, Tensor]:
        return OpacusRun(side, loss_fn, ghost=False).run()


class OpacusGhost(Implementation):
    """Opacus ghost clipping: per-example norms from ``p._norm_sample``; no inner products."""

    name = "opacus_ghost"
    differentiable = False

    def _squared_norms(self, side: Side, loss_fn, create_graph: bool) -> dict[str, Tensor]:
        return OpacusRun(side, loss_fn, ghost=True).run()

    def _inner(self, side: Side, other: Side, loss_fn, create_graph: bool) -> Tensor:
        raise Unsupported(NORMS_ONLY)

    def _factor_groups(self, side: Side, loss_fn) -> list:
        raise Unsupported(NORMS_ONLY)


NORMS_ONLY = (
    "opacus_ghost gives per-example norms only: ghost clipping never forms per-example "
    "gradients, so it has no inner products (use 'opacus')"
)
