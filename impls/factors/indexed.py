"""Indexed rows: an Embedding's weight, and its pairing with an Outer of the same parameter (an
Embedding tied to a Linear decoder).

Example n's gradient is Σ_p e_{row_p} values_pᵀ over the entries p with example_p = n (one
entry per non-padding position). Norms sum each example's values per distinct row (O(T·D), no
vocabulary-sized tensor); inner products pair the entries of equal rows,
Σ_{t,s}[x_nt = x'_ms](g_nt·g'_ms), or materialise when the vocabulary is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from impls.factors.base import Factors
from impls.factors.costs import COSTS, cat, chunks, gram, squared_row_norms
from impls.factors.outer import Outer


@dataclass(eq=False)
class Indexed(Factors):
    """Σ_t e_{rows_nt} values_ntᵀ over the positions t of example n that are kept.

    rows [n, t] (long), values [n, t, d], keep [n, t] (bool, None: every position); the
    parameter is [num_rows, d]. :attr:`example`, :attr:`row` and :attr:`entries` give the same
    sum as a flat list of the kept entries.
    """

    rows: Tensor
    values: Tensor
    num_rows: int
    keep: Tensor | None = None
    _entries: tuple | None = field(default=None, repr=False)
    _aggregated: tuple | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.rows.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, self.values.shape[-1]))

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(example [P], row [P], values [P, d]) of the kept positions."""
        if self._entries is None:
            n, t = self.rows.shape
            example = torch.arange(n, device=self.rows.device).repeat_interleave(t)
            row, values = self.rows.reshape(-1), self.values.reshape(n * t, -1)
            if self.keep is not None:
                kept = self.keep.reshape(-1)
                example, row, values = example[kept], row[kept], values[kept]
            self._entries = (example, row, values)
        return self._entries

    @property
    def example(self) -> Tensor:
        return self.entries()[0]

    @property
    def row(self) -> Tensor:
        return self.entries()[1]

    @property
    def keys(self) -> Tensor:
        example, row, _ = self.entries()
        return example * self.num_rows + row

    def kept_values(self) -> Tensor:
        """values [n, t, d] with the dropped positions zeroed."""
        if self.keep is None:
            return self.values
        return self.values * self.keep.unsqueeze(-1).to(self.values.dtype)

    def tensors(self) -> list[Tensor]:
        return [self.values]

    def _converted(self, dtype, converted):
        return Indexed(self.rows, self.values.to(dtype), self.num_rows, self.keep)

    def placed(self, shape, row_start):
        whole = row_start == 0 and tuple(shape) == tuple(self.shape)
        if whole or len(shape) != 2 or shape[1] != self.values.shape[-1]:
            return super().placed(shape, row_start)  # (the whole parameter: itself)
        return Indexed(self.rows + row_start, self.values, shape[0], self.keep)

    def materialise(self) -> Tensor:
        n, v, d = self.batch_size, self.num_rows, self.values.shape[-1]
        _, _, values = self.entries()
        flat = values.new_zeros(n * v, d).index_add(0, self.keys, values)
        return flat.reshape(n, v, d)

    def aggregated(self) -> tuple[Tensor, Tensor, Tensor]:
        """(example [K], row [K], values [K, d]): entries with equal (example, row) summed."""
        if self._aggregated is None:
            _, _, entry_values = self.entries()
            unique, inverse = torch.unique(self.keys, return_inverse=True)
            values = entry_values.new_zeros(unique.shape[0], entry_values.shape[-1])
            values = values.index_add(0, inverse, entry_values)
            self._aggregated = (unique // self.num_rows, unique % self.num_rows, values)
        return self._aggregated

    def squared_norms(self) -> Tensor:
        n, d = self.batch_size, self.values.shape[-1]
        entries = self.rows.numel()
        # a dense [n·V, d] buffer, or sorting the P entries' keys (counted as 4·P·d)
        if not COSTS.factored_is_cheaper(4 * entries, n * self.num_rows):
            _, _, values = self.entries()
            flat = values.new_zeros(n * self.num_rows, d).index_add(0, self.keys, values)
            return squared_row_norms(flat).reshape(n, self.num_rows).sum(1)
        example, _, values = self.aggregated()
        return values.new_zeros(n).index_add(0, example, squared_row_norms(values))


def indexed_diagonal(left: Indexed, right: Indexed) -> Tensor:
    keys_l, keys_r = left.keys, right.keys
    values_l, values_r = left.entries()[2], right.entries()[2]
    unique, inverse = torch.unique(torch.cat([keys_l, keys_r]), return_inverse=True)
    d = values_l.shape[-1]
    sums_l = values_l.new_zeros(unique.shape[0], d).index_add(
        0, inverse[: keys_l.shape[0]], values_l
    )
    sums_r = values_l.new_zeros(unique.shape[0], d).index_add(
        0, inverse[keys_l.shape[0] :], values_r
    )
    products = (sums_l * sums_r).sum(1)
    return products.new_zeros(left.batch_size).index_add(0, unique // left.num_rows, products)


def indexed_inner(left: Indexed, right: Indexed, same: bool) -> Tensor:
    """Σ_v ⟨rows of token v in n, in m⟩ = Σ_{t,s}[x_nt = x'_ms](g_nt·g'_ms): per token, the
    products between the examples that contain it (blocks), or dense when the vocabulary is small.
    """
    n, m, v, d = left.batch_size, right.batch_size, left.num_rows, left.values.shape[-1]
    ex_l, row_l, val_l = left.aggregated()
    ex_r, row_r, val_r = (ex_l, row_l, val_l) if same else right.aggregated()
    counts_l = torch.bincount(row_l, minlength=v)
    counts_r = counts_l if same else torch.bincount(row_r, minlength=v)
    shared = torch.nonzero((counts_l > 0) & (counts_r > 0)).flatten()
    caps_l, caps_r = _power_of_two(counts_l[shared]), _power_of_two(counts_r[shared])
    by_blocks = int((caps_l * caps_r).sum()) * d * COSTS.bmm
    dense = (n * v * d + (0 if same else m * v * d)) * COSTS.elementwise
    dense += n * m * v * d * COSTS.gemm
    if not COSTS.factored_is_cheaper(by_blocks, dense):
        return gram(left.materialise().flatten(1), None if same else right.materialise().flatten(1))
    # tokens in buckets of equal (capacity left, capacity right), capacities powers of two: one
    # batched product per bucket, padding at most doubling each side
    buckets = torch.log2(caps_l.double()).long() * 64 + torch.log2(caps_r.double()).long()
    slot = torch.empty(v, dtype=torch.long, device=row_l.device)
    bucket_of = torch.full((v,), -1, dtype=torch.long, device=row_l.device)
    bucket_of[shared] = buckets
    rank_l, rank_r = _rank_within_row(row_l, counts_l), _rank_within_row(row_r, counts_r)
    out = val_l.new_zeros((n + 1) * (m + 1))  # row n / column m: padding's sink
    for key in torch.unique(buckets).tolist():
        tokens = shared[buckets == key]
        slot[tokens] = torch.arange(len(tokens), device=slot.device)
        cap_l, cap_r = 1 << (key // 64), 1 << (key % 64)
        left_block, left_ex = _padded(ex_l, row_l, val_l, rank_l, bucket_of, key, slot,
                                      len(tokens), cap_l, n)  # fmt: skip
        right_block, right_ex = _padded(ex_r, row_r, val_r, rank_r, bucket_of, key, slot,
                                        len(tokens), cap_r, m)  # fmt: skip
        products = left_block @ right_block.transpose(1, 2)  # [tokens, cap_l, cap_r]
        index = left_ex.unsqueeze(2) * (m + 1) + right_ex.unsqueeze(1)
        out = out.index_add(0, index.flatten(), products.flatten())
    result = out.reshape(n + 1, m + 1)[:n, :m]
    if same:  # each pair's blocks were summed in another order: make the result symmetric
        return (result + result.T) / 2
    return result


def _power_of_two(counts: Tensor) -> Tensor:
    """The smallest power of two >= each count (counts >= 1)."""
    return torch.pow(2, torch.ceil(torch.log2(counts.double()))).long()


def _rank_within_row(row: Tensor, counts: Tensor) -> Tensor:
    """For each entry, how many entries of the same row come before it."""
    order = torch.argsort(row, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(row)
    rank[order] = torch.arange(len(row), device=row.device) - starts[row[order]]
    return rank


def _padded(example, row, values, rank, bucket_of, key, slot, tokens, cap, sink):
    """The entries of a bucket's tokens as [tokens, cap, d] (zeros where a token has fewer than
    ``cap`` entries) and their examples [tokens, cap] (``sink`` for padding).
    """
    mine = bucket_of[row] == key
    where = (slot[row[mine]], rank[mine])
    block = values.new_zeros(tokens, cap, values.shape[-1]).index_put(where, values[mine])
    examples = torch.full((tokens, cap), sink, dtype=torch.long, device=row.device)
    return block, examples.index_put(where, example[mine])


# -- Indexed x Outer (an Embedding tied to a Linear decoder) -------------------------------------


def pairs_with_outer(outer: Outer) -> bool:
    return outer.groups == 1 and outer.full and len(outer.shape) == 2 and not outer.transposed


def indexed_outer_diagonal(left: Indexed, right: Outer) -> Tensor:
    """Σ_t Σ_s g_{n,s}[rows_nt] (values_nt·a_{n,s}) per example: [n, t, s] products of values
    and activations, weighted by the decoder's output gradient at each position's row."""
    grads, acts = right.gradients[:, 0], right.activations[:, 0]  # [n, s, V], [n, s, d]
    n, t = left.rows.shape
    s = acts.shape[1]
    values, rows = left.kept_values(), left.rows
    out = []
    for a, b in chunks(n, t * s):
        dots = values[a:b] @ acts[a:b].transpose(1, 2)  # [n, t, s]
        weights = grads[a:b].gather(2, rows[a:b].unsqueeze(1).expand(b - a, s, t))  # [n, s, t]
        out.append((dots * weights.transpose(1, 2)).sum((1, 2)))
    return cat(out)


def indexed_outer_inner(left: Indexed, right: Outer) -> Tensor:
    """Σ_t Σ_s g'_{m,s}[rows_nt] (values_nt·a'_{m,s}) as [n, m]."""
    grads, acts = right.gradients[:, 0], right.activations[:, 0]  # [m, s, V], [m, s, d]
    m, s = acts.shape[0], acts.shape[1]
    flat_acts = acts.reshape(m * s, -1)
    flat_grads = grads.reshape(m * s, -1)
    example, row, values = left.entries()
    out = values.new_zeros(left.batch_size, m)
    for a, b in chunks(values.shape[0], m * s):
        dots = values[a:b] @ flat_acts.T  # [p, m·s]
        weights = flat_grads[:, row[a:b]].T  # [p, m·s]
        out = out.index_add(0, example[a:b], (dots * weights).reshape(b - a, m, s).sum(2))
    return out
