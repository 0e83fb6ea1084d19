"""``function``: the custom autograd.Function route.

Agreement with ``naive`` on the layers it covers (float64), its Functions against the modules
they stand for, refusals with a reason for everything else, and no state left on the model,
even when the forward or the loss raises midway.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import impls
from correctness.cases import get_case
from correctness.harness import perturbed
from impls import Unsupported
from impls.base import Implementation
from impls.function import ConvFunction, EmbeddingFunction, FunctionCapture, LinearFunction
from impls.layers.conv import explicit_padding
from impls.tests.conftest import DOUBLE
from impls.tests.conftest import ce as _ce
from impls.tests.conftest import double as _double

FUNCTION = impls.get("function")
NAIVE = impls.get("naive")


def _classes(b, shape, classes=3, seed=0, dtype=DOUBLE):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=gen, dtype=dtype), torch.randint(0, classes, (b,))


def _assert_all_agree(model, loss_fn, batch, other_batch, atol=1e-10):
    """norms, per-parameter norms, Gram, cross-batch and cross-checkpoint against naive."""
    other_model = perturbed(model)
    for quantity in ("norms", "per_param", "gram", "cross_batch", "cross_checkpoint"):
        got, want = (
            _compute(impl, quantity, model, other_model, loss_fn, batch, other_batch)
            for impl in (FUNCTION, NAIVE)
        )
        if quantity == "per_param":
            assert set(got) == set(want)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=atol)
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=atol, msg=quantity)


def _compute(impl, quantity, model, other_model, loss_fn, batch, other_batch):
    if quantity == "norms":
        return impl.norms(model, loss_fn, batch)
    if quantity == "per_param":
        return impl.norms(model, loss_fn, batch, per_param=True)
    if quantity == "gram":
        return impl.inner(model, loss_fn, batch)
    if quantity == "cross_batch":
        return impl.inner(model, loss_fn, batch, other_batch)
    return impl.inner(model, loss_fn, batch, other_batch, other_model=other_model)


# -- agreement with naive --------------------------------------------------------------------

COVERED_CASES = [
    "mlp_f64", "mlp_regression", "cnn", "conv1d", "conv3d", "sequence_linear", "embedding",
    "frozen_layer", "tied_embedding", "reused_layer", "two_inputs",
]  # fmt: skip


@pytest.mark.parametrize("name", COVERED_CASES)
def test_agrees_with_naive_on_covered_zoo_cases(name):
    case = get_case(name)
    model = case.make_model().double()
    batch = _double(case.make_batch(4, seed=0))
    other = _double(case.make_batch(3, seed=1))
    _assert_all_agree(model, case.loss_fn, batch, other)


@pytest.mark.skipif("ghost" not in impls.names(), reason="ghost is not registered")
@pytest.mark.parametrize("name", COVERED_CASES)
def test_same_answers_as_ghost(name):
    case = get_case(name)
    model = case.make_model().double()
    batch, other = _double(case.make_batch(4, seed=0)), _double(case.make_batch(3, seed=1))
    other_model = perturbed(model)
    ghost = impls.get("ghost")
    for quantity in ("per_param", "gram", "cross_batch", "cross_checkpoint"):
        got, want = (
            _compute(impl, quantity, model, other_model, case.loss_fn, batch, other)
            for impl in (FUNCTION, ghost)
        )
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=quantity)


def test_frozen_weight_trainable_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Conv1d(1, 2, 3), nn.Flatten(),
                          nn.Linear(6, 3)).double()  # fmt: skip
    model[0].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            h = self.body[1](self.body[0](x)).unsqueeze(1)
            return self.body[4](self.body[3](self.body[2](h)))

    _assert_all_agree(Net(), _ce, _classes(4, (4,)), _classes(3, (4,), seed=1))


class TiedLinears(nn.Module):
    """Two Linear modules sharing one weight (each with its own bias), 4-D inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 5)  # called, but its output never reaches the loss

    def forward(self, x):  # x [B, 2, 3, 5]
        self.unused(x)
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean((1, 2)))


class TwoEmbeddingCalls(nn.Module):
    """One sparse Embedding with padding_idx called on two token sequences."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4, padding_idx=0, sparse=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        left, right = tokens[:, :3], tokens[:, 3:]
        return self.head(torch.tanh(self.embed(left).mean(1) * self.embed(right).sum(1)))


def test_tied_linears_unused_output_and_4d_inputs():
    torch.manual_seed(0)
    model = TiedLinears().double()
    _assert_all_agree(model, _ce, _classes(4, (2, 3, 5)), _classes(3, (2, 3, 5), seed=1))
    norms = FUNCTION.norms(model, _ce, _classes(4, (2, 3, 5)), per_param=True)
    assert torch.equal(norms["unused.weight"], torch.zeros(4, dtype=DOUBLE))


def test_embedding_called_twice_sparse_with_padding():
    torch.manual_seed(0)
    model = TwoEmbeddingCalls().double()
    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    tokens[::2, -2:] = 0
    other = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 0])
    _assert_all_agree(model, _ce, (tokens, targets), (other, targets[:3]))


CONV_CONFIGS = [
    (nn.Conv2d, dict(kernel_size=3, padding=1, padding_mode="reflect")),
    (nn.Conv2d, dict(kernel_size=(2, 3), padding="same", padding_mode="circular")),
    (nn.Conv2d, dict(kernel_size=4, padding="same", dilation=(1, 2))),  # asymmetric 'same'
    (nn.Conv2d, dict(kernel_size=3, stride=2, padding=(2, 1), groups=2, bias=False)),
    (nn.Conv1d, dict(kernel_size=3, padding="valid", dilation=2, padding_mode="replicate")),
    (nn.Conv1d, dict(kernel_size=2, padding=3, stride=3)),
    (nn.Conv3d, dict(kernel_size=2, padding=1, padding_mode="circular", groups=2)),
]
CONV_IDS = [f"{t.__name__}-{k}" for k, (t, _) in enumerate(CONV_CONFIGS)]


class ConvNet(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(conv.out_channels, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(h.flatten(2).mean(2))


def _conv_batch(conv_type, b, seed):
    shape = {nn.Conv1d: (4, 9), nn.Conv2d: (4, 7, 6), nn.Conv3d: (4, 5, 4, 3)}[conv_type]
    return _classes(b, shape, seed=seed)


@pytest.mark.parametrize("conv_type, options", CONV_CONFIGS, ids=CONV_IDS)
def test_conv_padding_modes_stride_dilation_groups(conv_type, options):
    torch.manual_seed(0)
    model = ConvNet(conv_type(4, 6, **options)).double()
    batch, other = _conv_batch(conv_type, 3, 0), _conv_batch(conv_type, 2, 1)
    _assert_all_agree(model, _ce, batch, other)


@settings(max_examples=20, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same", "valid"]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
)
def test_conv_sweep(dims, kernel, stride, dilation, padding, mode, groups, bias):
    conv_type = (nn.Conv1d, nn.Conv2d)[dims - 1]
    if padding == "same":
        stride = 1  # PyTorch refuses 'same' with stride
    torch.manual_seed(0)
    conv = conv_type(4, 4, kernel, stride, padding, dilation, groups, bias, mode)
    model = ConvNet(conv).double()
    batch = _conv_batch(conv_type, 3, 0)
    torch.testing.assert_close(
        FUNCTION.norms(model, _ce, batch, per_param=True),
        NAIVE.norms(model, _ce, batch, per_param=True),
        rtol=1e-9,
        atol=1e-12,
    )


# -- the Functions against the modules -------------------------------------------------------


def _padded_as_the_module_pads(conv, x):
    """(input, padding left to the convolution): what nn.Conv hands F.conv, then 'same'."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    if isinstance(conv.padding, str):
        return explicit_padding(x, conv.padding, conv.kernel_size, conv.dilation), 0
    return x, conv.padding


@pytest.mark.parametrize("conv_type, options", CONV_CONFIGS, ids=CONV_IDS)
def test_conv_function_matches_the_module_and_skips_weight_gradients(conv_type, options):
    torch.manual_seed(0)
    conv = conv_type(4, 6, **options).double()
    x = _conv_batch(conv_type, 3, 0)[0].requires_grad_()
    want = conv(x)
    sink = []
    padded, padding = _padded_as_the_module_pads(conv, x)
    got = ConvFunction.apply(
        padded,
        conv.weight,
        conv.bias,
        conv.stride,
        padding,
        conv.dilation,
        conv.groups,
        sink,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn_like(want)
    params = [p for p in conv.parameters()]
    grads = torch.autograd.grad(got, [x, *params], g, allow_unused=True)
    assert all(grad is None for grad in grads[1:])
    torch.testing.assert_close(grads[0], torch.autograd.grad(want, x, g)[0], rtol=0, atol=1e-12)
    assert sink[0] is not None and torch.equal(sink[0], g)


def test_linear_and_embedding_functions_skip_weight_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=DOUBLE, requires_grad=True)
    sink = []
    out = LinearFunction.apply(x, linear.weight, linear.bias, sink)
    assert torch.equal(out, linear(x))
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, [x, linear.weight, linear.bias], g, allow_unused=True)
    assert gw is None and gb is None
    torch.testing.assert_close(gx, torch.autograd.grad(linear(x), x, g)[0])
    assert torch.equal(sink[0], g)

    embed = nn.Embedding(7, 3, padding_idx=2).double()
    tokens = torch.tensor([[1, 2, 6], [2, 0, 0]])
    sink = []
    out = EmbeddingFunction.apply(tokens, embed.weight, embed.padding_idx, sink)
    assert torch.equal(out, embed(tokens))
    (gw,) = torch.autograd.grad(out.sum(), [embed.weight], allow_unused=True)
    assert gw is None and sink[0].shape == out.shape


# -- refusals --------------------------------------------------------------------------------


class UsesChildWeight(nn.Module):
    """The parent calls F.linear with its child's weight: no covered forward sees that use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x) + F.linear(x, self.fc.weight)))


class Gain(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x * self.weight


class TiedToUncovered(nn.Module):
    """A Linear bias shared with a module type 'function' does not cover."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gain = Gain(self.fc.bias)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gain(torch.tanh(self.fc(x))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def _refusal_cases():
    torch.manual_seed(0)
    feats = _classes(3, (4,))
    layer_norm = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    max_norm = nn.Sequential(nn.Embedding(9, 4, max_norm=1.0), nn.Flatten(), nn.Linear(8, 3))
    tokens = (torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([0, 1, 2]))
    patched = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    patched[0].forward = lambda x: F.linear(x, patched[0].weight) * 2
    model = nn.Sequential(nn.Linear(4, 3))

    def loss_with_weight(outputs, targets):
        return _ce(outputs, targets) + model[0].weight.sum()

    class SharedBias(nn.Module):
        """A Linear called on an unbatched vector (whose length happens to equal B)."""

        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x + self.shared(torch.ones(3, dtype=x.dtype)))

    class UnbatchedConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x + self.conv(torch.ones(3, 4, dtype=x.dtype)).mean(1))

    return {
        "unbatched_linear": (SharedBias(), _ce, _classes(3, (4,)), "Linear 'shared'"),
        "unbatched_conv": (UnbatchedConv(), _ce, _classes(3, (4,)), "Conv1d 'conv'"),
        "layer_norm": (layer_norm, _ce, feats, "LayerNorm '1'"),
        "bare_parameter": (*_case_parts("bare_parameter"), "'scale'"),
        "parameter_in_loss": (model, loss_with_weight, feats, "'0.weight'"),
        "tied_to_uncovered": (TiedToUncovered(), _ce, feats, "Gain 'gain'"),
        "embedding_max_norm": (max_norm, _ce, tokens, "max_norm"),
        "subclass_forward": (*_case_parts("linear_subclass"), "LowRankLinear 'body'"),
        "batchnorm_eval": (*_case_parts("batchnorm_eval"), "BatchNorm1d 'bn'"),
    }


def _case_parts(name):
    case = get_case(name)
    return case.make_model(), case.loss_fn, case.make_batch(3)


REFUSALS = _refusal_cases()


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refuses_what_it_cannot_account_for(name):
    model, loss_fn, batch, names_it = REFUSALS[name]
    model = model.double()
    batch = _double(batch)
    before = _snapshot(model)
    for compute in (
        lambda: FUNCTION.norms(model, loss_fn, batch),
        lambda: FUNCTION.inner(model, loss_fn, batch),
    ):
        with pytest.raises(Unsupported) as refusal:
            compute()
        message = str(refusal.value)
        assert names_it in message and "\n" not in message, message
    assert _snapshot(model) == before


def test_calls_are_covered_whichever_module_makes_them():
    """A parent's F.linear with its child's weight, a module whose forward was replaced by the
    instance: the calls are F.linear calls, accounted for wherever they are made."""
    import types

    torch.manual_seed(0)
    patched = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)).double()
    patched[0].forward = types.MethodType(lambda self, x: F.linear(x, self.weight) * 2, patched[0])
    for model in (UsesChildWeight().double(), patched):
        _assert_all_agree(model, _ce, _classes(4, (4,)), _classes(3, (4,), seed=1))


def test_attention_and_recurrent_layers_run_as_their_projections():
    """nn.MultiheadAttention and nn.LSTM are recomputed as F.linear calls (plus parameter-free
    steps): their projections go through the Functions like any Linear."""
    torch.manual_seed(0)
    _assert_all_agree(Attention().double(), _ce, _classes(4, (5, 4)), _classes(3, (5, 4), seed=1))
    case = get_case("lstm")
    model = case.make_model().double()
    batch, other = _double(case.make_batch(4)), _double(case.make_batch(3, seed=1))
    _assert_all_agree(model, case.loss_fn, batch, other)


def test_create_graph_is_refused():
    case = get_case("mlp")
    model, batch = case.make_model(), case.make_batch(3)
    assert not FUNCTION.differentiable
    with pytest.raises(Unsupported, match="create_graph"):
        FUNCTION.norms(model, case.loss_fn, batch, create_graph=True)
    with pytest.raises(Unsupported, match="create_graph"):
        FUNCTION.inner(model, case.loss_fn, batch, create_graph=True)


# -- no state left behind --------------------------------------------------------------------


def _snapshot(model):
    """What a caller can observe of a model's modules and parameters (by identity and value)."""
    modules = [
        (
            name,
            sorted(m.__dict__),
            m.__dict__.get("forward"),
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            m.training,
        )
        for name, m in model.named_modules()
    ]
    params = [
        (n, p.requires_grad, id(p.grad), None if p.grad is None else p.grad.sum().item(),
         sorted(p.__dict__), p.detach().sum().item())
        for n, p in model.named_parameters()
    ]  # fmt: skip
    return modules, params


class Boom(RuntimeError):
    pass


class RaisesMidForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(self.conv(x).mean(-1))
        if h.shape[0] > 0:
            raise Boom("raised after two covered calls")
        return h


def _mode_stack_depth():
    return torch._C._len_torch_function_stack()


def test_no_state_left_after_an_exception_mid_forward():
    model = RaisesMidForward()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    batch = (torch.randn(3, 2, 5), torch.tensor([0, 1, 2]))
    before, depth = _snapshot(model), _mode_stack_depth()
    with pytest.raises(Boom):
        FUNCTION.norms(model, _ce, batch)
    assert _snapshot(model) == before and _mode_stack_depth() == depth
    # the capture alone (without the interface's model guard) cleans up too
    side = Implementation._side(model, batch)
    with pytest.raises(Boom), FunctionCapture(side):
        side.call_model()
    assert _snapshot(model) == before and _mode_stack_depth() == depth
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_no_state_left_after_loss_fn_raises_or_a_success():
    case = get_case("cnn")
    model, batch = case.make_model(), case.make_batch(3)
    calls = []
    model.conv1.register_forward_hook(lambda *_: calls.append(1))
    before, depth = _snapshot(model), _mode_stack_depth()
    reference = model(batch[0])

    def bad_loss(outputs, targets):
        raise Boom("loss")

    with pytest.raises(Boom):
        FUNCTION.inner(model, bad_loss, batch)
    assert _snapshot(model) == before and _mode_stack_depth() == depth
    first = FUNCTION.norms(model, case.loss_fn, batch)
    assert len(calls) == 3  # the user's hook saw the call made under 'function'
    assert _snapshot(model) == before and _mode_stack_depth() == depth
    torch.testing.assert_close(FUNCTION.norms(model, case.loss_fn, batch), first, rtol=0, atol=0)
    after = model(batch[0])
    assert torch.equal(after, reference) and "Function" not in after.grad_fn.name()


def test_recording_refusal_for_a_parameter_used_outside_leaves_nothing():
    model = TiedToUncovered()
    batch = (torch.randn(3, 4), torch.tensor([0, 1, 2]))
    side = Implementation._side(model, batch)
    before = _snapshot(model)
    capture = FunctionCapture(side)
    with pytest.raises(Unsupported, match="'fc.bias'"), capture:
        side.call_model()
    assert _snapshot(model) == before
    assert [use.where for use in capture.uses] == ["torch.linear in Linear 'fc'"]


def test_a_copy_as_the_other_checkpoint_gives_the_gram_matrix():
    """Two models sharing nothing are recorded independently (cross-checkpoint at θ and θ)."""
    case = get_case("conv1d")
    model = case.make_model().double()
    other = copy.deepcopy(model)
    batch = _double(case.make_batch(3))
    gram = FUNCTION.inner(model, case.loss_fn, batch)
    cross = FUNCTION.inner(model, case.loss_fn, batch, other_model=other)
    torch.testing.assert_close(cross, gram, rtol=1e-12, atol=1e-14)


def test_another_thread_using_the_model_meanwhile_gets_plain_modules():
    """The overrides sit on the modules, which threads share: only the caller's thread is routed
    through the Functions, so another thread's own backward still gets weight gradients."""
    import threading

    case = get_case("mlp_f64")
    model, batch = case.make_model(), case.make_batch(3)
    x2 = batch[0][:2].clone()
    want = torch.autograd.grad(model(x2).sum(), model[0].weight)[0]
    seen = {}

    def other_thread():
        seen["grad"] = torch.autograd.grad(model(x2).sum(), model[0].weight, allow_unused=True)[0]

    def loss_fn(outputs, targets):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        return case.loss_fn(outputs, targets)

    got = FUNCTION.norms(model, loss_fn, batch)
    torch.testing.assert_close(got, NAIVE.norms(model, case.loss_fn, batch))
    assert seen["grad"] is not None
    torch.testing.assert_close(seen["grad"], want)


def test_no_reference_cycle_keeps_activations_alive():
    """After the call, the recorded activations and gradients are freed by reference counting,
    not left to the cyclic garbage collector."""
    import gc

    case = get_case("cnn")
    model, batch = case.make_model(), case.make_batch(3)
    FUNCTION.norms(model, case.loss_fn, batch)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        FUNCTION.norms(model, case.loss_fn, batch)
        FUNCTION.inner(model, case.loss_fn, batch, batch)
        gc.collect()
        leaked = [tuple(o.shape) for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not leaked, f"tensors only the garbage collector frees: {leaked[:5]}"
