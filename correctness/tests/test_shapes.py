"""Property-based sweeps of Linear and Conv shapes, down to an empty batch, every implementation
against the float64 oracle (norms and Gram matrix)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import impls
from correctness import oracle
from correctness.harness import relative_error
from correctness.losses import squared_error
from correctness.tests.test_agreement import MUST_ANSWER
from impls import Unsupported

SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _agree(name, model, batch):
    model = model.double()
    x, y = batch
    batch = (x.double() if x.is_floating_point() else x, y.double())
    impl = impls.get(name)
    try:
        norms = impl.norms(model, squared_error, batch)
        gram = impl.inner(model, squared_error, batch)
    except Unsupported:
        assert name not in MUST_ANSWER, f"{name} refused a plain layer"
        return
    if batch[0].shape[0] == 0:
        assert norms.shape == (0,) and gram.shape == (0, 0)
        return
    grads = oracle.per_example_gradients(model, squared_error, batch)
    assert relative_error(norms, oracle.norms(grads)) <= 1e-6
    assert relative_error(gram, oracle.inner(grads, grads)) <= 1e-6


@st.composite
def linear_problems(draw):
    batch = draw(st.integers(0, 4))
    leading = draw(st.lists(st.integers(1, 4), max_size=2))
    fan_in, fan_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(fan_in, fan_out, bias=bias)
    x = torch.randn(batch, *leading, fan_in, generator=gen)
    y = torch.randn(batch, *leading, fan_out, generator=gen)
    return model, (x, y)


@st.composite
def conv_problems(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    size = draw(st.integers(kernel + 1, 6 if dims < 3 else 4))
    padding = draw(st.sampled_from([0, 1, "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2)) if (size - 1) >= 2 * (kernel - 1) else 1
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"])) if padding == 1 else "zeros"
    bias = draw(st.booleans())
    batch = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    conv = getattr(torch.nn, f"Conv{dims}d")(
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, *([size] * dims), generator=gen)
    with torch.no_grad():
        y = torch.randn(conv(x).shape, generator=gen)
    return conv, (x, y)


@pytest.mark.parametrize("name", impls.names())
@SETTINGS
@given(problem=linear_problems())
def test_linear_shapes(name, problem):
    _agree(name, *problem)


@pytest.mark.parametrize("name", impls.names())
@SETTINGS
@given(problem=conv_problems())
def test_conv_shapes(name, problem):
    _agree(name, *problem)
