"""Linear maps with a weight matrix: ``F.linear(x, W, b)`` (nn.Linear), ``torch.addmm(b, x, W)``
(Hugging Face's Conv1D), ``x @ W`` and ``W @ x`` (a weight used in a matmul).

With activations a [n, t, i] and output gradients g [n, t, o] per example (every dimension but
the batch and the features is a position): ∇W ℓ_n = Σ_t g_nt a_ntᵀ, kept factored
(``Outer``), and ∇b ℓ_n = Σ_t g_nt (``GradientSums``, reduced with the weight). ``addmm`` and
``x @ W`` hold the weight transposed ([i, o]); ``W @ x`` reads the positions from x's last
dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from impls.factors import GradientSums, Outer
from impls.layers.base import Binding, OpRule, flatten_positions, register_rule


def linear_factors(a: Tensor, g: Tensor, wanted: dict, *, transposed=False, alpha=1.0, beta=1.0):
    """Factors of a linear map with activations a [n, t, i] and output gradients g [n, t, o]."""
    out = {}
    weight, bias = wanted.get("weight"), wanted.get("bias")
    shape = weight.shape if weight is not None else (g.shape[-1], a.shape[-1])
    grads = g if alpha == 1.0 else g * alpha
    outer = Outer(grads.unsqueeze(1), a.unsqueeze(1), shape, transposed=transposed)
    if weight is not None:
        out["weight"] = outer
    if bias is not None:  # β Σ_t g_t, from the sums of the α-scaled gradients
        out["bias"] = GradientSums(outer, bias.shape, scale=beta / alpha)
    return out


def _is(x) -> bool:
    return isinstance(x, Tensor)


class LinearRule(OpRule):
    """``F.linear(x, weight, bias)``: weight [o, i]."""

    functions = (F.linear,)

    def bind(self, func, args, kwargs, is_weight):
        x = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not _is(x) or not _is(weight) or weight.dim() != 2 or is_weight(x):
            return None
        if bias is not None and bias.dim() != 1:
            return None
        weights = {"weight": weight, "bias": bias}
        if not any(is_weight(w) for w in weights.values() if w is not None):
            return None
        return Binding((x,), weights)

    def factors(self, use):
        a = flatten_positions(use.activation())
        g = flatten_positions(use.output_gradient())
        return linear_factors(a, g, use.wanted)


class AddmmRule(OpRule):
    """``torch.addmm(bias, x, weight, beta=β, alpha=α)`` = β·bias + α·x @ weight, weight [i, o]."""

    functions = (torch.addmm, torch.Tensor.addmm)

    def bind(self, func, args, kwargs, is_weight):
        bias = args[0] if args else kwargs.get("input")
        x = args[1] if len(args) > 1 else kwargs.get("mat1")
        weight = args[2] if len(args) > 2 else kwargs.get("mat2")
        if not (_is(bias) and _is(x) and _is(weight)) or is_weight(x):
            return None
        if weight.dim() != 2 or x.dim() != 2:
            return None
        if not (bias.dim() == 1 or (bias.dim() == 2 and bias.shape[0] == 1)):
            return None
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if alpha == 0:
            return None
        weights = {"weight": weight, "bias": bias}
        if not any(is_weight(w) for w in weights.values()):
            return None
        return Binding((x,), weights, {"alpha": float(alpha), "beta": float(beta)})

    def factors(self, use):
        a = flatten_positions(use.activation())
        g = flatten_positions(use.output_gradient())
        alpha, beta = use.config["alpha"], use.config["beta"]
        return linear_factors(a, g, use.wanted, transposed=True, alpha=alpha, beta=beta)


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)


class MatmulRule(OpRule):
    """A 2-D weight on either side of a matmul: ``x @ W`` (W [i, o]) or ``W @ x`` (W [o, i])."""

    functions = (*_MATMULS, torch.Tensor.__rmatmul__)

    def bind(self, func, args, kwargs, is_weight):
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
        if func is torch.Tensor.__rmatmul__:
            a, b = b, a
        if not (_is(a) and _is(b)):
            return None
        if is_weight(b) and b.dim() == 2 and not is_weight(a) and a.dim() >= 2:
            return Binding((a,), {"weight": b}, {"weight_on_right": True})
        if is_weight(a) and a.dim() == 2 and not is_weight(b) and b.dim() >= 2:
            return Binding((b,), {"weight": a}, {"weight_on_right": False})
        return None

    def factors(self, use):
        x, g = use.activation(), use.output_gradient()
        if use.config["weight_on_right"]:
            return linear_factors(flatten_positions(x), flatten_positions(g), use.wanted,
                                  transposed=True)  # fmt: skip
        # W @ x: positions along x's last dimension unless the examples were there
        layout = use.layout()
        raw = use.binding.activations[0]
        if layout is None or layout.dim != raw.dim() - 1:
            x, g = x.transpose(-1, -2), g.transpose(-1, -2)
        return linear_factors(flatten_positions(x), flatten_positions(g), use.wanted)


register_rule(LinearRule())
register_rule(AddmmRule())
register_rule(MatmulRule())
