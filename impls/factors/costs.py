"""The cost model that picks, per pair of factors and per quantity, between a factored form and
materialising the per-example gradients; and the sizes reductions work in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Costs:
    """Relative seconds per multiply-add of each kind of work.

    ``gemm``: one large matrix product (a Gram matrix across examples); ``bmm``: many small
    per-example products (the T x T products of the factored forms); ``materialise``: building
    per-example gradients a feature chunk at a time; ``elementwise``: a streaming pass (squares,
    products, sums, zero fills).

    Measured in CPU time at 1 thread on the shared 2-core development machine (its elapsed times
    were too noisy), each form forced in turn: for the norms of a Linear the two
    forms cost the same near T ≈ 1.2·i·o/(i+o) (factored T²(i+o) per example against T·i·o),
    which these constants reproduce; for the Gram matrix near n·T²·(i+o) ≈ T·i·o·1.2 + n·i·o
    (n = 128: T ≈ 12 at i = o = 256, where the per-norm rule 2T² ≤ i·o would pick the factored
    form up to T = 181 and run 90x slower).
    """

    gemm: float = 1.0
    bmm: float = 1.5
    materialise: float = 1.8
    elementwise: float = 4.0
    #: "factored" or "materialised" overrides the choice (for measurements and tests)
    force: str | None = None
    #: when a list, every decision appends its (factored, materialised) estimates (the floor's
    #: search skips forms predicted far slower than the choice)
    decisions: list | None = None

    def factored_is_cheaper(self, factored: float, materialised: float) -> bool:
        if self.decisions is not None:
            self.decisions.append((factored, materialised))
        if self.force is not None:
            return self.force == "factored"
        return factored <= materialised


COSTS = Costs()

#: largest intermediate (elements) a reduction builds at once; bigger work is chunked
CHUNK_ELEMENTS = 1 << 24
#: elements of per-example gradients materialised at once (a feature chunk of every example)
MATERIALISE_ELEMENTS = 1 << 22


def chunks(total: int, per_item: int):
    """Ranges over ``total`` items such that ``per_item`` elements each fit one chunk."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def part(x: Tensor, a: int, b: int) -> Tensor:
    """x[a:b], without a slicing op when that is all of x."""
    return x if a == 0 and b == x.shape[0] else x[a:b]


def cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def squared_row_norms(x: Tensor, dim: int = 1) -> Tensor:
    """Σ_j x[:, j]² for x [n, D] (along ``dim``): a fused norm (no [n, D] temporary, several
    times faster than ``x.pow(2).sum(1)``: 37 against 142 us on [1024, 784] at 2 threads),
    unless the result must be differentiable: the norm's gradient at a zero row is not that of
    its square."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x.pow(2).sum(dim)
    return torch.linalg.vector_norm(x, dim=dim).square()


def gram(x: Tensor, y: Tensor | None = None) -> Tensor:
    """x [n, D] @ y [n', D]ᵀ; ``y=None``: x xᵀ, symmetric by construction.

    One product: computing only the blocks above the diagonal was measured slower on CPU (the
    product with few rows and a long D runs near peak only in one piece). BLAS kernels need not
    give bit-identical (i, j) and (j, i) entries, so the upper triangle is mirrored.
    """
    if y is not None:
        return x @ y.T
    product = x @ x.T
    if torch.is_grad_enabled() and product.requires_grad:
        upper = product.triu()
        return upper + upper.triu(1).T
    return product.triu_().add_(product.triu(1).T)
