"""Convolutions ``F.conv1d/2d/3d(x, weight, bias, stride, padding, dilation, groups)``, any
stride, padding (numbers, 'same', 'valid'; nn.Conv's other padding modes pad before the call),
dilation and groups, through unfolding: the input becomes a [n, i = C_in/G·∏k, t] matrix per
group (t = output positions) and the layer is a Linear per group applied at every position, with
the Linear's factored forms (T = output positions, i = C_in/G·∏k, o = C_out/G).

The examples must be rows of the convolution's own batch dimension (dimension 0), possibly several
rows each (a folded batch).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from impls.base import Unsupported
from impls.factors import Dense, GradientSums, Outer
from impls.layers.base import Binding, OpRule, register_rule, require_first_dimension

_CONVS = {
    F.conv1d: 1,
    F.conv2d: 2,
    F.conv3d: 3,
}


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def explicit_padding(x: Tensor, padding, kernel, dilation) -> Tensor:
    """The input zero-padded as the convolution pads it (numbers, 'same', 'valid')."""
    dims = len(kernel)
    if padding == "valid":
        return x
    if padding == "same":
        pads = []
        for d, k in zip(reversed(dilation), reversed(kernel), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    padding = _tuple(padding, dims)
    if not any(padding):
        return x
    return F.pad(x, [p for p in reversed(padding) for _ in range(2)])


def unfold(x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """Input patches: [N, C·∏k, t], ordered like ``weight.flatten(1)`` within each group.

    ``Tensor.unfold`` along each spatial dimension (a window of the dilated kernel's span, every
    ``dilation``-th entry of it) gives a strided view [N, C, *out, *k]; one copy puts it in the
    layout of the weight. The same numbers as ``F.unfold``, for every dimension (1d, 3d).
    """
    dims = len(kernel)
    x = explicit_padding(x, padding, kernel, dilation)
    for d in range(dims):
        x = x.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    n, channels = x.shape[:2]
    spatial = list(range(2, 2 + dims))
    taps = list(range(2 + dims, 2 + 2 * dims))
    x = x.permute(0, 1, *taps, *spatial)  # [N, C, *k, *out]
    return x.reshape(n, channels * math.prod(kernel), -1)


class ConvRule(OpRule):
    functions = tuple(_CONVS)

    def bind(self, func, args, kwargs, is_weight):
        dims = _CONVS[func]
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        values = [
            args[k] if k < len(args) else kwargs.get(name, default)
            for k, (name, default) in enumerate(zip(names, defaults, strict=True))
        ]
        x, weight, bias, stride, padding, dilation, groups = values
        if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or is_weight(x):
            return None
        weights = {"weight": weight, "bias": bias}
        if not any(is_weight(w) for w in weights.values() if w is not None):
            return None
        config = {
            "dims": dims,
            "stride": _tuple(stride, dims),
            "padding": padding if isinstance(padding, str) else _tuple(padding, dims),
            "dilation": _tuple(dilation, dims),
            "groups": groups,
        }
        return Binding((x,), weights, config)

    def check(self, use):
        require_first_dimension(use, "convolves each row")
        if use.binding.activations[0].dim() != use.config["dims"] + 2:
            raise Unsupported(f"{use.where} is called on an input without a batch dimension")

    def factors(self, use):
        config = use.config
        n, groups = use.batch_size, config["groups"]
        x = use.activation()  # [n, r, C, *spatial]
        g = use.output_gradient()  # [n, r, O, *spatial out]
        rows = x.shape[1]
        out_channels = g.shape[2]
        g = g.reshape(n, rows, groups, out_channels // groups, -1)  # [n, r, G, o, t]
        grads = g.permute(0, 2, 1, 4, 3).reshape(n, groups, -1, out_channels // groups)
        out = {}
        weight, bias = use.wanted.get("weight"), use.wanted.get("bias")
        if weight is not None:
            kernel = tuple(weight.shape[2:])
            patches = unfold(x.reshape(n * rows, *x.shape[2:]), kernel, config["stride"],
                             config["padding"], config["dilation"])  # fmt: skip
            patches = patches.reshape(n, rows, groups, -1, patches.shape[-1])  # [n, r, G, i, t]
            acts = patches.permute(0, 2, 1, 4, 3).reshape(n, groups, -1, patches.shape[3])
            outer = Outer(grads, acts, weight.shape)
            out["weight"] = outer
            if bias is not None:
                out["bias"] = GradientSums(outer, bias.shape)
        elif bias is not None:
            out["bias"] = Dense(g.sum((1, 4)).reshape(n, -1))
        return out


register_rule(ConvRule())
