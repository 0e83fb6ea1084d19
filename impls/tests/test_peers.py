"""The peer adapters (opacus, opacus_ghost, backpack): what each library is made to answer, what
it must refuse, and that nothing of it is left behind.

The zoo-wide agreement with the oracle is ``correctness``' job; here are the configurations the
adapters treat specially: swaps, eval mode, rerouted layers, and every known way the libraries
would return a wrong number, each of which must be a refusal naming the module or parameter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import impls
from impls import Unsupported
from impls.tests.conftest import DOUBLE

PEERS = ["opacus", "opacus_ghost", "backpack"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def mse(outputs, targets):
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1)


def seeded(make, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().double()


def classes(shape, b=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g, dtype=DOUBLE), torch.randint(0, k, (b,), generator=g)


def tokens(b=4, t=5, vocab=11, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, t), generator=g)
    return x, torch.randint(0, k, (b,), generator=g)


def agree(name, model, loss_fn, batch, quantities=("norms", "gram")):
    """The adapter's answers equal the naive loop's (float64)."""
    impl, naive = impls.get(name), impls.get("naive")
    for quantity in quantities:
        if quantity == "norms":
            got, want = impl.norms(model, loss_fn, batch), naive.norms(model, loss_fn, batch)
        elif quantity == "per_param":
            got = impl.norms(model, loss_fn, batch, per_param=True)
            want = naive.norms(model, loss_fn, batch, per_param=True)
        else:
            got, want = impl.inner(model, loss_fn, batch), naive.inner(model, loss_fn, batch)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def refuses(name, model, loss_fn, batch, *words, inner=False):
    impl = impls.get(name)
    with pytest.raises(Unsupported) as refusal:
        impl.inner(model, loss_fn, batch) if inner else impl.norms(model, loss_fn, batch)
    message = str(refusal.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# -- models -------------------------------------------------------------------------------------


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.decoder = nn.Linear(6, 11, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, x):
        return self.decoder(torch.tanh(self.embed(x))).mean(1)


class Linear4d(nn.Module):
    """Linear on [B, 2, 3, F]: Opacus's ghost norm sampler returns nothing for it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)).mean((1, 2)))


class LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


class ParentUsesChildWeight(nn.Module):
    """F.linear with a child's weight in the parent's forward: no layer hook sees that use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.fc.weight)) + self.fc(x))


class FlattensBatch(nn.Module):
    """A Linear on [B*T, F]: hooks would count B*T examples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        b = x.shape[0]
        return self.fc(x.reshape(-1, 4)).reshape(b, -1, 3).mean(1)


class NoisyScale(nn.Module):
    """A bare parameter and dropout in one module: Opacus re-runs it through functorch."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return F.dropout(x * self.scale, 0.5, self.training)


class TwoArgScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x, y=None):
        return x * self.scale if y is None else (x + y) * self.scale


class TwoArgNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = TwoArgScale()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.scale(x, x))


class Attention(nn.Module):
    """nn.MultiheadAttention in the configurations the Opacus swap must reproduce."""

    def __init__(self, batch_first=True, add_bias_kv=False, kdim=None, heads=2):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(11, 8)
        self.other = nn.Linear(8, 6)
        self.attn = nn.MultiheadAttention(
            8, heads, batch_first=batch_first, add_bias_kv=add_bias_kv, kdim=kdim, vdim=kdim
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        kv = self.other(h) if self.attn.kdim != 8 else h
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        a, _ = self.attn(h, kv, kv, need_weights=False)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.head(a.mean(1))


class HiddenAttention(nn.Module):
    """The attention is reached through a plain list as well as the module tree."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.layers = [self.attn]  # not a registered submodule: a copy's swap cannot reach it
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.layers[0](h, h, h, need_weights=False)[0].mean(1))


class Recurrent(nn.Module):
    def __init__(self, kind=nn.GRU):
        super().__init__()
        self.rnn = kind(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class UnusedBranch(nn.Module):
    """``aux`` never reaches the loss; ``shared``'s second call does not either."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        self.aux(h)
        self.shared(h)
        return self.head(h)


def mlp(*sizes, inplace=True):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=inplace)]
    return nn.Sequential(*layers[:-1])


# -- what the adapters make the libraries answer ------------------------------------------------


@pytest.mark.parametrize("name", PEERS)
def test_inplace_relu_mlp_in_eval_mode(name):
    # Opacus records nothing for modules in eval mode; both libraries break on in-place ops
    model = seeded(lambda: mlp(5, 7, 3)).eval()
    agree(name, model, ce, classes((5,)), ("norms", "per_param"))
    assert not model.training and model[1].inplace


def test_opacus_reroutes_what_its_samplers_get_wrong():
    conv = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(48, 3)
        )
    )
    agree("opacus", conv, ce, classes((2, 4, 4)))
    bag = seeded(
        lambda: nn.Sequential(nn.Embedding(11, 4, padding_idx=0), nn.Flatten(), nn.Linear(20, 3))
    )
    x, y = tokens()
    x[:, -2:] = 0
    agree("opacus", bag, ce, (x, y))
    norm = seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, bias=False)))
    agree("opacus", norm, mse, (classes((4,))[0], torch.randn(4, 6, dtype=DOUBLE)))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"batch_first": False}, {"add_bias_kv": True}, {"kdim": 6}, {"heads": 1}],
    ids=["batch_first", "sequence_first", "add_bias_kv", "kdim", "one_head"],
)
@pytest.mark.parametrize("name", ["opacus", "opacus_ghost"])
def test_opacus_attention_swap(name, kwargs):
    model = seeded(lambda: Attention(**kwargs))
    quantities = ("norms", "per_param") if name == "opacus_ghost" else ("per_param", "gram")
    agree(name, model, ce, tokens(), quantities)
    assert type(model.attn) is nn.MultiheadAttention  # the swap happened on a copy


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_opacus_recurrent_swap(kind):
    agree("opacus", seeded(lambda: Recurrent(kind)), ce, classes((6, 4)))


class UnusedHead(nn.Module):
    """``aux`` never reaches the loss: its per-example gradients are exactly zero."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        self.aux(h)
        return self.head(h)


@pytest.mark.parametrize("name", PEERS)
def test_unused_outputs_give_exact_zeros(name):
    agree(name, seeded(UnusedHead), ce, classes((4,)), ("per_param",))


@pytest.mark.parametrize("name", PEERS)
def test_layer_called_twice_with_one_call_unused_is_refused(name):
    # Opacus pops inputs last-in-first-out per backward hook: the unused second call's inputs
    # would meet the first call's output gradients; BackPACK and ghost keep one call
    why = "not every call reaches the loss" if name == "opacus" else "more than once"
    refuses(name, seeded(UnusedBranch), ce, classes((4,)), "Linear 'shared'", why)


def test_backpack_grouped_convolution_norms():
    # BatchL2Grad ignores groups; the adapter squares BatchGrad's gradients instead
    model = seeded(
        lambda: nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(8, 3))
    )
    agree("backpack", model, ce, classes((4, 4)), ("norms", "per_param", "gram"))


@pytest.mark.parametrize("name", PEERS)
def test_two_calls_give_the_same_answer_and_leave_the_model_as_it_was(name):
    # attention: Opacus swaps it on a copy; BackPACK has no extension for it
    model = seeded(lambda: Recurrent(nn.LSTM) if name == "backpack" else Attention())
    batch = classes((6, 4)) if name == "backpack" else tokens()
    before = _state(model)
    impl = impls.get(name)
    first, second = impl.norms(model, ce, batch), impl.norms(model, ce, batch)
    assert torch.equal(first, second)
    assert _state(model) == before


def test_results_follow_the_model_dtype():
    for dtype in (torch.float32, DOUBLE):
        model = seeded(lambda: mlp(5, 7, 3)).to(dtype)
        x, y = classes((5,))
        for name in PEERS:
            assert impls.get(name).norms(model, ce, (x.to(dtype), y)).dtype == dtype


# -- refusals: never a silently wrong number -----------------------------------------------------


@pytest.mark.parametrize("name", ["opacus_ghost", "backpack"])
def test_tied_parameter_is_refused(name):
    refuses(name, seeded(TiedNet), ce, tokens(), "'embed.weight'", "tied")


def test_opacus_handles_a_tied_parameter():
    agree("opacus", seeded(TiedNet), ce, tokens(), ("per_param", "gram"))


def test_ghost_refuses_a_4d_linear_input():
    refuses("opacus_ghost", seeded(Linear4d), ce, classes((2, 3, 4)), "Linear 'fc'", "4-D")
    agree("opacus", seeded(Linear4d), ce, classes((2, 3, 4)))
    agree("backpack", seeded(Linear4d), ce, classes((2, 3, 4)))


def test_backpack_refuses_layer_norm():
    refuses("backpack", seeded(LayerNormNet), ce, classes((4,)), "LayerNorm 'norm'", "norm.weight")


@pytest.mark.parametrize("name", ["opacus_ghost", "backpack"])
def test_padding_idx_and_reflect_padding_are_refused(name):
    bag = seeded(
        lambda: nn.Sequential(nn.Embedding(11, 4, padding_idx=0), nn.Flatten(), nn.Linear(20, 3))
    )
    refuses(name, bag, ce, tokens(), "Embedding '0'", "padding_idx")
    conv = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(48, 3)
        )
    )
    refuses(name, conv, ce, classes((2, 4, 4)), "Conv2d '0'", "reflect")


def test_ghost_refuses_expanded_position_ids():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.position = nn.Embedding(8, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            ids = torch.arange(x.shape[1]).expand_as(x)
            return self.head(self.position(ids).mean(1))

    refuses("opacus_ghost", seeded(Positions), ce, tokens(), "Embedding 'position'")
    agree("opacus", seeded(Positions), ce, tokens())


class FinalState(nn.Module):
    """The loss reads the LSTM's h_n and c_n (BackPACK backpropagates its output sequence only)."""

    def __init__(self, initial_state=False):
        super().__init__()
        self.initial_state = initial_state
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        if self.initial_state:
            h0 = torch.ones(1, x.shape[0], 5, dtype=x.dtype)
            out, _ = self.lstm(x, (h0, h0))
            return self.head(out[:, -1])
        _, (h, c) = self.lstm(x)
        return self.head(h[-1] + c[-1])


def test_backpack_refuses_what_its_recurrent_derivatives_leave_out():
    refuses("backpack", seeded(FinalState), ce, classes((6, 4)), "LSTM 'lstm'", "h_n")
    refuses("backpack", seeded(lambda: FinalState(True)), ce, classes((6, 4)), "initial state")
    agree("opacus", seeded(FinalState), ce, classes((6, 4)))
    agree("opacus", seeded(lambda: FinalState(True)), ce, classes((6, 4)))


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.block, x, use_reentrant=False))


@pytest.mark.parametrize("name", PEERS)
def test_activation_checkpointing_is_refused(name):
    refuses(name, seeded(Checkpointed), ce, classes((4,)), "Linear 'block.0'", "again")


@pytest.mark.parametrize("name", PEERS)
def test_parameter_used_outside_its_module_is_refused(name):
    refuses(name, seeded(ParentUsesChildWeight), ce, classes((4,)), "'fc.weight'", "outside")


@pytest.mark.parametrize("name", PEERS)
def test_parameter_used_in_the_loss_is_refused(name):
    model = seeded(lambda: mlp(4, 3))

    def loss(outputs, targets):
        return ce(outputs, targets) + model[0].bias.sum()

    refuses(name, model, loss, classes((4,)), "'0.bias'", "outside")


@pytest.mark.parametrize("name", PEERS)
def test_input_without_the_batch_first_is_refused(name):
    refuses(name, seeded(FlattensBatch), ce, classes((5, 4)), "Linear 'fc'", "batch")


def test_opacus_functorch_path_refusals():
    noisy = seeded(lambda: nn.Sequential(nn.Linear(4, 4), NoisyScale(), nn.Linear(4, 3)))
    refuses("opacus", noisy, ce, classes((4,)), "NoisyScale '1'", "random")
    refuses("opacus", seeded(TwoArgNet), ce, classes((4,)), "TwoArgScale 'scale'", "several")
    agree("opacus", noisy.eval(), ce, classes((4,)))  # no dropout in eval mode


def test_opacus_refuses_attention_it_cannot_swap():
    refuses("opacus", seeded(HiddenAttention), ce, tokens(), "'attn'", "swap")


def test_opacus_refuses_trainable_layers_with_buffers():
    model = seeded(lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)))
    refuses("opacus", model.eval(), ce, classes((4,)), "BatchNorm1d '1'", "buffers")
    agree("backpack", model, ce, classes((4,)))  # BackPACK supports BatchNorm in eval mode


def test_ghost_has_no_inner_products():
    refuses("opacus_ghost", seeded(lambda: mlp(4, 3)), ce, classes((4,)), "norms only", inner=True)


@pytest.mark.parametrize("name", PEERS)
def test_create_graph_is_refused(name):
    with pytest.raises(Unsupported):
        impls.get(name).norms(seeded(lambda: mlp(4, 3)), ce, classes((4,)), create_graph=True)


# -- nothing left behind -------------------------------------------------------------------------


def _state(model: nn.Module):
    """Everything about a model a caller can observe, as comparable values."""
    modules = [
        (
            name,
            m.training,
            sorted(vars(m)),
            [len(getattr(m, k)) for k in vars(m) if k.endswith(("_hooks", "_hooks_with_kwargs"))],
            {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))},
        )
        for name, m in model.named_modules()
    ]
    params = [
        (name, p.requires_grad, p.grad is None, sorted(vars(p)), p.detach().clone().tolist())
        for name, p in model.named_parameters()
    ]
    return modules, params


FAILING = {
    "opacus": (lambda: nn.Sequential(nn.Linear(4, 4), NoisyScale(), nn.Linear(4, 3))),
    "opacus_ghost": TiedNet,
    "backpack": LayerNormNet,
}


@pytest.mark.parametrize("name", PEERS)
def test_nothing_left_behind_after_a_refusal(name):
    from backpack.context import CTX

    model = seeded(FAILING[name])
    batch = tokens() if name == "opacus_ghost" else classes((4,))
    handles, active = len(CTX.hook_handles), CTX.active_exts
    before = _state(model)
    with pytest.raises(Unsupported):
        impls.get(name).norms(model, ce, batch)
    assert _state(model) == before
    assert (len(CTX.hook_handles), CTX.active_exts) == (handles, active)


@pytest.mark.parametrize("name", PEERS)
def test_nothing_left_behind_after_an_answer(name):
    from backpack.context import CTX

    model = seeded(lambda: mlp(5, 7, 3))
    model[0].weight.grad = torch.ones_like(model[0].weight)
    handles = len(CTX.hook_handles)
    before = _state(model)
    impls.get(name).norms(model, ce, classes((5,)))
    if name != "opacus_ghost":
        impls.get(name).inner(model, ce, classes((5,)), classes((5,), b=2, seed=1))
    assert _state(model) == before
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert len(CTX.hook_handles) == handles


def test_importing_the_adapters_changes_no_global_state():
    # Opacus calls logging.basicConfig() on import; torchvision must never be imported
    code = (
        "import logging, sys\n"
        "handlers = list(logging.root.handlers)\n"
        "import impls\n"
        "for name in ('opacus', 'opacus_ghost', 'backpack'): impls.get(name)\n"
        "assert logging.root.handlers == handlers, logging.root.handlers\n"
        "assert 'torchvision' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
