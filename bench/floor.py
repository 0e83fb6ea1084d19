"""The floor: what any exact per-layer method must pay, measured on the very model and batch.

For a model, a batch and a quantity (norms or a Gram matrix) the floor is the sum of

- the **activation step**: a forward pass and a backward pass that produces the gradient of the
  output of every call that uses a trainable parameter, and no parameter gradient (autograd is
  asked for those outputs only); for a call that uses its parameters out of sight inside one
  kernel (``nn.MultiheadAttention``'s ``multi_head_attention_forward``, the fused recurrent
  kernels) the gradients of its inputs are asked too, so that the backward runs through it, as
  it must to reach the projections inside;
- the **reductions**: for each parameter group (a layer's weight and bias, a tied parameter's
  uses), the time of its reduction alone on factors captured beforehand, in the fastest exact
  form available for it: each group is reduced in every form the factors offer (factored,
  materialised in tiles, token-match for embeddings), and the fastest is kept. The factors are
  what the backward delivers: activations a layer builds on first use from its input (a
  convolution's patches, ``impls.factors.Unbuilt``) are built inside every timed call of a form
  that needs them, as any method reducing from the captured input must build them.

:func:`floor_step` is one zero-argument callable doing both, which the sweep times interleaved
with the plain step like any implementation (``implementation == "floor"``); its forms are
chosen by :func:`fastest_forms` before. ``python -m bench floor CASE`` prints the breakdown
(``floor_report``), and ``ghost``'s time in the same parts beside it (:func:`ghost_parts`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

FLOOR = "floor"

#: calls that use their parameters inside one kernel: their inputs' gradients are asked too
_OPAQUE = {torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu}


class _ParameterUses(TorchFunctionMode):
    """Record where the output of every call using a trainable parameter is in the graph.

    An opaque call's floating inputs that do not require gradients (the model's data) are
    swapped for copies that do, whose edges are recorded: the backward must run through the
    kernel (the gate gradients of every step, for a recurrent one) even when nothing the model
    feeds it needs a gradient.
    """

    def __init__(self, params):
        super().__init__()
        self.params = {id(p) for p in params}
        self.edges: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opaque = func in _OPAQUE or func is torch.nn.functional.multi_head_attention_forward
        if opaque and torch.is_grad_enabled():
            args, kwargs = self._through(args, kwargs)
        result = func(*args, **kwargs)
        if not torch.is_grad_enabled():
            return result
        tensors = _tensors([*args, *kwargs.values()])
        if not any(id(x) in self.params for x in tensors):
            return result
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for x in outputs:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                self.edges.append(get_gradient_edge(x))
        if opaque:
            for x in tensors:
                if id(x) not in self.params and x.requires_grad:
                    self.edges.append(get_gradient_edge(x))
        return result

    def _through(self, args, kwargs):
        def swap(x):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
                return x.detach().requires_grad_()
            return x

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for a in values:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def activation_step(model, loss_fn, batch) -> Callable[[], None]:
    """A forward and a backward to the outputs of every parameter use, no parameter gradient."""
    from correctness.oracle import call

    inputs, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.enable_grad():
            with _ParameterUses(params) as uses:
                losses = loss_fn(call(model, inputs), targets)
            if uses.edges and losses.requires_grad:
                torch.autograd.grad(losses.sum(), uses.edges, allow_unused=True)

    return step


# -- the reductions -------------------------------------------------------------------------------

#: the exact forms a reduction can take: the cost model's choice, and each choice forced
FORMS = (None, "factored", "materialised")


@contextlib.contextmanager
def forced(form: str | None):
    from impls.factors import COSTS

    previous = COSTS.force
    COSTS.force = form
    try:
        yield
    finally:
        COSTS.force = previous


def captured_groups(model, loss_fn, batch) -> list[dict]:
    """Every parameter group's factors ({name: factors}, as ghost reduces them), captured once."""
    from impls._capture import parameter_factors
    from impls.base import Implementation

    side = Implementation._side(model, batch)
    groups: list[dict] = []
    with torch.enable_grad():
        parameter_factors(side, loss_fn, False, groups.append)
    return groups


def uncached(factors: Any, memo: dict | None = None) -> Any:
    """A copy of factors without what an earlier reduction cached on them (an embedding's
    entries, a bias's gradient sums, a convolution's patches): every timed reduction starts from
    what the backward delivers. Factors shared within a group stay shared (``memo``)."""
    from impls.factors import Factors, Unbuilt

    memo = {} if memo is None else memo
    if not dataclasses.is_dataclass(factors) or isinstance(factors, type):
        return factors
    if id(factors) in memo:
        return memo[id(factors)]
    changes = {}
    for f in dataclasses.fields(factors):
        if not f.init:
            continue
        value = getattr(factors, f.name)
        if f.name.startswith("_"):
            changes[f.name] = f.default
        elif isinstance(value, (Factors, Unbuilt)):
            changes[f.name] = uncached(value, memo)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Factors) for v in value):
            changes[f.name] = type(value)(uncached(v, memo) for v in value)
    memo[id(factors)] = copy = dataclasses.replace(factors, **changes)
    return copy


def reduce_group(group: dict, quantity: str) -> Any:
    """One group's reduction, on a copy of its factors without caches."""
    from impls.factors import groups as reductions

    memo: dict = {}
    group = {name: uncached(factors, memo) for name, factors in group.items()}
    if quantity == "norms":
        return reductions.squared_norms(group)
    return reductions.inner_sum(group, group, True)


@dataclass
class GroupTiming:
    names: tuple[str, ...]
    form: str | None  # the fastest form (None: the cost model's own choice was fastest)
    seconds: float  # its time
    by_form: dict  # form -> seconds, for the forms tried


#: a form the cost model predicts at more than this multiple of its own choice is not tried (a
#: factored Gram matrix of a long sequence or a large vocabulary takes seconds per call)
HOPELESS = 4.0


@contextlib.contextmanager
def recorded_decisions():
    from impls.factors import COSTS

    previous, COSTS.decisions = COSTS.decisions, []
    try:
        yield COSTS.decisions
    finally:
        COSTS.decisions = previous


def hopeless(decisions: list[tuple[float, float]], form: str) -> bool:
    """Whether every decision predicts ``form`` at more than HOPELESS x the other form."""
    if not decisions:
        return False
    if form == "factored":
        return all(f > HOPELESS * m for f, m in decisions)
    return all(m > HOPELESS * f for f, m in decisions)


def _least_time(group: dict, quantity: str, form: str | None, repeats: int) -> float:
    with forced(form):
        reduce_group(group, quantity)  # untimed: thread wake-ups and fresh pages
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            reduce_group(group, quantity)
            times.append(time.perf_counter() - start)
    return min(times)


def fastest_forms(groups: list[dict], quantity: str, repeats: int = 3) -> list[GroupTiming]:
    """Each group's fastest exact form: the least of ``repeats`` timed calls after an untimed one
    (the first calls pay for thread wake-ups and fresh pages, tens of milliseconds on a small
    CPU), for the cost model's choice and each form forced, except a form the cost model
    predicts hopeless (``HOPELESS``)."""
    out = []
    for group in groups:
        with recorded_decisions() as decisions:
            reduce_group(group, quantity)
        by_form = {None: _least_time(group, quantity, None, repeats)}
        for form in FORMS[1:]:
            if not decisions or hopeless(decisions, form):
                continue  # no choice was made, or this one cannot win
            by_form[form] = _least_time(group, quantity, form, repeats)
        form = min(by_form, key=by_form.get)
        out.append(GroupTiming(tuple(group), form, by_form[form], by_form))
    return out


def floor_step(model, loss_fn, batch, quantity: str) -> Callable[[], None]:
    """One callable: the activation step, then every group's reduction in its fastest form on
    factors captured (and forms chosen) now, beforehand."""
    groups = captured_groups(model, loss_fn, batch)
    return floor_of(
        activation_step(model, loss_fn, batch), groups, fastest_forms(groups, quantity), quantity
    )


def floor_of(
    step: Callable[[], None], groups: list[dict], timings: list[GroupTiming], quantity: str
) -> Callable[[], None]:
    """``floor_step`` from its parts: an activation step, the captured groups and their forms."""
    plan = [(group, timing.form) for group, timing in zip(groups, timings, strict=True)]

    def floor() -> None:
        step()
        for group, form in plan:
            with forced(form):
                reduce_group(group, quantity)

    return floor


@dataclass
class GhostParts:
    """Medians (seconds) of ``ghost``'s pieces, timed in the same interleaved rounds as the
    floor, its activation step and a plain forward (each piece a ``blocked_autorange`` per
    round, calls back to back as the sweep times a cell: one call right after another piece
    reads far slower on a small model, its caches cold). Each of ghost's parts is the
    difference of two nested calls (the forward is inside the factors' call, which is inside the
    reductions' call, inside the whole call), so a part near zero can read slightly negative."""

    plain_forward: float  # the model and loss alone, with autograd recording
    floor: float  # the floor (``floor_step``): its activation step and fastest reductions
    activation_step: float  # the floor's forward and backward to the uses' outputs
    captured_forward: float  # ghost's forward under the watch that follows the batch
    backward_and_factors: float  # its backward to the uses' outputs, and the factors built
    reductions: float  # the cost model's forms, on those factors
    outside: float  # checks, the model guard, random state, the total and square root
    total: float  # one whole ``ghost.norms`` / ``ghost.inner`` call


def ghost_parts(
    model,
    loss_fn,
    batch,
    quantity: str,
    rounds: int = 5,
    min_run_time: float = 0.05,
    floor: Callable[[], None] | None = None,
    step: Callable[[], None] | None = None,
) -> GhostParts:
    """Where ``ghost``'s time goes, beside the floor's activation step (see :class:`GhostParts`).
    ``floor`` and ``step``: the floor and its activation step when the caller built them
    already (choosing the floor's forms times every group's reductions again).

    Calls ghost's own pieces (``impls._capture``, ``Ghost._squared_norms`` / ``_inner``) the way
    a whole call does, each with a consumer that does nothing more than the piece named.
    """
    from torch.utils.benchmark import Timer

    import impls
    from correctness.oracle import call
    from impls._capture import captured_forward, parameter_factors

    ghost = impls.get("ghost")
    side = ghost._side(model, batch)
    inputs, targets = batch

    def plain_forward() -> None:
        with torch.enable_grad():
            loss_fn(call(model, inputs), targets).sum()

    def forward() -> None:
        with torch.enable_grad():
            captured_forward(side, loss_fn, False)

    def factors() -> None:
        with torch.enable_grad():
            parameter_factors(side, loss_fn, False, lambda group: None)

    def reduced() -> None:
        with torch.enable_grad():
            if quantity == "norms":
                ghost._squared_norms(side, loss_fn, False)
            else:
                ghost._inner(side, side, loss_fn, False)

    def whole() -> None:
        if quantity == "norms":
            ghost.norms(model, loss_fn, batch)
        else:
            ghost.inner(model, loss_fn, batch)

    pieces = {
        "plain_forward": plain_forward,
        "floor": floor or floor_step(model, loss_fn, batch, quantity),
        "activation_step": step or activation_step(model, loss_fn, batch),
        "forward": forward,
        "factors": factors,
        "reduced": reduced,
        "whole": whole,
    }
    timers = {
        name: Timer(stmt="f()", globals={"f": f}, num_threads=torch.get_num_threads())
        for name, f in pieces.items()
    }
    for f in pieces.values():
        f()  # untimed: thread wake-ups, fresh pages, first-call caches
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    m = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return GhostParts(
        plain_forward=m["plain_forward"],
        floor=m["floor"],
        activation_step=m["activation_step"],
        captured_forward=m["forward"],
        backward_and_factors=m["factors"] - m["forward"],
        reductions=m["reduced"] - m["factors"],
        outside=m["whole"] - m["reduced"],
        total=m["whole"],
    )


def ghost_lines(parts: GhostParts) -> list[str]:
    """``ghost_parts`` in text."""

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:8.3f} ms"

    capture = parts.captured_forward + parts.backward_and_factors
    return [
        f"ghost {parts.total * 1e3:.3f} ms = {parts.total / parts.floor:.3f}x the floor "
        f"({parts.floor * 1e3:.3f} ms, {(parts.total - parts.floor) * 1e3:+.3f} ms); "
        "medians of interleaved rounds:",
        f"  plain forward (model and loss)           {ms(parts.plain_forward)}",
        f"  ghost's captured forward                 {ms(parts.captured_forward)}"
        f"  ({(parts.captured_forward - parts.plain_forward) * 1e3:+.3f} ms over a plain one)",
        f"  ghost's backward to the uses, factors    {ms(parts.backward_and_factors)}",
        f"    forward + backward + factors           {ms(capture)}"
        f"  (floor's activation step {parts.activation_step * 1e3:.3f} ms)",
        f"  ghost's reductions (cost model's forms)  {ms(parts.reductions)}",
        f"  outside the capture (checks, guards)     {ms(parts.outside)}",
    ]


def floor_report(model, loss_fn, batch, quantity: str, rounds: int = 5) -> str:
    """The floor's parts in text: the activation step beside a plain step, each group's forms."""
    from bench.sweep import plain_step

    step, plain = activation_step(model, loss_fn, batch), plain_step(model, loss_fn, batch)
    step(), plain()
    step_times, plain_times = [], []
    for _ in range(rounds):
        for f, times in ((step, step_times), (plain, plain_times)):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
    step_s, plain_s = sorted(step_times)[rounds // 2], sorted(plain_times)[rounds // 2]
    groups = captured_groups(model, loss_fn, batch)
    timings = fastest_forms(groups, quantity)
    reductions = sum(t.seconds for t in timings)
    lines = [
        f"plain step {plain_s * 1e3:.1f} ms; activation step {step_s * 1e3:.1f} ms "
        f"({step_s / plain_s:.3f}x); reductions {reductions * 1e3:.1f} ms "
        f"({reductions / plain_s:.3f}x); floor {(step_s + reductions) / plain_s:.3f}x a plain step",
        f"{'group':48s} {'fastest':>12s} {'ms':>8s}   cost model / factored / materialised (ms)",
    ]
    for t in sorted(timings, key=lambda t: -t.seconds):
        forms = " / ".join(
            "-" if f not in t.by_form else f"{t.by_form[f] * 1e3:.2f}" for f in FORMS
        )
        name = ", ".join(t.names)
        name = name if len(name) <= 48 else name[:45] + "..."
        lines.append(f"{name:48s} {t.form or 'cost model':>12s} {t.seconds * 1e3:8.2f}   {forms}")
    from impls import Unsupported

    try:
        floor = floor_of(step, groups, timings, quantity)
        parts = ghost_parts(model, loss_fn, batch, quantity, rounds, floor=floor, step=step)
    except Unsupported as refusal:
        lines.append(f"ghost: unsupported on this model ({refusal})")
    else:
        lines += ghost_lines(parts)
    return "\n".join(lines)
