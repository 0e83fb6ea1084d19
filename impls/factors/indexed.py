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
from impls.factors.costs import COSTS, chunks, gram, squared_row_norms
from impls.factors.outer import Outer


@dataclass(eq=False)
class Indexed(Factors):
    """Σ_p e_{row_p} values_pᵀ over the entries p with ``example_p = n``.

    example [P] and row [P] (long), values [P, d]; the parameter is [num_rows, d].
    """

    example: Tensor
    row: Tensor
    values: Tensor
    batch_size: int
    num_rows: int
    _aggregated: tuple | None = field(default=None, repr=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, self.values.shape[-1]))

    @property
    def keys(self) -> Tensor:
        return self.example * self.num_rows + self.row

    def placed(self, shape, row_start):
        if len(shape) != 2 or shape[1] != self.values.shape[-1]:
            return super().placed(shape, row_start)
        return Indexed(self.example, self.row + row_start, self.values, self.batch_size, shape[0])

    def materialize(self) -> Tensor:
        n, v, d = self.batch_size, self.num_rows, self.values.shape[-1]
        flat = self.values.new_zeros(n * v, d).index_add(0, self.keys, self.values)
        return flat.reshape(n, v, d)

    def aggregated(self) -> tuple[Tensor, Tensor, Tensor]:
        """(example [K], row [K], values [K, d]): entries with equal (example, row) summed."""
        if self._aggregated is None:
            unique, inverse = torch.unique(self.keys, return_inverse=True)
            values = self.values.new_zeros(unique.shape[0], self.values.shape[-1])
            values = values.index_add(0, inverse, self.values)
            self._aggregated = (unique // self.num_rows, unique % self.num_rows, values)
        return self._aggregated

    def squared_norms(self) -> Tensor:
        n, entries, d = self.batch_size, self.values.shape[0], self.values.shape[-1]
        # a dense [n·V, d] buffer, or sorting the P entries' keys (counted as 4·P·d)
        if not COSTS.factored_is_cheaper(4 * entries, n * self.num_rows):
            flat = self.values.new_zeros(n * self.num_rows, d).index_add(0, self.keys, self.values)
            return squared_row_norms(flat).reshape(n, self.num_rows).sum(1)
        example, _, values = self.aggregated()
        return values.new_zeros(n).index_add(0, example, squared_row_norms(values))


def indexed_diagonal(left: Indexed, right: Indexed) -> Tensor:
    keys_l, keys_r = left.keys, right.keys
    unique, inverse = torch.unique(torch.cat([keys_l, keys_r]), return_inverse=True)
    d = left.values.shape[-1]
    sums_l = left.values.new_zeros(unique.shape[0], d).index_add(
        0, inverse[: keys_l.shape[0]], left.values
    )
    sums_r = left.values.new_zeros(unique.shape[0], d).index_add(
        0, inverse[keys_l.shape[0] :], right.values
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
        return gram(left.materialize().flatten(1), None if same else right.materialize().flatten(1))
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
    """Σ_p Σ_s g_{n,s}[row_p] (values_p·a_{n,s}) over the entries p of example n."""
    grads, acts = right.gradients[:, 0], right.activations[:, 0]  # [n, s, V], [n, s, d]
    out = left.values.new_zeros(left.batch_size)
    entries, s, d = left.values.shape[0], acts.shape[1], acts.shape[2]
    for a, b in chunks(entries, s * d):
        ex, row = left.example[a:b], left.row[a:b]
        dots = (acts[ex] @ left.values[a:b].unsqueeze(-1)).squeeze(-1)  # [p, s]
        weights = grads[ex, :, row]  # [p, s]: g_{n,s}[row_p]
        out = out.index_add(0, ex, (dots * weights).sum(1))
    return out


def indexed_outer_inner(left: Indexed, right: Outer) -> Tensor:
    """Σ_p Σ_s g'_{m,s}[row_p] (values_p·a'_{m,s}) as [n, m]."""
    grads, acts = right.gradients[:, 0], right.activations[:, 0]  # [m, s, V], [m, s, d]
    m, s = acts.shape[0], acts.shape[1]
    flat_acts = acts.reshape(m * s, -1)
    flat_grads = grads.reshape(m * s, -1)
    out = left.values.new_zeros(left.batch_size, m)
    for a, b in chunks(left.values.shape[0], m * s):
        dots = left.values[a:b] @ flat_acts.T  # [p, m·s]
        weights = flat_grads[:, left.row[a:b]].T  # [p, m·s]
        out = out.index_add(0, left.example[a:b], (dots * weights).reshape(b - a, m, s).sum(2))
    return out
