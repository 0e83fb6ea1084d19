"""Gram matrices from materialised per-example gradients, one tile at a time.

For a 2-D parameter [rows, columns], a tile is [n, c, r]: columns k..k+c and rows j..j+r of every
example's gradient (transposed: the layout in which an Outer's tile comes out of one batched
product). Tiles are formed and added into the Gram matrix while they are in cache: an Outer's
tile costs c·r·T multiply-adds per example, its Gram update c·r per pair, so small tiles keep the
work compute-bound where whole per-example gradients would stream through memory. Every factor
kind of a 2-D parameter gives its tiles, so the parts of a :class:`~impls.factors.Sum` (a tied
embedding and decoder) are added tile by tile and their Gram matrix formed once, instead of
pairing every two parts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from impls.factors import costs
from impls.factors.base import Dense, Factors
from impls.factors.indexed import Indexed
from impls.factors.outer import Outer, inner_costs

#: columns per tile (the activations' features an Outer's tile reads)
TILE_COLUMNS = 256


def supports(factors: Factors) -> bool:
    """Whether :func:`tiled_gram` can form this factor's tiles."""
    if len(factors.shape) != 2:
        return False
    if isinstance(factors, Outer):
        return factors.groups == 1 and (factors.full or not factors.transposed)
    return isinstance(factors, (Indexed, Dense))


class _Tiles:
    """The tiles of one factor for one column block (its per-block work done once)."""

    def __init__(self, factors: Factors, start: int, width: int):
        self.factors = factors
        self.n = factors.batch_size
        if isinstance(factors, Outer):
            # the parameter's columns come from the activations (W [o, i]) or, transposed
            # (W [i, o], torch.addmm's), from the output gradients
            columns, rows = factors.activations[:, 0], factors.gradients[:, 0]  # [n, t, ·]
            if factors.transposed:
                columns, rows = rows, columns
            self.acts = columns[:, :, start : start + width].transpose(1, 2)  # [n, c, t]
            self.grads = rows  # [n, t, rows]
            self.first = 0 if factors.transposed else factors.row_start
            self.height = rows.shape[2]
        elif isinstance(factors, Indexed):
            example, row, values = factors.entries()
            order = torch.argsort(row, stable=True)
            self.example, self.row = example[order], row[order]
            self.values = values[order][:, start : start + width]  # [p, c]
        else:
            values = factors.materialise()
            self.dense = values[:, :, start : start + width].transpose(1, 2)  # [n, c, rows]

    def add_to(self, tile: Tensor | None, start: int, height: int, differentiable: bool,
               buffer: Tensor | None = None) -> Tensor | None:  # fmt: skip
        """``tile`` + this factor's [n, c, height] tile for rows start..start+height (``tile``
        None: this factor's tile alone, written into ``buffer`` when given, or None where the
        factor is zero there)."""
        f = self.factors
        in_place = tile is not None and not differentiable
        if isinstance(f, Outer):
            lo, hi = max(start, self.first), min(start + height, self.first + self.height)
            if hi <= lo:
                return tile
            grads = self.grads[:, :, lo - self.first : hi - self.first]
            whole = lo == start and hi == start + height
            if whole and in_place:
                return tile.baddbmm_(self.acts, grads)  # accumulate without a temporary
            if whole and tile is None and buffer is not None:
                return torch.bmm(self.acts, grads, out=buffer)  # no fresh pages to fault in
            part = torch.bmm(self.acts, grads)
            if not whole:
                part = torch.nn.functional.pad(part, (lo - start, start + height - hi))
            return part if tile is None else (tile.add_(part) if in_place else tile + part)
        if isinstance(f, Indexed):
            a, b = torch.searchsorted(
                self.row, torch.tensor([start, start + height], device=self.row.device)
            ).tolist()
            if tile is None:
                tile = self.values.new_zeros(self.n, self.values.shape[1], height)
                in_place = not differentiable
            if a == b:
                return tile
            where = (self.example[a:b], self.row[a:b] - start)
            rows_first = tile.transpose(1, 2)  # [n, height, c]: a view of the tile
            if in_place:
                rows_first.index_put_(where, self.values[a:b], accumulate=True)
                return tile
            return rows_first.index_put(where, self.values[a:b], accumulate=True).transpose(1, 2)
        part = self.dense[:, :, start : start + height]
        return part if tile is None else (tile.add_(part) if in_place else tile + part)


def tiled_gram(left: list[Factors], right: list[Factors] | None) -> Tensor:
    """⟨Σ_k left_k, Σ_l right_l⟩ for every pair of examples, [n, m] (``right=None``: the Gram
    matrix of the left sum, symmetric)."""
    rows, columns = left[0].shape
    n = left[0].batch_size
    m = n if right is None else right[0].batch_size
    width = min(columns, TILE_COLUMNS)
    height = max(1, min(rows, costs.MATERIALISE_ELEMENTS // max(1, (n + m) * width)))
    total = None
    buffers = _Buffers(_reference(left))
    # with a graph to keep (create_graph) no buffer is reused or written in place
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for f in (*left, *(right or ())) for t in _tensors(f)
    )
    reuse = not differentiable
    for k in range(0, columns, width):
        c = min(width, columns - k)
        left_tiles = [_Tiles(f, k, c) for f in left]
        right_tiles = None if right is None else [_Tiles(f, k, c) for f in right]
        for j in range(0, rows, height):
            r = min(height, rows - j)
            a = _sum(left_tiles, j, r, differentiable,
                     buffers.get("left", (n, c, r)) if reuse else None)  # fmt: skip
            b = a
            if right_tiles is not None:
                buffer = buffers.get("right", (m, c, r)) if reuse else None
                b = _sum(right_tiles, j, r, differentiable, buffer)
            if a is None or b is None:
                continue
            a, b = a.reshape(n, -1), b.reshape(m, -1)
            if total is None:
                total = a @ b.T
            elif differentiable:
                total = total + a @ b.T
            else:
                total.addmm_(a, b.T)
    if total is None:
        reference = left[0].materialise()
        return reference.new_zeros(n, m)
    if right is None:
        upper = total.triu()
        return upper + upper.triu(1).T
    return total


def _sum(tiles: list[_Tiles], start: int, height: int, differentiable: bool,
         buffer: Tensor | None) -> Tensor | None:  # fmt: skip
    """Σ of the factors' tiles, Outers first (their product is the buffer the others add to)."""
    total = None
    for tiles_of in sorted(tiles, key=lambda t: not isinstance(t.factors, Outer)):
        first = buffer if total is None else None
        total = tiles_of.add_to(total, start, height, differentiable, first)
    return total


class _Buffers:
    """Tile buffers reused across tiles (one per side and shape)."""

    def __init__(self, like: Tensor):
        self.like, self.held = like, {}

    def get(self, side: str, shape: tuple) -> Tensor:
        key = (side, shape)
        if key not in self.held:
            self.held[key] = self.like.new_empty(shape)
        return self.held[key]


def _tensors(f: Factors) -> list[Tensor]:
    if isinstance(f, Outer):
        return [f.gradients, f.activations]
    if isinstance(f, Indexed):
        return [f.values]
    return [f.materialise()]


def _reference(factors: list[Factors]) -> Tensor:
    """A tensor of the factors' dtype, device and autograd state (for new buffers)."""
    f = factors[0]
    if isinstance(f, Outer):
        return f.gradients
    if isinstance(f, Indexed):
        return f.values
    return f.materialise()


def materialising_is_cheaper(parts: list[Factors], same: bool) -> bool:
    """Whether a Sum's Gram matrix is cheaper from its materialised total: when an Outer part
    would be materialised for its own Gram matrix anyway, the cross terms come for free."""
    if not all(supports(p) for p in parts):
        return False
    for p in parts:
        if isinstance(p, Outer):
            factored, materialised = inner_costs(p, p, same)
            if not costs.COSTS.factored_is_cheaper(factored, materialised):
                return True
    return False
