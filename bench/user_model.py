"""A user's model for ``bench.compare`` and ``python -m bench compare``: loading and checking it.

From a notebook, ``bench.compare(model, loss_fn, make_batch)`` takes the three directly
(``case_from``). From the command line, the file defines ``make_case()`` returning them
(``load``):

- ``model``: a ``torch.nn.Module`` in the mode (train/eval), dtype and device it is used in;
- ``loss_fn(outputs, targets)``: per-example losses, a Tensor of shape [B] (reduction "none");
- ``make_batch(batch_size)``: ``(inputs, targets)`` with the batch dimension first. inputs: a
  Tensor (``model(x)``), a tuple (``model(*inputs)``) or a dict of names (``model(**inputs)``);
  targets: a Tensor, a tuple or a dict, handed to ``loss_fn`` as they are. Values that are not
  Tensors pass through unchanged; every Tensor among them has the batch dimension first.

Both run one forward and loss on a batch of ``PROBE_BATCH_SIZE`` examples (``probe``), so that
a mistake is reported as one line naming it (``UserModelError``) before any implementation
runs. The result, a ``UserCase``, is a bench case (``name``, ``make_model``, ``make_batch``,
``loss_fn``) that ``bench.sweep`` measures like its own.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: examples in the batch the file is checked with before anything is measured
PROBE_BATCH_SIZE = 2

_counter = itertools.count()


class UserModelError(ValueError):
    """A problem with the user's model (or model file), in one line naming it."""


@dataclass
class UserCase:
    """The user's model as a bench case (the interface ``bench.sweep.Cell.case`` expects).

    ``make_model`` returns the user's own model (seed and device are the file's business: the
    model is measured on its own device); ``make_batch`` calls the file's ``make_batch``.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    user_make_batch: Callable[[int], tuple]
    path: Path | None = None  # the model file, None for a model given directly
    tags: tuple[str, ...] = field(default=("user",))

    @property
    def device(self) -> str:
        return str(_trainable(self.model)[0].device)

    @property
    def dtype(self) -> torch.dtype:
        return _trainable(self.model)[0].dtype

    @property
    def parameter_count(self) -> int:
        """Trainable parameters (elements)."""
        return sum(p.numel() for p in _trainable(self.model))

    def make_model(self, seed: int = 0, device: str | None = None) -> nn.Module:
        return self.model

    def make_batch(self, batch_size: int, seed: int = 0, device: str | None = None) -> tuple:
        return self.user_make_batch(batch_size)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe(error: BaseException, path: Path | None = None) -> str:
    """``Type: message (file:line)``, on one line; the line is the deepest one in the user's
    file when the traceback passes through it, else the deepest one."""
    if isinstance(error, SyntaxError) and error.lineno is not None:
        return f"SyntaxError: {error.msg} ({Path(error.filename or path).name}:{error.lineno})"
    frames = traceback.extract_tb(error.__traceback__)
    theirs = []
    if path is not None:
        theirs = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
    frame = (theirs or frames or [None])[-1]
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    message = _first_line(str(error))
    return f"{type(error).__name__}{': ' + message if message else ''}{where}"


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {list(value.shape)}"
    if isinstance(value, (tuple, list, Mapping)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _import(path: Path):
    name = f"pegbench_user_model_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserModelError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        del sys.modules[name]
        raise UserModelError(f"{path}: importing it raised {describe(error, path)}") from None
    return module


def _tensors(value: Any) -> list[torch.Tensor]:
    """The Tensors at the top of a Tensor, a tuple/list or a mapping (others pass through)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _shapes(inputs: Any) -> str:
    """``[2, 5], [2]`` (a Tensor or a tuple) or ``x=[2, 5], mask=[2, 5]`` (a mapping)."""

    def shape(value) -> str:
        return str(list(value.shape)) if isinstance(value, torch.Tensor) else _kind(value)

    if isinstance(inputs, Mapping):
        return ", ".join(f"{k}={shape(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(shape(v) for v in inputs)
    return shape(inputs)


def check_batch(batch: Any, batch_size: int, where: str) -> None:
    """Raise ``UserModelError`` unless ``batch`` is ``(inputs, targets)`` of ``batch_size``:
    inputs a Tensor, a tuple or a mapping of names holding at least one Tensor, every Tensor
    of inputs and targets with the batch dimension first."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UserModelError(f"{where} must return (inputs, targets); it returned {_kind(batch)}")
    inputs, targets = batch
    if isinstance(inputs, Mapping):
        keys = [k for k in inputs if not isinstance(k, str)]
        if keys:
            raise UserModelError(
                f"{where}: a dict of inputs needs names (str keys: the model is called as "
                f"model(**inputs)); got the key {keys[0]!r}"
            )
    tensors = _tensors(inputs)
    if not tensors:
        raise UserModelError(
            f"{where}: inputs must be a Tensor, a tuple of Tensors or a dict of names to "
            f"Tensors; got {_kind(inputs)}"
        )
    for tensor in tensors:
        if tensor.dim() == 0 or tensor.shape[0] != batch_size:
            raise UserModelError(
                f"{where}: every input needs the batch dimension first ({batch_size}); "
                f"got shape {list(tensor.shape)}"
            )
    for tensor in _tensors(targets):
        if tensor.dim() == 0 or tensor.shape[0] != batch_size:
            raise UserModelError(
                f"{where}: targets need the batch dimension first ({batch_size}); "
                f"got shape {list(tensor.shape)}"
            )


def load(path: str | Path) -> UserCase:
    """Import the file, call ``make_case()``, and check one forward and loss on a small batch.

    Raises ``UserModelError`` (one line naming the problem) for a missing file, an import that
    raises, a missing or failing ``make_case``, a result of the wrong shape, a ``make_batch``
    that fails or returns the wrong shape, a forward or loss that fails, per-example losses of
    the wrong shape, or a loss that does not depend on any trainable parameter.
    """
    path = Path(path)
    if not path.exists():
        raise UserModelError(f"no such file: {path}")
    if not path.is_file():
        raise UserModelError(f"not a file: {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sweep shows them again; the errors come first here
        return _load(path)


def _load(path: Path) -> UserCase:
    module = _import(path)
    make_case = getattr(module, "make_case", None)
    if make_case is None:
        raise UserModelError(
            f"{path} does not define make_case() (returning (model, loss_fn, make_batch))"
        )
    if not callable(make_case):
        raise UserModelError(f"{path}: make_case is {_kind(make_case)}, not a function")
    try:
        case = make_case()
    except Exception as error:
        raise UserModelError(f"{path}: make_case() raised {describe(error, path)}") from None
    if not isinstance(case, (tuple, list)) or len(case) != 3:
        raise UserModelError(
            f"{path}: make_case() must return (model, loss_fn, make_batch); "
            f"it returned {_kind(case)}"
        )
    model, loss_fn, make_batch = case
    return case_from(model, loss_fn, make_batch, path=path)


def case_from(
    model: Any,
    loss_fn: Any,
    make_batch: Any,
    *,
    path: Path | None = None,
    name: str | None = None,
) -> UserCase:
    """Check the three (a Module with trainable parameters, two callables), probe one forward
    and loss on a batch of ``PROBE_BATCH_SIZE``, and return the ``UserCase``; the name is the
    file's stem, else ``name``, else the model's class name. ``UserModelError`` on a problem,
    worded for ``make_case()``'s result when ``path`` is given, for arguments otherwise."""
    prefix = f"{path}: " if path is not None else ""

    def label(index: int, what: str) -> str:
        return f"make_case()[{index}], {what}," if path is not None else what

    if not isinstance(model, nn.Module):
        raise UserModelError(
            f"{prefix}{label(0, 'the model')} must be a torch.nn.Module; got {_kind(model)}"
        )
    for index, (what, value) in enumerate((("loss_fn", loss_fn), ("make_batch", make_batch)), 1):
        if not callable(value):
            raise UserModelError(
                f"{prefix}{label(index, what)} must be callable; got {_kind(value)}"
            )
    if not _trainable(model):
        raise UserModelError(f"{prefix}the model has no trainable parameters (requires_grad)")
    if path is not None:
        name = path.stem
    user_case = UserCase(name or type(model).__name__, model, loss_fn, make_batch, path)
    probe(user_case, PROBE_BATCH_SIZE)
    return user_case


def probe(case: UserCase, batch_size: int) -> None:
    """One forward and loss on ``make_batch(batch_size)``; ``UserModelError`` on a problem."""
    from correctness.oracle import call

    path, where = case.path, f"make_batch({batch_size})"
    prefix = f"{path}: " if path is not None else ""
    try:
        batch = case.user_make_batch(batch_size)
    except Exception as error:
        raise UserModelError(f"{prefix}{where} raised {describe(error, path)}") from None
    check_batch(batch, batch_size, f"{prefix}{where}")
    inputs, targets = batch
    try:
        outputs = call(case.model, inputs)
    except Exception as error:
        raise UserModelError(
            f"{prefix}the model's forward failed on {where} (inputs {_shapes(inputs)}): "
            f"{describe(error, path)}"
        ) from None
    try:
        losses = case.loss_fn(outputs, targets)
    except Exception as error:
        raise UserModelError(
            f"{prefix}loss_fn(outputs, targets) failed on {where}: {describe(error, path)}"
        ) from None
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch_size,):
        scalar = isinstance(losses, torch.Tensor) and losses.dim() == 0
        hint = " (a mean or a sum? use reduction='none')" if scalar else ""
        raise UserModelError(
            f"{prefix}loss_fn must return per-example losses, a Tensor of shape [{batch_size}] "
            f"for a batch of {batch_size}; it returned {_kind(losses)}{hint}"
        )
    if not losses.requires_grad:
        raise UserModelError(
            f"{prefix}the loss does not depend on any trainable parameter "
            "(computed under torch.no_grad(), or detached?)"
        )
