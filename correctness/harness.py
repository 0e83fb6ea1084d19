"""The agreement harness: every implementation against the float64 oracle on every case.

For each (implementation, case) it checks five quantities:

- ``norms``       per-example gradient norms, Tensor[B]
- ``per_param``   the same per parameter
- ``gram``        inner products within the batch, Tensor[B, B]
- ``cross_batch`` inner products with a second batch (train x test), Tensor[B, B']
- ``cross_checkpoint`` inner products with a second batch at a second model (θ vs θ')
- ``double_backward`` d/dθ of Σ_i ‖g_i‖ + Σ_ij W_ij ⟨g_i, g_j⟩ through ``create_graph=True``
  (implementations that cannot differentiate their results refuse it)

and grades each ``ok`` (relative error within tolerance), ``unsupported`` (the implementation
refused with a reason), ``WRONG`` (a number off by more than the tolerance, or a number where
per-example gradients are undefined) or ``error`` (any other exception).

By default each case runs in its own dtype, with :data:`TOLERANCE` for it. With a precision
(``correctness.precision``: float64, float32, bf16 parameters, bf16 autocast) every case is
converted to it, the implementation is called in it, and the answer is held to that precision's
tolerance against the float64 oracle of the converted parameters; :func:`loop_rounding` measures
what a plain per-example loop in the precision gets, from which those tolerances are derived.
"""

from __future__ import annotations

import contextlib
import copy
import traceback
from dataclasses import dataclass
from functools import cache

import torch

import impls
from correctness import oracle
from correctness import precision as precisions
from correctness.cases import CASES, Case
from correctness.precision import TOLERANCE, Precision
from impls import Unsupported

QUANTITIES = ("norms", "per_param", "gram", "cross_batch", "cross_checkpoint", "double_backward")
BATCH_SIZE, OTHER_BATCH_SIZE = 5, 3


@dataclass(frozen=True)
class Outcome:
    implementation: str
    case: str
    quantity: str
    status: str  # ok | unsupported | WRONG | error
    error: float = float("nan")  # max relative error (ok / WRONG)
    detail: str = ""  # the refusal's reason, or what went wrong
    precision: str | None = None  # the precision's name; None: the case's own dtype

    @property
    def failed(self) -> bool:
        return self.status in ("WRONG", "error")


def relative_error(
    value: torch.Tensor, reference: torch.Tensor, scale: float | None = None
) -> float:
    """max |value - reference| / max |reference| (absolute error when the reference is zero);
    ``scale`` replaces max |reference| (one scale for several tensors)."""
    if value.shape != reference.shape:
        return float("inf")
    value = value.detach().double().cpu()
    if not torch.isfinite(value).all():
        return float("inf")
    if scale is None:
        scale = reference.abs().max().item() if reference.numel() else 0.0
    err = (value - reference).abs().max().item() if reference.numel() else 0.0
    return err / scale if scale > 0 else err


def perturbed(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """A second checkpoint θ' of the same network: every parameter moved by seeded noise."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.add_(scale * noise.to(p.dtype) * (p.abs().mean() + 1e-3))
    return other


@dataclass
class Problem:
    """A case's model, batches and float64 references, built once per case (and precision)."""

    case: Case
    model: torch.nn.Module
    other_model: torch.nn.Module
    batch: tuple
    other_batch: tuple
    references: dict | None  # quantity -> reference; None when undefined
    undefined_reason: str = ""
    precision: Precision | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (what the objective's weights are in)."""
        return self.case.dtype if self.precision is None else self.precision.parameters

    @property
    def tolerance(self) -> dict[str, float]:
        """quantity -> the largest relative error that is ok."""
        if self.precision is None:
            return dict.fromkeys(QUANTITIES, TOLERANCE[self.case.dtype])
        return {q: self.precision.tolerance_for(q) for q in QUANTITIES}

    def context(self):
        """What the implementation is called inside (the precision's autocast, or nothing)."""
        return contextlib.nullcontext() if self.precision is None else self.precision.context()


@cache
def problem(case_name: str, precision: str | None = None) -> Problem:
    """The case as built (``precision=None``) or converted to a precision of
    ``correctness.precision.PRECISIONS``; references from the float64 oracle of the very
    parameters the implementations get."""
    case = next(c for c in CASES if c.name == case_name)
    chosen = None if precision is None else precisions.get(precision)
    model = case.make_model()
    batch = case.make_batch(BATCH_SIZE, seed=0)
    other_batch = case.make_batch(OTHER_BATCH_SIZE, seed=1)
    if chosen is not None:
        model = chosen.model(model)
        batch, other_batch = chosen.batch(batch), chosen.batch(other_batch)
    other_model = perturbed(model)
    try:
        here = oracle.per_example_gradients(model, case.loss_fn, batch)
    except Unsupported as refusal:
        return Problem(case, model, other_model, batch, other_batch, None, str(refusal), chosen)
    there = oracle.per_example_gradients(model, case.loss_fn, other_batch)
    there_other_model = oracle.per_example_gradients(other_model, case.loss_fn, other_batch)
    weights = objective_weights(BATCH_SIZE, model_dtype(model, case.dtype))
    references = {
        "norms": oracle.norms(here),
        "per_param": oracle.per_param_norms(here),
        "gram": oracle.inner(here, here),
        "cross_batch": oracle.inner(here, there),
        "cross_checkpoint": oracle.inner(here, there_other_model),
        "double_backward": oracle.double_backward(model, case.loss_fn, batch, weights),
    }
    return Problem(case, model, other_model, batch, other_batch, references, precision=chosen)


def model_dtype(model: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


def objective_weights(batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(batch_size, batch_size, generator=generator, dtype=torch.float64).to(dtype)


def compute(implementation, p: Problem, quantity: str):
    """The implementation's answer, called inside the problem's precision context (the final
    differentiation of the double backward check is the harness's own: outside it)."""
    loss_fn = p.case.loss_fn
    with p.context():
        if quantity == "norms":
            return implementation.norms(p.model, loss_fn, p.batch)
        if quantity == "per_param":
            return implementation.norms(p.model, loss_fn, p.batch, per_param=True)
        if quantity == "gram":
            return implementation.inner(p.model, loss_fn, p.batch)
        if quantity == "cross_batch":
            return implementation.inner(p.model, loss_fn, p.batch, p.other_batch)
        if quantity == "cross_checkpoint":
            return implementation.inner(
                p.model, loss_fn, p.batch, p.other_batch, other_model=p.other_model
            )
        if quantity == "double_backward":
            norms = implementation.norms(p.model, loss_fn, p.batch, create_graph=True)
            gram = implementation.inner(p.model, loss_fn, p.batch, create_graph=True)
    if quantity == "double_backward":
        weights = objective_weights(oracle.batch_size_of(p.batch[0]), p.dtype)
        params = dict((n, q) for n, q in p.model.named_parameters() if q.requires_grad)
        value = oracle.objective(norms, gram, weights)
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        return {
            n: torch.zeros_like(q) if g is None else g
            for (n, q), g in zip(params.items(), grads, strict=False)
        }
    raise ValueError(f"unknown quantity '{quantity}'")


def check(
    implementation_name: str, case_name: str, quantity: str, precision: str | None = None
) -> Outcome:
    """One implementation x case x quantity against the float64 oracle, in the case's own dtype
    (``precision=None``) or in a precision of ``correctness.precision.PRECISIONS``."""
    p = problem(case_name, precision)
    implementation = impls.get(implementation_name)
    tolerance = p.tolerance[quantity]

    def outcome(status, error=float("nan"), detail=""):
        return Outcome(implementation_name, case_name, quantity, status, error, detail, precision)

    try:
        value = compute(implementation, p, quantity)
    except Unsupported as refusal:
        return outcome("unsupported", detail=str(refusal))
    except Exception as exc:  # noqa: BLE001 - every other exception is a failure to report
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{last.filename.split('/')[-1]}:{last.lineno}"
        return outcome("error", detail=f"{type(exc).__name__}: {exc} ({where})".splitlines()[0])
    if p.references is None:
        return outcome("WRONG", detail=f"returned a number, but {p.undefined_reason}")
    reference = p.references[quantity]
    named = isinstance(value, dict) and set(value) == set(reference)
    if isinstance(reference, dict) and not named:
        return outcome("WRONG", float("inf"), "per-parameter names differ from the oracle's")
    error = quantity_error(value, reference)
    if error <= tolerance:
        return outcome("ok", error)
    return outcome("WRONG", error, f"relative error {error:.2e} > {tolerance:.0e}")


def quantity_error(value, reference) -> float:
    """The relative error of a quantity: a tensor's, or for a dict of per-parameter tensors the
    largest over the parameters, all against one scale (the largest reference entry)."""
    if not isinstance(reference, dict):
        return relative_error(value, reference)
    # one scale for every parameter: a gradient that is zero in exact arithmetic (an attention
    # key bias: softmax ignores a shift shared by all keys) is rounding noise in float32, which
    # its own zero reference would blow up into a huge relative error
    scale = max((reference[n].abs().max().item() for n in reference if reference[n].numel()),
                default=0.0)  # fmt: skip
    return max((relative_error(value[n], reference[n], scale) for n in reference), default=0.0)


def loop_rounding(case_name: str, precision: str, quantities=QUANTITIES) -> dict[str, float]:
    """quantity -> the relative error against the float64 oracle of a plain per-example loop
    in ``precision`` (each example's forward under the precision's autocast, if any, and its
    backward in the model's dtype; the gradients then reduced in float64): the rounding any
    implementation in that precision is allowed, from which its tolerances are derived.
    Empty when per-example gradients are undefined for the case."""
    p = problem(case_name, precision)
    if p.references is None:
        return {}
    loss_fn, forward = p.case.loss_fn, p.context

    def loop(model, batch, reference=None):
        grads = oracle.per_example_gradients(
            model, loss_fn, batch, in_model_dtype=True, reference=reference, forward=forward
        )
        return {n: g.double() for n, g in grads.items()}

    here = loop(p.model, p.batch)
    values = {
        "norms": lambda: oracle.norms(here),
        "per_param": lambda: oracle.per_param_norms(here),
        "gram": lambda: oracle.inner(here, here),
        "cross_batch": lambda: oracle.inner(here, loop(p.model, p.other_batch)),
        "cross_checkpoint": lambda: oracle.inner(here, loop(p.other_model, p.other_batch)),
    }
    errors = {}
    for quantity in quantities:
        if quantity == "double_backward":
            value = _loop_double_backward(p, loop)
        else:
            value = values[quantity]()
        errors[quantity] = quantity_error(value, p.references[quantity])
    return errors


def _loop_double_backward(p: Problem, loop) -> dict[str, torch.Tensor]:
    """d objective / dθ through a per-example loop in the precision (math attention kernel:
    the fused ones have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    reference = copy.deepcopy(p.model)
    params = {n: q for n, q in reference.named_parameters() if q.requires_grad}
    with sdpa_kernel([SDPBackend.MATH]):
        grads = loop(p.model, p.batch, reference=reference)
    weights = objective_weights(BATCH_SIZE, p.dtype).double()
    value = oracle.objective(oracle.norms(grads), oracle.inner(grads, grads), weights)
    result = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(q) if g is None else g
            for (n, q), g in zip(params.items(), result, strict=False)}  # fmt: skip


def run(
    implementations=None, cases=None, quantities=QUANTITIES, progress=None, precision=None
) -> list[Outcome]:
    implementations = implementations or impls.names()
    cases = cases or [c.name for c in CASES]
    outcomes = []
    for case_name in cases:
        for name in implementations:
            for quantity in quantities:
                outcomes.append(check(name, case_name, quantity, precision))
                if progress:
                    progress()
    return outcomes
