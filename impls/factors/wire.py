"""Factors on the wire: one parameter group's per-example gradients packed for another process,
each parameter in whichever form is smaller to send, the factors or the gradients they describe.

``pack(group)`` gives a :class:`Packed`: a picklable ``spec`` (one node per parameter; tensors
are referred to by their index) and the tensors themselves. ``to_buffer`` lays the tensors out in
one byte buffer (one collective carries every dtype), ``from_buffer`` reads them back as views,
and ``unpack(spec, tensors)`` rebuilds the factors, so that the receiver reduces them with the
same code as its own (``impls.factors.groups.inner_sum``).

Sizes, per example (``e``: bytes per element):

- :class:`Outer` (a Linear or Conv weight over t positions, G groups): G·t·(i+o)·e as factors,
  i·o·G·e as a gradient;
- :class:`GradientSums` (the bias beside such a weight): nothing when its weight goes as
  factors (the receiver sums the weight's output gradients again), o·G·e otherwise;
- :class:`Indexed` (an Embedding's rows): t·(4 + d·e) (+ t for a mask) as factors, V·d·e as a
  gradient;
- :class:`Dense`: the gradient; :class:`Sum`: its parts, or its sum as one gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from impls.factors.base import Dense, Factors, Sum
from impls.factors.indexed import Indexed
from impls.factors.outer import GradientSums, Outer

#: byte alignment of every tensor in a buffer (a view of a slice needs its dtype's alignment)
ALIGN = 16

FACTORS, GRADIENTS = "factors", "gradients"


@dataclass
class Packed:
    """A group's factors ready to send: ``spec`` (picklable), ``tensors`` and, per parameter,
    whether it goes as factors or as per-example gradients."""

    spec: list[tuple[str, Any]]
    tensors: list[Tensor] = field(default_factory=list)
    sent_as: dict[str, str] = field(default_factory=dict)
    #: parameter name -> bytes of its tensors
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _activation_bytes(f: Outer) -> int:
    """Bytes of the activations as sent (built, when the factors hold what builds them)."""
    if isinstance(f.source, Tensor):
        return _nbytes(f.source)
    return math.prod(f.source.shape) * f.source.inputs()[0].element_size()


def _dense_bytes(f: Factors) -> int:
    return f.batch_size * math.prod(f.shape) * _element_size(f)


def _element_size(f: Factors) -> int:
    if isinstance(f, Dense):
        return f.values.element_size()
    if isinstance(f, Outer):
        return f.gradients.element_size()
    if isinstance(f, GradientSums):
        return f.outer.gradients.element_size()
    if isinstance(f, Indexed):
        return f.values.element_size()
    if isinstance(f, Sum):
        return _element_size(f.parts[0])
    raise TypeError(f"unknown factor kind {type(f).__name__}")


def _rows_dtype(f: Indexed) -> torch.dtype:
    return torch.int32 if f.num_rows <= torch.iinfo(torch.int32).max else torch.int64


def _factor_bytes(f: Factors) -> int | None:
    """Bytes of ``f`` sent as factors (None: it has no form smaller than a gradient)."""
    if isinstance(f, Outer):
        return _nbytes(f.gradients) + _activation_bytes(f)
    if isinstance(f, Indexed):
        rows = f.rows.numel() * _itemsize(_rows_dtype(f))
        keep = f.keep.numel() if f.keep is not None else 0
        return rows + _nbytes(f.values) + keep
    if isinstance(f, Sum):
        return sum(_cheapest(p)[1] for p in f.parts)
    return None


def _cheapest(f: Factors) -> tuple[str, int]:
    """(FACTORS or GRADIENTS, bytes) for one factor on its own."""
    dense = _dense_bytes(f)
    factored = _factor_bytes(f)
    if factored is not None and factored < dense:
        return FACTORS, factored
    return GRADIENTS, dense


def pack(group: dict[str, Factors]) -> Packed:
    """The group's factors, each parameter as its factors or as its per-example gradients,
    whichever is fewer bytes (a bias rides on its weight's factors for free)."""
    packed = Packed(spec=[])
    # weights first, so that a bias can refer to its weight's factors
    order = sorted(group, key=lambda name: isinstance(group[name], GradientSums))
    # id(output gradients) -> name, for Outers sent as factors: a bias's sums are those of
    # its weight's output gradients (the weight's Outer may be a placed copy of the bias's)
    sent_outer: dict[int, str] = {}
    for name in order:
        f = group[name]
        before = len(packed.tensors)
        if isinstance(f, GradientSums) and id(f.outer.gradients) in sent_outer:
            node = ("sums", sent_outer[id(f.outer.gradients)], tuple(f.shape), f.scale)
            packed.sent_as[name] = FACTORS
        else:
            form, _ = _cheapest(f)
            node = _node(f, packed.tensors) if form == FACTORS else _dense(f, packed.tensors)
            packed.sent_as[name] = form
            if isinstance(f, Outer) and form == FACTORS:
                sent_outer[id(f.gradients)] = name
        packed.sizes[name] = sum(_nbytes(t) for t in packed.tensors[before:])
        packed.spec.append((name, node))
    return packed


def _add(tensors: list[Tensor], t: Tensor) -> int:
    tensors.append(t.detach().contiguous())
    return len(tensors) - 1


def _dense(f: Factors, tensors: list[Tensor]) -> tuple:
    return ("dense", _add(tensors, f.materialise()))


def _node(f: Factors, tensors: list[Tensor]) -> tuple:
    if isinstance(f, Outer):
        g, a = _add(tensors, f.gradients), _add(tensors, f.activations)
        return ("outer", g, a, tuple(f.shape), f.row_start, f.transposed)
    if isinstance(f, Indexed):
        rows = _add(tensors, f.rows.to(_rows_dtype(f)))
        values = _add(tensors, f.values)
        keep = _add(tensors, f.keep) if f.keep is not None else None
        return ("indexed", rows, values, f.num_rows, keep)
    if isinstance(f, Sum):
        parts = []
        for p in f.parts:
            form, _ = _cheapest(p)
            parts.append(_node(p, tensors) if form == FACTORS else _dense(p, tensors))
        return ("sum", parts)
    return _dense(f, tensors)


def unpack(spec: list[tuple[str, Any]], tensors: list[Tensor]) -> dict[str, Factors]:
    """The group ``pack`` described, rebuilt from the received tensors."""
    out: dict[str, Factors] = {}
    for name, node in spec:
        if node[0] == "sums":
            _, weight, shape, scale = node
            out[name] = GradientSums(out[weight], torch.Size(shape), scale)
        else:
            out[name] = _build(node, tensors)
    return out


def _build(node: tuple, tensors: list[Tensor]) -> Factors:
    kind = node[0]
    if kind == "dense":
        return Dense(tensors[node[1]])
    if kind == "outer":
        _, g, a, shape, row_start, transposed = node
        return Outer(tensors[g], tensors[a], torch.Size(shape), row_start, transposed)
    if kind == "indexed":
        _, rows, values, num_rows, keep = node
        mask = tensors[keep] if keep is not None else None
        return Indexed(tensors[rows].long(), tensors[values], num_rows, mask)
    if kind == "sum":
        return Sum([_build(part, tensors) for part in node[1]])
    raise ValueError(f"unknown factor node '{kind}'")


# -- one byte buffer for many tensors --------------------------------------------------------------

#: (byte offset, dtype, shape) of each tensor in a buffer
Layout = list[tuple[int, torch.dtype, tuple[int, ...]]]


def metas(tensors: list[Tensor]) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each tensor: what a receiver needs to lay out the buffer."""
    return [(t.dtype, tuple(t.shape)) for t in tensors]


def layout_of(
    described: list[tuple[torch.dtype, tuple[int, ...]]], start: int = 0
) -> tuple[Layout, int]:
    """Where each (dtype, shape) goes in a buffer, from byte ``start`` on; and where it ends."""
    layout, offset = [], start
    for dtype, shape in described:
        offset = aligned(offset)
        layout.append((offset, dtype, tuple(shape)))
        offset += math.prod(shape) * _itemsize(dtype)
    return layout, offset


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def write(buffer: Tensor, tensors: list[Tensor], layout: Layout) -> None:
    """Copy ``tensors`` into the uint8 ``buffer`` at the places of ``layout``."""
    for t, (offset, _, _) in zip(tensors, layout, strict=True):
        size = _nbytes(t)
        if size:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            buffer[offset : offset + size].copy_(flat)


def read(buffer: Tensor, layout: Layout, device: torch.device | None = None) -> list[Tensor]:
    """The tensors of ``layout`` as views of the uint8 ``buffer`` (moved to ``device``)."""
    out = []
    for offset, dtype, shape in layout:
        size = math.prod(shape) * _itemsize(dtype)
        t = buffer[offset : offset + size].view(dtype).reshape(shape)
        out.append(t if device is None else t.to(device))
    return out
