"""The capture's backward: output gradients delivered during the backward pass (streamed) or
after it are the same; layers are handed over from the top; errors of a reduction surface
unchanged either way.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import impls
from correctness.cases import CASES
from correctness.models import HookedPReLU
from impls import Unsupported, _capture
from impls._capture import captured_forward
from impls.base import Implementation
from impls.layers.linear import LinearRule
from impls.tests.conftest import DOUBLE
from impls.tests.conftest import ce as _ce


class Branchy(nn.Module):
    """A chain, a branch whose output never reaches the loss, a layer called twice, and a layer
    whose output feeds two later layers (one captured node under several others)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.dead = nn.Linear(6, 3)
        self.left = nn.Linear(6, 4)
        self.right = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        self.dead(h)  # computed, never used
        return self.left(h) * torch.sigmoid(self.right(h))


def _side(model, batch):
    return Implementation._side(model, batch)


def _module(use) -> str:
    """The module name in a use's description: "torch.linear in Linear 'shared'" -> shared."""
    return use.where.rsplit("'", 2)[1]


def _delivered(model, batch, stream, monkeypatch):
    """(module name, output gradient, use) in the order the uses were handed over."""
    seen = []
    original = LinearRule.factors

    def recording(self, use):
        seen.append((_module(use), use.output_gradient().clone(), use))
        return original(self, use)

    monkeypatch.setattr(LinearRule, "factors", recording)
    capture, loss = captured_forward(_side(model, batch), _ce, False)
    capture.backward(loss, lambda contributions: None, stream=stream)
    monkeypatch.setattr(LinearRule, "factors", original)
    return seen


def _problem():
    torch.manual_seed(0)
    model = Branchy().to(DOUBLE)
    batch = (torch.randn(7, 5, dtype=DOUBLE), torch.randint(0, 4, (7,)))
    return model, batch


def test_streamed_delivery_sees_the_gradients_delivered_after_the_backward(monkeypatch):
    model, batch = _problem()
    expected = _delivered(model, batch, False, monkeypatch)
    seen = _delivered(model, batch, True, monkeypatch)
    assert len(seen) == len(expected) == 6  # first, shared twice, dead, left, right
    by_name = {}
    for name, grad, _ in expected:
        by_name.setdefault(name, []).append(grad)
    for name, grad, use in seen:  # a layer called twice may come in either order
        match = next(k for k, g in enumerate(by_name[name]) if torch.equal(g, grad))
        by_name[name].pop(match)
        assert use.output is None and use.binding.activations == ()  # released once reduced
    dead = [g for name, g, _ in expected if name == "dead"]
    assert dead and not dead[0].any()  # no path to the loss: zeros


def test_layers_are_reduced_during_the_backward_from_the_top(monkeypatch):
    model, batch = _problem()
    order = [name for name, _, _ in _delivered(model, batch, True, monkeypatch)]
    # the output layers before the layers below them; "first" is the lowest captured node
    assert order.index("left") < order.index("first")
    assert order.index("right") < order.index("first")
    assert order.count("shared") == 2


@pytest.mark.parametrize("stream_bytes", [0, 1 << 40], ids=["streamed", "after"])
def test_an_error_of_a_reduction_is_raised_unchanged_and_the_model_is_left_clean(
    monkeypatch, stream_bytes
):
    monkeypatch.setattr(_capture, "STREAM_BYTES", stream_bytes)
    model, batch = _problem()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    original = LinearRule.factors

    def refuse(self, use):
        if _module(use) == "shared":
            raise Unsupported("refused inside the backward")
        return original(self, use)

    monkeypatch.setattr(LinearRule, "factors", refuse)
    with pytest.raises(Unsupported, match="refused inside the backward"):
        impls.get("ghost").norms(model, _ce, batch)
    monkeypatch.setattr(LinearRule, "factors", original)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    # and the next call works
    got = impls.get("ghost").norms(model, _ce, batch)
    want = impls.get("naive").norms(model, _ce, batch)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", [c for c in CASES if c.defined], ids=str)
def test_ghost_streamed_equals_ghost_after_the_backward(case, monkeypatch):
    """Every zoo case, through both paths of the capture (the zoo's models are small enough
    that ghost would otherwise never stream them)."""
    model, batch = case.make_model(), case.make_batch(5)
    other = case.make_batch(3, seed=1)
    ghost = impls.get("ghost")

    def results():
        try:
            norms = ghost.norms(model, case.loss_fn, batch, per_param=True)
        except Unsupported as refusal:
            return str(refusal)
        gram = ghost.inner(model, case.loss_fn, batch)
        cross = ghost.inner(model, case.loss_fn, batch, other)
        losses = ghost.norms(model, case.loss_fn, batch, create_graph=True).sum()
        trainable = [p for p in model.parameters() if p.requires_grad]
        differentiated = torch.autograd.grad(losses, trainable, allow_unused=True)
        return norms, gram, cross, differentiated

    monkeypatch.setattr(_capture, "STREAM_BYTES", 1 << 40)
    after = results()
    monkeypatch.setattr(_capture, "STREAM_BYTES", 0)
    streamed = results()
    if isinstance(after, str):
        assert streamed == after
        return
    torch.testing.assert_close(streamed, after)


@pytest.mark.parametrize("name", ["ghost", "hooks"])
def test_the_callers_own_module_hooks_run_outside_the_redone_call(name):
    """The caller's forward pre-hook rescales the input of a module the vmap fallback redoes,
    and its forward hook rescales the output by a function of the module's own parameter: the
    watch's record of the call (the arguments the fallback redoes it on, the outputs it is
    differentiated at) opens after the caller's pre-hooks and closes after its forward hooks,
    so redoing the call applies neither twice."""
    torch.manual_seed(0)
    model = HookedPReLU().to(DOUBLE)  # the hooks are registered by the model (a zoo case)
    batch = (torch.randn(5, 6, dtype=DOUBLE), torch.randint(0, 3, (5,)))
    naive = impls.get("naive")
    got = impls.get(name).norms(model, _ce, batch, per_param=True)
    want = naive.norms(model, _ce, batch, per_param=True)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    torch.testing.assert_close(
        impls.get(name).inner(model, _ce, batch), naive.inner(model, _ce, batch)
    )


def test_the_watch_wraps_each_forward_only_while_it_is_active():
    """Inside, every module's forward is a wrapper with the forward's signature; on exit (also
    through an error) the modules are as before, a forward a library set on an instance too."""
    import inspect

    from impls._watch import BatchWatch

    model = HookedPReLU()
    own = model.head.forward  # a forward set on the instance, as some libraries do
    model.head.forward = lambda x: own(x) * 2
    instance_forward = model.head.forward
    signature = inspect.signature(model.body.forward)
    x = torch.randn(2, 6)
    with BatchWatch(2, [x], model=model) as watch:
        assert inspect.signature(model.body.forward) == signature
        seen = []
        model.body.register_forward_hook(lambda *_: seen.append([f.name for f in watch.frames]))
        model(x)
    assert seen == [[""]]  # the caller's hook ran in the calling module's frame
    assert "forward" not in model.body.__dict__ and model.head.forward is instance_forward
    with pytest.raises(RuntimeError), BatchWatch(2, [x], model=model):
        model(torch.randn(2, 5))  # a shape error inside the forward
    assert "forward" not in model.body.__dict__ and model.head.forward is instance_forward


def test_a_call_an_interceptor_handles_is_followed_unless_it_tagged_the_result():
    """``__setitem__`` returns None: handled by an interceptor, the call is still followed and
    its target tagged (only a result the interceptor tagged through ``followed`` is skipped)."""
    from impls._watch import BatchWatch

    x = torch.randn(3, 4)
    with BatchWatch(3, [x], interceptor=lambda func, args, kwargs: func(*args, **kwargs)) as w:
        y = torch.zeros(3, 4)
        y[:] = x
        assert w.tag_of(y) is not None  # followed: what was written carries the batch
