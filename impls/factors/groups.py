"""Reductions of the parameters that complete together (a layer's weight and bias, from one
use), so that a bias reuses the products its weight's factored form formed.

Every reduction accumulates in float32 at the least: factors in a lower dtype (bfloat16
parameters, a forward under autocast, where a layer's activations may be float32 and its output
gradients bfloat16) are converted, one group at a time, to :func:`accumulation_dtype` of the
group before any product is formed, and an autocast the caller is in does not reach the
products (``without_autocast``).
"""

from __future__ import annotations

import contextlib

from torch import Tensor

from impls._precision import accumulation_dtype, without_autocast
from impls.factors.base import Factors
from impls.factors.outer import is_layer_pair, layer_inner, layer_squared_norms
from impls.factors.pairs import inner


def _pairs(group: dict[str, Factors]) -> dict[str, str]:
    """bias name -> weight name for the (weight, bias) pairs of one use in ``group``."""
    out = {}
    for name, factors in group.items():
        for other, candidate in group.items():
            if other != name and is_layer_pair(candidate, factors):
                out[name] = other
    return out


def accumulating(*groups: dict[str, Factors]) -> tuple[dict[str, Factors], ...]:
    """The groups with every factor in the accumulation dtype of all of them (at least
    float32); factors that are in it already are returned as they are."""
    tensors = [t for group in groups for f in group.values() for t in f.tensors()]
    dtypes = {t.dtype for t in tensors}
    dtype = accumulation_dtype(dtypes)
    if dtypes == {dtype}:  # float32 or float64 throughout: nothing to convert
        return groups
    converted: dict = {}  # shared: a bias's sums keep pointing at its converted weight
    return tuple({n: f.to(dtype, converted) for n, f in group.items()} for group in groups)


def _exact(group: dict[str, Factors]):
    """No autocast around the products (the caller's, when called outside an implementation)."""
    for factors in group.values():
        for t in factors.tensors():
            return without_autocast("cpu" if t.is_cpu else t.device.type)
    return contextlib.nullcontext()


def squared_norms(group: dict[str, Factors]) -> dict[str, Tensor]:
    """name -> Tensor[n]: each parameter's squared per-example norms."""
    (group,) = accumulating(group)
    out: dict[str, Tensor] = {}
    with _exact(group):
        pairs = _pairs(group)
        for bias, weight in pairs.items():
            out[weight], out[bias] = layer_squared_norms(group[weight], group[bias])
        for name, factors in group.items():
            if name not in out:
                out[name] = factors.squared_norms()
    return out


def inner_sum(left: dict[str, Factors], right: dict[str, Factors], same: bool) -> Tensor | None:
    """Σ over the parameters of ``right`` found in ``left`` of ⟨left_n, right_m⟩, [n, m]."""
    if same:
        (right,) = accumulating(right)
        left = right
    else:
        left, right = accumulating({n: f for n, f in left.items() if n in right}, right)
    with _exact(right):
        return _inner_sum(left, right, same)


def _inner_sum(left: dict[str, Factors], right: dict[str, Factors], same: bool) -> Tensor | None:
    total = None
    done: set[str] = set()
    pairs = _pairs(right)
    for bias, weight in pairs.items():
        if weight not in left or bias not in left:
            continue
        if not same and not is_layer_pair(left[weight], left[bias]):
            continue
        w_value, b_value = layer_inner(
            (left[weight], right[weight]), (left[bias], right[bias]), same
        )
        value = w_value + b_value
        total = value if total is None else total + value
        done.add(weight)
        done.add(bias)
    for name, factors in right.items():
        if name in done or name not in left:
            continue
        value = inner(left[name], factors, same=same)
        total = value if total is None else total + value
    return total
