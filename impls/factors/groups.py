"""Reductions of the parameters that complete together (a layer's weight and bias, from one
use), so that a bias reuses the products its weight's factored form formed."""

from __future__ import annotations

from torch import Tensor

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


def squared_norms(group: dict[str, Factors]) -> dict[str, Tensor]:
    """name -> Tensor[n]: each parameter's squared per-example norms."""
    out: dict[str, Tensor] = {}
    pairs = _pairs(group)
    for bias, weight in pairs.items():
        out[weight], out[bias] = layer_squared_norms(group[weight], group[bias])
    for name, factors in group.items():
        if name not in out:
            out[name] = factors.squared_norms()
    return out


def inner_sum(left: dict[str, Factors], right: dict[str, Factors], same: bool) -> Tensor | None:
    """Σ over the parameters of ``right`` found in ``left`` of ⟨left_n, right_m⟩, [n, m]."""
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
        done.update((weight, bias))
    for name, factors in right.items():
        if name in done or name not in left:
            continue
        value = inner(left[name], factors, same=same)
        total = value if total is None else total + value
    return total
