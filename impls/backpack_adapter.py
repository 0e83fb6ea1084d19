"""``backpack``: BackPACK 1.7 behind the pegbench interface.

Norms come from ``BatchL2Grad``: ``p.batch_l2`` [B] is each example's squared gradient norm for
that parameter (for Linear and Conv without materialising the gradient). Inner products come
from ``BatchGrad``: ``p.grad_batch`` [B, *p.shape] is each example's gradient.

How BackPACK sees our loss. First-order extensions read only each extended module's input and
the gradient of the backpropagated scalar w.r.t. that module's output; they never look at the
loss module (extending a loss is needed for second-order extensions only). The adapter
backpropagates the sum of the per-example losses, Σ ℓ_i, whatever loss_fn computes: its gradient
w.r.t. example i's outputs is ∂ℓ_i/∂outputs_i, so the results are each example's own gradient.
BackPACK's 1/B factor appears only when the backpropagated loss is a mean; here it is a sum, so
there is nothing to undo.

Only modules that own trainable parameters are extended: a first-order extension needs no hook
elsewhere. ``inplace`` is switched off on activation modules for the call, because an in-place
op on the output of a module with a full backward hook is an autograd error (the flag changes no
value). Hooks, BackPACK's global hook list and every attribute BackPACK sets are removed after
the call.

Refused (``Unsupported``) before any number exists, because BackPACK would be wrong or fail:
a trainable parameter in a module BackPACK has no extension for (LayerNorm, attention, a bare
``nn.Parameter`` ...), tied parameters and modules called twice (BackPACK keeps one call's
inputs and one result per parameter), a parameter used outside its module, inputs without the
batch first, modules re-run in backward (activation checkpointing), Conv with padding_mode other
than "zeros" or string padding, an RNN/LSTM given an initial state or whose h_n / c_n reach the
loss (BackPACK assumes a zero state and backpropagates the output sequence only), Embedding
outside the default dtype, and whatever BackPACK's own parameter checks refuse (Embedding
padding_idx, LSTM num_layers > 1, ...). ``BatchL2Grad`` ignores ``groups`` of Conv and
ConvTranspose layers (wrong norms), so a model with a grouped convolution gets its norms from
``BatchGrad`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from backpack import backpack, extend
from backpack.context import CTX
from backpack.extensions import BatchGrad, BatchL2Grad
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
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
    MaterializingImplementation,
    Side,
    Unsupported,
    differentiate,
    per_example_losses,
)


def _extension_table() -> dict[type, Any]:
    """BackPACK's module -> module-extension table (private; 1.7 keeps it here). Another
    version that moved it gives a refusal with the reason, not an error at import."""
    try:
        return BatchGrad()._BackpropExtension__module_extensions
    except AttributeError as error:
        raise Unsupported(
            f"this BackPACK version keeps its extension table elsewhere ({error}): pegbench's "
            "adapter knows BackPACK 1.7"
        ) from error


def _extended_modules(side: Side) -> list[tuple[str, nn.Module]]:
    """The modules that own trainable parameters, each checked against what BackPACK handles."""
    refuse_tied_parameters(
        side.model, side.params, "BackPACK keeps one result per parameter, from one module"
    )
    names = {id(p): n for n, p in side.params.items()}
    modules = []
    for name, module in side.model.named_modules():
        own = [(local, p) for local, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        what = label(name, module)
        extension = _extension_table().get(type(module))
        if extension is None:
            raise Unsupported(
                f"BackPACK has no extension for {what} (parameter '{names[id(own[0][1])]}')"
            )
        handled = getattr(extension, "_ModuleExtension__params", None)
        if handled is None:
            raise Unsupported(f"this BackPACK version's extension for {what} is not one pegbench "
                              "knows (BackPACK 1.7)")  # fmt: skip
        for local, _ in own:
            if local not in handled:
                raise Unsupported(f"BackPACK's extension for {what} ignores parameter '{local}'")
        if isinstance(module, _ConvNd):
            if module.padding_mode != "zeros":
                raise Unsupported(
                    f"BackPACK's conv derivatives assume zero padding; {what} pads with "
                    f"'{module.padding_mode}'"
                )
            if isinstance(module.padding, str):
                raise Unsupported(
                    f"BackPACK's conv derivatives need numeric padding; {what} has "
                    f"padding='{module.padding}'"
                )
        check_parameters = getattr(extension._derivatives, "_check_parameters", None)
        if check_parameters is not None:
            try:
                check_parameters(module)
            except NotImplementedError as exc:
                raise Unsupported(f"BackPACK refuses {what}: {exc}") from exc
        if isinstance(module, nn.Embedding) and module.weight.dtype != torch.get_default_dtype():
            raise Unsupported(
                f"BackPACK's Embedding derivative builds its index masks in the default dtype "
                f"({torch.get_default_dtype()}), which fails for {what} in {module.weight.dtype}"
            )
        modules.append((name, module))
    return modules


def _grouped_convolution(model: nn.Module) -> bool:
    return any(isinstance(m, _ConvNd) and m.groups > 1 for m in model.modules())


def _backpack_run(side: Side, loss_fn, extension, savefield: str) -> dict[str, Tensor]:
    """One forward and backward with ``extension`` active.

    Returns parameter name -> ``p.<savefield>``: Tensor[B] (batch_l2) or Tensor[B, *shape]
    (grad_batch); zeros for a parameter that does not reach the loss.
    """
    modules = _extended_modules(side)
    disable_inplace(side.model)  # preserved_model puts the flags back
    b = side.batch_size

    def check(name, module, args, kwargs):
        if watch.calls[id(module)] > 1:
            raise Unsupported(
                f"{label(name, module)} is called more than once per forward: BackPACK keeps the "
                "inputs of one call"
            )
        if not args:
            raise Unsupported(f"{label(name, module)} is called without positional inputs")
        watch.check_batch_axis(name, module, args[0])
        if isinstance(module, nn.RNNBase) and (
            any(a is not None for a in args[1:]) or kwargs.get("hx") is not None
        ):
            raise Unsupported(
                f"{label(name, module)} gets an initial state: BackPACK's recurrent derivatives "
                "assume a zero one"
            )

    unseen: list[str] = []  # modules whose further outputs (h_n, c_n) received gradient

    def after(name, module, args, kwargs, output):
        # BackPACK reads the gradient of the first output only (an RNN's sequence): a gradient
        # reaching h_n / c_n would be left out of its per-example gradients
        rest, _ = tree_flatten(output[1:] if isinstance(output, tuple) else ())
        what = label(name, module)
        for tensor in rest:
            if isinstance(tensor, Tensor) and tensor.requires_grad:
                tensor.register_hook(lambda grad: unseen.append(what))

    covered = [(name, m, list(m.parameters(recurse=False))) for name, m in modules]
    watch = ForwardWatch(side.params, covered, check, after)
    known = {id(h) for h in CTX.hook_handles}
    # BackPACK's marks (_backpack_extend, input0, output) and results must not survive this run:
    # a second run in the same call (another batch) would find the modules "already extended"
    # and read the first run's results
    attributes = {id(m): set(vars(m)) for _, m in modules}
    earlier = {
        id(p): p.__dict__.pop(savefield) for p in side.params.values() if savefield in vars(p)
    }
    try:
        with library_errors("BackPACK", "backpack"), quiet("backpack"):
            for _, module in modules:
                extend(module)
        with torch.enable_grad(), quiet("backpack"), backpack(extension):
            watch.track_batch(side.batched_tensors(), b)
            with watch:
                with library_errors("BackPACK", "backpack"):
                    outputs = side.call_model()
                losses = per_example_losses(loss_fn, outputs, side.targets, b)
            if losses.requires_grad:
                with library_errors("BackPACK", "backpack"):
                    differentiate(losses.sum(), list(side.params.values()), allow_unused=True)
        if unseen:
            raise Unsupported(
                f"the loss depends on a later output of {unseen[0]} (h_n / c_n): BackPACK only "
                "backpropagates the output sequence"
            )
        return {n: _result(n, p, savefield, b) for n, p in side.params.items()}
    finally:
        watch.remove()
        # BackPACK keeps every hook handle of extend() in a process-wide list: take ours out
        ours = [h for h in CTX.hook_handles if id(h) not in known]
        for handle in ours:
            handle.remove()
        CTX.hook_handles = [h for h in CTX.hook_handles if id(h) in known]
        for _, module in modules:
            for key in set(vars(module)) - attributes[id(module)]:
                delattr(module, key)
        for p in side.params.values():
            p.__dict__.pop(savefield, None)
            if id(p) in earlier:
                setattr(p, savefield, earlier[id(p)])


def _result(name: str, p: nn.Parameter, savefield: str, batch_size: int) -> Tensor:
    value = getattr(p, savefield, None)
    shape = (batch_size,) if savefield == "batch_l2" else (batch_size, *p.shape)
    if value is None:  # no hook fired: the parameter does not reach the loss
        return torch.zeros(shape, dtype=p.dtype, device=p.device)
    if tuple(value.shape) != shape:
        raise Unsupported(
            f"BackPACK returned {savefield} of shape {tuple(value.shape)} for '{name}' "
            f"(expected {shape})"
        )
    return value


class BackPACK(MaterializingImplementation):
    """BackPACK: norms from BatchL2Grad (``p.batch_l2``), inner products from BatchGrad."""

    name = "backpack"
    differentiable = False

    def _squared_norms(self, side: Side, loss_fn, create_graph: bool) -> dict[str, Tensor]:
        if _grouped_convolution(side.model):
            # BatchL2Grad's conv formula ignores groups: square BatchGrad's gradients instead
            return super()._squared_norms(side, loss_fn, create_graph)
        return _backpack_run(side, loss_fn, BatchL2Grad(), "batch_l2")

    def _grad_samples(self, side: Side, loss_fn, create_graph: bool) -> dict[str, Tensor]:
        return _backpack_run(side, loss_fn, BatchGrad(), "grad_batch")
