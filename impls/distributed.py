"""``norms`` and ``inner`` under ``torch.distributed``: DistributedDataParallel and FSDP2.

The contract. With a process group initialised and the model wrapped in
``DistributedDataParallel`` or sharded with ``torch.distributed.fsdp.fully_shard``, every rank
of the model's process group calls the same function with its local shard of the batch:

- ``impl.norms(model, loss_fn, local_batch)`` -> Tensor[B_local]: each local example's gradient
  norm over all trainable parameters, whole (an FSDP parameter's shards included);
- ``impl.inner(model, loss_fn, local_batch, other=None, ...)`` -> Tensor[B_local, B_global]:
  this rank's rows of the Gram matrix of the global batch, the columns of every rank's shard in
  rank order (with ``other``: the columns of every rank's ``other`` shard, in rank order);
- the numbers are those of one process on the concatenated batch with the unwrapped model;
- the caller's model, its gradients and its DDP / FSDP state come back as they were: DDP's
  forward never runs (no reducer is prepared, no gradient all-reduce is left pending), FSDP's
  hooks never run (no parameter is resharded or unsharded);
- if one rank refuses (``Unsupported``) or gets bad input (``ValueError``), every rank raises the
  same exception with the same message, ``"rank R: ..."``; any other failure is a
  ``RuntimeError`` on every rank; every collective waits at most :func:`collective_timeout`
  seconds, after which it raises :class:`CollectiveTimeout` (a hang is a failure).

How, in one place for every implementation (``impls.base.Implementation`` calls it):

1. Each rank checks its own call without communicating (the batch, the options, what the model
   is and how it is sharded) and the ranks exchange one header: the call, the model's parameter
   names and shapes, an exact fingerprint of every replicated tensor (parameters of a DDP
   replica, buffers: every rank must hold the same model), the local batch sizes, and the
   rank's error if it has one. Every rank reads the same headers and raises the same error.
2. The implementation runs on the plain model: a DDP model's ``module``; for FSDP2, the model
   itself with its FSDP classes, hooks and sharded parameters set aside for the call and the
   full parameters in their place, gathered in one all-gather of every shard (its bytes are
   those of FSDP's own forward all-gather). Each rank's examples have their full activations and
   output gradients here, so its norms are whole without any further communication.
3. ``inner``: each rank computes its examples' per-example gradients as factors
   (``Implementation._factor_groups``: ``ghost``'s per-layer factors, or the per-example
   gradients of a materialising implementation) and sends them to the other ranks, each
   parameter as its factors or its per-example gradients, whichever is fewer bytes
   (``impls.factors.wire``); every rank reduces the other ranks' factors against its own with
   the same code as a one-process call (``impls.factors.groups.inner_sum``). A status exchange
   after the local work, and one after the reductions, make every rank raise together.

What one call sent is in :func:`last_traffic` (bytes by kind, and which parameters went as
factors and which as gradients).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from impls._guard import preserved_model
from impls.base import (
    Unsupported,
    _check_same_parameters,
    check_per_example_gradients_defined,
    split_batch,
)
from impls.factors import groups, wire

#: seconds every collective may wait (``PEGBENCH_COLLECTIVE_TIMEOUT_S`` overrides the default)
DEFAULT_TIMEOUT_S = 300.0
_timeout_s = [float(os.environ.get("PEGBENCH_COLLECTIVE_TIMEOUT_S", DEFAULT_TIMEOUT_S))]

#: bytes of factors one rank puts into one all-gather at most (a round); a group larger than
#: this goes alone. Every rank receives world size x this much per round.
ROUND_BYTES = 64 << 20


def collective_timeout() -> float:
    """Seconds each collective of a distributed call may wait before it raises."""
    return _timeout_s[0]


def set_collective_timeout(seconds: float) -> None:
    if not seconds > 0:
        raise ValueError(f"the collective timeout must be positive seconds, got {seconds}")
    _timeout_s[0] = float(seconds)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time: another rank did not reach it."""


# -- what one call sent --------------------------------------------------------------------------


@dataclass
class Traffic:
    """What one distributed call sent from this rank.

    ``bytes_sent``: this rank's bytes on the wire, counted as a ring all-gather sends them:
    (world size - 1) x this rank's share of each all-gather. ``by_kind``: "control" (headers,
    statuses and the factors' descriptions), "parameters" (FSDP2's shards), "factors" and
    "gradients" (per-example data for the cross-rank blocks of ``inner``), "padding" (alignment,
    and the shorter shares padded to the longest). ``sent_as``: parameter name -> "factors" or
    "gradients", for the parameters whose per-example data this rank sent.
    """

    world: int = 1
    collectives: int = 0
    bytes_sent: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    sent_as: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, share: int) -> None:
        sent = (self.world - 1) * share
        self.bytes_sent += sent
        self.by_kind[kind] = self.by_kind.get(kind, 0) + sent

    def summary(self) -> str:
        """One line: total bytes, by kind, and how many parameters went in which form."""
        kinds = ", ".join(f"{k} {_size(v)}" for k, v in sorted(self.by_kind.items()) if v)
        forms = {}
        for form in self.sent_as.values():
            forms[form] = forms.get(form, 0) + 1
        sent = ", ".join(f"{n} as {form}" for form, n in sorted(forms.items()))
        line = f"{_size(self.bytes_sent)} sent in {self.collectives} collectives"
        line += f" ({kinds})" if kinds else ""
        return line + (f"; parameters {sent}" if sent else "")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_last: list[Traffic | None] = [None]


def last_traffic() -> Traffic | None:
    """What the last distributed call of this process sent (None before the first one)."""
    return _last[0]


# -- what a model is -----------------------------------------------------------------------------


def involved(*models: Any) -> bool:
    """Whether a call on these models is a distributed one (DDP or FSDP2 among them)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return any(isinstance(m, nn.Module) and _kind(m) != "plain" for m in models)


def _kind(model: nn.Module) -> str:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "ddp"
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return "fsdp2"
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "fsdp2"  # refused with the reason when the plan finds no FSDP behind it
    return "plain"


@dataclass(eq=False)
class _Shard:
    """One FSDP2 parameter: its sharded DTensor and the (module, name) places that hold it."""

    param: nn.Parameter
    places: list[tuple[nn.Module, str]]
    name: str
    dim: int = 0
    chunk: int = 0  # rows along ``dim`` per rank, the last ranks' shares padded to it


class _Plan:
    """How one model is seen by the implementation: its kind, its process group, its plain
    module (a DDP model's ``module``, an FSDP2 model with its full parameters) and the names."""

    def __init__(self, model: nn.Module):
        self.caller = model
        self.kind = _kind(model)
        self.group = None
        self.shards: list[_Shard] = []
        self.module = model
        if self.kind == "ddp":
            self.module = model.module
            self.group = model.process_group
            if _kind(self.module) != "plain":
                raise Unsupported(
                    "a DistributedDataParallel model holding FSDP2 or DTensor parameters: "
                    "pegbench knows DDP over a plain module, or FSDP2"
                )
        elif self.kind == "fsdp2":
            self.shards = _fsdp_shards(model)
            self.group = _mesh_group(self.shards)
        caller_names = {id(p): n for n, p in model.named_parameters()}
        # the implementation's names (the plain module's) -> the caller's (a DDP model's
        # parameters are named "module.<name>")
        self.names = {n: caller_names.get(id(p), n) for n, p in self.module.named_parameters()}

    def signature(self) -> tuple:
        """(kind, ((name, global shape, dtype, requires_grad), ...)): equal on every rank."""
        sharded = {(id(m), n): s for s in self.shards for m, n in s.places}
        out = []
        for module_name, module in self.module.named_modules():
            for local, p in module._parameters.items():
                if p is None:
                    continue
                shard = sharded.get((id(module), local))
                tensor = shard.param if shard is not None else p
                name = f"{module_name}.{local}" if module_name else local
                out.append((name, tuple(tensor.shape), str(tensor.dtype), tensor.requires_grad))
        return self.kind, tuple(out)

    def fingerprints(self) -> tuple:
        """(name, exact bit sum) of every tensor each rank holds whole: parameters outside
        FSDP's shards, and buffers."""
        sharded = {(id(m), n) for s in self.shards for m, n in s.places}
        out = []
        seen = set()
        for module_name, module in self.module.named_modules():
            for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
                for local, t in tensors.items():
                    if t is None or (id(module), local) in sharded or id(t) in seen:
                        continue
                    seen.add(id(t))
                    name = f"{module_name}.{local}" if module_name else local
                    out.append((f"{kind} '{self.names.get(name, name)}'", _bit_sum(t)))
        return tuple(out)

    @contextlib.contextmanager
    def view(self, channel: Channel) -> Iterator[nn.Module]:
        """The plain model the implementation runs on (FSDP2: the full parameters gathered and
        put in place for the call, FSDP's classes and hooks set aside; all restored after)."""
        if self.kind != "fsdp2":
            yield self.module
            return
        full = _gather_shards(self.shards, channel)
        from torch.distributed.fsdp import FSDPModule

        with preserved_model(self.caller):  # FSDP's hooks and parameters come back
            classes = []
            try:
                for module in self.caller.modules():
                    for hooks in (module._forward_pre_hooks, module._forward_hooks):
                        for key in [k for k, h in hooks.items() if _is_fsdp_hook(h)]:
                            del hooks[key]
                    for key in _COMPOSABLE_KEYS:  # FSDP's state (a copy of the module would
                        module.__dict__.pop(key, None)  # copy its process group)
                    if isinstance(module, FSDPModule):
                        cls = type(module)
                        classes.append((module, cls))
                        module.__class__ = cls.__mro__[cls._orig_cls_mro_index]
                for shard in self.shards:
                    p = nn.Parameter(full.pop(id(shard.param)), shard.param.requires_grad)
                    for module, local in shard.places:
                        module._parameters[local] = p
                yield self.caller
            finally:
                for module, cls in classes:
                    module.__class__ = cls


def _composable_keys() -> tuple[str, ...]:
    """The attributes where torch's composable APIs (fully_shard) keep their state."""
    try:
        from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    except ImportError:
        return ()
    return STATE_KEY, REGISTRY_KEY


_COMPOSABLE_KEYS = _composable_keys() if dist.is_available() else ()


def _bit_sum(t: Tensor) -> int:
    """An exact, order-independent fingerprint of a tensor's bits (equal tensors, equal sums)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    size = t.element_size()
    if size == 8:
        t = t.view(torch.int32)  # halves: no int64 sum of them can overflow
    elif size in (4, 2, 1) and t.is_floating_point():
        t = t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[size])
    return int(t.sum(dtype=torch.int64)) if t.numel() else 0


def _fsdp_shards(model: nn.Module) -> list[_Shard]:
    """Every FSDP2-managed parameter of ``model`` (also while unsharded), with its places."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    names = {}
    for module_name, module in model.named_modules():
        for local in module._parameters:
            names[(id(module), local)] = f"{module_name}.{local}" if module_name else local
    shards: dict[int, _Shard] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        try:
            group = module._get_fsdp_state()._fsdp_param_group
            managed = list(group.fsdp_params) if group is not None else []
            for fsdp_param in managed:
                info = fsdp_param._module_info
                places = [(info.module, info.param_name)]
                places += list(zip(info.shared_modules, info.shared_param_names, strict=True))
                sharded = fsdp_param.sharded_param
                if id(sharded) not in shards:
                    name = names.get((id(info.module), info.param_name), info.param_name)
                    shards[id(sharded)] = _Shard(sharded, places, name)
        except AttributeError as error:
            raise Unsupported(
                f"this torch's FSDP2 keeps its parameters where pegbench does not look ({error})"
            ) from error
    covered = {(id(m), n) for s in shards.values() for m, n in s.places}
    for module in model.modules():
        for local, p in module._parameters.items():
            if isinstance(p, DTensor) and (id(module), local) not in covered:
                raise Unsupported(
                    f"parameter '{names[(id(module), local)]}' is a DTensor that fully_shard does "
                    "not manage: pegbench gathers FSDP2's parameters only"
                )
    for shard in shards.values():
        p = shard.param
        if not isinstance(p, DTensor):
            raise Unsupported(f"FSDP2 parameter '{shard.name}' is not a DTensor")
        mesh, placements = p.device_mesh, p.placements
        if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard:
            raise Unsupported(
                f"FSDP2 parameter '{shard.name}' is placed {placements} on a {mesh.ndim}-D mesh: "
                "pegbench gathers parameters sharded along one dimension of a 1-D mesh (no HSDP "
                "or tensor parallelism)"
            )
        shard.dim = placements[0].dim % max(p.dim(), 1)
    return list(shards.values())


def _mesh_group(shards: list[_Shard]):
    meshes = {id(s.param.device_mesh): s.param.device_mesh for s in shards}
    if not meshes:
        raise Unsupported("an FSDP2 model without sharded parameters")
    groups_ = {tuple(dist.get_process_group_ranks(m.get_group())) for m in meshes.values()}
    if len(groups_) != 1:
        raise Unsupported("FSDP2 parameters sharded over different process groups")
    mesh = next(iter(meshes.values()))
    group = mesh.get_group()
    if mesh.get_local_rank() != dist.get_rank(group):
        raise Unsupported("the FSDP2 mesh's order is not its process group's rank order")
    world = dist.get_world_size(group)
    for shard in shards:
        size = shard.param.shape[shard.dim] if shard.param.dim() else 1
        shard.chunk = -(-size // world)
        expected = max(0, min(shard.chunk, size - dist.get_rank(group) * shard.chunk))
        local = shard.param.to_local()
        got = local.shape[shard.dim] if local.dim() else 1
        if got != expected:
            raise Unsupported(
                f"FSDP2 parameter '{shard.name}' holds {got} of its {size} rows here, not the "
                f"{expected} of torch.chunk: pegbench cannot put its shards back together"
            )
    return group


def _is_fsdp_hook(hook) -> bool:
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError as error:
        raise Unsupported(f"this torch's FSDP2 keeps its hooks elsewhere ({error})") from error

    seen = 0
    while hook is not None and seen < 16:  # a bound method, possibly behind wrappers
        if isinstance(getattr(hook, "__self__", None), FSDPState):
            return True
        hook, seen = getattr(hook, "__wrapped__", None), seen + 1
    return False


def _gather_shards(shards: list[_Shard], channel: Channel) -> dict[int, Tensor]:
    """id(sharded parameter) -> its full tensor, from one all-gather of every shard."""
    pieces = []
    for shard in shards:
        local = shard.param.to_local().detach()
        if local.dim() == 0:
            pieces.append(local)
            continue
        shape = list(local.shape)
        shape[shard.dim] = shard.chunk
        padded = local.new_zeros(shape)
        padded.narrow(shard.dim, 0, local.shape[shard.dim]).copy_(local)
        pieces.append(padded)
    layout, end = wire.layout_of(wire.metas(pieces))
    buffer = torch.zeros(end, dtype=torch.uint8, device=channel.device)
    wire.write(buffer, [p.to(channel.device) for p in pieces], layout)
    useful = sum(t.numel() * t.element_size() for t in pieces)
    buffers = channel.all_gather(buffer, {"parameters": useful, "padding": end - useful})
    full = {}
    for k, shard in enumerate(shards):
        device = shard.param.to_local().device
        parts = [wire.read(b, [layout[k]], device)[0] for b in buffers]
        if parts[0].dim() == 0:
            full[id(shard.param)] = parts[0].clone()
            continue
        whole = torch.cat(parts, dim=shard.dim)
        full[id(shard.param)] = whole.narrow(shard.dim, 0, shard.param.shape[shard.dim]).clone()
    return full


# -- collectives with a timeout ------------------------------------------------------------------


class Channel:
    """All-gathers on one process group, each waiting at most :func:`collective_timeout`."""

    def __init__(self, group, traffic: Traffic):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend
            else torch.device("cpu")
        )
        self.traffic = traffic
        traffic.world = self.world

    def all_gather(self, buffer: Tensor, kinds: dict[str, int] | str) -> list[Tensor]:
        """Every rank's ``buffer`` (equal sizes), in rank order. ``kinds``: what the buffer's
        bytes are, for :class:`Traffic` (a kind, or bytes per kind)."""
        out = [torch.empty_like(buffer) for _ in range(self.world)]
        work = dist.all_gather(out, buffer, group=self.group, async_op=True)
        seconds = collective_timeout()
        try:
            done = work.wait(timeout=datetime.timedelta(seconds=seconds))
        except RuntimeError as error:
            raise CollectiveTimeout(
                f"pegbench: rank {self.rank}'s collective did not complete within {seconds:g} s "
                f"({str(error).strip().splitlines()[0] if str(error).strip() else 'timed out'}): "
                "another rank did not make the same call, or failed outside it"
            ) from error
        if done is False:
            raise CollectiveTimeout(
                f"pegbench: rank {self.rank}'s collective did not complete within {seconds:g} s"
            )
        self.traffic.collectives += 1
        share = buffer.numel() * buffer.element_size()
        if isinstance(kinds, str):
            self.traffic.add(kinds, share)
        else:
            for kind, nbytes in kinds.items():
                self.traffic.add(kind, nbytes)
        return out

    def objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (two all-gathers)."""
        data = pickle.dumps(obj)
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [int(s.item()) for s in self.all_gather(size, "control")]
        buffer = torch.zeros(max(sizes), dtype=torch.uint8)
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = self.all_gather(buffer.to(self.device), "control")
        pairs = zip(gathered, sizes, strict=True)
        return [pickle.loads(g[:n].cpu().numpy().tobytes()) for g, n in pairs]


# -- every rank raises together -------------------------------------------------------------------

_TYPES = {"Unsupported": Unsupported, "ValueError": ValueError}


def _failure(error: BaseException) -> tuple[str, str]:
    """(type name, one-line message) of a local failure, as the other ranks will see it."""
    text = str(error).strip()
    message = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, Unsupported):
        return "Unsupported", message
    if isinstance(error, ValueError):
        return "ValueError", message
    if isinstance(error, CollectiveTimeout):
        raise error  # the ranks are no longer in step: nothing more to exchange
    return "RuntimeError", f"{type(error).__name__}: {message}"


def _raise(failure: tuple[str, str], cause: BaseException | None = None) -> None:
    kind, message = failure
    raise _TYPES.get(kind, RuntimeError)(message) from cause


def _first_failure(statuses: list) -> tuple[str, str] | None:
    for rank, status in enumerate(statuses):
        if status is not None:
            kind, message = status
            return kind, f"rank {rank}: {message}"
    return None


def _agree(channel: Channel, failure: tuple[str, str] | None, cause, extra: Any = None) -> list:
    """Exchange each rank's failure (and ``extra``); raise the first on every rank, or return
    every rank's ``extra``."""
    gathered = channel.objects((failure, extra))
    first = _first_failure([f for f, _ in gathered])
    if first is not None:
        _raise(first, cause if failure is not None else None)
    return [e for _, e in gathered]


# -- the calls -----------------------------------------------------------------------------------


@dataclass
class _Setup:
    """What each rank checks and declares before the first collective."""

    plans: list[_Plan]
    group: Any
    header: dict
    cause: BaseException | None = None


def _prepare(call: tuple, models: list, batches: list, checks) -> _Setup:
    """The plans and the header; a local failure goes into the header (never raised here)."""
    plans: list[_Plan] = []
    header: dict = {"call": call, "error": None}
    group, cause = None, None
    try:
        for model in models:
            if not isinstance(model, nn.Module):
                raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        unique = {id(m): m for m in models}
        plans = [_Plan(m) for m in unique.values()]
        groups_ = [p.group for p in plans if p.group is not None]
        group = groups_[0]
        if any(
            dist.get_process_group_ranks(g) != dist.get_process_group_ranks(group)
            for g in groups_[1:]
        ):
            raise Unsupported("model and other_model are spread over different process groups")
        header["ranks"] = tuple(dist.get_process_group_ranks(group))
        header["sizes"] = tuple(split_batch(b)[3] for b in batches)
        for plan in plans:
            check_per_example_gradients_defined(plan.module)
        checks(plans)
        header["models"] = tuple(p.signature() for p in plans)
        header["fingerprints"] = tuple(p.fingerprints() for p in plans)
    except CollectiveTimeout:
        raise
    except Exception as error:  # noqa: BLE001 - every rank must hear of it
        header["error"] = _failure(error)
        cause = error
    if group is None:
        group = dist.group.WORLD
    return _Setup(plans, group, header, cause)


def _disagreement(headers: list[dict]) -> tuple[str, str] | None:
    """The same error on every rank, from the headers every rank holds."""
    first = _first_failure([h["error"] for h in headers])
    if first is not None:
        return first
    base = headers[0]
    for rank, h in enumerate(headers[1:], start=1):
        if h["call"] != base["call"]:
            return "ValueError", (
                f"the ranks made different calls: rank 0 {_describe(base['call'])}, rank {rank} "
                f"{_describe(h['call'])}"
            )
        if h["ranks"] != base["ranks"]:
            return "ValueError", "the ranks' models are spread over different process groups"
        for k, (mine, theirs) in enumerate(zip(base["models"], h["models"], strict=True)):
            if mine != theirs:
                what = "other_model" if k else "the model"
                return "ValueError", (
                    f"{what} differs between rank 0 and rank {rank} "
                    f"({_first_difference(mine, theirs)}): every rank must hold the same model"
                )
        for k, (mine, theirs) in enumerate(
            zip(base["fingerprints"], h["fingerprints"], strict=True)
        ):
            for (name, value), (_, other) in zip(mine, theirs, strict=True):
                if value != other:
                    what = " of other_model" if k else ""
                    return "ValueError", (
                        f"{name}{what} differs between rank 0 and rank {rank}: every rank must "
                        "hold the same model (replicas out of sync?)"
                    )
    return None


def _describe(call: tuple) -> str:
    op, name, *options = call
    return f"'{name}'.{op}{tuple(options)}"


def _first_difference(mine: tuple, theirs: tuple) -> str:
    if mine[0] != theirs[0]:
        return f"{mine[0]} vs {theirs[0]}"
    for a, b in zip(mine[1], theirs[1], strict=False):
        if a != b:
            return f"parameter {a[0]} {a[1:]} vs {b[0]} {b[1:]}"
    return f"{len(mine[1])} vs {len(theirs[1])} parameters"


def _start(call: tuple, models: list, batches: list, checks) -> tuple[_Setup, Channel, list]:
    traffic = Traffic()
    _last[0] = traffic
    setup = _prepare(call, models, batches, checks)
    channel = Channel(setup.group, traffic)
    headers = channel.objects(setup.header)
    failure = _disagreement(headers)
    if failure is not None:
        _raise(failure, setup.cause)
    return setup, channel, headers


def norms(impl, model, loss_fn, batch, *, per_param: bool, create_graph: bool):
    """``impl.norms`` under DDP or FSDP2 (see the module's contract)."""
    call = ("norms", impl.name, per_param, create_graph)

    def checks(plans):
        impl._check_create_graph(create_graph)
        if create_graph and plans[0].kind == "fsdp2":
            raise Unsupported(
                "create_graph=True under FSDP2: the norms would be differentiable w.r.t. a "
                "gathered copy of the parameters, not the caller's shards"
            )

    setup, channel, _ = _start(call, [model], [batch], checks)
    plan = setup.plans[0]
    result, failure, cause = None, None, None
    try:
        with plan.view(channel) as module:
            result = impl._local_norms(module, loss_fn, batch, per_param, create_graph)
        if per_param:
            result = {plan.names.get(n, n): v for n, v in result.items()}
    except CollectiveTimeout:
        raise
    except Exception as error:  # noqa: BLE001 - every rank must hear of it
        failure, cause = _failure(error), error
    _agree(channel, failure, cause)
    return result


def inner(impl, model, loss_fn, batch, other, *, other_model, create_graph: bool) -> Tensor:
    """``impl.inner`` under DDP or FSDP2 (see the module's contract)."""
    call = ("inner", impl.name, other is None, other_model is None, create_graph)
    right_model = model if other_model is None else other_model
    right_batch = batch if other is None else other
    same = other is None and other_model is None

    def checks(plans):
        impl._check_create_graph(create_graph)
        if create_graph:
            raise Unsupported(
                "create_graph=True across ranks: the other ranks' per-example gradients arrive "
                "without a graph"
            )

    setup, channel, headers = _start(call, [model, right_model], [batch, right_batch], checks)
    by_model = {id(p.caller): p for p in setup.plans}
    left_plan, right_plan = by_model[id(model)], by_model[id(right_model)]
    columns = [h["sizes"][1] for h in headers]
    rank = channel.rank

    failure, cause, blocks, left, described, packed = None, None, [], {}, [], []
    try:
        with contextlib.ExitStack() as stack:
            left_module = stack.enter_context(left_plan.view(channel))
            right_module = (
                left_module if right_plan is left_plan
                else stack.enter_context(right_plan.view(channel))
            )  # fmt: skip
            left_side = impl._side(left_module, batch)
            right_side = left_side if same else impl._side(right_module, right_batch)
            _check_same_parameters(left_side, right_side)
            dtype, device = left_side.dtype, left_side.device
            left_groups = _factor_groups(impl, left_side, loss_fn)
            right_groups = left_groups if same else _factor_groups(impl, right_side, loss_fn)
        for group in left_groups:
            left.update(group)
        blocks = [torch.zeros(left_side.batch_size, b, dtype=dtype, device=device) for b in columns]
        blocks[rank] = _reduce(left, right_groups, same, blocks[rank])
        if channel.world > 1:
            packed = [wire.pack(group) for group in right_groups]
            described = [(p.spec, wire.metas(p.tensors)) for p in packed]
            for p in packed:
                channel.traffic.sent_as.update(
                    {left_plan.names.get(n, n): form for n, form in p.sent_as.items()}
                )
    except CollectiveTimeout:
        raise
    except Exception as error:  # noqa: BLE001 - every rank must hear of it
        failure, cause = _failure(error), error
    everyone = _agree(channel, failure, cause, described)
    if channel.world == 1:
        return blocks[0]
    failure = None
    for round_ in _rounds(everyone):
        received = _exchange(channel, round_, everyone, packed)
        if failure is not None:
            continue  # keep in step with the other ranks; the failure is exchanged below
        try:
            for sender, spec, tensors in received:
                if sender != rank:
                    right = wire.unpack(spec, [t.to(device) for t in tensors])
                    blocks[sender] = _reduce(left, [right], False, blocks[sender])
        except Exception as error:  # noqa: BLE001 - every rank must hear of it
            failure, cause = _failure(error), error
    _agree(channel, failure, cause)
    return torch.cat(blocks, dim=1)


def payload(impl, model: nn.Module, loss_fn, batch) -> dict[str, tuple[str, int]]:
    """What a rank holding ``batch`` sends the other ranks in a distributed ``inner``: parameter
    name -> ("factors" or "gradients", bytes), computed in this process (no group needed). Each
    other rank receives all of it: (ranks - 1) times the total leaves each rank."""
    side = impl._side(model, batch)
    out = {}
    for group in _factor_groups(impl, side, loss_fn):
        packed = wire.pack(group)
        out.update({n: (form, packed.sizes[n]) for n, form in packed.sent_as.items()})
    return out


def _factor_groups(impl, side, loss_fn) -> list[dict]:
    if side.batch_size == 0 or not side.params:
        return []
    from impls.base import _untouched

    with _untouched(side.model):
        return impl._factor_groups(side, loss_fn)


def _reduce(left: dict, right_groups: list[dict], same: bool, total: Tensor) -> Tensor:
    """``total`` plus Σ over the right groups of ⟨left, right⟩ (``same``: the Gram of left)."""
    for group in right_groups:
        value = groups.inner_sum(group if same else left, group, same)
        if value is not None:
            total = total + value
    return total


def _rounds(everyone: list[list]) -> list[list[tuple[int, int]]]:
    """The all-gather rounds: per round, the (rank, group index) pairs it carries. Every rank
    computes the same rounds from the descriptions all of them hold."""
    plans = []
    for rank, described in enumerate(everyone):
        rounds, current, size = [], [], 0
        for k, (_, metas) in enumerate(described):
            _, end = wire.layout_of(metas)
            if current and size + end > ROUND_BYTES:
                rounds.append(current)
                current, size = [], 0
            current.append((rank, k))
            size = wire.aligned(size + end)
        if current:
            rounds.append(current)
        plans.append(rounds)
    count = max((len(r) for r in plans), default=0)
    return (
        [[pair for rounds in plans if j < len(rounds) for pair in rounds[j]] for j in range(count)]
        if count
        else []
    )


def _exchange(channel: Channel, round_: list, everyone: list, packed: list) -> list:
    """One all-gather of the round's groups: [(sender, spec, tensors)] of every rank's."""
    places: dict[int, list] = {}  # rank -> [(group index, layout)]
    ends: dict[int, int] = {}
    for rank, k in round_:
        spec, metas = everyone[rank][k]
        layout, end = wire.layout_of(metas, wire.aligned(ends.get(rank, 0)))
        places.setdefault(rank, []).append((k, spec, layout))
        ends[rank] = end
    length = max(ends.values(), default=0)
    buffer = torch.zeros(length, dtype=torch.uint8, device=channel.device)
    kinds = {"factors": 0, "gradients": 0}
    for k, _, layout in places.get(channel.rank, []):
        wire.write(buffer, [t.to(channel.device) for t in packed[k].tensors], layout)
        for name, form in packed[k].sent_as.items():
            kinds[form] += packed[k].sizes[name]
    kinds["padding"] = length - kinds["factors"] - kinds["gradients"]
    buffers = channel.all_gather(buffer, kinds)
    out = []
    for rank, entries in places.items():
        for _, spec, layout in entries:
            out.append((rank, spec, wire.read(buffers[rank], layout)))
    return out
