"""nn.Conv1d/2d/3d, any stride, padding (numbers, 'same', 'valid', any padding_mode),
dilation and groups, through unfolding: the input becomes a [n, i = C_in/G·∏k, t] matrix per
group (t = output positions) and the layer is a Linear per group applied at every position,
with the Linear's factored forms (T = output positions, i = C_in/G·∏k, o = C_out/G).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from impls.layers.base import LayerRule, register_rule
from impls.layers.factored import Dense, Outer, RowSums


def explicit_padding(module: nn.modules.conv._ConvNd, a: torch.Tensor) -> torch.Tensor:
    """The input padded as the module pads it, so that the convolution itself pads nothing."""
    if module.padding_mode != "zeros":
        return F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    if module.padding == "valid":
        return a
    if module.padding == "same":
        pads = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(a, pads)
    pads = [p for p in reversed(module.padding) for _ in range(2)]
    return F.pad(a, pads)


def unfold(module: nn.modules.conv._ConvNd, a: torch.Tensor) -> torch.Tensor:
    """Input patches: [n, C_in·∏k, t], ordered like ``weight.flatten(1)`` within each group.

    ``Tensor.unfold`` along each spatial dimension (a window of the dilated kernel's span,
    every ``dilation``-th entry of it) gives a strided view [n, C, *out, *k]; one copy puts it
    in the layout of the weight. The same numbers as ``F.unfold``, for every dimension (1d, 3d)
    and many times faster than unfolding by a convolution with a one-hot kernel per tap (a
    depthwise convolution with ∏k outputs per channel, a slow path of the CPU kernels).
    """
    dims = len(module.kernel_size)
    a = explicit_padding(module, a)
    for d in range(dims):
        kernel, stride, dilation = module.kernel_size[d], module.stride[d], module.dilation[d]
        a = a.unfold(2 + d, dilation * (kernel - 1) + 1, stride)  # window appended last
        if dilation > 1:
            a = a[..., ::dilation]
    n, channels = a.shape[:2]
    spatial = list(range(2, 2 + dims))
    taps = list(range(2 + dims, 2 + 2 * dims))
    a = a.permute(0, 1, *taps, *spatial)  # [n, C, *k, *out]
    return a.reshape(n, channels * math.prod(module.kernel_size), -1)


class ConvRule(LayerRule):
    """Per group, the unfolded convolution is a Linear applied at every output position:
    weight factors rows g [n, G, t, o/G], cols patches [n, G, t, C_in/G·∏k].
    """

    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def factors(self, call):
        module = call.module
        n, groups = call.batch_size, module.groups
        out = {}
        g = call.grad_output.flatten(2)  # [n, o, t]
        rows = g.reshape(n, groups, -1, g.shape[-1]).transpose(2, 3)
        if "weight" in call.wanted:
            a = unfold(module, call.input)  # [n, i, t]
            cols = a.reshape(n, groups, -1, a.shape[-1]).transpose(2, 3)
            weight = Outer(rows, cols, module.weight.shape)
            out["weight"] = weight
            if "bias" in call.wanted:
                out["bias"] = RowSums(weight, module.bias.shape)
        elif "bias" in call.wanted:
            out["bias"] = Dense(g.sum(2))
        return out


register_rule(ConvRule())
