"""The one watcher of a forward pass: which tensors carry which examples, which module is running,
and where trainable parameters are used.

:class:`BatchWatch` is a ``TorchFunctionMode`` on the calling thread (other threads running the
same model are not seen). It tags the batch's tensors with their :class:`~impls._layouts.Layout`
and follows them through every torch call (``impls._layouts.propagate``; reads of a shape, a type
or a flag pass straight through: their results are never tensors), keeps the stack of
module calls running (every module's forward wrapped, ``_wrap_modules``), and offers each torch
call to an ``interceptor`` first: the capture of ``ghost``/``hooks``/``function``, which records
parameter uses, and the peers' watch, which refuses uses their libraries cannot see.

Every user of the watch words refusals with :func:`refusal` helpers here, so a module, a
parameter or a torch call is named the same way everywhere.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from impls._layouts import Call, Layout, Lost, Tag, name_of, propagate, reads_metadata_only

_NO_FORWARD = object()  # a module without a forward of its own instance

#: ``interceptor(func, args, kwargs)``: the result of the call, or NotImplemented to run it as is
Interceptor = Callable[[Any, tuple, dict], Any]


def describe_module(name: str, module: nn.Module) -> str:
    """``"Linear 'encoder.fc'"``: how refusals name a module."""
    return f"{type(module).__name__} '{name or type(module).__name__}'"


def describe_call(func: Any) -> str:
    return f"torch.{name_of(func)}"


@dataclass(eq=False)
class Frame:
    """One running call of a module: its arguments, and its outputs once it returned."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    outputs: Any = None
    returned: bool = False
    #: anything a watcher wants to remember about this call (e.g. parameters it needs to redo)
    notes: dict = field(default_factory=dict)
    #: for calls with notes: the autograd edges of the output leaves when the call returned
    edges: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return describe_module(self.name, self.module)


class BatchWatch(TorchFunctionMode):
    """Follow the batch through the torch calls made while inside (this thread only).

    ``batch_size``: B. ``inputs``: the tensors that carry the examples along dimension 0 (the
    model's inputs and the targets). ``model``: when given, every module of it is hooked so that
    :attr:`frames` is the stack of running module calls and :attr:`calls` the finished ones.
    """

    def __init__(
        self,
        batch_size: int,
        inputs: Iterable[Tensor] = (),
        *,
        model: nn.Module | None = None,
        interceptor: Interceptor | None = None,
        record_calls: bool = False,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.interceptor = interceptor
        self._tags: dict[int, tuple[weakref.ref, Tag]] = {}
        self.frames: list[Frame] = []
        self.calls: list[Frame] = []  # finished module calls, when ``record_calls``
        self.record_calls = record_calls
        self._model = model
        self._wrapped: list[tuple[nn.Module, Any]] = []  # (module, its own forward)
        self._owner = threading.get_ident()
        self._names: dict[int, str] = {}
        self._followed: Tensor | None = None  # see ``followed``
        for x in inputs:
            self.set_tag(x, Layout(0))

    # -- tags ----------------------------------------------------------------------------------

    def tag_of(self, x: Any) -> Tag:
        if not isinstance(x, Tensor):
            return None
        entry = self._tags.get(id(x))
        if entry is None or entry[0]() is not x:
            return None
        return entry[1]

    def set_tag(self, x: Tensor, tag: Tag) -> None:
        if tag is None:
            self._tags.pop(id(x), None)
        else:
            self._tags[id(x)] = (weakref.ref(x), tag)

    def layout_of(self, x: Tensor) -> Layout | None:
        """The layout of a tensor that carries the batch, None when it carries none.

        Raises ``LostBatch`` when the tensor was computed from the batch but its examples cannot
        be located (with the reason).
        """
        tag = self.tag_of(x)
        if isinstance(tag, Lost):
            raise LostBatch(tag.reason)
        return tag

    # -- context -------------------------------------------------------------------------------

    def __enter__(self):
        if self._model is not None:
            try:
                self._wrap_modules(self._model)
            except BaseException:
                self._unwrap_modules()
                raise
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._unwrap_modules()

    def _unwrap_modules(self) -> None:
        for module, own in reversed(self._wrapped):
            if own is _NO_FORWARD:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = own
        self._wrapped.clear()

    def _wrap_modules(self, model: nn.Module) -> None:
        """Wrap the ``forward`` of every module of the model (an attribute of the instance,
        removed on exit) so that a :class:`Frame` is open exactly while it runs: its arguments
        are those the forward received (after the module's forward pre-hooks) and its outputs
        those it returned (before the module's forward hooks). The caller's module hooks thus
        run in the calling module's frame, and a call redone per example (the vmap fallback)
        is a call of the forward alone.

        A wrapper, not a pair of forward hooks per module: registering and removing the hooks
        cost more than the rest of the watch on a small model's forward, and a module without
        hooks keeps PyTorch's fast call path.
        """
        for name, module in model.named_modules():
            self._names[id(module)] = name
            if isinstance(module, torch.jit.ScriptModule):
                continue  # its calls bypass torch functions: nothing inside is seen anyway
            own = module.__dict__.get("forward", _NO_FORWARD)  # e.g. one a library set
            module.__dict__["forward"] = self._watched(name, module, module.forward)
            self._wrapped.append((module, own))

    def _watched(self, name: str, module: nn.Module, forward: Callable) -> Callable:
        owner, frames, calls, record = self._owner, self.frames, self.calls, self.record_calls

        def watched(*args, **kwargs):
            if threading.get_ident() != owner:
                return forward(*args, **kwargs)
            frame = Frame(name, module, args, kwargs)
            frames.append(frame)
            try:
                outputs = forward(*args, **kwargs)
            finally:
                frames.pop()
            frame.outputs, frame.returned = outputs, True
            if frame.notes:  # a call someone will redo: where its outputs are in the graph
                frame.edges = _edges(outputs)
            if record or frame.notes:
                calls.append(frame)
            return outputs

        # what inspect.signature(module.forward) follows; functools.wraps's copies of the name,
        # docstring and __dict__ cost a microsecond a module a call
        watched.__wrapped__ = forward
        return watched

    @contextlib.contextmanager
    def following(self):
        """Follow the calls made inside (from within a call this watch is handling, where the
        mode is off): the mode only, the module hooks stay as they are."""
        TorchFunctionMode.__enter__(self)
        try:
            yield self
        finally:
            TorchFunctionMode.__exit__(self, None, None, None)

    @property
    def frame(self) -> Frame | None:
        """The innermost module call running now."""
        return self.frames[-1] if self.frames else None

    # -- the torch calls -----------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if reads_metadata_only(func):
            return func(*args, **kwargs)
        result = NotImplemented
        if self.interceptor is not None:
            result = self.interceptor(func, args, kwargs)
            if self._followed is not None and result is self._followed:
                self._followed = None  # the interceptor tagged it (``followed``)
                return result
        if result is NotImplemented:
            result = func(*args, **kwargs)
        self.follow(func, args, kwargs, result)
        return result

    def followed(self, result: Tensor, tag: Tag) -> None:
        """For an interceptor that propagated the tag of the result of the call it handles
        (``propagate``, not in place): set it, and the call is not followed again."""
        self.set_tag(result, tag)
        self._followed = result

    def follow(self, func, args: tuple, kwargs: dict, result: Any) -> None:
        """Tag the result of a call (and the target of an in-place call) from its arguments."""
        if not self._any_tagged(args) and not (kwargs and self._any_tagged(kwargs.values())):
            return
        call = Call(name_of(func), func, args, kwargs, result, self.tag_of, self.batch_size)
        tags = propagate(call)
        if isinstance(result, Tensor):
            if tags:
                self.set_tag(result, tags[0])
        elif isinstance(result, (tuple, list)):
            tensors = [r for r in result if isinstance(r, Tensor)]
            for x, tag in zip(tensors, tags, strict=False):
                self.set_tag(x, tag)
        name = call.name
        if args and isinstance(args[0], Tensor) and result is not args[0]:
            if name == "__setitem__" or (name.endswith("_") and not name.startswith("__")):
                # an in-place call whose result is not the target (or None): the target changed
                target_tags = tags or [self._inplace_tag(call)]
                self.set_tag(args[0], target_tags[0])
            elif name.startswith("__i") and name.endswith("__"):
                self.set_tag(args[0], tags[0] if tags else None)

    def _inplace_tag(self, call: Call) -> Tag:
        from impls._layouts import _Unfollowable, handler_for

        handler = handler_for(call.func)
        if handler is None:
            return Lost(f"torch.{call.name} writes into a tensor in a way not followed here")
        try:
            tag = handler(call)
        except _Unfollowable as error:
            return Lost(f"torch.{call.name} {error}")
        return tag if not isinstance(tag, list) else (tag[0] if tag else None)

    def _any_tagged(self, values) -> bool:
        tags = self._tags
        for value in values:
            if isinstance(value, Tensor):
                entry = tags.get(id(value))
                if entry is not None and entry[0]() is value:
                    return True
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, Tensor):
                        entry = tags.get(id(item))
                        if entry is not None and entry[0]() is item:
                            return True
        return False


def _edges(outputs) -> list:
    from torch.autograd.graph import get_gradient_edge
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(outputs)
    return [
        get_gradient_edge(x) if isinstance(x, Tensor) and x.requires_grad else None for x in leaves
    ]


class LostBatch(Exception):
    """A tensor computed from the batch whose examples cannot be located."""


def tensor_arguments(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors among a call's arguments (one level of lists and tuples flattened)."""
    out = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, Tensor))
    return out


def grad_enabled() -> bool:
    return torch.is_grad_enabled()
