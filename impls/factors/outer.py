"""Outer-product sums: the weight of a Linear-like use (Linear, Conv per group, the projections
inside attention and recurrent layers), and the bias beside it.

Example n's weight gradient is Σ_t g_nt a_ntᵀ per group, with the output gradients g
[n, G, t, o] and the activations a [n, G, t, i]; the reductions between two such factors
choose between the factored form Σ_{t,s} (a_nt·a'_ms)(g_nt·g'_ms) and materialising by cost.
The bias's gradient Σ_t g_nt (:class:`GradientSums`) is reduced together with its weight when
both come from one use (:func:`layer_squared_norms`, :func:`layer_inner`), which reuses the
products g_nt·g'_ms the weight's factored form forms.

Activations that would cost more to build than the inputs they come from (a convolution's
patches, :class:`Unbuilt`) are built on first use; an example's products a_nt·a_ns, all the
factored norm needs, may be cheaper to form from those inputs without building them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from impls.factors import costs
from impls.factors.base import Dense, Factors
from impls.factors.costs import COSTS, cat, chunks, gram, part, squared_row_norms


class Unbuilt:
    """Activations [n, G, t, i] of an :class:`Outer` built on first use from smaller inputs (a
    convolution's patches from its input), kept once built.

    ``products(a, b)`` is every example's a_t·a_s [b - a, G, t, t] for examples a..b, formed the
    cheaper way (:meth:`products_cost`): from the inputs, or from the built activations.
    """

    shape: torch.Size

    def build(self) -> Tensor:
        raise NotImplementedError

    @property
    def built(self) -> Tensor | None:
        """The activations if they were built (the same object every time after)."""
        raise NotImplementedError

    def inputs(self) -> list[Tensor]:
        """The floating tensors the activations are built from (what :meth:`to` converts)."""
        raise NotImplementedError

    def to(self, dtype: torch.dtype) -> Unbuilt:
        raise NotImplementedError

    def products(self, a: int, b: int) -> Tensor:
        raise NotImplementedError

    def products_cost(self) -> float:
        """The cost of :meth:`products` for the whole batch, in the cost model's units."""
        raise NotImplementedError

    def products_elements(self) -> int:
        """The largest intermediate of :meth:`products`, per example (elements)."""
        raise NotImplementedError

    def build_cost(self) -> float:
        """What building the activations costs (zero once built)."""
        return 0.0 if self.built is not None else math.prod(self.shape) * COSTS.elementwise


def evaluated(activations: Tensor | Unbuilt) -> Tensor:
    return activations if isinstance(activations, Tensor) else activations.build()


def _build_cost(activations: Tensor | Unbuilt) -> float:
    return 0.0 if isinstance(activations, Tensor) else activations.build_cost()


@dataclass(eq=False)
class Outer(Factors):
    """Σ_t gradients_nt activations_ntᵀ per group, gradients [n, G, t, o], activations [n, G, t, i].

    Group g's gradient fills rows g·o .. (g+1)·o of ``weight.flatten(1)`` (a grouped
    convolution's layout), starting at parameter row ``row_start`` (a use that read a row slice);
    other rows are zero. ``transposed``: the parameter holds the transpose ([i, o], as
    ``torch.addmm(bias, x, weight)`` uses it); norms and inner products are the same either way.

    ``source``: the activations, or what builds them on first use (:class:`Unbuilt`);
    :attr:`activations` is always the tensor.
    """

    gradients: Tensor
    source: Tensor | Unbuilt
    shape: torch.Size
    row_start: int = 0
    transposed: bool = False

    def __post_init__(self):
        if self.gradients.shape[:3] != self.source.shape[:3]:
            raise ValueError(f"factor shapes differ: {self.gradients.shape} vs {self.source.shape}")
        self.shape = torch.Size(self.shape)

    @property
    def activations(self) -> Tensor:
        return evaluated(self.source)

    @property
    def batch_size(self) -> int:
        return self.gradients.shape[0]

    @property
    def groups(self) -> int:
        return self.gradients.shape[1]

    @property
    def positions(self) -> int:
        return self.gradients.shape[2]

    @property
    def features(self) -> tuple[int, int]:
        """(o, i): output and input features per group."""
        return self.gradients.shape[3], self.source.shape[3]

    @property
    def full(self) -> bool:
        """Whether the factors cover every row of the parameter."""
        if self.transposed:
            return self.row_start == 0 and self.features[1] == self.shape[0]
        return self.row_start == 0 and self.groups * self.features[0] == self.shape[0]

    def placed(self, shape, row_start):
        if self.transposed or self.groups != 1 or (row_start == 0 and shape == self.shape):
            return super().placed(shape, row_start)  # (the whole parameter: itself)
        return Outer(self.gradients, self.source, shape, self.row_start + row_start)

    def squared_norms(self) -> Tensor:
        return outer_diagonal(self, self)

    def tensors(self) -> list[Tensor]:
        if isinstance(self.source, Unbuilt):
            return [self.gradients, *self.source.inputs()]
        return [self.gradients, self.source]

    def _converted(self, dtype, converted):
        return Outer(self.gradients.to(dtype), self.source.to(dtype), self.shape, self.row_start,
                     self.transposed)  # fmt: skip

    def materialise(self) -> Tensor:
        """In the wider dtype of the two factors (under autocast a layer's input may be float32
        and its output gradient bfloat16)."""
        n = self.batch_size
        dtype = torch.promote_types(self.gradients.dtype, self.activations.dtype)
        gradients, activations = self.gradients.to(dtype), self.activations.to(dtype)
        blocks = (gradients.transpose(2, 3) @ activations).reshape(n, -1, self.features[1])
        if self.transposed:
            return blocks.transpose(1, 2).reshape(n, *self.shape)
        if self.full:
            return blocks.reshape(n, *self.shape)
        height = self.shape[0]
        inner = math.prod(self.shape[1:])
        top, bottom = self.row_start, height - self.row_start - blocks.shape[1]
        padded = F.pad(blocks.reshape(n, -1, inner), (0, 0, top, bottom))
        return padded.reshape(n, *self.shape)


@dataclass(eq=False)
class GradientSums(Factors):
    """Σ_t gradients_nt of an :class:`Outer`, [n, G·o]: the bias next to a Linear or Conv weight.

    ``scale`` multiplies it (``torch.addmm``'s beta over alpha).
    """

    outer: Outer
    shape: torch.Size
    scale: float = 1.0
    _sums: Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.outer.batch_size

    def sums(self) -> Tensor:
        """[n, G·o]."""
        if self._sums is None:
            sums = self.outer.gradients.sum(2).reshape(self.batch_size, -1)
            self._sums = sums if self.scale == 1.0 else sums * self.scale
        return self._sums

    def materialise(self) -> Tensor:
        return self.sums().reshape(self.batch_size, *self.shape)

    def tensors(self) -> list[Tensor]:
        return self.outer.tensors()

    def _converted(self, dtype, converted):
        return GradientSums(self.outer.to(dtype, converted), self.shape, self.scale)

    def squared_norms(self) -> Tensor:
        return squared_row_norms(self.sums())


# -- reductions between two Outer factors ------------------------------------------------------


def _row_overlap(left: Outer, right: Outer) -> tuple[Tensor, Any, Tensor, Any] | None:
    """The two factors restricted to the parameter rows both cover, as (g, a) pairs; the
    activations as the factors hold them (``source``: possibly :class:`Unbuilt`)."""
    if left.transposed != right.transposed:
        return None
    same_layout = left.row_start == right.row_start and left.groups == right.groups
    if same_layout and left.features[0] == right.features[0]:
        return left.gradients, left.source, right.gradients, right.source
    if left.transposed or left.groups != 1 or right.groups != 1:
        return None  # grouped or transposed factors of different layouts: materialise
    lo = max(left.row_start, right.row_start)
    hi = min(left.row_start + left.features[0], right.row_start + right.features[0])
    g_l, a_l, g_r, a_r = left.gradients, left.source, right.gradients, right.source
    if hi <= lo:
        return g_l[..., :0], a_l, g_r[..., :0], a_r
    ls, rs = lo - left.row_start, lo - right.row_start
    width = hi - lo
    return g_l[..., ls : ls + width], a_l, g_r[..., rs : rs + width], a_r


def outer_diagonal(left: Outer, right: Outer, keep: dict | None = None) -> Tensor:
    """Tensor[n]: ⟨left example n's gradient, right example n's⟩ (two factors of one batch).

    ``keep``: when given and ``left is right``, receives ``"gradient_products"`` [n] =
    Σ_g Σ_{t,s} g_t·g_s per example if the factored form formed them (the bias's squared norms).
    """
    overlap = _row_overlap(left, right)
    if overlap is None:
        return (left.materialise().flatten(1) * right.materialise().flatten(1)).sum(1)
    g_l, a_l, g_r, a_r = overlap
    n, groups, t, o = g_l.shape
    s, i = g_r.shape[2], a_l.shape[3]
    if o == 0:
        return g_l.new_zeros(n)
    same = left is right
    if t == 1 and s == 1:
        # Goodfellow: ⟨g aᵀ, g' a'ᵀ⟩ = (a·a')(g·g')
        a_l, a_r = evaluated(a_l), evaluated(a_r)
        if same:
            grads = squared_row_norms(g_l, dim=-1)  # [n, G, 1]
            if keep is not None:
                keep["gradient_products"] = grads.flatten(1).sum(1)
            products = squared_row_norms(a_l, dim=-1) * grads
        else:
            products = (a_l * a_r).sum(-1) * (g_l * g_r).sum(-1)
        return products.flatten(1).sum(1)
    # what the activations still cost to build (an Unbuilt's), for each form that needs them
    building = _build_cost(a_l) + (0.0 if a_r is a_l else _build_cost(a_r))
    acts_cost = n * groups * t * s * i * COSTS.bmm + building
    from_inputs = same and isinstance(a_l, Unbuilt) and a_l.products_cost() < acts_cost
    if from_inputs:
        acts_cost = a_l.products_cost()
    factored = acts_cost + n * groups * t * s * (o * COSTS.bmm + COSTS.elementwise)
    build = (t if same else t + s) * COSTS.materialise + COSTS.elementwise
    materialised = n * groups * i * o * build + building
    if COSTS.factored_is_cheaper(factored, materialised):
        if not from_inputs:
            a_l, a_r = evaluated(a_l), evaluated(a_r)
        per_example = max(groups * t * s, a_l.products_elements() if from_inputs else 0)
        out, kept = [], []
        for a, b in chunks(n, per_example):
            if from_inputs:
                acts = a_l.products(a, b)  # [b - a, G, t, t]
            else:
                acts = part(a_l, a, b) @ part(a_r, a, b).transpose(2, 3)  # [n, G, t, s]
            grads = part(g_l, a, b) @ part(g_r, a, b).transpose(2, 3)
            out.append((acts * grads).flatten(1).sum(1))
            if keep is not None and same:
                kept.append(grads.flatten(1).sum(1))
        if kept:
            keep["gradient_products"] = cat(kept)
        return cat(out)
    a_l, a_r = evaluated(a_l), evaluated(a_r)
    if same:
        return sum(squared_row_norms(block) for block in materialised_blocks(g_l, a_l, n))
    blocks_l, blocks_r = materialised_blocks(g_l, a_l, 2 * n), materialised_blocks(g_r, a_r, 2 * n)
    pairs = zip(blocks_l, blocks_r, strict=True)
    return sum((block_l * block_r).sum(1) for block_l, block_r in pairs)


def materialised_blocks(gradients: Tensor, activations: Tensor, examples: int):
    """The per-example gradients a feature chunk at a time: [n, G·c·o] blocks for input
    features k..k+c (the gradient is [n, G, i, o]; a reduction adds its blocks' terms).

    Chunks bound the memory, and without a graph to keep one buffer is reused: a fresh
    allocation of the whole [n, G, i, o] costs page faults comparable to the products.
    """
    n, groups, t, o = gradients.shape
    i = activations.shape[3]
    grads3 = gradients.reshape(n * groups, t, o)
    acts3 = activations.reshape(n * groups, t, i).transpose(1, 2)  # [n·G, i, t]
    # the same chunks for both sides of a pair: sized by the examples of both
    step = max(1, min(i, costs.MATERIALISE_ELEMENTS // max(1, examples * groups * o)))
    reuse = not (torch.is_grad_enabled() and (gradients.requires_grad or activations.requires_grad))
    buffer = None
    for k in range(0, i, step):
        c = min(step, i - k)
        if reuse:
            if buffer is None or buffer.shape[1] != c:
                buffer = gradients.new_empty(n * groups, c, o)
            block = torch.bmm(acts3[:, k : k + c], grads3, out=buffer)
        else:
            block = torch.bmm(acts3[:, k : k + c], grads3)
        yield block.view(n, -1)


def outer_inner(left: Outer, right: Outer, same: bool, keep: dict | None = None) -> Tensor:
    """Tensor[n, m]. ``keep`` receives ``"gradient_products"`` [n, m] = g_n·g'_m when the
    factored form of single-position factors formed them (the bias's inner products)."""
    overlap = _row_overlap(left, right)
    if overlap is None:
        return gram(left.materialise().flatten(1), None if same else right.materialise().flatten(1))
    g_l, a_l, g_r, a_r = overlap
    a_l, a_r = evaluated(a_l), evaluated(a_r)
    n, groups, t, o = g_l.shape
    m, s = g_r.shape[0], g_r.shape[2]
    if o == 0:
        return g_l.new_zeros(n, m)
    if COSTS.factored_is_cheaper(*inner_costs(left, right, same)):
        if t == 1 and s == 1 and groups == 1:
            # (a_n·a'_m)(g_n·g'_m); g_n·g'_m is also the bias's inner product
            grads = gram(g_l[:, 0, 0], None if same else g_r[:, 0, 0])
            if keep is not None:
                keep["gradient_products"] = grads
            return gram(a_l[:, 0, 0], None if same else a_r[:, 0, 0]) * grads
        return _outer_inner_factored(g_l, a_l, g_r, a_r)
    if _tileable(left) and _tileable(right) and left.shape == right.shape:
        from impls.factors.blocks import tiled_gram

        return tiled_gram([left], None if same else [right])
    reuse = not (torch.is_grad_enabled() and (g_l.requires_grad or a_l.requires_grad))
    total = None
    if same:
        blocks = ((block, block) for block in materialised_blocks(g_l, a_l, n))
    else:
        blocks_l = materialised_blocks(g_l, a_l, n + m)
        blocks = zip(blocks_l, materialised_blocks(g_r, a_r, n + m), strict=True)
    for block_l, block_r in blocks:
        if total is None:
            total = block_l @ block_r.T
        elif reuse:
            total.addmm_(block_l, block_r.T)
        else:
            total = total + block_l @ block_r.T
    if same and total is not None:
        return _symmetric(total)
    return total


def _tileable(f: Outer) -> bool:
    return f.groups == 1 and len(f.shape) == 2 and (f.full or not f.transposed)


def inner_costs(left: Outer, right: Outer, same: bool) -> tuple[float, float]:
    """(factored, materialised) cost of ⟨left_n, right_m⟩ for all pairs."""
    n, groups, t, o = left.gradients.shape
    m, s, i = right.gradients.shape[0], right.gradients.shape[2], left.source.shape[3]
    factored = n * m * groups * t * s * ((i + o) * COSTS.gemm + COSTS.elementwise)
    build = (n * t if same else n * t + m * s) * COSTS.materialise
    products = n * m * COSTS.gemm
    return factored, groups * i * o * (build + products)


def _symmetric(x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        upper = x.triu()
        return upper + upper.triu(1).T
    return x.triu_().add_(x.triu(1).T)


def _outer_inner_factored(g_l, a_l, g_r, a_r) -> Tensor:
    """Σ_g Σ_{t,s} (a_nt·a'_ms)(g_nt·g'_ms) as [n, m]; chunked over the left examples."""
    n, groups, t, o = g_l.shape
    m, s = g_r.shape[0], g_r.shape[2]
    # [G, m·s, f]: all right positions of a group as one matrix
    right_acts = a_r.permute(1, 0, 2, 3).reshape(groups, m * s, -1)
    right_grads = g_r.permute(1, 0, 2, 3).reshape(groups, m * s, -1)
    out = []
    for a, b in chunks(n, groups * t * m * s):
        left_acts = part(a_l, a, b).permute(1, 0, 2, 3).reshape(groups, (b - a) * t, -1)
        left_grads = part(g_l, a, b).permute(1, 0, 2, 3).reshape(groups, (b - a) * t, -1)
        products = left_acts @ right_acts.transpose(1, 2)
        products = products * (left_grads @ right_grads.transpose(1, 2))
        out.append(products.reshape(groups, b - a, t, m, s).sum((0, 2, 4)))
    return cat(out)


def sums_inner(left: GradientSums, right: GradientSums, same: bool) -> Tensor:
    return gram(left.sums(), None if same else right.sums())


def sums_diagonal(left: GradientSums, right: GradientSums) -> Tensor:
    return (left.sums() * right.sums()).sum(1)


# -- a layer's weight and bias together -----------------------------------------------------------


def is_layer_pair(weight: Factors, bias: Factors) -> bool:
    """Whether ``bias`` is the gradient sums of ``weight`` (one use of a Linear-like layer)."""
    return (
        isinstance(weight, Outer)
        and isinstance(bias, GradientSums)
        and bias.outer is weight
        and bias.scale == 1.0
        and weight.full
    )


def layer_squared_norms(weight: Outer, bias: GradientSums) -> tuple[Tensor, Tensor]:
    """(‖∇W‖², ‖∇b‖²) per example, the bias from the products the weight's reduction formed."""
    keep: dict = {}
    weight_norms = outer_diagonal(weight, weight, keep)
    bias_norms = keep.get("gradient_products")
    if bias_norms is None:
        bias_norms = bias.squared_norms()
    return weight_norms, bias_norms


def layer_inner(
    weights: tuple[Outer, Outer], biases: tuple[GradientSums, GradientSums], same: bool
) -> tuple[Tensor, Tensor]:
    """(⟨∇W_n, ∇W'_m⟩, ⟨∇b_n, ∇b'_m⟩) as [n, m] each."""
    keep: dict = {}
    weight_inner = outer_inner(weights[0], weights[1], same, keep)
    bias_inner = keep.get("gradient_products")
    if bias_inner is None:
        bias_inner = sums_inner(biases[0], biases[1], same)
    return weight_inner, bias_inner


def dense_of(factors: Factors) -> Dense:
    return factors if isinstance(factors, Dense) else Dense(factors.materialise())
