"""The sweep: implementation x case x dtype x batch size x quantity x device, one row per cell.

For every cell the implementation's call and a plain forward+backward of the same model and
batch are timed interleaved in this process (``bench.timing``), the peak memory of one call of
each is read (``bench.memory``), and the row is saved at once (``bench.store``). A cell that is
unsupported, runs out of memory, runs past its budget or fails becomes a row saying so, and the
sweep goes on; a cell that would obviously blow its budget (extrapolated from the same
implementation at a smaller batch) is skipped with the reason.

"Correct" is decided per (device, case, implementation, quantity) by the float64 oracle of
``correctness.oracle``: the implementation's answer on a small batch (``check_batch_size``
examples) of the very bench model is compared with the oracle's, with the agreement harness's
tolerance. It is recorded in every row of that group (column ``correct``).

Reusable pieces: ``plan`` (which cells), ``Sweep(store, settings).run(cells)`` (measure them),
``Sweep.measure(cell)`` (one row), ``quantity_call`` / ``plain_step`` (the timed callables).

The dtype axis (``bench.precision``): a cell's case may be a case in a precision (bf16
parameters, bf16 autocast); its implementation call runs inside the precision's autocast, the
plain step's forward too, and its check holds it to that precision's tolerance.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

import impls
from bench import counters
from bench import memory as memory_module
from bench import precision as precisions
from bench.cases import default_batch_sizes
from bench.environment import available_memory_bytes
from bench.floor import FLOOR, floor_step
from bench.store import IDENTITY, ResultStore
from bench.store import STATUSES as STATUSES  # a cell's statuses (defined beside the table)
from bench.timing import CellTimeout, interleaved, time_limit, time_once
from impls import Unsupported

QUANTITIES = ("norms", "gram")

#: calls a cell needs at the least: a probe, one memory reading, one timed round (a warm-up and
#: a measured call); used to skip cells whose extrapolated call time cannot fit the budget
MIN_CALLS_PER_CELL = 4

#: wall seconds one memory reading costs beyond the call (memray's tracker and reader)
MEMORY_READING_OVERHEAD_S = 0.2

#: a noisy cell's extra round is run only if the budget left holds this many of its longest
#: round (and the memory reading): the cell's alarm must not cut it
ROOM_MARGIN = 2.0


@dataclass(frozen=True)
class Settings:
    """How cells are measured. Times in seconds."""

    threads: int = field(default_factory=torch.get_num_threads)
    rounds: int = 3  # interleaved blocked_autorange rounds per side
    #: rounds added, at most, while the call's or the plain step's IQR is above
    #: ``bench.timing.NOISY_RELATIVE_IQR`` and the cell's budget has room for another
    noisy_rounds: int = 0
    min_run_time: float = 0.1  # seconds per blocked_autorange round
    budget_s: float = 10.0  # wall seconds one cell may take
    check: bool = True  # check each (case, implementation, quantity) against the oracle
    check_batch_size: int = 8
    measure_memory: bool = True
    memory_fraction: float = 0.5  # skip CPU cells extrapolated above this share of free RAM
    seed: int = 0
    clock: str = "wall"  # "wall" or "cpu" (bench.timing.CLOCKS); budgets are always wall time
    #: also count one call's FLOPs, aten operators and bytes allocated (bench.counters)
    count: bool = False

    @property
    def call_limit_s(self) -> float:
        """Seconds one call may take: a cell needs ``MIN_CALLS_PER_CELL`` within its budget."""
        return self.budget_s / MIN_CALLS_PER_CELL

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Cell:
    """One measurement: ``case`` is any object with ``name``, ``make_model(seed, device)``,
    ``make_batch(batch_size, seed, device)`` and ``loss_fn`` (a ``correctness.cases.Case``)."""

    device: str
    case: Any
    implementation: str
    quantity: str
    batch_size: int

    @property
    def dtype(self) -> str:
        """The precision the cell runs in (``bench.precision.label``)."""
        return precisions.label(self.case)

    @property
    def key(self) -> tuple:
        """The values of ``bench.store.IDENTITY``."""
        return (self.device, self.case.name, self.implementation, self.quantity, self.batch_size,
                self.dtype)  # fmt: skip

    @property
    def group(self) -> tuple:
        """The cells that share an oracle check and an extrapolation history: the key but B."""
        return _group(self.key)

    def __str__(self) -> str:
        return (
            f"{self.device} {self.case.name} {self.dtype} {self.implementation} {self.quantity} "
            f"B={self.batch_size}"
        )


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def plan(
    cases: Sequence[Any],
    implementations: Sequence[str],
    *,
    devices: Sequence[str] = ("cpu",),
    quantities: Sequence[str] = QUANTITIES,
    batch_sizes: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    dtypes: Sequence[str | None] | Mapping[str, Sequence[str | None]] = (None,),
) -> list[Cell]:
    """The cells of a sweep, in the order they are measured.

    Per device and case the batch sizes ascend in the outer loop, so that every cell can be
    extrapolated from the same implementation at a smaller batch. ``batch_sizes``: one list for
    every case, a dict case name -> list, or None for ``bench.cases.default_batch_sizes``.
    ``dtypes``: the precisions (``bench.precision.NAMES``; None: the case as built) of every
    case, or a dict case name -> them (a case missing from it: as built); a ``batch_sizes`` dict
    may give a case's cells in one precision their own sizes, under (case name, dtype).
    """
    cells = []
    for device in devices:
        for case in _in_precisions(cases, dtypes):
            if batch_sizes is None:
                sizes = default_batch_sizes(case.name, torch.device(device).type)
            elif isinstance(batch_sizes, Mapping):
                sizes = batch_sizes.get((case.name, precisions.label(case)))
                sizes = batch_sizes[case.name] if sizes is None else sizes
            else:
                sizes = batch_sizes
            for batch_size in sorted(set(sizes)):
                for quantity in quantities:
                    for name in implementations:
                        cells.append(Cell(device, case, name, quantity, int(batch_size)))
    return cells


def _group(key: tuple) -> tuple:
    """An identity (``bench.store.IDENTITY``) without its batch size."""
    return (*key[:4], *key[5:])


def _in_precisions(cases, dtypes) -> list:
    """Every case in each of its precisions, in order."""
    out = []
    for case in cases:
        names = dtypes.get(case.name, (None,)) if isinstance(dtypes, Mapping) else dtypes
        for name in dict.fromkeys(names):
            out.append(precisions.in_precision(case, name))
    return out


# -- the timed callables ---------------------------------------------------------------------------


def quantity_call(
    implementation, quantity: str, model, loss_fn, batch, context=contextlib.nullcontext
) -> Callable[[], Any]:
    """A zero-argument callable computing ``quantity`` ("norms" or "gram") for the batch,
    inside ``context()`` (a precision's autocast: ``bench.precision.forward_context``)."""
    if quantity == "norms":
        call = partial(implementation.norms, model, loss_fn, batch)
    elif quantity == "gram":
        call = partial(implementation.inner, model, loss_fn, batch)
    else:
        raise ValueError(f"unknown quantity '{quantity}'; known: {', '.join(QUANTITIES)}")
    return _within(context, call)


def _within(context, call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` run inside ``context()`` (itself when that is no context)."""
    if context is contextlib.nullcontext:
        return call

    def within() -> Any:
        with context():
            return call()

    return within


def plain_step(model, loss_fn, batch, context=contextlib.nullcontext) -> Callable[[], None]:
    """A zero-argument plain training step: forward, ``loss.sum().backward()``.

    The model is called as the batch holds its inputs: ``model(x)`` for a Tensor,
    ``model(*inputs)`` for a tuple, ``model(**inputs)`` for a mapping of names (as the
    implementations call it). Gradients are set to None first, as ``optimizer.zero_grad()``
    does, so every call does the same work (allocating ``.grad``) instead of accumulating into
    the last call's. ``context``: what the forward and the loss run in (a precision's autocast;
    the backward runs outside it, as in a mixed-precision training step).
    """
    from correctness.oracle import call

    inputs, targets = batch

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with context():
            losses = loss_fn(call(model, inputs), targets)
        losses.sum().backward()

    return step


# -- classifying failures --------------------------------------------------------------------------


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text.lower()
        or "can't allocate memory" in text
        or "DefaultCPUAllocator" in text
    )


def one_line(error: BaseException) -> str:
    """``Type: message (file:line)``, first line only."""
    where = ""
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        where = f" ({frames[-1].filename.split('/')[-1]}:{frames[-1].lineno})"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}{where}"


class BudgetExceeded(Exception):
    """The probe shows that measuring the cell cannot fit its budget."""


@contextlib.contextmanager
def torch_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


@dataclass
class Check:
    """The oracle check of one (device, case, implementation, quantity)."""

    status: str  # ok | WRONG | unsupported | error | timeout | unchecked
    error: float = float("nan")
    detail: str = ""


# -- the sweep ---------------------------------------------------------------------------------


class Sweep:
    """Measures cells into a ``ResultStore``, keeping what cells share between them.

    ``implementations`` maps names to objects with ``norms``/``inner`` (the interface of
    ``impls``); names not in it are looked up with ``impls.get``.
    """

    def __init__(
        self,
        store: ResultStore,
        settings: Settings | None = None,
        implementations: Mapping[str, Any] | None = None,
        progress: bool = True,
    ):
        self.store = store
        self.settings = settings or Settings()
        self.implementations = dict(implementations or {})
        self.progress = progress
        self._models: dict[tuple, torch.nn.Module] = {}
        self._batch: tuple[tuple, Any] | None = None
        self._references: dict[tuple, Any] = {}
        self._checks: dict[tuple, Check] = {}
        self._plain_memory: dict[tuple, memory_module.MemoryReading] = {}

    # -- shared state ------------------------------------------------------------------------

    def implementation(self, name: str):
        if name not in self.implementations:
            self.implementations[name] = impls.get(name)
        return self.implementations[name]

    def model(self, device: str, case) -> torch.nn.Module:
        key = (device, case.name, precisions.label(case))
        if key not in self._models:
            self._models.clear()  # one model at a time: bench models are big
            self._models[key] = case.make_model(self.settings.seed, device)
        return self._models[key]

    def batch(self, device: str, case, batch_size: int):
        key = (device, case.name, precisions.label(case), batch_size)
        if self._batch is None or self._batch[0] != key:
            self._batch = None
            self._batch = (key, case.make_batch(batch_size, self.settings.seed, device))
        return self._batch[1]

    def forget(self) -> None:
        """Drop built models and batches (after a failure that may have left them dirty)."""
        self._models.clear()
        self._batch = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def budget(self, cell: Cell) -> float:
        """Wall seconds this cell may take: the settings' budget, scaled for cases whose plain
        step alone takes seconds (``bench.cases.BUDGET_SCALE``)."""
        from bench.cases import budget_scale

        return self.settings.budget_s * budget_scale(precisions.unwrapped(cell.case))

    # -- the oracle check --------------------------------------------------------------------

    def check(self, cell: Cell) -> Check:
        if cell.implementation == FLOOR:
            return Check("unchecked", detail="the floor is a measure, not an implementation")
        if not self.settings.check:
            return Check("unchecked", detail="checking disabled")
        if cell.group not in self._checks:
            self._checks[cell.group] = self._run_check(cell)
        return self._checks[cell.group]

    def _reference(self, device: str, case):
        """(the check's batch, quantity -> float64 reference, quantity -> tolerance).

        The tolerance is the agreement harness's for the case's dtype (for its precision, in a
        low precision), or ten times the rounding of a plain per-example loop in the model's own
        dtype (under the precision's autocast) on this very model and batch, whichever is
        larger: a large float32 model (GPT-2's 5 million parameters, losses summed over 128
        tokens) rounds far above the tiny zoo models' 1e-4, while a missing or misplaced
        contribution stays far above its rounding.
        """
        from correctness import oracle
        from correctness.harness import TOLERANCE, relative_error

        key = (device, case.name, precisions.label(case))
        if key not in self._references:
            batch = case.make_batch(self.settings.check_batch_size, self.settings.seed + 1, device)
            model = self.model(device, case)
            grads = oracle.per_example_gradients(model, case.loss_fn, batch)
            references = {"norms": oracle.norms(grads), "gram": oracle.inner(grads, grads)}
            floor = TOLERANCE.get(getattr(case, "dtype", torch.float32), 1e-4)
            tolerances = precisions.tolerances(case) or dict.fromkeys(references, floor)
            if not _is_float64(model):
                loop = oracle.per_example_gradients(
                    model, case.loss_fn, batch, in_model_dtype=True,
                    forward=precisions.forward_context(case, device),
                )  # fmt: skip
                rounding = {"norms": oracle.norms(loop), "gram": oracle.inner(loop, loop)}
                for q, value in rounding.items():
                    noise = relative_error(value, references[q])
                    tolerances[q] = max(tolerances[q], ROUNDING_FACTOR * noise)
            self._references = {key: (batch, references, tolerances)}
        return self._references[key]

    def _run_check(self, cell: Cell) -> Check:
        from correctness.harness import relative_error

        # the check is the group's first call (one-time imports and set-up included), so it
        # gets the whole cell budget rather than a single call's share
        limit = self.budget(cell)
        try:
            with torch_threads(self.settings.threads):
                batch, references, tolerances = self._reference(cell.device, cell.case)
                model = self.model(cell.device, cell.case)
                call = quantity_call(
                    self.implementation(cell.implementation),
                    cell.quantity,
                    model,
                    cell.case.loss_fn,
                    batch,
                    precisions.forward_context(cell.case, cell.device),
                )
                with time_limit(limit):
                    value = call()
        except Unsupported as refusal:
            return Check("unsupported", detail=str(refusal))
        except CellTimeout:
            self.forget()
            return Check(
                "timeout",
                detail=f"one call on the oracle check's {self.settings.check_batch_size} examples "
                f"ran past the whole {limit:g} s cell budget",
            )
        except Exception as error:  # noqa: BLE001 - reported in the rows
            self.forget()
            return Check("error", detail=one_line(error))
        reference = references[cell.quantity]
        error = relative_error(value, reference)
        tolerance = tolerances[cell.quantity]
        if error <= tolerance:
            return Check("ok", error)
        return Check("WRONG", error, f"relative error {error:.2e} > {tolerance:.1e} vs oracle")

    # -- skipping ----------------------------------------------------------------------------

    def _smaller(self, cell: Cell) -> dict | None:
        """The row of the same group at the largest measured batch below this cell's."""
        best = None
        for key, row in self.store.rows.items():
            if _group(key) == cell.group and key[4] < cell.batch_size:
                if best is None or key[4] > best["batch_size"]:
                    best = row
        return best

    def skip_reason(self, cell: Cell) -> str | None:
        """Why a cell would obviously blow its budget (or memory), from a smaller batch."""
        row = self._smaller(cell)
        if row is None:
            return None
        smaller, status = int(row["batch_size"]), row["status"]
        if status in ("timeout", "oom"):
            return f"B={smaller} already hit {status}"
        if status == "skipped":
            return f"B={smaller} was skipped too"
        if status != "ok":
            return None
        scale = cell.batch_size / smaller
        per_call = float(row["time_median_s"]) * scale
        needed = MIN_CALLS_PER_CELL * per_call
        if needed > self.budget(cell):
            return (
                f"extrapolated from B={smaller} ({float(row['time_median_s']):.3g} s per call): "
                f"~{per_call:.3g} s per call, a cell needs >= {MIN_CALLS_PER_CELL} calls "
                f"(~{needed:.3g} s) > the {self.budget(cell):g} s budget"
            )
        peak = row.get("memory_peak_bytes")
        free = available_memory_bytes() if torch.device(cell.device).type == "cpu" else None
        if free and peak is not None and not _missing(peak):
            predicted = float(peak) * scale
            if predicted > self.settings.memory_fraction * free:
                return (
                    f"extrapolated from B={smaller}: peak ~{_gib(predicted)} > "
                    f"{self.settings.memory_fraction:g} x the {_gib(free)} of free memory"
                )
        return None

    # -- one cell ----------------------------------------------------------------------------

    def measure(self, cell: Cell) -> dict:
        """Measure one cell and return its row (never raises for the cell's own failures)."""
        started = time.perf_counter()
        row: dict[str, Any] = dict(zip(IDENTITY, cell.key, strict=True))
        row.update(
            threads=self.settings.threads, flags="", reason="", memory_note="", measured_at=_now()
        )
        check = self.check(cell)
        row.update(correct=check.status, check_error=check.error)
        if check.status in ("unsupported", "timeout"):
            row.update(status=check.status, reason=check.detail)
        elif (reason := self.skip_reason(cell)) is not None:
            row.update(status="skipped", reason=reason)
        else:
            try:
                row.update(self._measure(cell, time.perf_counter()))  # check not counted
                row["status"] = "ok"
            except Unsupported as refusal:
                row.update(status="unsupported", reason=str(refusal))
            except (CellTimeout, BudgetExceeded) as timeout:
                row.update(status="timeout", reason=f"{timeout}")
                self.forget()
            except Exception as error:  # noqa: BLE001 - every failure becomes a row
                oom = is_out_of_memory(error)
                row.update(status="oom" if oom else "error", reason=one_line(error))
                self.forget()
            if check.status in ("error", "unchecked") and row["status"] == "ok":
                row["reason"] = f"check: {check.detail}"
        row["wall_s"] = time.perf_counter() - started
        return row

    def _measure(self, cell: Cell, started: float) -> dict:
        s = self.settings
        model = self.model(cell.device, cell.case)
        batch = self.batch(cell.device, cell.case, cell.batch_size)
        context = precisions.forward_context(cell.case, cell.device)
        if cell.implementation == FLOOR:
            with context():  # the floor's capture and its timed step under the precision too
                call = floor_step(model, cell.case.loss_fn, batch, cell.quantity)
            call = _within(context, call)
            started = time.perf_counter()  # capturing factors and choosing forms is not timed
        else:
            call = quantity_call(
                self.implementation(cell.implementation), cell.quantity, model,
                cell.case.loss_fn, batch, context,
            )  # fmt: skip
        plain = plain_step(model, cell.case.loss_fn, batch, context)
        plain_key = (cell.device, cell.case.name, cell.dtype, cell.batch_size)

        budget = self.budget(cell)
        call_limit = budget / MIN_CALLS_PER_CELL

        def remaining() -> float:
            left = budget - (time.perf_counter() - started)
            if left <= 0:
                raise BudgetExceeded(f"ran past the {budget:g} s cell budget")
            return left

        over_budget = f"ran past the {budget:g} s cell budget"
        too_slow = (
            f"one call ran past {call_limit:.3g} s, the most one call may take "
            f"({MIN_CALLS_PER_CELL} calls must fit the {budget:g} s cell budget)"
        )
        try:
            with torch_threads(s.threads):
                with time_limit(min(call_limit, remaining()), too_slow):
                    call_s = time_once(call, cell.device)  # warm-up and probe
                with time_limit(remaining(), over_budget):
                    plain_s = time_once(plain, cell.device)
                per_round = call_s + max(call_s, s.min_run_time)
                per_round += plain_s + max(plain_s, s.min_run_time)
                memory_cost = call_s + (0 if plain_key in self._plain_memory else plain_s)
                memory_cost += MEMORY_READING_OVERHEAD_S if s.measure_memory else 0
                rounds = min(s.rounds, math.floor((remaining() - memory_cost) / per_round))
                if rounds < 1:
                    raise BudgetExceeded(
                        f"one call takes {call_s:.3g} s and a plain step {plain_s:.3g} s: "
                        f"a round of timing does not fit the {budget:g} s budget"
                    )

                def room(round_s: float) -> bool:  # another round, and the memory reading
                    left = budget - (time.perf_counter() - started)
                    return left - memory_cost > ROOM_MARGIN * round_s

                with time_limit(remaining(), over_budget):
                    call_stats, plain_stats = interleaved(
                        call,
                        plain,
                        threads=s.threads,
                        rounds=rounds,
                        noisy_rounds=s.noisy_rounds,
                        room=room,
                        min_run_time=s.min_run_time,
                        device=cell.device,
                        clock=s.clock,
                        label=cell.quantity,
                        sub_label=cell.implementation,
                        description=f"{cell.case.name} B={cell.batch_size}",
                    )
                # outside any time limit: an alarm inside memray's tracker would break its
                # global state; the probe showed that one more call fits the budget
                if s.measure_memory:
                    call_memory = memory_module.peak_memory(call, cell.device, allocated=s.count)
                    if plain_key not in self._plain_memory:
                        plain_memory = memory_module.peak_memory(plain, cell.device)
                        self._plain_memory[plain_key] = plain_memory
                    plain_memory = self._plain_memory[plain_key]
                else:
                    call_memory = plain_memory = memory_module.MemoryReading(
                        None, "memory not measured"
                    )
                counts = counters.count(call) if s.count else None
        finally:
            model.zero_grad(set_to_none=True)
        flags = []
        if call_stats.noisy:
            flags.append(f"noisy: IQR {call_stats.relative_iqr:.0%} of median")
        if plain_stats.noisy:
            flags.append(f"noisy plain: IQR {plain_stats.relative_iqr:.0%} of median")
        peak, plain_peak = call_memory.peak_bytes, plain_memory.peak_bytes
        return {
            "time_median_s": call_stats.median,
            "time_iqr_s": call_stats.iqr,
            "plain_median_s": plain_stats.median,
            "plain_iqr_s": plain_stats.iqr,
            "ratio": call_stats.median / plain_stats.median,
            "flags": "; ".join(flags),
            "n_samples": len(call_stats.samples),
            "samples_s": " ".join(f"{t:.6g}" for t in call_stats.samples),
            "plain_samples_s": " ".join(f"{t:.6g}" for t in plain_stats.samples),
            "memory_peak_bytes": peak,
            "plain_peak_bytes": plain_peak,
            "memory_ratio": peak / plain_peak if peak is not None and plain_peak else None,
            "memory_note": call_memory.note or plain_memory.note,
            # per interleaved round: call median / plain median of that round (both sides saw
            # the same machine); not a table column: the regression gate reads it from the rows
            # that ``Sweep.run`` returns
            "round_ratios": tuple(
                c / p
                for c, p in zip(call_stats.round_medians, plain_stats.round_medians, strict=True)
            ),
            # with Settings.count, likewise read by the gate only
            **(
                {}
                if counts is None
                else {
                    "flops": counts.flops,
                    "aten_ops": counts.operators,
                    "allocated_bytes": call_memory.allocated_bytes,
                    "counts_note": counts.note,
                }
            ),
        }

    # -- many cells --------------------------------------------------------------------------

    def run(self, cells: Iterable[Cell], remeasure: bool = False) -> list[dict]:
        """Measure every cell not already in the store (every cell with ``remeasure``: its new
        row replaces the old one), saving after each; return the new rows."""
        todo = [c for c in cells if remeasure or c.key not in self.store]
        measured = []
        bar = _progress_bar(len(todo), self.progress)
        with warnings.catch_warnings():
            # functorch's remark that a batching rule falls back to a loop (vmap on LSTM): the
            # slowness is what the table shows; the warning would flood the progress bar
            warnings.filterwarnings("ignore", message="There is a performance drop")
            try:
                for cell in todo:
                    bar.set_postfix_str(str(cell), refresh=False)
                    row = self.measure(cell)
                    self.store.add(row)
                    measured.append(row)
                    bar.update(1)
            finally:
                bar.close()
        return measured


#: an implementation agrees with the oracle when its error is within this many times the
#: rounding of a plain per-example loop in the model's dtype (see ``Sweep._reference``)
ROUNDING_FACTOR = 10.0


def _is_float64(model) -> bool:
    return any(p.dtype == torch.float64 for p in model.parameters())


def _missing(value) -> bool:
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a plain environment (the GPU machine) may lack tqdm
        tqdm = None
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=total, unit="cell", dynamic_ncols=True)


class _NoBar:
    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass
