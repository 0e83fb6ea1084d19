"""Per-example gradients of one parameter kept as factors, and the reductions between two.

A rule describes example n's gradient of one parameter, from one call, as one of

- :class:`Dense`:   values [n, *shape], the gradient itself (small parameters, vmap fallback);
- :class:`Outer`:   Σ_t rows_nt cols_ntᵀ per group: rows [n, G, t, o], cols [n, G, t, i]
  (Linear: G = 1, rows = output gradients g, cols = inputs a; Conv: unfolded patches per
  group), placed at rows ``row_start`` of a larger parameter (MultiheadAttention's packed
  in_proj_weight) when asked;
- :class:`Indexed`: Σ_p e_{row_p} values_pᵀ over the entries p of example n (Embedding: one
  entry per non-padding position);
- :class:`RowSums`: Σ_t rows_nt of an Outer (the bias beside a weight), reusing the products
  of rows the weight's reductions formed;
- :class:`Sum`: several of the above (a parameter used at places whose forms differ).

:func:`inner` (Tensor[n, n'], two batches) and :func:`diagonal` (Tensor[n], two factors of one
batch: the cross term of a parameter used at two places) choose per pair and per quantity between
the factored form and materialising, by the cost model :data:`COSTS`. Between a Linear's factors
the factored form is ⟨∇W ℓ_n, ∇W ℓ'_m⟩ = Σ_{t,s} (a_nt·a'_ms)(g_nt·g'_ms).

The sum of several uses of one parameter is :func:`combine`: the uses that share a form are
merged (the same layer called twice: positions concatenated), the rest form a :class:`Sum`
whose reductions add the cross terms between its parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# -- the cost model ----------------------------------------------------------------------------


@dataclass
class Costs:
    """Relative seconds per multiply-add of each kind of work.

    ``gemm``: one large matrix product (a Gram matrix across examples); ``bmm``: many small
    per-example products (the T x T products of the factored forms); ``materialise``: building
    per-example gradients a feature chunk at a time; ``elementwise``: a streaming pass (squares,
    products, sums, zero fills).

    Measured (``python -m impls.tests.perf_ghost --calibrate --threads 1 --clock cpu``, on the
    shared 2-core development machine, whose elapsed times were too noisy): for the norms of a
    Linear the two forms cost the same near T ≈ 1.2·i·o/(i+o) (factored T²(i+o) per example
    against T·i·o), which these constants reproduce; for the Gram matrix near
    n·T²·(i+o) ≈ T·i·o·1.2 + n·i·o (n = 128: T ≈ 12 at i = o = 256, where the per-norm rule
    2T² ≤ i·o would pick the factored form up to T = 181 and run 90x slower).
    """

    gemm: float = 1.0
    bmm: float = 1.5
    materialise: float = 1.8
    elementwise: float = 4.0
    #: "factored" or "materialised" overrides the choice (for measurements and tests)
    force: str | None = None

    def factored_is_cheaper(self, factored: float, materialised: float) -> bool:
        if self.force is not None:
            return self.force == "factored"
        return factored <= materialised


COSTS = Costs()

#: largest intermediate (elements) a reduction builds at once; bigger work is chunked
CHUNK_ELEMENTS = 1 << 24
#: elements of per-example gradients materialised at once (a feature chunk of every example)
MATERIALISE_ELEMENTS = 1 << 22


def _chunks(total: int, per_item: int):
    """Ranges over ``total`` items such that ``per_item`` elements each fit one chunk."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _part(x: Tensor, a: int, b: int) -> Tensor:
    """x[a:b], without a slicing op when that is all of x."""
    return x if a == 0 and b == x.shape[0] else x[a:b]


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def squared_row_norms(x: Tensor) -> Tensor:
    """Σ_j x[:, j]² for x [n, D]: a fused norm (no [n, D] temporary, several times faster than
    ``x.pow(2).sum(1)``), unless the result must be differentiable: the norm's gradient at a
    zero row is not that of its square."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x.pow(2).sum(1)
    return torch.linalg.vector_norm(x, dim=1).square()


# -- the factor kinds ---------------------------------------------------------------------------


class Factors:
    """Example n's gradient of one parameter (Tensor[*shape]) for n in the batch, unevaluated."""

    batch_size: int
    shape: torch.Size

    def materialize(self) -> Tensor:
        """Tensor[n, *shape]: every example's gradient."""
        raise NotImplementedError

    def squared_norms(self) -> Tensor:
        """Tensor[n]: ‖example n's gradient‖²."""
        return squared_row_norms(self.materialize().flatten(1))


@dataclass(eq=False)
class Dense(Factors):
    values: Tensor  # [n, *shape]

    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape[1:]

    def materialize(self) -> Tensor:
        return self.values

    def squared_norms(self) -> Tensor:
        return squared_row_norms(self.values.flatten(1))


@dataclass(eq=False)
class Outer(Factors):
    """Σ_t rows_nt cols_ntᵀ per group g, rows [n, G, t, o], cols [n, G, t, i].

    The gradient of group g fills rows g·o .. (g+1)·o of ``weight.flatten(1)`` (the layout of a
    grouped convolution's weight), starting at parameter row ``row_start``; other rows are zero.
    """

    rows: Tensor
    cols: Tensor
    shape: torch.Size
    row_start: int = 0

    def __post_init__(self):
        if self.rows.shape[:3] != self.cols.shape[:3]:
            raise ValueError(f"factor shapes differ: {self.rows.shape} vs {self.cols.shape}")
        self.shape = torch.Size(self.shape)
        # products of the rows a reduction formed, for the bias (:class:`RowSums`) to reuse:
        # "norms" -> [n]: Σ_g Σ_{t,s} g_t·g_s per example; id(other) -> (other, [n, m]) with
        # Σ_{t,s} g_t·g'_s between the examples of two factors
        self.row_products: dict = {}

    @property
    def batch_size(self) -> int:
        return self.rows.shape[0]

    @property
    def groups(self) -> int:
        return self.rows.shape[1]

    @property
    def positions(self) -> int:
        return self.rows.shape[2]

    @property
    def features(self) -> tuple[int, int]:
        """(o, i): output and input features per group."""
        return self.rows.shape[3], self.cols.shape[3]

    @property
    def full(self) -> bool:
        """Whether the factors cover every row of the parameter."""
        return self.row_start == 0 and self.groups * self.features[0] == self.shape[0]

    def squared_norms(self) -> Tensor:
        return _outer_diagonal(self, self)

    def materialize(self) -> Tensor:
        n = self.batch_size
        blocks = (self.rows.transpose(2, 3) @ self.cols).reshape(n, -1, self.features[1])
        if self.full:
            return blocks.reshape(n, *self.shape)
        height = self.shape[0]
        inner = math.prod(self.shape[1:])
        top, bottom = self.row_start, height - self.row_start - blocks.shape[1]
        padded = torch.nn.functional.pad(blocks.reshape(n, -1, inner), (0, 0, top, bottom))
        return padded.reshape(n, *self.shape)


@dataclass(eq=False)
class RowSums(Factors):
    """Σ_t rows_nt of an :class:`Outer`, [n, G·o]: the bias next to a Linear or Conv weight.

    ‖Σ_t g_t‖² = Σ_{t,s} g_t·g_s: the weight's factored reductions already formed these
    products (``Outer.row_products``), so the bias reuses them when they are there (the weight
    is reduced first: parameters are visited in their module's order).
    """

    outer: Outer
    shape: torch.Size

    @property
    def batch_size(self) -> int:
        return self.outer.batch_size

    def materialize(self) -> Tensor:
        return self.outer.rows.sum(2).reshape(self.batch_size, *self.shape)

    def squared_norms(self) -> Tensor:
        products = self.outer.row_products.get("norms")
        if products is not None:
            return products
        return super().squared_norms()


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

    def __post_init__(self):
        self._aggregated = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, self.values.shape[-1]))

    @property
    def keys(self) -> Tensor:
        return self.example * self.num_rows + self.row

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


@dataclass(eq=False)
class Sum(Factors):
    """Σ_k parts_k: one parameter used at several places whose factors cannot be merged."""

    parts: list[Factors]

    @property
    def batch_size(self) -> int:
        return self.parts[0].batch_size

    @property
    def shape(self) -> torch.Size:
        return self.parts[0].shape

    def materialize(self) -> Tensor:
        return sum(p.materialize() for p in self.parts)

    def squared_norms(self) -> Tensor:
        # ‖Σ_k F_k‖² = Σ_k ‖F_k‖² + 2 Σ_{k<l} ⟨F_k, F_l⟩ per example
        total = None
        for k, f in enumerate(self.parts):
            value = f.squared_norms()
            for g in self.parts[k + 1 :]:
                value = value + 2 * diagonal(f, g)
            total = value if total is None else total + value
        return total


# -- pairwise reductions ------------------------------------------------------------------------


def inner(left: Factors, right: Factors, *, same: bool = False) -> Tensor:
    """Tensor[n, n']: ⟨left example n's gradient, right example m's⟩.

    ``same``: ``left is right`` (a Gram matrix); the result is symmetric and computed so.
    """
    if isinstance(left, Sum) and same:
        total = None
        for k, f in enumerate(left.parts):
            value = inner(f, f, same=True)
            for g in left.parts[k + 1 :]:
                cross = inner(f, g)
                value = value + cross + cross.T
            total = value if total is None else total + value
        return total
    if isinstance(left, Sum):
        return sum(inner(f, right) for f in left.parts)
    if isinstance(right, Sum):
        return sum(inner(left, g) for g in right.parts)
    if isinstance(left, Outer) and isinstance(right, Outer):
        return _outer_inner(left, right, same)
    if isinstance(left, RowSums) and isinstance(right, RowSums):
        partner, products = left.outer.row_products.get(id(right.outer), (None, None))
        if partner is right.outer:
            return products
    if isinstance(left, Indexed) and isinstance(right, Indexed):
        return _indexed_inner(left, right, same)
    if isinstance(left, Indexed) and isinstance(right, Outer) and _tied_ok(right):
        return _indexed_outer_inner(left, right)
    if isinstance(left, Outer) and isinstance(right, Indexed) and _tied_ok(left):
        return _indexed_outer_inner(right, left).T
    return gram(left.materialize().flatten(1), None if same else right.materialize().flatten(1))


def diagonal(left: Factors, right: Factors) -> Tensor:
    """Tensor[n]: ⟨left example n's gradient, right example n's⟩ (two factors of one batch)."""
    if left.batch_size != right.batch_size:
        raise ValueError("diagonal() needs two factors of the same batch")
    if left is right:
        return left.squared_norms()
    if isinstance(left, Sum):
        return sum(diagonal(f, right) for f in left.parts)
    if isinstance(right, Sum):
        return sum(diagonal(left, g) for g in right.parts)
    if isinstance(left, Outer) and isinstance(right, Outer):
        return _outer_diagonal(left, right)
    if isinstance(left, Indexed) and isinstance(right, Indexed):
        return _indexed_diagonal(left, right)
    if isinstance(left, Indexed) and isinstance(right, Outer) and _tied_ok(right):
        return _indexed_outer_diagonal(left, right)
    if isinstance(left, Outer) and isinstance(right, Indexed) and _tied_ok(left):
        return _indexed_outer_diagonal(right, left)
    return (left.materialize().flatten(1) * right.materialize().flatten(1)).sum(1)


def gram(x: Tensor, y: Tensor | None = None) -> Tensor:
    """x [n, D] @ y [n', D]ᵀ (``y=None``: x xᵀ).

    One product: computing only the blocks above the diagonal of x xᵀ was measured slower on CPU
    (the product with few rows and a long D runs near peak only in one piece).
    """
    return x @ (x if y is None else y).T


# -- Outer x Outer ------------------------------------------------------------------------------


def _row_overlap(left: Outer, right: Outer) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The two factors restricted to the parameter rows both cover, as (rows, cols) pairs."""
    same_layout = left.row_start == right.row_start and left.groups == right.groups
    if same_layout and left.features[0] == right.features[0]:
        return left.rows, left.cols, right.rows, right.cols
    if left.groups != 1 or right.groups != 1:
        return None  # grouped factors of different layouts: the caller materialises
    lo = max(left.row_start, right.row_start)
    hi = min(left.row_start + left.features[0], right.row_start + right.features[0])
    if hi <= lo:
        return left.rows[..., :0], left.cols, right.rows[..., :0], right.cols
    ls, rs = lo - left.row_start, lo - right.row_start
    width = hi - lo
    return left.rows[..., ls : ls + width], left.cols, right.rows[..., rs : rs + width], right.cols


def _outer_diagonal(left: Outer, right: Outer) -> Tensor:
    overlap = _row_overlap(left, right)
    if overlap is None:
        return (left.materialize().flatten(1) * right.materialize().flatten(1)).sum(1)
    rows_l, cols_l, rows_r, cols_r = overlap
    n, groups, t, o = rows_l.shape
    s, i = rows_r.shape[2], cols_l.shape[3]
    if o == 0:
        return rows_l.new_zeros(n)
    same = left is right
    if t == 1 and s == 1:
        # Goodfellow: ⟨g aᵀ, g' a'ᵀ⟩ = (a·a')(g·g')
        if same:
            rows = rows_l.pow(2).sum(-1)  # [n, G, 1]
            if left.full:
                left.row_products["norms"] = rows.flatten(1).sum(1)
            products = cols_l.pow(2).sum(-1) * rows
        else:
            products = (cols_l * cols_r).sum(-1) * (rows_l * rows_r).sum(-1)
        return products.flatten(1).sum(1)
    factored = n * groups * t * s * ((i + o) * COSTS.bmm + COSTS.elementwise)
    build = (t if same else t + s) * COSTS.materialise + COSTS.elementwise
    materialised = n * groups * i * o * build
    if COSTS.factored_is_cheaper(factored, materialised):
        out, row_products = [], []
        keep = same and left.full  # the bias beside this weight reuses Σ_{t,s} g_t·g_s
        for a, b in _chunks(n, groups * t * s):
            cols = _part(cols_l, a, b) @ _part(cols_r, a, b).transpose(2, 3)  # [n, G, t, s]
            rows = _part(rows_l, a, b) @ _part(rows_r, a, b).transpose(2, 3)
            out.append((cols * rows).flatten(1).sum(1))
            if keep:
                row_products.append(rows.flatten(1).sum(1))
        if keep:
            left.row_products["norms"] = _cat(row_products)
        return _cat(out)
    if same:
        return sum(squared_row_norms(block) for block in _materialised(rows_l, cols_l, n))
    blocks_l, blocks_r = _materialised(rows_l, cols_l, 2 * n), _materialised(rows_r, cols_r, 2 * n)
    pairs = zip(blocks_l, blocks_r, strict=True)
    return sum((block_l * block_r).sum(1) for block_l, block_r in pairs)


def _materialised(rows: Tensor, cols: Tensor, examples: int):
    """The per-example gradients a feature chunk at a time: [n, G·c·o] blocks for input
    features k..k+c (the gradient is [n, G, i, o]; a reduction adds its blocks' terms).

    Chunks bound the memory, and without a graph to keep one buffer is reused: a fresh
    allocation of the whole [n, G, i, o] costs page faults comparable to the products.
    """
    n, groups, t, o = rows.shape
    i = cols.shape[3]
    rows3 = rows.reshape(n * groups, t, o)
    cols3 = cols.reshape(n * groups, t, i).transpose(1, 2)  # [n·G, i, t]
    # the same chunks for both sides of a pair: sized by the examples of both
    step = max(1, min(i, MATERIALISE_ELEMENTS // max(1, examples * groups * o)))
    reuse = not (torch.is_grad_enabled() and (rows.requires_grad or cols.requires_grad))
    buffer = None
    for k in range(0, i, step):
        c = min(step, i - k)
        if reuse:
            if buffer is None or buffer.shape[1] != c:
                buffer = rows.new_empty(n * groups, c, o)
            block = torch.bmm(cols3[:, k : k + c], rows3, out=buffer)
        else:
            block = torch.bmm(cols3[:, k : k + c], rows3)
        yield block.view(n, -1)


def _outer_inner(left: Outer, right: Outer, same: bool) -> Tensor:
    overlap = _row_overlap(left, right)
    if overlap is None:
        return gram(left.materialize().flatten(1), None if same else right.materialize().flatten(1))
    rows_l, cols_l, rows_r, cols_r = overlap
    n, groups, t, o = rows_l.shape
    m, s, i = rows_r.shape[0], rows_r.shape[2], cols_l.shape[3]
    if o == 0:
        return rows_l.new_zeros(n, m)
    factored = n * m * groups * t * s * ((i + o) * COSTS.gemm + COSTS.elementwise)
    build = (n * t if same else n * t + m * s) * COSTS.materialise
    products = n * m * COSTS.gemm
    materialised = groups * i * o * (build + products)
    if COSTS.factored_is_cheaper(factored, materialised):
        if t == 1 and s == 1 and groups == 1:
            # (a_n·a'_m)(g_n·g'_m); g_n·g'_m is also the bias's inner product
            rows = rows_l[:, 0, 0] @ rows_r[:, 0, 0].T
            if left.full and right.full:
                left.row_products[id(right)] = (right, rows)
            return (cols_l[:, 0, 0] @ cols_r[:, 0, 0].T) * rows
        return _outer_inner_factored(rows_l, cols_l, rows_r, cols_r)
    reuse = not (torch.is_grad_enabled() and (rows_l.requires_grad or cols_l.requires_grad))
    total = None
    if same:
        blocks = ((block, block) for block in _materialised(rows_l, cols_l, n))
    else:
        blocks_l = _materialised(rows_l, cols_l, n + m)
        blocks = zip(blocks_l, _materialised(rows_r, cols_r, n + m), strict=True)
    for block_l, block_r in blocks:
        if total is None:
            total = block_l @ block_r.T
        elif reuse:
            total.addmm_(block_l, block_r.T)
        else:
            total = total + block_l @ block_r.T
    return total


def _outer_inner_factored(rows_l, cols_l, rows_r, cols_r) -> Tensor:
    """Σ_g Σ_{t,s} (a_nt·a'_ms)(g_nt·g'_ms) as [n, m]; chunked over the left examples."""
    n, groups, t, o = rows_l.shape
    m, s = rows_r.shape[0], rows_r.shape[2]
    # [G, m·s, f]: all right positions of a group as one matrix
    right_cols = cols_r.permute(1, 0, 2, 3).reshape(groups, m * s, -1)
    right_rows = rows_r.permute(1, 0, 2, 3).reshape(groups, m * s, -1)
    out = []
    for a, b in _chunks(n, groups * t * m * s):
        left_cols = _part(cols_l, a, b).permute(1, 0, 2, 3).reshape(groups, (b - a) * t, -1)
        left_rows = _part(rows_l, a, b).permute(1, 0, 2, 3).reshape(groups, (b - a) * t, -1)
        products = left_cols @ right_cols.transpose(1, 2)
        products = products * (left_rows @ right_rows.transpose(1, 2))
        out.append(products.reshape(groups, b - a, t, m, s).sum((0, 2, 4)))
    return _cat(out)


# -- Indexed x Indexed --------------------------------------------------------------------------


def _indexed_diagonal(left: Indexed, right: Indexed) -> Tensor:
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


def _indexed_inner(left: Indexed, right: Indexed, same: bool) -> Tensor:
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
    return out.reshape(n + 1, m + 1)[:n, :m]


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


def _tied_ok(outer: Outer) -> bool:
    return outer.groups == 1 and outer.full and len(outer.shape) == 2


def _indexed_outer_diagonal(left: Indexed, right: Outer) -> Tensor:
    """Σ_p Σ_s g_{n,s}[row_p] (values_p·a_{n,s}) over the entries p of example n."""
    rows, cols = right.rows[:, 0], right.cols[:, 0]  # [n, s, V], [n, s, d]
    out = left.values.new_zeros(left.batch_size)
    entries, s, d = left.values.shape[0], cols.shape[1], cols.shape[2]
    for a, b in _chunks(entries, s * d):
        ex, row = left.example[a:b], left.row[a:b]
        dots = (cols[ex] @ left.values[a:b].unsqueeze(-1)).squeeze(-1)  # [p, s]
        weights = rows[ex, :, row]  # [p, s]: g_{n,s}[row_p]
        out = out.index_add(0, ex, (dots * weights).sum(1))
    return out


def _indexed_outer_inner(left: Indexed, right: Outer) -> Tensor:
    """Σ_p Σ_s g'_{m,s}[row_p] (values_p·a'_{m,s}) as [n, m]."""
    rows, cols = right.rows[:, 0], right.cols[:, 0]  # [m, s, V], [m, s, d]
    m, s = cols.shape[0], cols.shape[1]
    flat_cols = cols.reshape(m * s, -1)
    flat_rows = rows.reshape(m * s, -1)
    out = left.values.new_zeros(left.batch_size, m)
    for a, b in _chunks(left.values.shape[0], m * s):
        dots = left.values[a:b] @ flat_cols.T  # [p, m·s]
        weights = flat_rows[:, left.row[a:b]].T  # [p, m·s]
        out = out.index_add(0, left.example[a:b], (dots * weights).reshape(b - a, m, s).sum(2))
    return out


# -- several uses of one parameter --------------------------------------------------------------


def combine(factors: list[Factors]) -> Factors:
    """The sum of the uses of one parameter. Uses that share a form are merged (Outer with the
    same groups, features and rows, and Indexed: positions concatenated; Dense: added); the
    rest stay parts of a :class:`Sum`, whose reductions add the cross terms.
    """
    merged: list[Factors] = []
    for f in factors:
        for part in f.parts if isinstance(f, Sum) else [f]:
            for k, g in enumerate(merged):
                joined = _join(g, part)
                if joined is not None:
                    merged[k] = joined
                    break
            else:
                merged.append(part)
    return merged[0] if len(merged) == 1 else Sum(merged)


def _join(a: Factors, b: Factors) -> Factors | None:
    if isinstance(a, Dense) and isinstance(b, Dense):
        return Dense(a.values + b.values)
    if isinstance(a, Outer) and isinstance(b, Outer):
        if a.row_start == b.row_start and a.groups == b.groups and a.features == b.features:
            rows, cols = torch.cat([a.rows, b.rows], 2), torch.cat([a.cols, b.cols], 2)
            return Outer(rows, cols, a.shape, a.row_start)
        return None
    if isinstance(a, (Dense, RowSums)) and isinstance(b, (Dense, RowSums)):
        return Dense(a.materialize() + b.materialize())
    if isinstance(a, Indexed) and isinstance(b, Indexed) and a.num_rows == b.num_rows:
        return Indexed(
            torch.cat([a.example, b.example]),
            torch.cat([a.row, b.row]),
            torch.cat([a.values, b.values]),
            a.batch_size,
            a.num_rows,
        )
    return None
