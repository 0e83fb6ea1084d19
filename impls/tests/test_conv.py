"""Convolutions: the patches built on demand, and each example's products of patches formed from
the input without building them (``impls.layers.conv.Patches``), against the built patches and
against per-example gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import impls
from impls.factors import costs
from impls.layers.conv import Patches
from impls.tests.conftest import DOUBLE
from impls.tests.conftest import ce as _ce

#: (spatial input sizes, kernel, stride, padding, dilation, groups): 1d, 2d and 3d, strides,
#: dilations, explicit / 'same' / 'valid' padding, grouped and not
GEOMETRIES = {
    "1d_stride": ((9,), (3,), (2,), (1,), (1,), 2),
    "1d_dilated_same": ((8,), (3,), (1,), "same", (2,), 1),
    "2d_plain": ((6, 5), (3, 3), (1, 1), (0, 0), (1, 1), 1),
    "2d_stride_pad_groups": ((7, 6), (3, 2), (2, 1), (1, 2), (1, 1), 2),
    "2d_dilated_valid": ((8, 7), (2, 3), (1, 2), "valid", (2, 1), 1),
    "2d_kernel_1": ((4, 5), (1, 1), (1, 1), (0, 0), (1, 1), 4),
    "3d": ((4, 5, 3), (3, 2, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2), 2),
}


def _patches(name: str, n=5, rows=1, channels=4, seed=0) -> Patches:
    spatial, kernel, stride, padding, dilation, groups = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rows, channels, *spatial, generator=gen, dtype=DOUBLE)
    return Patches(x, kernel, stride, padding, dilation, groups)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_patches_are_the_inputs_of_the_convolution(name, rows):
    """Built patches times the weight is the convolution itself, at every output position."""
    p = _patches(name, rows=rows)
    spatial, kernel, stride, padding, dilation, groups = GEOMETRIES[name]
    n, channels = p.input.shape[0], p.input.shape[2]
    gen = torch.Generator().manual_seed(1)
    out = 8
    weight = torch.randn(out, channels // groups, *kernel, generator=gen, dtype=DOUBLE)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    want = conv(p.input.flatten(0, 1), weight, None, stride, padding, dilation, groups)
    patches = p.build()  # [n, G, r·t, i]
    assert patches.shape == p.shape
    per_group = weight.reshape(groups, out // groups, -1)  # [G, o, i]
    got = torch.einsum("ngti,goi->ngto", patches, per_group)  # [n, G, r·t, o]
    got = got.reshape(n, groups, rows, -1, out // groups).permute(0, 2, 1, 4, 3)
    torch.testing.assert_close(got.reshape(want.shape), want)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_products_from_the_input_are_those_of_the_built_patches(name, rows):
    p = _patches(name, rows=rows)
    built = _patches(name, rows=rows).build()
    for a, b in [(0, 5), (1, 4), (2, 3)]:
        got = p.products(a, b)
        want = built[a:b] @ built[a:b].transpose(2, 3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert p.built is None  # the patches were never built


def test_products_are_differentiable_with_respect_to_the_input():
    p = _patches("2d_stride_pad_groups", n=2, channels=2)
    x = p.input.clone().requires_grad_()

    def from_input(x):
        return Patches(x, p.kernel, p.stride, p.padding, p.dilation, p.groups).products(0, 2)

    def from_patches(x):
        built = Patches(x, p.kernel, p.stride, p.padding, p.dilation, p.groups).build()
        return built @ built.transpose(2, 3)

    torch.autograd.gradcheck(from_input, (x,), fast_mode=True)
    weights = torch.randn(from_input(x).shape, dtype=DOUBLE)
    (got,) = torch.autograd.grad((from_input(x) * weights).sum(), x)
    (want,) = torch.autograd.grad((from_patches(x) * weights).sum(), x)
    torch.testing.assert_close(got, want)


def test_converting_keeps_the_geometry_and_converts_built_patches():
    p = _patches("3d")
    p.build()
    single = p.to(torch.float32)
    assert single.input.dtype == torch.float32 and single.built.dtype == torch.float32
    assert single.shape == p.shape and p.to(DOUBLE) is p
    torch.testing.assert_close(single.products(0, 5), p.products(0, 5).float())


def test_an_input_changed_in_place_before_its_patches_are_read_is_refused():
    """The patches are read late (at the reduction): an input changed since is not read."""
    for read in (lambda p: p.build(), lambda p: p.products(0, 5), lambda p: p.to(torch.float32)):
        p = _patches("2d_plain")
        p.input.mul_(2)
        with pytest.raises(impls.Unsupported, match="modified in place"):
            read(p)
    p = _patches("2d_plain")
    built = p.build()
    p.input.mul_(2)
    assert p.build() is built  # built before the change: what the call saw


class FoldedConvNet(nn.Module):
    """Convolutions over examples of 2 rows each (a folded batch), 2d and 1d, one with 'same'."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=(1, 2), groups=1)
        self.grouped = nn.Conv2d(4, 4, 2, dilation=2, groups=2, bias=False)
        self.line = nn.Conv1d(3, 2, 3, padding="same")
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, x):  # x [B, 2, 3, 7, 8]
        n = x.shape[0]
        y = torch.tanh(self.grouped(torch.tanh(self.conv(x.flatten(0, 1)))))
        y = y.mean((2, 3)).unflatten(0, (n, 2)).sum(1)  # [B, 4]
        z = torch.tanh(self.line(x[:, 0, :, 0, :])).mean(2)  # [B, 2]
        return self.head(torch.cat([y, z], 1))


def _problem():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(5, 2, 3, 7, 8, generator=gen, dtype=DOUBLE), torch.tensor([0, 1, 2, 0, 1]))
    other = (torch.randn(3, 2, 3, 7, 8, generator=gen, dtype=DOUBLE), torch.tensor([2, 1, 0]))
    return FoldedConvNet().double(), batch, other


@pytest.mark.parametrize("products", ["from_input", "from_patches"])
@pytest.mark.parametrize("force", [None, "factored", "materialised"])
def test_conv_norms_and_inner_products_agree_with_naive(monkeypatch, force, products):
    """Each form, the factored norm's products of patches formed from the input or from built
    patches, in small chunks."""
    monkeypatch.setattr(costs.COSTS, "force", force)
    monkeypatch.setattr(costs, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(costs, "MATERIALISE_ELEMENTS", 40)
    cost = 0.0 if products == "from_input" else math.inf
    monkeypatch.setattr(Patches, "products_cost", lambda self: cost)
    formed, own = [], Patches.products
    monkeypatch.setattr(Patches, "products", lambda self, a, b: formed.append(a) or own(self, a, b))
    model, batch, other = _problem()
    ghost, naive = impls.get("ghost"), impls.get("naive")
    got = ghost.norms(model, _ce, batch, per_param=True)
    want = naive.norms(model, _ce, batch, per_param=True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
    # every convolution's norm formed its products from the input exactly when asked to
    assert len(formed) >= (3 if products == "from_input" and force != "materialised" else 0)
    assert not formed or products == "from_input"
    for args in ((), (other,)):
        torch.testing.assert_close(
            ghost.inner(model, _ce, batch, *args), naive.inner(model, _ce, batch, *args),
            rtol=1e-9, atol=1e-12,
        )  # fmt: skip


def test_factored_norms_from_the_input_are_differentiable(monkeypatch):
    monkeypatch.setattr(costs.COSTS, "force", "factored")
    monkeypatch.setattr(Patches, "products_cost", lambda self: 0.0)
    model, batch, _ = _problem()
    params = tuple(p for p in model.parameters() if p.requires_grad)
    ghost = impls.get("ghost")
    assert torch.autograd.gradcheck(
        lambda *inputs: ghost.norms(model, _ce, batch, create_graph=True),
        params, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True,
    )  # fmt: skip


def test_the_cost_model_forms_a_stride_one_layers_products_from_its_input():
    """A late CNN layer (many channels, small output): from the input; a strided one: from
    the patches."""
    late = Patches(torch.zeros(64, 1, 64, 10, 10), (3, 3), (1, 1), (0, 0), (1, 1), 1)
    n, groups, t, i = late.shape
    from_patches = n * groups * t * t * i * costs.COSTS.bmm + late.build_cost()
    assert late.products_cost() < from_patches / 2
    strided = Patches(torch.zeros(64, 1, 32, 16, 16), (3, 3), (2, 2), (1, 1), (1, 1), 2)
    n, groups, t, i = strided.shape
    assert strided.products_cost() > n * groups * t * t * i * costs.COSTS.bmm
