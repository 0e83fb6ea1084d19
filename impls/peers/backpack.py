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

from impls.base import MaterialisingImplementation, Side, Unsupported
from impls.peers.run import LibraryRun, read_result
from impls.peers.support import (
    ForwardWatch,
    disable_inplace,
    label,
    refuse_callers_hooks,
    refuse_tied_parameters,
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
    refuse_callers_hooks(side.model, "BackPACK")
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


class BackPACKRun(LibraryRun):
    """One forward and backward with a BackPACK extension active; ``collect`` gives parameter
    name -> ``p.<savefield>``: Tensor[B] (batch_l2) or Tensor[B, *shape] (grad_batch)."""

    library, package = "BackPACK", "backpack"

    def __init__(self, side: Side, loss_fn, extension, savefield: str):
        super().__init__(side, loss_fn)
        self.extension, self.savefield = extension, savefield
        self.modules = _extended_modules(side)
        disable_inplace(side.model)  # preserved_model puts the flags back
        self.unseen: list[str] = []  # modules whose further outputs (h_n, c_n) got gradient
        # BackPACK's marks (_backpack_extend, input0, output) and results must not survive this
        # run: a second run in the same call (another batch) would find the modules "already
        # extended" and read the first run's results
        self.known = {id(h) for h in CTX.hook_handles}
        self.attributes = {id(m): set(vars(m)) for _, m in self.modules}
        self.earlier = {
            id(p): p.__dict__.pop(savefield) for p in side.params.values() if savefield in vars(p)
        }

    def attach(self):
        for _, module in self.modules:
            extend(module)

    def watch(self):
        covered = [(name, m, list(m.parameters(recurse=False))) for name, m in self.modules]
        watch = ForwardWatch(self.side.params, covered, self._check, self._after)
        self._watch = watch
        return watch

    def _check(self, name, module, args, kwargs):
        if self._watch.calls[id(module)] > 1:
            raise Unsupported(
                f"{label(name, module)} is called more than once per forward: BackPACK keeps the "
                "inputs of one call"
            )
        if not args:
            raise Unsupported(f"{label(name, module)} is called without positional inputs")
        self._watch.check_batch_axis(name, module, args[0])
        if isinstance(module, nn.RNNBase) and (
            any(a is not None for a in args[1:]) or kwargs.get("hx") is not None
        ):
            raise Unsupported(
                f"{label(name, module)} gets an initial state: BackPACK's recurrent derivatives "
                "assume a zero one"
            )

    def _after(self, name, module, args, kwargs, output):
        # BackPACK reads the gradient of the first output only (an RNN's sequence): a gradient
        # reaching h_n / c_n would be left out of its per-example gradients
        rest, _ = tree_flatten(output[1:] if isinstance(output, tuple) else ())
        what = label(name, module)
        for tensor in rest:
            if isinstance(tensor, Tensor) and tensor.requires_grad:
                tensor.register_hook(lambda grad: self.unseen.append(what))

    def context(self):
        return backpack(self.extension)

    def after_backward(self, watch):
        if self.unseen:
            raise Unsupported(
                f"the loss depends on a later output of {self.unseen[0]} (h_n / c_n): BackPACK "
                "only backpropagates the output sequence"
            )

    def collect(self):
        b, field = self.side.batch_size, self.savefield
        return {
            n: read_result(
                "BackPACK",
                field,
                n,
                getattr(p, field, None),
                (b,) if field == "batch_l2" else (b, *p.shape),
                p,
            )
            for n, p in self.side.params.items()
        }

    def detach(self):
        # BackPACK keeps every hook handle of extend() in a process-wide list: take ours out
        ours = [h for h in CTX.hook_handles if id(h) not in self.known]
        for handle in ours:
            handle.remove()
        CTX.hook_handles = [h for h in CTX.hook_handles if id(h) in self.known]
        for _, module in self.modules:
            for key in set(vars(module)) - self.attributes[id(module)]:
                delattr(module, key)
        for p in self.side.params.values():
            p.__dict__.pop(self.savefield, None)
            if id(p) in self.earlier:
                setattr(p, self.savefield, self.earlier[id(p)])


class BackPACK(MaterialisingImplementation):
    """BackPACK: norms from BatchL2Grad (``p.batch_l2``), inner products from BatchGrad."""

    name = "backpack"
    differentiable = False

    def _squared_norms(self, side: Side, loss_fn, create_graph: bool) -> dict[str, Tensor]:
        if _grouped_convolution(side.model):
            # BatchL2Grad's conv formula ignores groups: square BatchGrad's gradients instead
            return super()._squared_norms(side, loss_fn, create_graph)
        return BackPACKRun(side, loss_fn, BatchL2Grad(), "batch_l2").run()

    def _grad_samples(self, side: Side, loss_fn, create_graph: bool) -> dict[str, Tensor]:
        return BackPACKRun(side, loss_fn, BatchGrad(), "grad_batch").run()
