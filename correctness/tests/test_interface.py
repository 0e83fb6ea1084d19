"""The interface contract (docs/interface.md), for every registered implementation."""

from __future__ import annotations

import pytest
import torch

import impls
from correctness import oracle
from correctness.cases import get_case
from correctness.harness import relative_error
from impls import Unsupported

NAMES = impls.names()


def _mlp():
    case = get_case("mlp")
    return case, case.make_model(), case.make_batch(4)


def test_names_and_unknown_name():
    assert {"naive", "vmap", "hooks"} <= set(NAMES)
    with pytest.raises(KeyError, match="known: .*naive"):
        impls.get("no-such-implementation")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        impls.register("naive", "impls.naive:NaiveLoop")


@pytest.mark.parametrize("name", NAMES)
def test_single_example(name):
    case, model, _ = _mlp()
    batch = case.make_batch(1, seed=3)
    got = impls.get(name).norms(model, case.loss_fn, batch)
    want = oracle.norms(oracle.per_example_gradients(model, case.loss_fn, batch))
    assert got.shape == (1,)
    assert relative_error(got, want) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name):
    case, model, batch = _mlp()
    empty = case.make_batch(0)
    impl = impls.get(name)
    norms = impl.norms(model, case.loss_fn, empty)
    assert norms.shape == (0,) and norms.dtype == torch.float32
    per_param = impl.norms(model, case.loss_fn, empty, per_param=True)
    assert set(per_param) == {n for n, _ in model.named_parameters()}
    assert all(v.shape == (0,) for v in per_param.values())
    try:
        assert impl.inner(model, case.loss_fn, empty, batch).shape == (0, 4)
        assert impl.inner(model, case.loss_fn, batch, empty).shape == (4, 0)
    except Unsupported:
        pass  # an implementation without inner products may refuse


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_batch_sizes(name):
    case, model, (x, y) = _mlp()
    impl = impls.get(name)
    with pytest.raises(ValueError, match="batch size"):
        impl.norms(model, case.loss_fn, (x, y[:3]))
    with pytest.raises(ValueError, match="batch size"):
        impl.inner(model, case.loss_fn, (x, y), (x[:2], y))
    two = get_case("two_inputs")
    (xa, xb), t = two.make_batch(3)
    with pytest.raises(ValueError, match="batch sizes"):
        impl.norms(two.make_model(), two.loss_fn, ((xa, xb[:2]), t))


@pytest.mark.parametrize("name", NAMES)
def test_malformed_batch_and_loss(name):
    case, model, (x, y) = _mlp()
    impl = impls.get(name)
    with pytest.raises(ValueError, match="pair"):
        impl.norms(model, case.loss_fn, x)

    def mean_loss(outputs, targets):
        return case.loss_fn(outputs, targets).mean()

    with pytest.raises((ValueError, Unsupported), match="shape"):
        impl.norms(model, mean_loss, (x, y))


@pytest.mark.parametrize("name", NAMES)
def test_other_model_must_match(name):
    case, model, batch = _mlp()
    other = torch.nn.Sequential(torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match="do not match"):
        impls.get(name).inner(model, case.loss_fn, batch, other_model=other)


@pytest.mark.parametrize("name", NAMES)
def test_create_graph_supported_or_refused(name):
    case, model, batch = _mlp()
    impl = impls.get(name)
    if not impl.differentiable:
        with pytest.raises(Unsupported):
            impl.norms(model, case.loss_fn, batch, create_graph=True)


def _observable_state(model: torch.nn.Module):
    """Everything a caller can see of a model: values, grads, flags, hooks, attributes."""
    state = {}
    for name, module in model.named_modules():
        state[f"{name}:dict"] = sorted(module.__dict__)
        state[f"{name}:training"] = module.training
        for hooks in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            state[f"{name}:{hooks}"] = list(getattr(module, hooks).items())
        state[f"{name}:modules"] = [(k, id(v)) for k, v in module._modules.items()]
    for name, p in model.named_parameters():
        state[f"{name}:value"] = p.detach().clone()
        state[f"{name}:grad"] = None if p.grad is None else p.grad.clone()
        state[f"{name}:requires_grad"] = p.requires_grad
        state[f"{name}:attrs"] = sorted(p.__dict__)
        state[f"{name}:type"] = type(p)
    for name, b in model.named_buffers():
        state[f"{name}:buffer"] = b.clone()
    return state


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize(
    "case_name",
    ["mlp", "transformer", "lstm", "tied_embedding", "batchnorm_eval", "batchnorm_train"],
)
@pytest.mark.parametrize("name", NAMES)
def test_model_untouched_and_calls_repeatable(name, case_name):
    case = get_case(case_name)
    model = case.make_model()
    batch = case.make_batch(3)
    # a caller's own state: stale gradients, a hook, an extra attribute
    out = case.loss_fn(model(*((batch[0],) if torch.is_tensor(batch[0]) else batch[0])), batch[1])
    out.sum().backward()
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    model.note = "mine"
    before = _observable_state(model)
    rng = torch.get_rng_state()
    impl = impls.get(name)
    results = []
    for _ in range(2):
        try:
            results.append(impl.norms(model, case.loss_fn, batch))
        except Unsupported:
            results.append(None)
    after = _observable_state(model)
    changed = [k for k in before if not _same(before[k], after.get(k))]
    assert not changed and set(before) == set(after), f"model changed: {changed[:5]}"
    assert torch.equal(torch.get_rng_state(), rng)
    if results[0] is not None:
        assert torch.equal(results[0], results[1]), "two calls in a row differ"
    handle.remove()


@pytest.mark.parametrize("name", NAMES)
def test_dtype_and_mode_respected(name):
    case = get_case("mlp_f64")
    model = case.make_model().eval()
    result = impls.get(name).norms(model, case.loss_fn, case.make_batch(2))
    assert result.dtype == torch.float64
    assert not model.training
