"""One forward and backward of the caller's model under a peer library: the structure both
adapters share, and how a library's per-parameter results are read."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from impls.base import Side, Unsupported, differentiate, per_example_losses
from impls.peers.support import ForwardWatch, library_errors, quiet


class LibraryRun:
    """Attach the library, run the forward under our watch, backpropagate Σ losses once, read
    the results, and detach the library whatever happened. Subclasses fill in the steps."""

    #: how refusals name the library, and the package whose frames mark its failures
    library = "?"
    package = "?"

    def __init__(self, side: Side, loss_fn):
        self.side, self.loss_fn = side, loss_fn

    # -- the steps -------------------------------------------------------------------------------

    def attach(self) -> None:
        """Wrap or extend the model (inside ``library_errors``)."""

    def watch(self) -> ForwardWatch:
        """Our hooks beside the library's (refusing what it would get wrong)."""
        raise NotImplementedError

    def exempt(self) -> list[nn.Module]:
        """The library's own modules, which build per-example tensors themselves."""
        return []

    def context(self):
        """A context the forward and backward run in (BackPACK's extension)."""
        return contextlib.nullcontext()

    def forward(self) -> Any:
        return self.side.call_model()

    def differentiated(self) -> list[Tensor]:
        """The tensors the summed losses are differentiated with respect to."""
        return list(self.side.params.values())

    def after_backward(self, watch: ForwardWatch) -> None:
        """Refuse what only shows once the backward ran."""

    def collect(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def detach(self) -> None:
        """Remove every hook, attribute and flag the library left (runs whatever happened)."""

    # -- the template ----------------------------------------------------------------------------

    def run(self) -> dict[str, Tensor]:
        side, watch = self.side, None
        # a failure under the caller's autocast says so (libraries compute in the weights' dtype)
        library = self.library
        if side.autocast is not None:
            library = f"{library} (under {side.autocast})"
        try:
            with library_errors(library, self.package), quiet(self.package):
                self.attach()
            watch = self.watch()
            with torch.enable_grad(), quiet(self.package), self.context():
                watch.track_batch(side.batched_tensors(), side.batch_size, self.exempt())
                with watch, side.forward_precision():
                    with library_errors(library, self.package):
                        outputs = self.forward()
                    losses = per_example_losses(self.loss_fn, outputs, side.targets,
                                                side.batch_size)  # fmt: skip
                if losses.requires_grad:
                    with library_errors(library, self.package):
                        differentiate(losses.sum(), self.differentiated(), allow_unused=True)
            self.after_backward(watch)
            return self.collect()
        finally:
            if watch is not None:
                watch.remove()
            self.detach()


def read_result(library: str, field: str, name: str, value: Tensor | None, shape: tuple,
                p: nn.Parameter) -> Tensor:  # fmt: skip
    """A library's per-parameter result, checked: zeros where no hook fired (the parameter does
    not reach the loss), ``Unsupported`` for a shape other than ``shape``."""
    if value is None:
        return torch.zeros(shape, dtype=p.dtype, device=p.device)
    if tuple(value.shape) != tuple(shape):
        raise Unsupported(
            f"{library} returned {field} of shape {tuple(value.shape)} for '{name}' "
            f"(expected {tuple(shape)})"
        )
    return value
