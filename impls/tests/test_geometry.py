"""Gradient geometry (impls.geometry) against gradients materialised by the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import impls
from correctness import oracle
from correctness.cases import get_case
from correctness.harness import perturbed
from impls import geometry
from impls.tests.conftest import DOUBLE
from impls.tests.conftest import ce as _ce
from impls.tests.conftest import double as _double

#: implementations the geometry is checked with (ghost once it is registered)
IMPLEMENTATIONS = [n for n in ("naive", "hooks", "function", "ghost") if n in impls.names()]
CASES = ["mlp_f64", "conv1d", "embedding"]  # covered by every implementation above


def _problem(case_name):
    case = get_case(case_name)
    model = case.make_model().double()
    return (
        case,
        model,
        _double(case.make_batch(4, seed=0)),
        _double(case.make_batch(3, seed=1)),
        perturbed(model),
    )


def _gradients(model, loss_fn, batch) -> torch.Tensor:
    """Tensor[B, P]: every example's gradient, materialised by the float64 oracle."""
    grads = oracle.per_example_gradients(model, loss_fn, batch)
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def _cosines(x, y):
    return (x @ y.T) / (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :])


def _close(got, want, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_cosine_similarity_within_across_batches_and_checkpoints(name, case_name):
    case, model, batch, other, other_model = _problem(case_name)
    g = _gradients(model, case.loss_fn, batch)
    g_other = _gradients(model, case.loss_fn, other)
    g_other_model = _gradients(other_model, case.loss_fn, other)
    within = geometry.cosine_similarity(name, model, case.loss_fn, batch)
    assert within.shape == (4, 4)
    _close(within, _cosines(g, g))
    _close(within.diagonal(), torch.ones(4, dtype=DOUBLE))
    across = geometry.cosine_similarity(name, model, case.loss_fn, batch, other)
    assert across.shape == (4, 3)
    _close(across, _cosines(g, g_other))
    checkpoints = geometry.cosine_similarity(
        impls.get(name), model, case.loss_fn, batch, other, other_model=other_model
    )
    _close(checkpoints, _cosines(g, g_other_model))
    same_batch = geometry.cosine_similarity(
        name, model, case.loss_fn, batch, other_model=other_model
    )
    _close(same_batch, _cosines(g, _gradients(other_model, case.loss_fn, batch)))


def _reference_parts(g, d):
    """The split of each row of g [B, P] against d [P], with the orthogonal parts themselves."""
    along = g @ d / d.norm()
    orthogonal = g - (g @ d / (d @ d))[:, None] * d
    norm = g.norm(dim=1)
    return orthogonal, {
        "norm": norm,
        "along": along,
        "orthogonal_norm": orthogonal.norm(dim=1),
        "cosine_to_direction": along / norm,
        "cosine_to_orthogonal": (g * orthogonal).sum(1) / (norm * orthogonal.norm(dim=1)),
        "direction_norm": d.norm(),
    }


def _check_parts(parts, g, d):
    orthogonal, want = _reference_parts(g, d)
    for field, value in want.items():
        got = getattr(parts, field)
        assert got.shape == value.shape, field
        _close(got, value, rtol=1e-8, atol=1e-10)
    # the split the module describes is orthogonal: rebuilt from its own numbers, g_i⊥ ⟂ d
    rebuilt = g - (parts.along / parts.direction_norm)[:, None].to(g.dtype) * d
    _close(rebuilt @ d / (rebuilt.norm(dim=1) * d.norm()), torch.zeros(len(g), dtype=DOUBLE))
    _close(rebuilt.norm(dim=1), parts.orthogonal_norm.to(g.dtype), rtol=1e-8, atol=1e-10)
    _close(parts.cosine_to_direction**2 + parts.cosine_to_orthogonal**2, torch.ones(len(g)))


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_orthogonal_to_the_batch_mean_gradient(name, case_name):
    case, model, batch, _, _ = _problem(case_name)
    g = _gradients(model, case.loss_fn, batch)
    parts = geometry.orthogonal_parts(name, model, case.loss_fn, batch)
    _check_parts(parts, g, g.mean(0))


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_orthogonal_to_weighted_and_foreign_directions(name):
    case, model, batch, other, other_model = _problem("mlp_f64")
    loss_fn = case.loss_fn
    g = _gradients(model, loss_fn, batch)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=DOUBLE)
    parts = geometry.orthogonal_parts(name, model, loss_fn, batch, weights)
    _check_parts(parts, g, weights @ g)
    # a validation batch's mean gradient
    parts = geometry.orthogonal_parts(name, model, loss_fn, batch, direction_batch=other)
    _check_parts(parts, g, _gradients(model, loss_fn, other).mean(0))
    # the batch's own gradients at another checkpoint, weighted
    parts = geometry.orthogonal_parts(
        name, model, loss_fn, batch, weights, direction_model=other_model
    )
    _check_parts(parts, g, weights @ _gradients(other_model, loss_fn, batch))
    # another batch at another checkpoint
    parts = geometry.orthogonal_parts(
        name, model, loss_fn, batch, [1.0, 0.0, -2.0], direction_batch=other,
        direction_model=other_model,
    )  # fmt: skip
    d = torch.tensor([1.0, 0.0, -2.0], dtype=DOUBLE) @ _gradients(other_model, loss_fn, other)
    _check_parts(parts, g, d)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_zero_direction_is_a_value_error(name):
    case, model, batch, other, _ = _problem("mlp_f64")
    loss_fn = case.loss_fn
    with pytest.raises(ValueError, match="zero norm") as error:
        geometry.orthogonal_parts(name, model, loss_fn, batch, torch.zeros(4))
    assert "\n" not in str(error.value)
    # weights that cancel: an example and its duplicate, with weights 1 and -1
    x, y = batch
    twice = (torch.cat([x[:1], x[:1]]), torch.cat([y[:1], y[:1]]))
    with pytest.raises(ValueError, match="zero norm"):
        geometry.orthogonal_parts(name, model, loss_fn, batch, [1.0, -1.0], direction_batch=twice)
    with pytest.raises(ValueError, match="zero norm"):
        geometry.orthogonal_parts(name, model, loss_fn, batch, direction_batch=(x[:0], y[:0]))


def test_mismatched_weights_are_a_value_error():
    case, model, batch, other, _ = _problem("mlp_f64")
    for weights, direction in (
        (torch.ones(3), None),
        (torch.ones(4), other),
        (torch.ones(2, 2), None),
        (torch.ones(5), None),
    ):
        with pytest.raises(ValueError, match="weights has shape"):
            geometry.orthogonal_parts(
                "naive", model, case.loss_fn, batch, weights, direction_batch=direction
            )
    with pytest.raises(ValueError, match="weights has shape"):
        geometry.orthogonal_parts_from_inner(
            torch.eye(3), torch.ones(3), torch.eye(3), torch.ones(2)
        )


def test_zero_gradient_gives_nan_cosines():
    gram = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DOUBLE)
    cosines = geometry.cosines_from_inner(gram, gram.diagonal(), gram.diagonal())
    assert cosines[0, 0] == 1 and cosines[1].isnan().all() and cosines[:, 1].isnan().all()


# -- differentiable results -------------------------------------------------------------------

DIFFERENTIABLE = [n for n in ("naive", "vmap", "ghost") if n in impls.names()]


def _small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(3, 3, generator=gen, dtype=DOUBLE), torch.tensor([0, 1, 1]))
    other = (torch.randn(2, 3, generator=gen, dtype=DOUBLE), torch.tensor([1, 0]))
    return model, batch, other


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_results_are_differentiable_with_create_graph(name):
    model, batch, other = _small()
    params = tuple(model.parameters())

    def orthogonal(*inputs):
        parts = geometry.orthogonal_parts(name, model, _ce, batch, create_graph=True)
        return torch.cat([parts.orthogonal_norm, parts.cosine_to_direction])

    def foreign(*inputs):
        parts = geometry.orthogonal_parts(
            name, model, _ce, batch, direction_batch=other, create_graph=True
        )
        return parts.cosine_to_orthogonal

    def cosines(*inputs):
        return geometry.cosine_similarity(name, model, _ce, batch, other, create_graph=True)

    for f in (orthogonal, foreign, cosines):
        assert f(*params).requires_grad
        # gradcheck perturbs the model's own parameters in place
        assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_without_create_graph_results_hold_no_graph():
    model, batch, _ = _small()
    parts = geometry.orthogonal_parts("naive", model, _ce, batch)
    assert not parts.orthogonal_norm.requires_grad
    assert not geometry.cosine_similarity("naive", model, _ce, batch).requires_grad
