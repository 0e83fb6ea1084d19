"""The interface every implementation honours, and the checks they all share.

An implementation answers two questions about per-example gradients g_i = ∇θ ℓ_i over the
trainable parameters θ (those with ``requires_grad=True``):

- ``norms``: ‖g_i‖ for every example (or per parameter with ``per_param=True``);
- ``inner``: ⟨g_i(θ), g'_j(θ')⟩ between the examples of two batches, possibly at two models.

Subclasses implement ``_squared_norms`` and ``_inner`` on validated, non-empty input; this class
does the validation, the empty-batch answers, the BatchNorm refusal and the guarantees that the
caller's model and random state are untouched.

Low precision (``impls._precision``): bfloat16 / float16 parameters run as given; a call made
inside ``torch.autocast(...)`` runs the caller's forward (model and ``loss_fn``, through
:meth:`Side.forward_precision`) under that autocast and everything else outside it. Results are
in :attr:`Side.result_dtype` (float32 for parameters below float32, else their dtype).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from impls._guard import preserved_model
from impls._precision import Autocast, accumulation_dtype, ambient_autocast, without_autocast

if TYPE_CHECKING:
    from impls.factors import Factors

LossFn = Callable[[Any, Any], Tensor]


class Unsupported(NotImplementedError):
    """The implementation cannot give the exact answer; the message says why, in one line."""


@dataclass
class Side:
    """One side of a question: a model, its trainable parameters and a validated batch.

    The model is called as ``model(*args, **kwargs)``: ``args`` from a Tensor or a tuple of
    inputs, ``kwargs`` from a mapping (the Hugging Face habit, ``model(**batch)``). ``autocast``:
    the autocast region the caller called the implementation in (None: none), under which the
    forward runs (:meth:`forward_precision`).
    """

    model: nn.Module
    params: OrderedDict[str, nn.Parameter]
    args: tuple
    kwargs: dict
    targets: Any
    batch_size: int
    autocast: Autocast | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype if self.params else torch.get_default_dtype()

    @property
    def result_dtype(self) -> torch.dtype:
        """The dtype of the results and of every reduction: the parameters' dtype, at least
        float32 (bfloat16 and float16 parameters give float32 results)."""
        return accumulation_dtype(p.dtype for p in self.params.values())

    @property
    def low_precision(self) -> str | None:
        """What runs below float32 ("torch.bfloat16 parameters", "autocast(cpu, bfloat16)"), or
        None."""
        low = sorted({str(p.dtype) for p in self.params.values() if p.is_floating_point()
                      and p.dtype.itemsize < 4})  # fmt: skip
        if low:
            return f"{', '.join(low)} parameters"
        return None if self.autocast is None else str(self.autocast)

    def forward_precision(self):
        """The context the caller's forward (the model and ``loss_fn``) runs in: the caller's
        autocast, or nothing. Implementations enter it around those calls only."""
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        if self.params:
            return next(iter(self.params.values())).device
        return self.batched_tensors()[0].device

    @property
    def inputs(self) -> tuple:
        """The positional inputs (a mapping's values when the model takes keywords)."""
        return self.args if self.args else tuple(self.kwargs.values())

    def call_model(self, args: tuple | None = None, kwargs: dict | None = None) -> Any:
        return self.model(*(self.args if args is None else args),
                          **(self.kwargs if kwargs is None else kwargs))  # fmt: skip

    def batched_tensors(self) -> list[Tensor]:
        """Every tensor of the batch whose first dimension is the examples' (inputs, targets)."""
        out = [x for x in (*self.args, *self.kwargs.values()) if isinstance(x, Tensor)]
        return out + [t for t in _target_tensors(self.targets)]


def trainable_parameters(model: nn.Module) -> OrderedDict[str, nn.Parameter]:
    """Parameters with requires_grad, by their first name (a tied parameter appears once)."""
    return OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)


def _target_tensors(targets: Any) -> list[Tensor]:
    if isinstance(targets, Tensor):
        return [targets]
    if isinstance(targets, Mapping):
        return [t for t in targets.values() if isinstance(t, Tensor)]
    if isinstance(targets, (tuple, list)):
        return [t for t in targets if isinstance(t, Tensor)]
    return []


def split_batch(batch: Any) -> tuple[tuple, dict, Any, int]:
    """Validate ``(inputs, targets)``: (positional inputs, keyword inputs, targets, batch size).

    inputs: a Tensor, a tuple of inputs, or a mapping of names to inputs (``model(**inputs)``);
    targets: a Tensor, a tuple or a mapping. Every Tensor among them has the batch dimension
    first; other values pass through unchanged.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("batch must be a pair (inputs, targets)")
    inputs, targets = batch
    if isinstance(inputs, Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, Mapping):
        if not all(isinstance(k, str) for k in inputs):
            raise ValueError("a mapping of inputs must have string keys (model(**inputs))")
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        raise ValueError(
            "inputs must be a Tensor, a tuple of Tensors or a mapping of names to Tensors, "
            f"not {type(inputs).__name__}"
        )
    named = [(f"inputs[{k}]", x) for k, x in enumerate(args)]
    named += [(f"inputs['{k}']", x) for k, x in kwargs.items()]
    tensors = [(where, x) for where, x in named if isinstance(x, Tensor)]
    if not tensors:
        raise ValueError("inputs must contain at least one Tensor (with the batch dimension first)")
    for where, x in tensors:
        if x.dim() == 0:
            raise ValueError(f"every input must be a Tensor with a batch dimension first ({where} "
                             "is a scalar)")  # fmt: skip
    size = tensors[0][1].shape[0]
    sizes = {where: x.shape[0] for where, x in tensors}
    if any(s != size for s in sizes.values()):
        raise ValueError(f"inputs have different batch sizes {list(sizes.values())}")
    for t in _target_tensors(targets):
        if t.dim() == 0 or t.shape[0] != size:
            got = "a scalar" if t.dim() == 0 else f"batch size {t.shape[0]}"
            raise ValueError(f"targets have {got} but inputs have batch size {size}")
    return args, kwargs, targets, int(size)


def check_per_example_gradients_defined(model: nn.Module) -> None:
    """Refuse models whose forward mixes the examples of a batch (BatchNorm in train mode)."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        kind, where = type(module).__name__, name or type(model).__name__
        if module.training:
            raise Unsupported(
                f"{kind} '{where}' in train mode mixes the examples of "
                "a batch: per-example gradients are undefined (use eval mode)"
            )
        if not module.track_running_stats or module.running_mean is None:
            raise Unsupported(
                f"{kind} '{where}' without running statistics normalises with batch statistics "
                "even in eval mode: per-example gradients are undefined"
            )


def differentiate(outputs, inputs, **options):
    """``torch.autograd.grad``, with what autograd cannot do for a model (reentrant activation
    checkpointing refuses ``.grad()``) refused with the reason."""
    try:
        return torch.autograd.grad(outputs, inputs, **options)
    except RuntimeError as error:
        if "checkpoint" not in str(error):
            raise
        first = str(error).strip().splitlines()[0]
        raise Unsupported(f"autograd cannot differentiate this model: {first}") from error


def per_example_losses(loss_fn: LossFn, outputs: Any, targets: Any, batch_size: int) -> Tensor:
    """Call loss_fn and insist on a Tensor of shape [batch_size]."""
    losses = loss_fn(outputs, targets)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (batch_size,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-example losses of shape [{batch_size}], got {got} "
            "(use reduction='none')"
        )
    return losses


def _rows(value: Any, start: int, stop: int) -> Any:
    return value[start:stop] if isinstance(value, Tensor) else value


def example_slice(side: Side, start: int, stop: int) -> tuple[tuple, dict, Any]:
    """(args, kwargs, targets) of examples start..stop-1, batch dimension kept."""
    args = tuple(_rows(x, start, stop) for x in side.args)
    kwargs = {k: _rows(x, start, stop) for k, x in side.kwargs.items()}
    targets = side.targets
    if isinstance(targets, Tensor):
        targets = targets[start:stop]
    elif isinstance(targets, Mapping):
        targets = type(targets)({k: _rows(t, start, stop) for k, t in targets.items()})
    elif isinstance(targets, (tuple, list)):
        targets = type(targets)(_rows(t, start, stop) for t in targets)
    return args, kwargs, targets


@contextlib.contextmanager
def _untouched(*models: nn.Module, create_graph: bool = False):
    """The models come back exactly as given, and so does the global random state.

    Gradients are enabled inside (a caller under ``torch.no_grad()`` still gets an answer); with
    ``create_graph`` attention runs on the math kernel, the fused ones have no double backward.
    The caller's autocast is off inside: implementations enter it again around the forward only
    (:meth:`Side.forward_precision`).
    """
    with contextlib.ExitStack() as stack:
        parameters: list[Tensor] = []
        seen = set()
        for model in models:
            if id(model) not in seen:
                seen.add(id(model))
                parameters += stack.enter_context(preserved_model(model))
        device_types, cuda_devices = _devices(parameters)
        stack.enter_context(torch.enable_grad())
        for device_type in device_types:
            stack.enter_context(without_autocast(device_type))
        if create_graph:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        stack.enter_context(_random_state_kept(cuda_devices))
        yield


@contextlib.contextmanager
def _random_state_kept(cuda_devices: list[int]):
    """``torch.random.fork_rng``: the CPU generator's state (and these CUDA devices') put back on
    exit. Without CUDA devices, the CPU state alone, without fork_rng's lookup of the current
    accelerator and its device module (fork_rng took 16 us of a ghost call on a small MLP)."""
    if cuda_devices:
        with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
            yield
        return
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _devices(parameters: list[Tensor]) -> tuple[list[str], list[int]]:
    """(the device types, the CUDA device indices) of the parameters; ``is_cpu`` first: a
    ``.device`` builds a torch.device per parameter (30 us a call on a 3-layer MLP)."""
    types, cuda = set(), set()
    for p in parameters:
        if p.is_cpu:
            types.add("cpu")
            continue
        device = p.device
        types.add(device.type)
        if device.type == "cuda":
            cuda.add(device.index or 0)
    return sorted(types), sorted(cuda)


class Implementation:
    """Base class: validation and guarantees around ``_squared_norms`` and ``_inner``."""

    #: registry name, set by subclasses
    name: str = "?"
    #: whether ``create_graph=True`` is supported (double backward through the result)
    differentiable: bool = False

    # -- the interface -------------------------------------------------------------------------

    def norms(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        per_param: bool = False,
        create_graph: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """L2 norm of each example's gradient: Tensor[B], or a dict name -> Tensor[B].

        Under ``torch.distributed`` (the model wrapped in DistributedDataParallel or sharded
        with FSDP2's ``fully_shard``) every rank calls this with its local shard of the batch
        and gets its local examples' norms over all trainable parameters, whole
        (``impls.distributed``).

        In :attr:`Side.result_dtype`: the parameters' dtype, at least float32. Called inside
        ``torch.autocast``, the forward (model and loss_fn) runs under that autocast.
        """
        from impls import distributed

        if distributed.involved(model):
            return distributed.norms(
                self, model, loss_fn, batch, per_param=per_param, create_graph=create_graph
            )
        return self._local_norms(model, loss_fn, batch, per_param, create_graph)

    def inner(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        other: Any = None,
        *,
        other_model: nn.Module | None = None,
        create_graph: bool = False,
    ) -> Tensor:
        """Inner products of per-example gradients: Tensor[B, B'].

        Entry (i, j) is ⟨∇θ ℓ_i (batch, model), ∇θ' ℓ'_j (other, other_model)⟩. ``other=None``
        means the batch itself (the Gram matrix), ``other_model=None`` the same model.

        Under ``torch.distributed`` (DDP or FSDP2, every rank with its local shard): Tensor
        [B_local, B'_global], this rank's rows, the columns of every rank's shard (of
        ``other``, or of ``batch``) in rank order (``impls.distributed``).

        In :attr:`Side.result_dtype` (the parameters' dtype, at least float32); called inside
        ``torch.autocast``, both forwards run under that autocast.
        """
        from impls import distributed

        if distributed.involved(model, other_model):
            return distributed.inner(
                self, model, loss_fn, batch, other,
                other_model=other_model, create_graph=create_graph,
            )  # fmt: skip
        return self._local_inner(model, loss_fn, batch, other, other_model, create_graph)

    # -- one process -----------------------------------------------------------------------------

    def _local_norms(
        self, model: nn.Module, loss_fn: LossFn, batch: Any, per_param: bool, create_graph: bool
    ) -> Tensor | dict[str, Tensor]:
        side = self._side(model, batch)
        self._check_create_graph(create_graph)
        dtype = side.result_dtype
        if side.batch_size == 0:
            empty = torch.zeros(0, dtype=dtype, device=side.device)
            return {n: empty.clone() for n in side.params} if per_param else empty
        check_per_example_gradients_defined(model)
        if not side.params:
            zeros = torch.zeros(side.batch_size, dtype=dtype, device=side.device)
            return {} if per_param else zeros
        with _untouched(model, create_graph=create_graph):
            squared = self._squared_norms(side, loss_fn, create_graph)
            squared = {n: squared[n].to(dtype) for n in side.params}
        _refuse_overflow("norms", [side], *squared.values())
        if per_param:
            return {n: _safe_sqrt(squared[n]) for n in side.params}
        return _safe_sqrt(_total(list(squared.values())))

    def _local_inner(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        other: Any,
        other_model: nn.Module | None,
        create_graph: bool,
    ) -> Tensor:
        side = self._side(model, batch)
        other_side = (
            side
            if other is None and other_model is None
            else self._side(
                model if other_model is None else other_model, batch if other is None else other
            )
        )
        _check_same_parameters(side, other_side)
        self._check_create_graph(create_graph)
        b1, b2 = side.batch_size, other_side.batch_size
        dtype = accumulation_dtype([side.result_dtype, other_side.result_dtype])
        if b1 == 0 or b2 == 0:
            return torch.zeros(b1, b2, dtype=dtype, device=side.device)
        check_per_example_gradients_defined(side.model)
        check_per_example_gradients_defined(other_side.model)
        if not side.params:
            return torch.zeros(b1, b2, dtype=dtype, device=side.device)
        with _untouched(side.model, other_side.model, create_graph=create_graph):
            value = self._inner(side, other_side, loss_fn, create_graph).to(dtype)
        _refuse_overflow("inner products", [side, other_side], value)
        return value

    # -- for subclasses ------------------------------------------------------------------------

    def _squared_norms(self, side: Side, loss_fn: LossFn, create_graph: bool) -> dict[str, Tensor]:
        """Squared per-example norms per parameter name: dict name -> Tensor[B]."""
        raise NotImplementedError

    def _inner(self, side: Side, other: Side, loss_fn: LossFn, create_graph: bool) -> Tensor:
        """Tensor[B, B'] of inner products; ``other is side`` for the Gram matrix."""
        raise NotImplementedError

    def _factor_groups(self, side: Side, loss_fn: LossFn) -> list[dict[str, Factors]]:
        """Every trainable parameter's per-example gradients as factors (``impls.factors``), in
        groups (a layer's weight and bias together), for the cross-rank blocks of a distributed
        ``inner``: the factors travel to the other ranks, which reduce them against their own.
        A parameter absent from every group has zero gradients."""
        raise Unsupported(
            f"'{self.name}' gives no per-example gradients or factors to send to other ranks: "
            "it has no distributed inner products"
        )

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _side(model: nn.Module, batch: Any) -> Side:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        args, kwargs, targets, size = split_batch(batch)
        params = trainable_parameters(model)
        side = Side(model, params, args, kwargs, targets, size)
        side.autocast = ambient_autocast(side.device.type)
        return side

    def _check_create_graph(self, create_graph: bool) -> None:
        if create_graph and not self.differentiable:
            raise Unsupported(f"'{self.name}' cannot differentiate its results (create_graph=True)")

    def __repr__(self) -> str:
        return f"<pegbench implementation '{self.name}'>"


class MaterialisingImplementation(Implementation):
    """An implementation that builds every example's gradient, then reduces it.

    Subclasses implement ``_grad_samples``: dict name -> Tensor[B, *param.shape].
    Per-example gradients may be in a dtype below float32 (bfloat16 parameters); their norms and
    products are formed in :attr:`Side.result_dtype`.
    """

    def _grad_samples(self, side: Side, loss_fn: LossFn, create_graph: bool) -> dict[str, Tensor]:
        raise NotImplementedError

    def _squared_norms(self, side, loss_fn, create_graph):
        samples = self._grad_samples(side, loss_fn, create_graph)
        dtype = side.result_dtype
        if create_graph:  # differentiable everywhere, also where a gradient is zero
            return {n: g.flatten(1).to(dtype).pow(2).sum(1) for n, g in samples.items()}
        # vector_norm reduces without a [B, P] temporary (5x faster on large layers)
        return {
            n: torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=dtype).square()
            for n, g in samples.items()
        }

    def _factor_groups(self, side, loss_fn):
        from impls.factors import Dense

        samples = self._grad_samples(side, loss_fn, False)
        return [{n: Dense(g)} for n, g in samples.items()]

    def _inner(self, side, other, loss_fn, create_graph):
        left = self._grad_samples(side, loss_fn, create_graph)
        right = left if other is side else self._grad_samples(other, loss_fn, create_graph)
        dtype = accumulation_dtype([side.result_dtype, other.result_dtype])
        return sum(
            left[n].flatten(1).to(dtype) @ right[n].flatten(1).to(dtype).T for n in side.params
        )


def _check_same_parameters(side: Side, other: Side) -> None:
    if side is other:
        return
    left = {n: tuple(p.shape) for n, p in side.params.items()}
    right = {n: tuple(p.shape) for n, p in other.params.items()}
    if left != right:
        missing = sorted(set(left) ^ set(right))
        differ = sorted(n for n in set(left) & set(right) if left[n] != right[n])
        detail = f"names differ: {missing[:3]}" if missing else f"shapes differ: {differ[:3]}"
        raise ValueError(f"other_model's trainable parameters do not match the model's ({detail})")


def _refuse_overflow(what: str, sides: Sequence[Side], *values: Tensor) -> None:
    """A result that is not finite where a model of ``sides`` runs below float32 (float16's
    range is 65504) cannot be computed in that precision: refused, not returned. One check for
    all the sides (the first low precision among them names the cause)."""
    low = next((p for p in (s.low_precision for s in sides) if p is not None), None)
    if low is None or not values:
        return
    flat = torch.cat([v.detach().reshape(-1) for v in values])  # one check, one sync
    if not bool(torch.isfinite(flat).all()):
        raise Unsupported(
            f"the {what} are not finite: the per-example gradients overflow with {low} (scale "
            "the loss down, or use bfloat16 or float32)"
        )


def _total(parts: list[Tensor]) -> Tensor:
    """Σ of equally shaped tensors in two kernel calls (a Python ``sum`` is one per part: a
    transformer's forty parameters made forty)."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _safe_sqrt(squared: Tensor) -> Tensor:
    # clamp: rounding can make a zero squared norm slightly negative in factored forms
    return squared.clamp_min(0).sqrt()
