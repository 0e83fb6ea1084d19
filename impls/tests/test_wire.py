"""Factors on the wire (``impls.factors.wire``): what is packed comes back as the same
per-example gradients, each parameter in the form with fewer bytes, through one byte buffer."""

from __future__ import annotations

import math

import pytest
import torch

from impls.factors import Dense, GradientSums, Indexed, Outer, Sum, groups, wire

DOUBLE = torch.float64


def _outer(n, t, i, o, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Outer(
        torch.randn(n, 1, t, o, generator=g, dtype=DOUBLE),
        torch.randn(n, 1, t, i, generator=g, dtype=DOUBLE),
        torch.Size((o, i)),
    )


def _indexed(n, t, rows, d, seed=0, keep=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, t, generator=g) > 0.3 if keep else None
    return Indexed(
        torch.randint(0, rows, (n, t), generator=g),
        torch.randn(n, t, d, generator=g, dtype=DOUBLE),
        rows,
        mask,
    )


def _through_buffer(packed: wire.Packed) -> dict:
    layout, end = wire.layout_of(wire.metas(packed.tensors))
    buffer = torch.zeros(end, dtype=torch.uint8)
    wire.write(buffer, packed.tensors, layout)
    return wire.unpack(packed.spec, wire.read(buffer, layout))


def _groups():
    few = _outer(3, 2, 16, 12)  # T (i + o) < i o: factors
    many = _outer(3, 40, 4, 5, seed=1)  # T (i + o) > i o: gradients
    return {
        "few positions": {"w": few, "b": GradientSums(few, torch.Size((12,)))},
        "many positions": {"w": many, "b": GradientSums(many, torch.Size((5,)))},
        "embedding": {"e": _indexed(3, 4, 50, 6)},
        "small table": {"e": _indexed(3, 9, 3, 6, seed=2, keep=False)},
        "dense": {"d": Dense(torch.randn(3, 7, dtype=DOUBLE))},
        "tied": {"t": Sum([_indexed(3, 4, 12, 16, seed=3), _outer(3, 4, 16, 12, seed=4)])},
    }


@pytest.mark.parametrize("name", list(_groups()))
def test_what_is_sent_reduces_like_the_original(name):
    group = _groups()[name]
    here = _groups()[name]  # another rank's own factors (same values, other objects)
    received = _through_buffer(wire.pack(group))
    assert set(received) == set(group)
    for key in group:
        torch.testing.assert_close(received[key].materialise(), group[key].materialise())
    expected = groups.inner_sum(here, group, same=False)
    torch.testing.assert_close(groups.inner_sum(here, received, same=False), expected)


def test_each_parameter_goes_in_its_smaller_form():
    packed = wire.pack(_groups()["few positions"])
    assert packed.sent_as == {"w": "factors", "b": "factors"}
    assert packed.sizes["b"] == 0  # the bias's sums come from its weight's output gradients
    packed = wire.pack(_groups()["many positions"])
    assert packed.sent_as == {"w": "gradients", "b": "gradients"}
    assert packed.sizes["w"] == 3 * 4 * 5 * 8
    assert wire.pack(_groups()["embedding"]).sent_as == {"e": "factors"}
    assert wire.pack(_groups()["small table"]).sent_as == {"e": "gradients"}


def test_sizes_are_what_the_buffer_holds():
    for group in _groups().values():
        packed = wire.pack(group)
        assert sum(packed.sizes.values()) == packed.nbytes
        layout, end = wire.layout_of(wire.metas(packed.tensors))
        assert end >= packed.nbytes and all(offset % wire.ALIGN == 0 for offset, _, _ in layout)


def test_indexed_rows_travel_as_int32():
    packed = wire.pack(_groups()["embedding"])
    kinds = {t.dtype for t in packed.tensors}
    assert torch.int32 in kinds and torch.int64 not in kinds
    rows, values, keep = packed.tensors
    assert packed.nbytes == rows.numel() * 4 + values.numel() * 8 + keep.numel()
    assert math.prod(rows.shape) == 3 * 4
