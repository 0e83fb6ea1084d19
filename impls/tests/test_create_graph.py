"""Differentiable results: ``norms``/``inner`` with ``create_graph=True`` (double backward).

naive, vmap and ghost (once registered) must return results differentiable w.r.t. the
parameters; every other registered implementation must refuse with ``Unsupported``. Checked by
``torch.autograd.gradcheck`` in float64 on small models, by agreement of the double-backward
gradients between implementations and with directional finite differences of the float64
oracle on the zoo, and by the use case of seed 000: the gradient w.r.t. the weights of the
squared cosine similarity between two examples' gradients, with the model's ``.grad`` untouched.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import impls
from correctness import oracle, status
from correctness.cases import CASES, get_case
from impls import Unsupported
from impls.tests.conftest import DOUBLE
from impls.tests.conftest import ce as _ce
from impls.tests.conftest import double as _double

#: the implementations that must differentiate their results (ghost once it is registered)
DIFFERENTIABLE = [n for n in ("naive", "vmap", "ghost") if n in impls.names()]
OTHERS = [n for n in impls.names() if n not in DIFFERENTIABLE]


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _small_models():
    """name -> (model, loss_fn, batch, other batch), float64, smooth nonlinearities."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    conv = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(), nn.Flatten(),
        nn.Linear(12, 2),
    ).double()  # fmt: skip
    # no padding_idx here: PyTorch defines the padding row's gradient as zero although the
    # forward reads it, so finite differences of anything would disagree with autograd there
    embed = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 2)).double()
    targets = torch.tensor([0, 1, 1])
    return {
        "mlp": (mlp, _ce, (torch.randn(3, 3, generator=gen, dtype=DOUBLE), targets),
                (torch.randn(2, 3, generator=gen, dtype=DOUBLE), targets[:2])),
        "conv1d": (conv, _ce, (torch.randn(3, 2, 4, generator=gen, dtype=DOUBLE), targets),
                   (torch.randn(2, 2, 4, generator=gen, dtype=DOUBLE), targets[:2])),
        "embedding": (embed, _ce, (torch.tensor([[1, 2], [0, 5], [3, 3]]), targets),
                      (torch.tensor([[4, 0], [2, 1]]), targets[:2])),
    }  # fmt: skip


SMALL = _small_models()


def _of_parameters(model, compute):
    """gradcheck's inputs are the model's own parameters: it perturbs them in place."""
    params = tuple(_trainable(model))

    def f(*inputs):
        assert all(a is b for a, b in zip(inputs, params, strict=True))
        return compute()

    return f, params


# -- gradcheck ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", sorted(SMALL))
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradcheck_norms_and_gram(name, model_name):
    model, loss_fn, batch, other = SMALL[model_name]
    impl = impls.get(name)
    for compute in (
        lambda: impl.norms(model, loss_fn, batch, create_graph=True),
        lambda: impl.inner(model, loss_fn, batch, create_graph=True),
        lambda: impl.inner(model, loss_fn, batch, other, create_graph=True),
    ):
        f, params = _of_parameters(model, compute)
        # the full Jacobian on the MLP; a random projection of it (fast mode) elsewhere
        fast = model_name != "mlp"
        assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradcheck_per_parameter_norms_and_cross_checkpoint(name):
    model, loss_fn, batch, other = SMALL["mlp"]
    other_model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    impl = impls.get(name)

    def per_param():
        norms = impl.norms(model, loss_fn, batch, per_param=True, create_graph=True)
        return torch.stack([norms[n] for n in sorted(norms)])

    def cross_checkpoint():
        return impl.inner(model, loss_fn, batch, other, other_model=other_model, create_graph=True)

    for compute in (per_param, cross_checkpoint):
        f, params = _of_parameters(model, compute)
        assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5)


# -- agreement on the zoo: implementations with each other and with the oracle ---------------

#: (implementation, case) pairs that must refuse create_graph=True, with why
_SNAPSHOT = status.load()
#: (implementation, case) whose double backward the committed snapshot records as refused
#: (vmap: torch.func's double backward through an affine LayerNorm is wrong in torch 2.13, and
#: Hugging Face's padding masks need data-dependent control flow; see correctness/status.json)
KNOWN_REFUSALS = {
    (impl, case)
    for impl, cases in _SNAPSHOT.items()
    for case, quantities in cases.items()
    if quantities.get("double_backward") == "unsupported"
}
# in float64 (this file) torch.func's vmap(grad) of nn.LSTM with parameters that require grad
# raises a shape error, which vmap turns into a refusal; in the snapshot's float32 it answers
KNOWN_REFUSALS.add(("vmap", "lstm"))
# traps: hooks must refuse; float32 inside: a float64 finite difference measures float32 rounding
ZOO = [c for c in CASES if c.defined and not {"trap", "float32_inside"} & set(c.tags)]


def _objective(impl, model, loss_fn, batch, other, weights):
    """A scalar mixing norms and inner products: Σ c_i‖g_i‖ + Σ C_ij⟨g_i, g'_j⟩."""
    c, big_c = weights
    norms = impl.norms(model, loss_fn, batch, create_graph=True)
    cross = impl.inner(model, loss_fn, batch, other, create_graph=True)
    return (c * norms).sum() + (big_c * cross).sum()


def _oracle_objective(model, loss_fn, batch, other, weights):
    c, big_c = weights
    here = oracle.per_example_gradients(model, loss_fn, batch)
    there = oracle.per_example_gradients(model, loss_fn, other)
    return (c * oracle.norms(here)).sum() + (big_c * oracle.inner(here, there)).sum()


def _zoo_problem(case):
    model = case.make_model().double()
    batch = _double(case.make_batch(3, seed=0))
    other = _double(case.make_batch(2, seed=1))
    gen = torch.Generator().manual_seed(2)
    weights = (torch.randn(3, generator=gen, dtype=DOUBLE), torch.randn(3, 2, generator=gen,
               dtype=DOUBLE))  # fmt: skip
    return model, batch, other, weights


def _double_backward(name, case, model, batch, other, weights):
    objective = _objective(impls.get(name), model, case.loss_fn, batch, other, weights)
    params = _trainable(model)
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    return objective, [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


@pytest.mark.parametrize("case", ZOO, ids=str)
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_double_backward_matches_directional_finite_differences(name, case, request):
    model, batch, other, weights = _zoo_problem(case)
    if (name, case.name) in KNOWN_REFUSALS:
        with pytest.raises(Unsupported):
            _double_backward(name, case, model, batch, other, weights)
        return
    value, grads = _double_backward(name, case, model, batch, other, weights)
    params = _trainable(model)
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=gen, dtype=DOUBLE) for p in params]
    _keep_padding_rows(model, params, direction)
    eps = 1e-5
    values = []
    originals = [p.detach().clone() for p in params]
    for sign in (1, -1):
        with torch.no_grad():
            for p, original, v in zip(params, originals, direction, strict=True):
                p.copy_(original + sign * eps * v)
        values.append(_oracle_objective(model, case.loss_fn, batch, other, weights))
    with torch.no_grad():
        for p, original in zip(params, originals, strict=True):
            p.copy_(original)
    finite_difference = (values[0] - values[1]) / (2 * eps)
    analytic = sum((g * v).sum() for g, v in zip(grads, direction, strict=True))
    torch.testing.assert_close(value, _oracle_objective(model, case.loss_fn, batch, other,
                               weights), rtol=1e-9, atol=1e-12)  # fmt: skip
    torch.testing.assert_close(analytic, finite_difference, rtol=1e-6, atol=1e-8)


def _keep_padding_rows(model, params, direction):
    """No step along an embedding's padding row: autograd defines its gradient as zero."""
    index = {id(p): k for k, p in enumerate(params)}
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            if id(module.weight) in index:
                direction[index[id(module.weight)]][module.padding_idx] = 0


@pytest.mark.skipif(len(DIFFERENTIABLE) < 2, reason="one differentiable implementation")
@pytest.mark.parametrize("case", ZOO, ids=str)
def test_double_backward_agrees_between_implementations(case):
    model, batch, other, weights = _zoo_problem(case)
    results = {}
    for name in DIFFERENTIABLE:
        if (name, case.name) not in KNOWN_REFUSALS:
            results[name] = _double_backward(name, case, model, batch, other, weights)[1]
    if len(results) < 2:
        pytest.skip("fewer than two implementations differentiate this case (KNOWN_REFUSALS)")
    reference_name = next(iter(results))
    for name, grads in results.items():
        for p_name, got, want in zip(
            [n for n, p in model.named_parameters() if p.requires_grad],
            grads,
            results[reference_name],
            strict=True,
        ):
            torch.testing.assert_close(
                got, want, rtol=1e-8, atol=1e-10, msg=f"{name} vs {reference_name}: {p_name}"
            )


# -- seed 000: d/dθ of the squared cosine similarity of two examples' gradients --------------


def _seed_network():
    """The seed's D_net (2 -> 4) then Phi_net (4 -> 1), with its hand-set weights."""
    model = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 0.0], [1.0, 0.0]]))
        model[0].bias.zero_()
        model[1].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        model[1].bias.zero_()
    return model


def _phi(outputs, targets):
    """Each example's 'loss' is the network's output φ(D(z))."""
    return outputs[:, 0]


SEED_BATCH = (torch.tensor([[1.0, 5.0], [1.0, 0.5]], dtype=DOUBLE), torch.zeros(2))


def _squared_cosine(gram):
    return gram[0, 1] ** 2 / (gram[0, 0] * gram[1, 1])


def _closed_form_squared_cosine(model, z):
    """⟨g_i, g_j⟩ = ‖w_φ‖²(z_i·z_j + 1) + D(z_i)·D(z_j) + 1 for this two-layer linear network."""
    d_weight, d_bias = model[0].weight, model[0].bias
    phi_weight = model[1].weight
    d = z @ d_weight.T + d_bias
    gram = phi_weight.pow(2).sum() * (z @ z.T + 1) + d @ d.T + 1
    return _squared_cosine(gram)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_seed_000_gradient_of_squared_cosine_similarity(name):
    model = _seed_network()
    impl = impls.get(name)
    params = list(model.parameters())
    sentinels = [torch.full_like(p, 7.0) for p in params[:2]]
    model[0].weight.grad, model[0].bias.grad = sentinels  # stale gradients a user left there

    gram = impl.inner(model, _phi, SEED_BATCH, create_graph=True)
    torch.testing.assert_close(
        gram, torch.tensor([[1439.0, 201.5], [201.5, 77.75]], dtype=DOUBLE), rtol=1e-14, atol=0
    )
    squared_cosine = _squared_cosine(gram)
    # φ's bias enters every example's gradient as the constant 1: it is unused in cos²
    grads = torch.autograd.grad(squared_cosine, params, allow_unused=True, materialize_grads=True)

    # the call left .grad alone: the sentinels are still there, the other .grad still None
    assert model[0].weight.grad is sentinels[0] and model[0].bias.grad is sentinels[1]
    assert all(torch.equal(s, torch.full_like(s, 7.0)) for s in sentinels)
    assert model[1].weight.grad is None and model[1].bias.grad is None

    # against the closed form, differentiated by autograd, and against finite differences
    z = SEED_BATCH[0]
    reference = torch.autograd.grad(
        _closed_form_squared_cosine(model, z), params, allow_unused=True, materialize_grads=True
    )
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for p, got in zip(params, grads, strict=True):
        torch.testing.assert_close(got, _finite_differences(model, p), rtol=1e-7, atol=1e-9)

    # a second call gives the same answer: nothing accumulated between calls (the seed's bug)
    again = _squared_cosine(impl.inner(model, _phi, SEED_BATCH, create_graph=True))
    assert again.item() == squared_cosine.item()
    # backward() on the result fills .grad with exactly d cos²/dθ, nothing stale added
    for p in params:
        p.grad = None
    again.backward()
    for p, want in zip(params, reference, strict=True):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _finite_differences(model, p, eps=1e-6):
    """Central differences of the squared cosine, from the float64 oracle, per entry of p."""
    out = torch.zeros_like(p)
    flat = p.data.view(-1)
    for k in range(flat.numel()):
        values, original = [], flat[k].item()
        for step in (eps, -eps):
            flat[k] = original + step
            grads = oracle.per_example_gradients(model, _phi, SEED_BATCH)
            values.append(_squared_cosine(oracle.inner(grads, grads)))
        flat[k] = original
        out.view(-1)[k] = (values[0] - values[1]) / (2 * eps)
    return out


# -- refusals and bookkeeping ----------------------------------------------------------------


@pytest.mark.parametrize("name", OTHERS)
def test_non_differentiable_implementations_refuse(name):
    case = get_case("mlp")
    model, batch = case.make_model(), case.make_batch(3)
    try:
        impl = impls.get(name)
    except ImportError as missing:  # an optional peer that is not installed
        pytest.skip(f"'{name}' cannot be imported here: {missing}")
    assert not impl.differentiable
    with pytest.raises(Unsupported, match="create_graph"):
        impl.norms(model, case.loss_fn, batch, create_graph=True)
    with pytest.raises(Unsupported, match="create_graph"):
        impl.norms(model, case.loss_fn, batch, per_param=True, create_graph=True)
    with pytest.raises(Unsupported, match="create_graph"):
        impl.inner(model, case.loss_fn, batch, create_graph=True)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_differentiable_flag_and_graph(name):
    impl = impls.get(name)
    assert impl.differentiable
    model, loss_fn, batch, _ = SMALL["mlp"]
    assert impl.norms(model, loss_fn, batch, create_graph=True).requires_grad
    assert impl.inner(model, loss_fn, batch, create_graph=True).requires_grad
    per_param = impl.norms(model, loss_fn, batch, per_param=True, create_graph=True)
    assert all(v.requires_grad for v in per_param.values())
