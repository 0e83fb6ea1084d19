"""A user's model file for ``python -m bench compare``: loading it and checking it first.

The file defines ``make_case()`` returning ``(model, loss_fn, make_batch)``:

- ``model``: a ``torch.nn.Module`` in the mode (train/eval), dtype and device it is used in;
- ``loss_fn(outputs, targets)``: per-example losses, a Tensor of shape [B] (reduction "none");
- ``make_batch(batch_size)``: ``(inputs, targets)``, inputs a Tensor or a tuple of Tensors with
  the batch dimension first.

``load(path)`` imports the file, calls ``make_case()`` and runs one forward and loss on a batch
of ``PROBE_BATCH_SIZE`` examples, so that a mistake is reported as one line naming it
(``UserModelError``) before any implementation runs. The result, a ``UserCase``, is a bench case
(``name``, ``make_model``, ``make_batch``, ``loss_fn``) that ``bench.sweep`` measures like its own.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: examples in the batch the file is checked with before anything is measured
PROBE_BATCH_SIZE = 2

_counter = itertools.count()


class UserModelError(Exception):
    """A problem with the user's model file, in one line naming it."""


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
    path: Path
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


def describe(error: BaseException, path: Path) -> str:
    """``Type: message (file:line)``, on one line; the line is the deepest one in the user's
    file when the traceback passes through it, else the deepest one."""
    if isinstance(error, SyntaxError) and error.lineno is not None:
        return f"SyntaxError: {error.msg} ({Path(error.filename or path).name}:{error.lineno})"
    frames = traceback.extract_tb(error.__traceback__)
    theirs = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
    frame = (theirs or frames or [None])[-1]
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    message = _first_line(str(error))
    return f"{type(error).__name__}{': ' + message if message else ''}{where}"


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {list(value.shape)}"
    if isinstance(value, (tuple, list)):
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


def _tensors(value: Any) -> list[torch.Tensor] | None:
    """The tensors of a Tensor or a tuple/list of Tensors; None for anything else."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and value:
        if all(isinstance(t, torch.Tensor) for t in value):
            return list(value)
    return None


def check_batch(batch: Any, batch_size: int, where: str) -> None:
    """Raise ``UserModelError`` unless ``batch`` is ``(inputs, targets)`` of ``batch_size``."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UserModelError(f"{where} must return (inputs, targets); it returned {_kind(batch)}")
    inputs, targets = batch
    tensors = _tensors(inputs)
    if tensors is None:
        raise UserModelError(
            f"{where}: inputs must be a Tensor or a tuple of Tensors; got {_kind(inputs)}"
        )
    for tensor in tensors:
        if tensor.dim() == 0 or tensor.shape[0] != batch_size:
            raise UserModelError(
                f"{where}: every input needs the batch dimension first ({batch_size}); "
                f"got shape {list(tensor.shape)}"
            )
    target_tensors = _tensors(targets) or []
    for tensor in target_tensors:
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
    if not isinstance(model, nn.Module):
        raise UserModelError(
            f"{path}: make_case()[0], the model, must be a torch.nn.Module; got {_kind(model)}"
        )
    for index, (name, value) in enumerate((("loss_fn", loss_fn), ("make_batch", make_batch)), 1):
        if not callable(value):
            raise UserModelError(
                f"{path}: make_case()[{index}], {name}, must be callable; got {_kind(value)}"
            )
    if not _trainable(model):
        raise UserModelError(f"{path}: the model has no trainable parameters (requires_grad)")
    user_case = UserCase(path.stem, model, loss_fn, make_batch, path)
    probe(user_case, PROBE_BATCH_SIZE)
    return user_case


def probe(case: UserCase, batch_size: int) -> None:
    """One forward and loss on ``make_batch(batch_size)``; ``UserModelError`` on a problem."""
    path, where = case.path, f"make_batch({batch_size})"
    try:
        batch = case.user_make_batch(batch_size)
    except Exception as error:
        raise UserModelError(f"{path}: {where} raised {describe(error, path)}") from None
    check_batch(batch, batch_size, f"{path}: {where}")
    inputs, targets = batch
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    try:
        outputs = case.model(*inputs)
    except Exception as error:
        shapes = ", ".join(str(list(t.shape)) for t in inputs)
        raise UserModelError(
            f"{path}: the model's forward failed on {where} (inputs {shapes}): "
            f"{describe(error, path)}"
        ) from None
    try:
        losses = case.loss_fn(outputs, targets)
    except Exception as error:
        raise UserModelError(
            f"{path}: loss_fn(outputs, targets) failed on {where}: {describe(error, path)}"
        ) from None
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch_size,):
        scalar = isinstance(losses, torch.Tensor) and losses.dim() == 0
        hint = " (a mean or a sum? use reduction='none')" if scalar else ""
        raise UserModelError(
            f"{path}: loss_fn must return per-example losses, a Tensor of shape [{batch_size}] "
            f"for a batch of {batch_size}; it returned {_kind(losses)}{hint}"
        )
    if not losses.requires_grad:
        raise UserModelError(
            f"{path}: the loss does not depend on any trainable parameter "
            "(computed under torch.no_grad(), or detached?)"
        )
