"""ghost: the factored reductions (every branch, against materialised gradients), the
MultiheadAttention projections, tied and reused parameters, and differentiable results.

The zoo-wide agreement with the oracle is ``correctness``' job; here each branch the cost model
can take is forced (``COSTS.force``) and intermediates are chunked small (``CHUNK_ELEMENTS``), so
that the zoo's small sizes do not leave a path untested.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import impls
from impls import Unsupported
from impls._capture import parameter_factors
from impls.base import Implementation
from impls.factors import (
    Dense,
    GradientSums,
    Indexed,
    Outer,
    Sum,
    combine,
    costs,
    diagonal,
    gram,
    inner,
    layer_inner,
    layer_squared_norms,
)
from impls.tests.conftest import DOUBLE
from impls.tests.conftest import ce as _ce

FORCES = [None, "factored", "materialised"]


@pytest.fixture(params=FORCES, ids=lambda f: f or "cost-model")
def force(request, monkeypatch):
    """Each branch of the cost model, with intermediates chunked into small pieces."""
    monkeypatch.setattr(costs.COSTS, "force", request.param)
    monkeypatch.setattr(costs, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(costs, "MATERIALISE_ELEMENTS", 40)
    return request.param


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _reference_inner(left, right):
    return left.materialise().flatten(1) @ right.materialise().flatten(1).T


def _check_pair(left, right, *, diagonal_too):
    _close(inner(left, right), _reference_inner(left, right))
    _close(inner(right, left), _reference_inner(right, left))
    _close(inner(left, left, same=True), _reference_inner(left, left))
    _close(left.squared_norms(), left.materialise().flatten(1).pow(2).sum(1))
    if diagonal_too:
        want = (left.materialise().flatten(1) * right.materialise().flatten(1)).sum(1)
        _close(diagonal(left, right), want)
        _close(diagonal(right, left), want)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


# -- factor-level: every pair of kinds, every branch ---------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("t, s", [(1, 1), (3, 2), (4, 1)])
def test_outer_pairs(force, groups, t, s):
    o, i = 3, 5
    shape = (groups * o, i)
    left = Outer(_randn(4, groups, t, o, seed=0), _randn(4, groups, t, i, seed=1), shape)
    right = Outer(_randn(3, groups, s, o, seed=2), _randn(3, groups, s, i, seed=3), shape)
    same_batch = Outer(_randn(4, groups, s, o, seed=4), _randn(4, groups, s, i, seed=5), shape)
    _check_pair(left, right, diagonal_too=False)
    _check_pair(left, same_batch, diagonal_too=True)


@pytest.mark.parametrize("t, s", [(1, 1), (3, 2)])
def test_bias_gradient_sums(force, t, s):
    """The bias, alone and reduced together with its weight (reusing the products of output
    gradients the weight's factored form formed)."""
    left = Outer(_randn(4, 2, t, 3, seed=0), _randn(4, 2, t, 5, seed=1), (6, 5))
    right = Outer(_randn(3, 2, s, 3, seed=2), _randn(3, 2, s, 5, seed=3), (6, 5))
    bias_l, bias_r = GradientSums(left, (6,)), GradientSums(right, (6,))
    _close(bias_l.materialise(), left.gradients.sum(2).reshape(4, 6))
    _check_pair(bias_l, bias_r, diagonal_too=False)
    weight_norms, bias_norms = layer_squared_norms(left, bias_l)
    _close(weight_norms, left.squared_norms())
    _close(bias_norms, bias_l.squared_norms())
    for (a, b), (c, d), same in (((left, right), (bias_l, bias_r), False),
                                 ((left, left), (bias_l, bias_l), True)):  # fmt: skip
        weight_inner, bias_inner = layer_inner((a, b), (c, d), same)
        _close(weight_inner, _reference_inner(a, b))
        _close(bias_inner, _reference_inner(c, d))
    merged = combine([bias_l, GradientSums(Outer(left.gradients, left.activations, (6, 5)), (6,))])
    _close(merged.materialise(), 2 * bias_l.materialise())


def test_outer_materialise_matches_per_example_sum():
    grads, acts = _randn(2, 2, 3, 4, seed=0), _randn(2, 2, 3, 5, seed=1)
    got = Outer(grads, acts, (8, 5)).materialise()
    want = torch.einsum("ngto,ngti->ngoi", grads, acts).reshape(2, 8, 5)
    _close(got, want)
    transposed = Outer(grads[:, :1], acts[:, :1], (5, 4), transposed=True).materialise()
    _close(transposed, want[:, :4].transpose(1, 2))
    padded = Outer(grads[:, :1], acts[:, :1], (9, 5), row_start=3).materialise()
    _close(padded[:, 3:7], want[:, :4])
    assert padded[:, :3].abs().sum() == 0 and padded[:, 7:].abs().sum() == 0


@pytest.mark.parametrize("starts", [(0, 4), (0, 2), (1, 3), (2, 2)])
def test_outer_row_slices(force, starts):
    """Projections of a packed weight: rows [start, start + width) of a [9, 5] parameter."""
    (a, b), width = starts, 4
    left = Outer(_randn(3, 1, 2, width, seed=0), _randn(3, 1, 2, 5, seed=1), (9, 5), a)
    right = Outer(_randn(2, 1, 3, width + 1, seed=2), _randn(2, 1, 3, 5, seed=3), (9, 5), b)
    twin = Outer(_randn(3, 1, 1, width + 1, seed=4), _randn(3, 1, 1, 5, seed=5), (9, 5), b)
    _check_pair(left, right, diagonal_too=False)
    _check_pair(left, twin, diagonal_too=True)
    total = combine([left, twin])
    _check_pair(total, combine([right, Dense(_randn(2, 9, 5, seed=6))]), diagonal_too=False)


def _indexed(n, t, vocab, d, seed, padding=None):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, t), generator=gen)
    tokens[0, -1] = tokens[0, 0]  # a repeated token within an example
    values = _randn(n, t, d, seed=seed + 100)
    keep = None if padding is None else tokens != padding
    return Indexed(tokens, values, vocab, keep)


@pytest.mark.parametrize("vocab", [3, 40])
def test_indexed_pairs(force, vocab):
    left = _indexed(4, 5, vocab, 3, seed=0, padding=1)
    right = _indexed(3, 2, vocab, 3, seed=1)
    same_batch = _indexed(4, 3, vocab, 3, seed=2)
    _check_pair(left, right, diagonal_too=False)
    _check_pair(left, same_batch, diagonal_too=True)


@pytest.mark.parametrize("t", [1, 3])
def test_indexed_outer_pairs(force, t):
    """An Embedding tied to a Linear decoder: token rows against outer products."""
    vocab, d = 7, 4
    embedding = _indexed(3, 4, vocab, d, seed=0, padding=2)
    decoder = Outer(_randn(3, 1, t, vocab, seed=1), _randn(3, 1, t, d, seed=2), (vocab, d))
    other = Outer(_randn(2, 1, t, vocab, seed=3), _randn(2, 1, t, d, seed=4), (vocab, d))
    _check_pair(embedding, decoder, diagonal_too=True)
    _check_pair(embedding, other, diagonal_too=False)
    tied = combine([embedding, decoder])
    assert isinstance(tied, Sum)
    _check_pair(tied, combine([_indexed(2, 3, vocab, d, seed=5), other]), diagonal_too=False)


def test_combine_merges_uses_of_one_form():
    a = Outer(_randn(2, 1, 3, 4, seed=0), _randn(2, 1, 3, 5, seed=1), (4, 5))
    b = Outer(_randn(2, 1, 1, 4, seed=2), _randn(2, 1, 1, 5, seed=3), (4, 5))
    merged = combine([a, b])
    assert isinstance(merged, Outer) and merged.positions == 4
    _close(merged.materialise(), a.materialise() + b.materialise())
    assert isinstance(combine([_indexed(2, 3, 5, 2, 0), _indexed(2, 1, 5, 2, 1)]), Indexed)
    dense = combine([Dense(_randn(2, 3, seed=0)), Dense(_randn(2, 3, seed=1))])
    assert isinstance(dense, Dense)


@pytest.mark.parametrize("n", [5, 64, 130])
def test_symmetric_gram(n):
    x = _randn(n, 7, seed=n)
    _close(gram(x), x @ x.T)
    assert torch.equal(gram(x), gram(x).T)


# -- MultiheadAttention --------------------------------------------------------------------------


class Attend(nn.Module):
    """One MultiheadAttention called as ``mode`` says, on sequences [B, T, E] (or [T, B, E])."""

    def __init__(self, mode="self", batch_first=True, **options):
        super().__init__()
        self.mode, self.batch_first = mode, batch_first
        kdim = options.get("kdim") or 6
        self.q = nn.Linear(3, 6)
        self.k = nn.Linear(3, kdim)
        self.v = nn.Linear(3, options.get("vdim") or 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first, **options)
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # x [B, T, 3]
        q, k, v = torch.tanh(self.q(x)), torch.tanh(self.k(x[:, :4])), torch.tanh(self.v(x[:, :4]))
        if not self.batch_first:
            q, k, v = (y.transpose(0, 1) for y in (q, k, v))
        if self.mode == "self":
            a, _ = self.attn(q, q, q)
        elif self.mode == "self_no_weights":  # what transformer layers call
            a, _ = self.attn(q, q, q, need_weights=False)
        elif self.mode == "kv":  # key is value, query differs (encoder-decoder)
            a, _ = self.attn(q, k, k, need_weights=False)
        elif self.mode == "twice":  # self-attention, then cross-attention: two calls, one weight
            h, _ = self.attn(q, q, q, need_weights=False)
            a, _ = self.attn(h, k, v, need_weights=False)
        else:
            a, _ = self.attn(q, k, v, need_weights=False)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.head(a.mean(1))


ATTENTION_MODELS = {
    "self_packed": dict(mode="self"),
    "self_no_weights": dict(mode="self_no_weights"),
    "self_no_weights_seq_first_no_bias": dict(
        mode="self_no_weights", batch_first=False, bias=False
    ),
    "self_seq_first": dict(mode="self", batch_first=False),
    "key_is_value": dict(mode="kv"),
    "qkv_distinct": dict(mode="qkv"),
    "kdim_vdim": dict(mode="qkv", kdim=5, vdim=4),
    "no_bias": dict(mode="qkv", bias=False),
    "called_twice": dict(mode="twice"),
    "bias_kv_zero_attn": dict(mode="qkv", add_bias_kv=True, add_zero_attn=True),
}


def _attention_problem(name, frozen=()):
    torch.manual_seed(0)
    model = Attend(**ATTENTION_MODELS[name]).double()
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 5, 3, generator=gen, dtype=DOUBLE), torch.tensor([0, 1, 1, 0]))
    other = (torch.randn(3, 5, 3, generator=gen, dtype=DOUBLE), torch.tensor([1, 0, 1]))
    return model, batch, other


def _agree(name, model, batch, other, reference="naive"):
    impl, ref = impls.get(name), impls.get(reference)
    got = impl.norms(model, _ce, batch, per_param=True)
    want = ref.norms(model, _ce, batch, per_param=True)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)
    for args in ((), (other,)):
        torch.testing.assert_close(
            impl.inner(model, _ce, batch, *args), ref.inner(model, _ce, batch, *args),
            rtol=1e-9, atol=1e-12,
        )  # fmt: skip


def _attention_factors(model, batch):
    """The attention's parameters' factors, by local name."""
    factors = {}
    parameter_factors(Implementation._side(model, batch), _ce, False, factors.update)
    return {n.removeprefix("attn."): f for n, f in factors.items() if n.startswith("attn.")}


@pytest.mark.parametrize("name", sorted(ATTENTION_MODELS))
def test_attention_projections_agree_with_naive(force, name):
    model, batch, other = _attention_problem(name)
    _agree("ghost", model, batch, other)
    _agree("hooks", model, batch, other)
    factors = _attention_factors(model, batch)
    assert factors, "the projections were not recorded"
    for local in ("in_proj_weight", "q_proj_weight", "out_proj.weight"):
        if local in factors:
            assert isinstance(factors[local], (Outer, Sum)), local
    if "bias_k" in factors:  # not a projection: from where it meets the batch (a cat)
        assert isinstance(factors["bias_k"], Dense)


@pytest.mark.parametrize("name", sorted(ATTENTION_MODELS))
def test_plain_self_attention_takes_the_short_route(monkeypatch, name):
    """Self-attention without masks or weights runs as its three calls; every other call of the
    module runs PyTorch's own forward, copied (and agrees with naive either way, above)."""
    from impls.layers import attention

    copied = []
    original = attention._followable_attention_forward

    def counted():
        copied.append(1)
        return original()

    monkeypatch.setattr(attention, "_followable_attention_forward", counted)
    model, batch, _ = _attention_problem(name)
    impls.get("ghost").norms(model, _ce, batch)
    assert (not copied) == name.startswith("self_no_weights"), copied


class EncoderDecoder(nn.Module):
    """nn.TransformerEncoderLayer and a norm-first nn.TransformerDecoderLayer (cross-attention
    of a shorter query on the encoder's memory)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(
            8, 2, 16, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(self.decoder(h[:, :3], self.encoder(h)).mean(1))


@pytest.mark.parametrize("train", [True, False])
def test_transformer_layers_agree_with_naive(train):
    torch.manual_seed(0)
    model = EncoderDecoder().double().train(train)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 20, (4, 5), generator=gen), torch.tensor([0, 1, 2, 0]))
    other = (torch.randint(0, 20, (3, 5), generator=gen), torch.tensor([2, 1, 0]))
    _agree("ghost", model, batch, other)


def test_attention_with_frozen_projection():
    model, batch, other = _attention_problem("key_is_value", frozen={"attn.in_proj_weight"})
    _agree("ghost", model, batch, other)
    factors = _attention_factors(model, batch)
    assert "in_proj_weight" not in factors and isinstance(factors["out_proj.weight"], Outer)


def test_attention_cross_checkpoint():
    model, batch, other = _attention_problem("qkv_distinct")
    torch.manual_seed(5)
    other_model = Attend(mode="qkv").double()
    got = impls.get("ghost").inner(model, _ce, batch, other, other_model=other_model)
    want = impls.get("naive").inner(model, _ce, batch, other, other_model=other_model)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_attention_recording_leaves_nothing_behind():
    model, batch, _ = _attention_problem("self_packed")
    linear, forward = F.linear, F.multi_head_attention_forward
    impls.get("ghost").norms(model, _ce, batch)
    assert F.linear is linear and F.multi_head_attention_forward is forward
    assert torch._C._len_torch_function_stack() == 0  # no mode left on this thread
    # another thread running the module meanwhile records nothing and computes the same
    results = {}

    def run():
        with torch.no_grad():
            results["other"] = model(batch[0])

    worker = threading.Thread(target=run)
    worker.start()
    impls.get("ghost").inner(model, _ce, batch)
    worker.join()
    with torch.no_grad():
        torch.testing.assert_close(results["other"], model(batch[0]))


def test_attention_on_unbatched_input_is_refused():
    """A 2-D query (one sequence shared by the batch) has no per-example projections."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # x [B, 4]
            a, _ = self.attn(x[:3], x[:3], x[:3])
            return self.head(x + a.mean(0))

    batch = (torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1]))
    with pytest.raises(Unsupported):
        impls.get("ghost").norms(Shared(), _ce, batch)


# -- recurrent layers -----------------------------------------------------------------------------


class Recur(nn.Module):
    def __init__(self, kind, batch_first=True, initial_state=False, **options):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, batch_first=batch_first, **options)
        self.batch_first, self.initial_state = batch_first, initial_state
        directions = 2 if options.get("bidirectional") else 1
        layers = options.get("num_layers", 1)
        self.h0 = nn.Linear(3, 4 * directions * layers)
        self.head = nn.Linear(4 * directions, 2)

    def forward(self, x):  # x [B, T, 3]
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.initial_state:  # a per-example initial state computed from the input
            h = torch.tanh(self.h0(x[:, 0])).reshape(x.shape[0], -1, 4).transpose(0, 1)
            state = (h.contiguous(), torch.zeros_like(h)) if isinstance(self.rnn, nn.LSTM) else h
            out, _ = self.rnn(seq, state.contiguous() if torch.is_tensor(state) else state)
        else:
            out, _ = self.rnn(seq)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


RECURRENT = {
    "lstm": dict(kind="LSTM"),
    "lstm_seq_first_bidirectional_2layers": dict(
        kind="LSTM", batch_first=False, bidirectional=True, num_layers=2
    ),
    "lstm_no_bias_initial_state": dict(kind="LSTM", bias=False, initial_state=True),
    "gru_bidirectional": dict(kind="GRU", bidirectional=True),
    "gru_initial_state_2layers": dict(kind="GRU", initial_state=True, num_layers=2),
    "rnn_tanh": dict(kind="RNN"),
    "rnn_relu_2layers": dict(kind="RNN", nonlinearity="relu", num_layers=2),
}


def _recurrent_problem(name):
    torch.manual_seed(0)
    model = Recur(**RECURRENT[name]).double()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 5, 3, generator=gen, dtype=DOUBLE), torch.tensor([0, 1, 1, 0]))
    other = (torch.randn(3, 5, 3, generator=gen, dtype=DOUBLE), torch.tensor([1, 0, 1]))
    return model, batch, other


def _recurrent_factors(model, batch):
    """The recurrent layer's parameters' factors, by local name."""
    factors = {}
    parameter_factors(Implementation._side(model, batch), _ce, False, factors.update)
    return {n.removeprefix("rnn."): f for n, f in factors.items() if n.startswith("rnn.")}


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_recurrent_projections_agree_with_naive(force, name):
    model, batch, other = _recurrent_problem(name)
    _agree("ghost", model, batch, other)
    _agree("hooks", model, batch, other)
    factors = _recurrent_factors(model, batch)
    assert isinstance(factors["weight_hh_l0"], Outer)  # every step's use, merged
    if "bias_hh_l0" in factors:  # each step's gradient sums, added
        assert isinstance(factors["bias_hh_l0"], (GradientSums, Dense))


def test_lstm_projection_is_recorded(force):
    torch.manual_seed(0)
    model = Recur("LSTM", proj_size=2, num_layers=2).double()
    model.head = nn.Linear(2, 2).double()
    _, batch, other = _recurrent_problem("lstm")
    _agree("ghost", model, batch, other)
    factors = _recurrent_factors(model, batch)
    assert isinstance(factors["weight_hr_l1"], Outer)


class FinalStates(nn.Module):
    """An LSTM whose initial h_0 and c_0 are computed from the input, and whose output, h_n and
    c_n all reach the loss: every gradient path of the fast LSTM route (the cell updates'
    backward through time, c_0's gradient, h_0's through the hidden projection)."""

    def __init__(self, **options):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True, **options)
        layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
        self.start = nn.Linear(3, 8 * layers)
        self.head = nn.Linear(4 * (2 if options.get("bidirectional") else 1), 2)

    def forward(self, x):
        h0, c0 = torch.tanh(self.start(x[:, 0])).reshape(x.shape[0], -1, 2, 4).unbind(2)
        out, (h_n, c_n) = self.rnn(x, (h0.transpose(0, 1).contiguous(),
                                       c0.transpose(0, 1).contiguous()))  # fmt: skip
        summary = (h_n * c_n).sum(0).sum(-1, keepdim=True)
        return self.head(out.mean(1)) + summary


@pytest.mark.parametrize("options", [{}, dict(num_layers=2, bidirectional=True)])
def test_lstm_final_states_and_initial_cells_agree_with_naive(options):
    torch.manual_seed(0)
    model = FinalStates(**options).double()
    _, batch, other = _recurrent_problem("lstm")
    _agree("ghost", model, batch, other)
    _agree("hooks", model, batch, other)
    _agree("function", model, batch, other)


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_hidden_projection_is_not_computed_twice(bias):
    """The fast LSTM route computes every step's h_{t-1} W_hhᵀ once, in its scan, and records
    W_hh's use with the gates' gradient: the capture's forward multiplies exactly as much as the
    layer (the input projections and one hidden product per step) and the head, and the
    factors still agree with naive's per-example gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    from impls._capture import captured_forward

    torch.manual_seed(0)
    model = Recur("LSTM", bias=bias).double()
    _, batch, other = _recurrent_problem("lstm")
    n, steps, features = batch[0].shape
    hidden, classes = 4, 2
    with FlopCounterMode(display=False) as counter:
        captured_forward(Implementation._side(model, batch), _ce, False)
    layer = 2 * n * steps * 4 * hidden * (features + hidden)
    assert counter.get_total_flops() == layer + 2 * n * hidden * classes
    _agree("ghost", model, batch, other)


def test_recurrent_dropout_in_training_is_left_to_the_kernel():
    """Dropout between layers in training: the fused kernel runs, nothing is recorded, and the
    vmap fallback refuses (its masks would differ per example) — never a wrong number."""
    torch.manual_seed(0)
    model = Recur("LSTM", num_layers=2, dropout=0.5).double()
    _, batch, _ = _recurrent_problem("lstm")
    with pytest.raises(Unsupported, match="vmap fallback"):
        impls.get("ghost").norms(model, _ce, batch)


# -- tied and reused parameters ------------------------------------------------------------------


class TiedPadded(nn.Module):
    """Embedding (with padding_idx) tied to a decoder, the embedding also used a second time."""

    def __init__(self, vocab=9, dim=4, padding_idx=0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mix = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens) + self.embed(tokens.flip(1)).mean(1, True)))
        return self.decoder(h).mean(1)


class ReusedAcrossShapes(nn.Module):
    """One Linear on a [B, 5] input and on a [B, 3, 5] input; one Conv1d called twice."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.conv = nn.Conv1d(2, 2, 3, padding=1, groups=2)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x [B, 3, 5]
        z = torch.tanh(self.conv(torch.tanh(self.conv(x[:, :2]))))
        h = torch.tanh(self.shared(x.mean(1))) + torch.tanh(self.shared(x)).mean(1)
        return self.head(h + z.mean(1))


def _tied_problem(padding_idx=0):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 9, (4, 5), generator=gen)
    tokens[::2, -2:] = 0
    other = torch.randint(0, 9, (3, 5), generator=gen)
    return (
        TiedPadded(padding_idx=padding_idx).double(),
        (tokens, torch.tensor([0, 1, 2, 3])),
        (other, torch.tensor([4, 5, 6])),
    )


def _reused_problem():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 3, 5, generator=gen, dtype=DOUBLE), torch.tensor([0, 1, 2, 0]))
    other = (torch.randn(2, 3, 5, generator=gen, dtype=DOUBLE), torch.tensor([2, 1]))
    return ReusedAcrossShapes().double(), batch, other


@pytest.mark.parametrize("problem", [_tied_problem, _reused_problem], ids=["tied", "reused"])
def test_tied_and_reused_parameters(force, problem):
    model, batch, other = problem()
    _agree("ghost", model, batch, other)


# -- differentiable results ----------------------------------------------------------------------


def _gradcheck(model, compute):
    params = tuple(p for p in model.parameters() if p.requires_grad)
    assert torch.autograd.gradcheck(
        lambda *inputs: compute(), params, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize(
    "problem",
    [
        lambda: _attention_problem("self_packed"),
        lambda: _attention_problem("kdim_vdim"),
        # no padding_idx: autograd defines the padding row's gradient as zero although the
        # forward reads it, so finite differences would disagree with any implementation there
        lambda: _tied_problem(padding_idx=None),
        _reused_problem,
        lambda: _recurrent_problem("lstm_no_bias_initial_state"),
        lambda: _recurrent_problem("gru_bidirectional"),
    ],
    ids=["attention_self", "attention_kdim", "tied", "reused", "lstm", "gru"],
)
@pytest.mark.parametrize("forced", ["factored", "materialised"])
def test_gradcheck(monkeypatch, problem, forced):
    monkeypatch.setattr(costs.COSTS, "force", forced)
    model, batch, other = problem()
    ghost = impls.get("ghost")
    _gradcheck(model, lambda: ghost.norms(model, _ce, batch, create_graph=True))
    _gradcheck(model, lambda: ghost.inner(model, _ce, batch, create_graph=True))
    _gradcheck(model, lambda: ghost.inner(model, _ce, batch, other, create_graph=True))


def test_create_graph_result_has_a_graph_and_the_model_is_untouched():
    model, batch, _ = _attention_problem("called_twice")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    value = impls.get("ghost").inner(model, _ce, batch, create_graph=True).sum()
    value.backward()
    assert all(p.grad is not None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


# -- refusals ------------------------------------------------------------------------------------


def test_refuses_batchnorm_in_train_mode_and_accounts_for_a_parent_reading_a_weight():
    ghost = impls.get("ghost")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(Unsupported, match="BatchNorm1d"):
        ghost.norms(model, _ce, batch)

    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return F.linear(x, self.fc.weight) + self.fc(x)

    # the parent's F.linear with its child's weight is a use like the child's own: both count
    model = Outside().double()
    batch = (batch[0].double(), batch[1])
    other = (torch.randn(2, 3, dtype=DOUBLE), torch.tensor([1, 0]))
    _agree("ghost", model, batch, other)
    _agree("hooks", model, batch, other)


def test_a_layers_weight_and_bias_are_reduced_together(monkeypatch):
    """Each Linear's bias is reduced with its weight, from the products the weight's factored
    form builds (the whole parameter's factors are the use's own, not a copy)."""
    from impls.factors import groups

    joint = []
    monkeypatch.setattr(groups, "layer_squared_norms", _counted(groups.layer_squared_norms, joint))
    monkeypatch.setattr(groups, "layer_inner", _counted(groups.layer_inner, joint))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(5, 3, dtype=DOUBLE), torch.tensor([0, 1, 1, 0, 1]))
    ghost = impls.get("ghost")
    ghost.norms(model, _ce, batch)
    assert len(joint) == 2
    ghost.inner(model, _ce, batch)
    assert len(joint) == 4


def _counted(function, calls: list):
    def counted(*args, **kwargs):
        calls.append(function.__name__)
        return function(*args, **kwargs)

    return counted


class NeverCalled(nn.Module):
    """``spare`` is trainable but never called: its per-example gradients are zero."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 2)

    def forward(self, x):
        return self.body(x)


def test_a_parameter_never_used_has_zero_norms():
    torch.manual_seed(0)
    model, batch = NeverCalled().double(), (torch.randn(5, 4, dtype=DOUBLE), torch.arange(5) % 3)
    got = impls.get("ghost").norms(model, _ce, batch, per_param=True)
    want = impls.get("naive").norms(model, _ce, batch, per_param=True)
    assert list(got) == list(want) == ["body.weight", "body.bias", "spare.weight", "spare.bias"]
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    assert not got["spare.weight"].any() and not got["spare.bias"].any()
    total = impls.get("ghost").norms(model, _ce, batch)
    torch.testing.assert_close(total, impls.get("naive").norms(model, _ce, batch))
