"""Low precision in the implementations (``impls._precision``): the dtype of the results, the
caller's autocast around the forward only, and ghost's reductions in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import impls
from correctness import oracle
from correctness.harness import relative_error
from correctness.precision import PRECISIONS
from impls.factors import GradientSums, Outer, groups, is_layer_pair

ANSWERING = ("naive", "vmap", "hooks", "function", "ghost")


def _ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(4, 6, dtype=dtype), torch.randint(0, 3, (4,))
    return model, (x, y)


class Bag(nn.Module):
    """Embedding + Linear: the Gram matrix that crashed under autocast (issue 11)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


@pytest.mark.parametrize("name", ANSWERING)
@pytest.mark.parametrize(
    "dtype, expected",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
     (torch.float64, torch.float64)],
)  # fmt: skip
def test_results_are_float32_at_least(name, dtype, expected):
    model, batch = _mlp(dtype)
    impl = impls.get(name)
    assert impl.norms(model, _ce, batch).dtype == expected
    assert {t.dtype for t in impl.norms(model, _ce, batch, per_param=True).values()} == {expected}
    assert impl.inner(model, _ce, batch).dtype == expected
    empty = (batch[0][:0], batch[1][:0])
    assert impl.norms(model, _ce, empty).dtype == expected
    assert impl.inner(model, _ce, batch, empty).dtype == expected


@pytest.mark.parametrize("name", ANSWERING)
def test_the_callers_autocast_wraps_the_forward_and_stays(name):
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 3)

        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return self.body(x)

    model, (x, y) = Spy(), _mlp()[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norms = impls.get(name).norms(model, _ce, (x, y))
        assert torch.is_autocast_enabled("cpu")  # the caller's region is intact
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    assert norms.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")


def test_ghost_gram_with_an_embedding_under_autocast():
    """The crash of issue 11 (index_add_ on float32 and bfloat16 factors): now within the
    autocast tolerance of the float64 oracle."""
    torch.manual_seed(0)
    model, tokens = Bag(), torch.randint(0, 20, (5, 7))
    batch = (tokens, torch.randint(0, 3, (5,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = impls.get("ghost").inner(model, _ce, batch)
    grads = oracle.per_example_gradients(model, _ce, batch)
    tolerance = PRECISIONS["autocast-bf16"].tolerance_for("gram")
    assert gram.dtype == torch.float32
    assert relative_error(gram, oracle.inner(grads, grads)) <= tolerance


def test_autocast_inside_the_model_forward():
    """A model that enters autocast in its own forward needs nothing from the caller."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.body(x).float()

    torch.manual_seed(0)
    model, batch = Mixed(), _mlp()[1]
    grads = oracle.per_example_gradients(model, _ce, batch)
    tolerance = PRECISIONS["autocast-bf16"].tolerance
    for name in ANSWERING:
        impl = impls.get(name)
        assert (
            relative_error(impl.norms(model, _ce, batch), oracle.norms(grads)) <= tolerance["norms"]
        ), name
        gram = impl.inner(model, _ce, batch)
        assert relative_error(gram, oracle.inner(grads, grads)) <= tolerance["inner"], name


def test_factors_are_converted_to_float32_keeping_a_layer_pair():
    torch.manual_seed(0)
    weight = Outer(torch.randn(3, 1, 4, 2, dtype=torch.bfloat16), torch.randn(3, 1, 4, 5),
                   torch.Size((2, 5)))  # fmt: skip
    bias = GradientSums(weight, torch.Size((2,)))
    (group,) = groups.accumulating({"w": weight, "b": bias})
    assert {t.dtype for f in group.values() for t in f.tensors()} == {torch.float32}
    assert is_layer_pair(group["w"], group["b"])
    norms = groups.squared_norms({"w": weight, "b": bias})
    exact = weight.to(torch.float64).materialise().flatten(1).pow(2).sum(1)
    torch.testing.assert_close(norms["w"].double(), exact, rtol=1e-5, atol=0)
    wide = Outer(torch.randn(3, 1, 4, 2, dtype=torch.float64), torch.randn(3, 1, 4, 5).double(),
                 torch.Size((2, 5)))  # fmt: skip
    (kept,) = groups.accumulating({"w": wide})
    assert kept["w"] is wide  # float64 stays float64, not copied


def test_ghost_reductions_ignore_an_ambient_autocast():
    """Called outside an implementation (the floor does), a reduction still multiplies in
    float32: autocast would round the Gram matrix's products to bfloat16."""
    torch.manual_seed(0)
    weight = Outer(torch.randn(6, 1, 1, 40), torch.randn(6, 1, 1, 50), torch.Size((40, 50)))
    exact = groups.inner_sum({"w": weight}, {"w": weight}, same=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = groups.inner_sum({"w": weight}, {"w": weight}, same=True)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact)


@pytest.mark.parametrize("name", ANSWERING)
def test_an_overflow_in_low_precision_is_refused(name):
    """float16 overflows at 65504: per-example gradients of a loss scaled beyond it are not
    numbers, and the call says so instead of returning inf."""
    model, (x, y) = _mlp(torch.float16)

    def huge(outputs, targets):
        return 1e5 * _ce(outputs, targets)  # beyond float16: inf

    with pytest.raises(impls.Unsupported, match="not finite: the per-example gradients overflow"):
        impls.get(name).norms(model, huge, (x * 100, y))
    with pytest.raises(impls.Unsupported, match="torch.float16 parameters"):
        impls.get(name).inner(model, huge, (x * 100, y))
