"""Exact or refused, never a wrong number and never a crash: regression tests for the defects
measured on real models (issue 9), for every implementation.

1. a module no rule knows, called on a tensor shared by all examples whose length equals the
   batch size, must not be mistaken for a batched call;
2. a model that rewrites its parameters in forward (Embedding max_norm) is refused and the
   caller's parameters come back unchanged;
3. what torch.func cannot batch (activation checkpointing, max_norm) is refused by ``vmap``;
4. only failures raised inside a peer library's own code become refusals;
and custom autograd Functions and reentrant checkpointing, whose forward hides what their
backward differentiates, are refused rather than half counted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import impls
from correctness import oracle
from correctness.harness import relative_error
from impls import Unsupported
from impls.peers.support import library_errors
from impls.tests.conftest import DOUBLE
from impls.tests.conftest import ce as _ce

NAMES = impls.names()


def _backward_per_example(model, batch):
    """name -> Tensor[B, *shape] by ``loss.backward()`` per example (reentrant checkpointing
    works with backward() only)."""
    x, y = batch
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        _ce(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def _exact_or_refused(name, model, batch, tolerance=1e-9, reference=None):
    """The implementation's norms and Gram agree with the float64 oracle, or it refuses."""
    grads = (reference or oracle.per_example_gradients)(model, _ce, batch)
    references = (oracle.norms(grads), oracle.inner(grads, grads))
    impl = impls.get(name)
    for compute, reference in zip(
        (lambda: impl.norms(model, _ce, batch), lambda: impl.inner(model, _ce, batch)),
        references,
        strict=True,
    ):
        try:
            value = compute()
        except Unsupported as refusal:
            assert str(refusal) and "\n" not in str(refusal)
            continue
        assert relative_error(value, reference) <= tolerance, name


# -- 1. the vmap fallback follows the batch, not the sizes ----------------------------------------


class Gate(nn.Module):
    """F.prelu (no rule) on the batch, plus a table shared by all examples."""

    def __init__(self, channels=4):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.1, 0.4, channels))

    def forward(self, x, shared):  # x [B, C, T], shared [T, T] (T == B here)
        return F.prelu(x, self.weight) + shared.sum(0)


class SharedTableNet(nn.Module):
    def __init__(self, length=5):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.gate = Gate()
        self.table = nn.Parameter(torch.randn(length, length) / length)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x [B, T, 3]
        positions = torch.arange(x.shape[1])
        h = self.gate(self.inp(x).transpose(1, 2), self.table[positions])
        return self.head(h.mean(-1))


@pytest.mark.parametrize("name", NAMES)
def test_a_fallback_call_with_a_shared_argument_as_long_as_the_batch(name):
    torch.manual_seed(0)
    model = SharedTableNet().double()
    batch = (torch.randn(5, 5, 3, dtype=DOUBLE), torch.tensor([0, 1, 2, 0, 1]))
    _exact_or_refused(name, model, batch)
    if name in ("ghost", "hooks"):  # the capability, not only the absence of a wrong number
        impls.get(name).norms(model, _ce, batch)


# -- 2. parameters rewritten in forward -----------------------------------------------------------


class MaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, max_norm=0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


@pytest.mark.parametrize("name", NAMES)
def test_a_model_rewriting_its_weight_is_refused_and_the_weight_restored(name):
    torch.manual_seed(0)
    model = MaxNorm()
    model.embed.weight.data.mul_(5)  # rows well above max_norm: a forward would rescale them
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = (torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(Unsupported, match="max_norm"):
        impls.get(name).norms(model, _ce, batch)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


# -- 3. what torch.func cannot batch --------------------------------------------------------------


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Linear(4, 4)
        self.inner = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)  # the checkpointed function's input requires grad
        h = checkpoint(lambda h: torch.tanh(self.inner(h)), h, use_reentrant=self.reentrant)
        return self.head(h)


class EmbeddingLSTM(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 12, batch_first=True, **options)
        self.head = nn.Linear(12 * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0][:, -1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reentrant", [False, True], ids=["checkpoint", "reentrant_checkpoint"])
def test_activation_checkpointing_is_exact_or_refused(name, reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant).double()
    batch = (torch.randn(4, 4, dtype=DOUBLE), torch.tensor([0, 1, 2, 0]))
    reference = (lambda m, loss_fn, b: _backward_per_example(m, b)) if reentrant else None
    _exact_or_refused(name, model, batch, reference=reference)


def test_vmap_refuses_what_torch_func_cannot_batch():
    vmap = impls.get("vmap")
    batch = (torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(Unsupported, match="saved tensor hooks"):
        vmap.norms(Checkpointed(False), _ce, batch)
    tokens = (torch.randint(0, 20, (4, 3)), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(Unsupported, match="max_norm"):
        vmap.norms(MaxNorm(), _ce, tokens)


@pytest.mark.parametrize("options", [{}, {"num_layers": 2}, {"bidirectional": True}], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_embedding_then_batch_first_lstm(name, options):
    torch.manual_seed(0)
    model = EmbeddingLSTM(**options).double()
    batch = (torch.randint(0, 20, (5, 4)), torch.tensor([0, 1, 2, 0, 1]))
    _exact_or_refused(name, model, batch)


# -- custom autograd Functions --------------------------------------------------------------------


class ScaledMatmul(torch.autograd.Function):
    """x @ wᵀ with a hand-written backward: its forward runs with autograd off."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.T

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.transpose(-1, -2) @ x


class CustomFunctionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return ScaledMatmul.apply(torch.tanh(self.inp(x)), self.weight)


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_inside_a_custom_function_is_never_half_counted(name):
    torch.manual_seed(0)
    model = CustomFunctionNet().double()
    batch = (torch.randn(4, 4, dtype=DOUBLE), torch.tensor([0, 1, 2, 0]))
    _exact_or_refused(name, model, batch)


# -- 4. library failures, and our own --------------------------------------------------------------


def test_only_failures_inside_the_library_become_refusals():
    from opacus.grad_sample import utils as opacus_utils  # any function of the library

    with pytest.raises(Unsupported, match="Opacus failed"):
        with library_errors("Opacus", "opacus"):
            opacus_utils.wrap_model(torch.nn.Linear(2, 2), grad_sample_mode="no-such-mode")
    with pytest.raises(KeyError):  # raised by pegbench's own code around the library call
        with library_errors("Opacus", "opacus"):
            {}["missing"]
    with pytest.raises(RuntimeError):  # raised by torch for the caller, not within the library
        with library_errors("Opacus", "opacus"):
            torch.zeros(2).view(3)
