"""Convolutions ``F.conv1d/2d/3d(x, weight, bias, stride, padding, dilation, groups)``, any
stride, padding (numbers, 'same', 'valid'; nn.Conv's other padding modes pad before the call),
dilation and groups, through unfolding: the input becomes a [n, i = C_in/G·∏k, t] matrix per
group (t = output positions) and the layer is a Linear per group applied at every position, with
the Linear's factored forms (T = output positions, i = C_in/G·∏k, o = C_out/G).

The examples must be rows of the convolution's own batch dimension (dimension 0), possibly several
rows each (a folded batch).

The patches (:class:`Patches`) are built only when a reduction needs them: they are ∏k times the
input, and the factored norm needs only each example's products of patches p_t·p_s, which are
sums of the products of the input's positions x_u·x_v (one matrix product over the channels)
along the kernel's taps — fewer multiply-adds when the output is not much smaller than the
input (stride 1), and no copy ∏k times the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from impls.base import Unsupported
from impls.factors import COSTS, Dense, GradientSums, Outer, Unbuilt
from impls.layers.base import Binding, OpRule, register_rule, require_first_dimension

_CONVS = {
    F.conv1d: 1,
    F.conv2d: 2,
    F.conv3d: 3,
}


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def padding_pairs(padding, kernel, dilation) -> list[tuple[int, int]]:
    """(before, after) zeros per spatial dimension, as the convolution pads (numbers, 'same',
    'valid')."""
    dims = len(kernel)
    if padding == "valid":
        return [(0, 0)] * dims
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in _tuple(padding, dims)]


def explicit_padding(x: Tensor, padding, kernel, dilation) -> Tensor:
    """The input zero-padded as the convolution pads it (numbers, 'same', 'valid')."""
    pairs = padding_pairs(padding, kernel, dilation)
    if not any(before or after for before, after in pairs):
        return x
    return F.pad(x, [p for pair in reversed(pairs) for p in pair])


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


def _output_sizes(spatial, kernel, stride, dilation) -> list[int]:
    """The output's size along each dimension of a padded input of sizes ``spatial``."""
    return [(size - d * (k - 1) - 1) // s + 1
            for size, k, s, d in zip(spatial, kernel, stride, dilation, strict=True)]  # fmt: skip


@dataclass(eq=False)
class Patches(Unbuilt):
    """A convolution's activations [n, G, r·t, i] (r rows per example, t output positions,
    i = C/G·∏k), from its input [n, r, C, *spatial], built on first use.

    The input is read when the patches are: changed in place since (``where``: the call),
    it is refused rather than read.
    """

    input: Tensor
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    where: str = "a convolution"
    _built: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        self.version = self.input._version
        n, rows, channels = self.input.shape[:3]
        pads = padding_pairs(self.padding, self.kernel, self.dilation)
        padded = [size + sum(pad) for size, pad in zip(self.input.shape[3:], pads, strict=True)]
        self.padded_sizes = padded
        self.out_sizes = _output_sizes(padded, self.kernel, self.stride, self.dilation)
        t = math.prod(self.out_sizes)
        i = channels // self.groups * math.prod(self.kernel)
        self.shape = torch.Size((n, self.groups, rows * t, i))

    @property
    def built(self) -> Tensor | None:
        return self._built

    def inputs(self) -> list[Tensor]:
        return [self.input]

    def to(self, dtype) -> Patches:
        if self.input.dtype == dtype:
            return self
        self._unchanged()
        return Patches(self.input.to(dtype), self.kernel, self.stride, self.padding,
                       self.dilation, self.groups, self.where,
                       None if self._built is None else self._built.to(dtype))  # fmt: skip

    def _unchanged(self) -> None:
        if self.input._version != self.version:
            raise Unsupported(f"the input of {self.where} was modified in place after the call")

    def build(self) -> Tensor:
        if self._built is None:
            self._unchanged()
            x = self.input
            n, rows, groups = x.shape[0], x.shape[1], self.groups
            patches = unfold(x.reshape(n * rows, *x.shape[2:]), self.kernel, self.stride,
                             self.padding, self.dilation)  # fmt: skip
            patches = patches.reshape(n, rows, groups, -1, patches.shape[-1])  # [n, r, G, i, t]
            self._built = patches.permute(0, 2, 1, 4, 3).reshape(n, groups, -1, patches.shape[3])
        return self._built

    # -- each example's products of patches, from the input ----------------------------------

    def products(self, a: int, b: int) -> Tensor:
        """[b - a, G, r·t, r·t]: p_u·p_v for examples a..b, without the patches.

        With the input zero-padded, x [m, G, r, c, *P]: M_uv = Σ_c x_u x_v over all pairs of
        padded positions (one matrix product), then p_t·p_s = Σ_κ M[t·stride + κ·dilation,
        s·stride + κ·dilation] over the kernel's taps κ, summed one spatial dimension at a time
        (the taps of a product kernel are separable).
        """
        self._unchanged()
        x = self.input[a:b] if (a, b) != (0, self.input.shape[0]) else self.input
        m, rows, channels = x.shape[:3]
        groups, dims = self.groups, len(self.kernel)
        flat = x.reshape(m * rows, channels, *x.shape[3:])
        padded = explicit_padding(flat, self.padding, self.kernel, self.dilation)
        sizes = self.padded_sizes
        # [m, G, r·P, c]: every row's padded positions of one group
        x = padded.reshape(m, rows, groups, channels // groups, -1).permute(0, 2, 1, 4, 3)
        x = x.reshape(m, groups, -1, channels // groups)
        products = (x @ x.transpose(2, 3)).view(m, groups, rows, *sizes, rows, *sizes)
        # [m, G, r, r', P1, P1', P2, P2', ...]: the two positions of each dimension side by side
        order = [0, 1, 2, 3 + dims]
        for d in range(dims):
            order += [3 + d, 4 + dims + d]
        products = products.permute(order)
        for d in range(dims):
            products = _tap_sum(products, 4 + 2 * d, self.kernel[d], self.stride[d],
                                self.dilation[d], self.out_sizes[d])  # fmt: skip
        # back to [m, G, r, t1, t2, .., r', t1', t2', ..]
        back = [0, 1, 2, *range(4, 4 + 2 * dims, 2), 3, *range(5, 5 + 2 * dims, 2)]
        size = rows * math.prod(self.out_sizes)
        return products.permute(back).reshape(m, groups, size, size)

    def products_elements(self) -> int:
        rows = self.input.shape[1]
        return self.groups * (rows * math.prod(self.padded_sizes)) ** 2

    def products_cost(self) -> float:
        n, rows, channels = self.input.shape[:3]
        positions = rows * math.prod(self.padded_sizes)
        cost = n * self.groups * positions**2 * (channels // self.groups) * COSTS.bmm
        sizes = [(p, p) for p in self.padded_sizes]
        for d, k in enumerate(self.kernel):  # each dimension's tap sum, over what is left
            sizes[d] = (self.out_sizes[d], self.out_sizes[d])
            cost += n * self.groups * rows**2 * k * math.prod(a * b for a, b in sizes) * (
                COSTS.elementwise)  # fmt: skip
        return cost


def _tap_sum(x: Tensor, axis: int, taps: int, stride: int, dilation: int, size: int) -> Tensor:
    """Σ_κ x[.., κ·dilation + stride·t, κ·dilation + stride·s, ..] over κ < taps, along the
    pair of axes ``axis``, ``axis + 1`` (two positions of one dimension): [.., size, size, ..]."""
    span = (size - 1) * stride + 1
    terms = [
        x[(slice(None),) * axis + (slice(k * dilation, k * dilation + span, stride),) * 2]
        for k in range(taps)
    ]
    if taps == 1:
        return terms[0]
    total = terms[0] + terms[1]
    in_place = not (torch.is_grad_enabled() and x.requires_grad)
    for term in terms[2:]:
        total = total.add_(term) if in_place else total + term
    return total


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
            patches = Patches(x, tuple(weight.shape[2:]), config["stride"], config["padding"],
                              config["dilation"], groups, use.where)  # fmt: skip
            outer = Outer(grads, patches, weight.shape)
            out["weight"] = outer
            if bias is not None:
                out["bias"] = GradientSums(outer, bias.shape)
        elif bias is not None:
            out["bias"] = Dense(g.sum((1, 4)).reshape(n, -1))
        return out


register_rule(ConvRule())
