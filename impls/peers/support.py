"""What the peer adapters (``impls.peers.opacus``, ``impls.peers.backpack``) share.

Both libraries compute per-example quantities from module hooks, so both are blind to the same
things: a parameter used outside the forward of the module that owns it, a module called on a
tensor without the batch first, an in-place op on a hooked module's output. ``ForwardWatch``
puts our own hooks beside theirs to see those cases and refuse them instead of returning a
wrong number; the rest are small helpers for refusals and library errors.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from impls._layouts import Layout, Lost
from impls._watch import BatchWatch, tensor_arguments
from impls._watch import describe_module as label
from impls.base import Unsupported

#: ``check(name, module, args, kwargs)`` before a watched call, raising Unsupported to refuse it
CallCheck = Callable[[str, nn.Module, tuple, dict], None]
#: ``after(name, module, args, kwargs, output)`` once a watched call returned
AfterCall = Callable[[str, nn.Module, tuple, dict, Any], None]


def one_line(exc: BaseException, limit: int = 240) -> str:
    """``"TypeName: first line of the message"``, cut to ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def library_errors(library: str, package: str) -> Iterator[None]:
    """Turn a failure of the library into Unsupported with a one-line reason; anything else
    propagates unchanged.

    A failure is the library's when the library's code (``package``) is on the stack where it
    was raised, and the innermost frame outside torch there is not pegbench's own: the library
    failed itself, or failed to run the model it re-runs (Opacus's functorch path). An error of
    pegbench's code around or inside the library's call (its hooks) is never disguised as one.
    """
    try:
        yield
    except Unsupported:
        raise
    except Exception as exc:
        if not raised_in(exc, package):
            raise
        raise Unsupported(f"{library} failed on this model: {one_line(exc)}") from exc


_TORCH = os.path.dirname(torch.__file__) + os.sep
_PEGBENCH = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PEGBENCH_TESTS = os.path.join(_PEGBENCH, "tests") + os.sep


def raised_in(exc: BaseException, package: str) -> bool:
    """Whether ``exc`` is the library ``package``'s failure (see :func:`library_errors`)."""
    module = importlib.import_module(package)
    root = os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    files = [os.path.abspath(f.filename) for f in traceback.extract_tb(exc.__traceback__)]
    if not any(f.startswith(root) for f in files):
        return False
    for filename in reversed(files):
        if filename.startswith(_TORCH):
            continue
        ours = filename.startswith(_PEGBENCH) and not filename.startswith(_PEGBENCH_TESTS)
        return not ours
    return True


@contextlib.contextmanager
def quiet(library_module: str) -> Iterator[None]:
    """Silence the warnings the library and its hooks emit on every call (restored after)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=rf"{library_module}(\.|$)")
        # torch warns when a full backward hook fires on a module whose inputs need no gradient
        # (every first layer): expected here, not the caller's concern
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def trainable_owners(
    model: nn.Module, params: dict[str, nn.Parameter]
) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> every (module name, module) that holds it directly."""
    wanted = {id(p) for p in params.values()}
    owners: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None and id(p) in wanted:
                if all(m is not module for _, m in owners[id(p)]):
                    owners[id(p)].append((name, module))
    return owners


def refuse_tied_parameters(model: nn.Module, params: dict[str, nn.Parameter], why: str) -> None:
    """Raise Unsupported if a trainable parameter is held by two modules (tied weights)."""
    owners = trainable_owners(model, params)
    for name, p in params.items():
        if len(owners[id(p)]) > 1:
            places = " and ".join(f"'{n or type(m).__name__}'" for n, m in owners[id(p)][:2])
            raise Unsupported(f"parameter '{name}' is tied ({places} share it): {why}")


def refuse_callers_hooks(model: nn.Module, library: str) -> None:
    """Raise Unsupported if a module with trainable parameters of its own carries the caller's
    forward hooks or pre-hooks.

    The libraries read a layer's activations and output gradients around hooks of their own,
    registered after the caller's, and some redo the module's call per example: a caller's hook
    that changes the layer's input or output (or uses its parameters) puts their per-example
    gradients off without an error (measured: Opacus on ``correctness`` case ``caller_hooks``).
    """
    for name, module in model.named_modules():
        if not (module._forward_hooks or module._forward_pre_hooks):
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            kind = "forward hooks" if module._forward_hooks else "forward pre-hooks"
            raise Unsupported(
                f"{label(name, module)} has the caller's own {kind}: {library} reads the layer "
                "around hooks of its own and cannot see what they change"
            )


def disable_inplace(model: nn.Module) -> None:
    """Switch off ``inplace`` on activation modules (nn.ReLU(inplace=True), ...).

    An in-place op on the output of a module with a full backward hook is an autograd error;
    ``inplace`` changes no value, only memory. Call it only inside ``preserved_model`` (or on a
    copy): the flags are module attributes and come back with them.
    """
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool) and module.inplace:
            module.inplace = False


class ForwardWatch:
    """Hooks on the modules a library computes from, while the forward pass and loss run.

    ``covered`` lists ``(name, module, parameters)``: the parameters the library accounts for
    while that module runs. The watch counts each module's calls, runs ``check`` before and
    ``after`` after each call, and on exit refuses any use of a trainable parameter made while
    no module covering it was running (a parent calling ``F.linear(x, self.fc.weight)``, a
    parameter used in ``loss_fn``): the library's hooks never see such a use. It follows the
    batch with the one watcher (``impls._watch``): a covered module fed a tensor not computed
    from the batch's inputs (e.g. ``torch.arange`` position ids), or with its examples along
    another dimension than the library assumes, is refused.

    Its hooks stay until ``remove()``: a watched module that runs again during the backward pass
    (activation checkpointing recomputes it) would feed the library a second call, and is
    refused there.
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        covered: Iterable[tuple[str, nn.Module, Iterable[nn.Parameter]]],
        check: CallCheck | None = None,
        after: AfterCall | None = None,
    ):
        self.covered = [(name, module, [id(p) for p in ps]) for name, module, ps in covered]
        self.check = check
        self.after = after
        self.calls: dict[int, int] = defaultdict(int)  # id(module) -> forward calls
        self._coverage: dict[int, int] = defaultdict(int)
        self._names = {id(p): n for n, p in params.items()}
        self.uncovered: str | None = None
        self._handles: list[Any] = []
        self._closed = False
        self._exempt: set[int] = set()
        self._watch = BatchWatch(0, interceptor=self._intercept)

    def __enter__(self) -> ForwardWatch:
        for name, module, keys in self.covered:
            self._handles.append(
                module.register_forward_pre_hook(self._before(name, keys), with_kwargs=True)
            )
            self._handles.append(
                module.register_forward_hook(self._after(name, keys), with_kwargs=True)
            )
        self._watch.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._watch.__exit__(*exc)
        self._closed = True
        if exc[0] is None and self.uncovered is not None:
            raise Unsupported(
                f"parameter '{self.uncovered}' is used outside the forward of the module "
                "that owns it (no library hook can see that use)"
            )
        return False

    def track_batch(self, tensors: Iterable[Tensor], batch_size: int,
                    exempt: Iterable[nn.Module] = ()) -> None:  # fmt: skip
        """Tag the batch's tensors (examples along dimension 0). ``exempt``: the library's own
        layers, which build per-example tensors themselves (Opacus's DPRNN initial states)."""
        self._watch.batch_size = batch_size
        for x in tensors:
            self._watch.set_tag(x, Layout(0))
        self._exempt = {id(m) for m in exempt}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_batch_axis(self, name: str, module: nn.Module, x: Any, axis: int = 0) -> None:
        """Refuse a call whose input does not carry one example per index of ``axis``."""
        what = label(name, module)
        if not isinstance(x, Tensor):
            raise Unsupported(f"{what} was called without a tensor input")
        if id(module) in self._exempt:
            return
        tag = self._watch.tag_of(x)
        if isinstance(tag, Lost):
            raise Unsupported(f"{what} was called on a tensor whose examples are lost: "
                              f"{tag.reason}")  # fmt: skip
        if tag is None:
            raise Unsupported(
                f"{what} was called on a tensor not computed from the batch's inputs (e.g. "
                "torch.arange position ids): its output is shared by all examples"
            )
        if tag != Layout(axis):
            raise Unsupported(
                f"{what} was called on a tensor of shape {tuple(x.shape)} without the batch one "
                f"example per index of axis {axis}: its hooks would mix or split examples"
            )

    def _intercept(self, func, args, kwargs):
        result = func(*args, **kwargs)
        # only a call whose result carries gradient uses a parameter: reading p.dtype, p.shape
        # or p.device, or p.detach(), is no gradient path
        if self.uncovered is None and _carries_gradient(result):
            for x in tensor_arguments(args, kwargs):
                if id(x) in self._names and not self._coverage[id(x)]:
                    self.uncovered = self._names[id(x)]
                    break
        return result

    def _before(self, name: str, keys: list[int]):
        def hook(module, args, kwargs):
            if self._closed:
                raise Unsupported(
                    f"{label(name, module)} runs again during backward (activation "
                    "checkpointing?): the library's hooks would record a second call"
                )
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, Tensor) and id(module) not in self._exempt:
                tag = self._watch.tag_of(first)
                if tag is None or isinstance(tag, Lost):
                    self.check_batch_axis(name, module, first, self._axis(first))
            self.calls[id(module)] += 1
            for key in keys:
                self._coverage[key] += 1
            if self.check is not None:
                self.check(name, module, args, kwargs)

        return hook

    def _axis(self, x: Tensor) -> int:
        tag = self._watch.tag_of(x)
        return tag.dim if isinstance(tag, Layout) else 0

    def _after(self, name: str, keys: list[int]):
        def hook(module, args, kwargs, output):
            if self._closed:
                return
            for key in keys:
                self._coverage[key] -= 1
            if self.after is not None:
                self.after(name, module, args, kwargs, output)

        return hook


def _carries_gradient(result) -> bool:
    if isinstance(result, Tensor):
        return result.requires_grad
    if isinstance(result, (tuple, list)):
        return any(isinstance(r, Tensor) and r.requires_grad for r in result)
    return False
