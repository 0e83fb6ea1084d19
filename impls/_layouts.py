"""Where the examples of a batch are in a tensor, and how each torch operation moves them.

A tensor computed from the batch's inputs carries a :class:`Layout`: dimension ``dim`` has size
``outer · B · inner`` and its index ``k`` holds example ``(k // inner) % B``. The inputs are
``Layout(0)``; ``x.view(B * T, E)`` folds positions batch-major (``Layout(0, inner=T)``);
``multi_head_attention_forward``'s ``view(T * B, E)`` folds them sequence-major
(``Layout(0, outer=T)``). A tensor whose examples cannot be located any more (an operation
summed over the batch, split it across dimensions, or is not known here) carries :class:`Lost`
with the reason. Tensors not computed from the batch carry nothing.

:func:`propagate` gives the tags of an operation's results from its arguments' tags, by the
operation's own semantics (broadcasting, the dimensions it reduces or permutes, the row-major
order of ``reshape``), never by guessing from sizes: a dimension whose size happens to equal B
is not the batch dimension unless an operation put the batch there. Operations not listed here
lose the batch (``Lost``) rather than assume anything.

:func:`canonical` turns a tensor with a layout into its per-example form ``[B, outer·inner,
*other dims]`` that the layer rules read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """The examples are along ``dim``: index k holds example (k // inner) % B."""

    dim: int
    outer: int = 1
    inner: int = 1

    @property
    def plain(self) -> bool:
        """One row per example along ``dim`` (no fold)."""
        return self.outer == 1 and self.inner == 1

    def moved(self, dim: int) -> Layout:
        return Layout(dim, self.outer, self.inner)


@dataclass(frozen=True)
class Lost:
    """Computed from the batch, but its examples cannot be located: ``reason`` says why."""

    reason: str


Tag = Layout | Lost | None


def canonical(x: Tensor, layout: Layout, batch_size: int) -> Tensor:
    """[B, outer·inner, *the other dims in order]: example n's rows of ``x`` at index n."""
    d = layout.dim
    x = x.movedim(d, 0) if d else x
    if layout.plain:
        return x.unsqueeze(1)
    rest = x.shape[1:]
    x = x.reshape(layout.outer, batch_size, layout.inner, *rest)
    if layout.outer == 1:
        return x.reshape(batch_size, layout.inner, *rest)
    return x.transpose(0, 1).reshape(batch_size, layout.outer * layout.inner, *rest)


def from_canonical(x: Tensor, layout: Layout, shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`canonical`: a tensor of ``shape`` with the examples at ``layout``."""
    batch_size = x.shape[0]
    d = layout.dim
    rest = x.shape[2:]
    if layout.plain:
        y = x.squeeze(1)
    elif layout.outer == 1:
        y = x.reshape(batch_size * layout.inner, *rest)
    else:
        y = x.reshape(batch_size, layout.outer, layout.inner, *rest).transpose(0, 1)
        y = y.reshape(layout.outer * batch_size * layout.inner, *rest)
    y = y.movedim(0, d) if d else y
    return y.reshape(shape)


# -- the call an operation was given --------------------------------------------------------------


class Call:
    """One torch call: its function's name, arguments, result and the tags of its tensors."""

    __slots__ = ("name", "func", "args", "kwargs", "result", "tag_of", "batch_size", "_tagged")

    def __init__(self, name, func, args, kwargs, result, tag_of, batch_size):
        self.name, self.func, self.args, self.kwargs = name, func, args, kwargs
        self.result, self.tag_of, self.batch_size = result, tag_of, batch_size
        self._tagged = None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)

    def tagged(self) -> list[tuple[Tensor, Tag]]:
        """Every tensor argument with its tag (nested lists flattened), untagged ones included.

        Read once per call (the handlers ask again): a handler that changes a tag makes a new
        ``Call``."""
        if self._tagged is not None:
            return self._tagged
        out = []
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor):
                out.append((value, self.tag_of(value)))
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, Tensor):
                        out.append((item, self.tag_of(item)))
        self._tagged = out
        return out

    def lost(self, what: str) -> Lost:
        return Lost(f"torch.{self.name} {what}")


Handler = Callable[[Call], Any]  # -> a Tag, or a list of tags aligned with the result's tensors

_HANDLERS: dict[Any, Handler] = {}
_BY_NAME: dict[str, Handler] = {}


def _register(handler: Handler, *names: str) -> None:
    for name in names:
        _BY_NAME[name] = handler


def name_of(func: Any) -> str:
    """``add``, ``linear``, ``T`` (properties), ``__rsub__``: how tables here name a function."""
    if type(func).__name__ == "method-wrapper" and func.__name__ == "__get__":
        return getattr(func.__self__, "__name__", "__get__")
    return getattr(func, "__name__", type(func).__name__)


#: handler_for's answers by function (the tables do not change after import); a property's
#: ``__get__`` is a new method-wrapper at every access, but equal to the last, so it is one key
_FOUND: dict[Any, Handler | None] = {}


def _memo(table: dict, func: Any, compute: Callable[[], Any]) -> Any:
    """``table[func]``, computed once (an unhashable ``func`` is computed every time)."""
    try:
        return table[func]
    except KeyError:
        value = table[func] = compute()
        return value
    except TypeError:
        return compute()


def handler_for(func: Any) -> Handler | None:
    return _memo(_FOUND, func, lambda: _HANDLERS.get(func) or _BY_NAME.get(name_of(func)))


def propagate(call: Call) -> list[Tag]:
    """Tags of the result's tensors (flattened in order) for a call with a tagged argument."""
    leaves = _result_tensors(call.result)
    if not leaves:
        return []
    handler = handler_for(call.func)
    if handler is _ignore:  # shapes, constants, or a tensor handed back as it is (._base)
        return []
    lost = next((t for _, t in call.tagged() if isinstance(t, Lost)), None)
    if handler is None:
        tag: Any = Lost(f"torch.{call.name} is not an operation pegbench follows the batch through")
    elif lost is not None:
        tag = lost
    else:
        try:
            tag = handler(call)
        except _Unfollowable as error:
            tag = Lost(f"torch.{call.name} {error}")
    if isinstance(tag, list):
        if len(tag) != len(leaves):
            return [Lost(f"torch.{call.name}: unexpected results")] * len(leaves)
        return tag
    return [tag] * len(leaves)


def _result_tensors(result: Any) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [r for r in result if isinstance(r, Tensor)]
    return []


class _Unfollowable(Exception):
    """Raised by a handler: the batch cannot be followed (the message completes 'torch.X ...')."""


class _OneLayout:
    """The one layout several tensors of a call must agree on."""

    def __init__(self, conflict: str):
        self.conflict, self.found = conflict, None

    def add(self, layout: Layout) -> None:
        if self.found is not None and layout != self.found:
            raise _Unfollowable(self.conflict)
        self.found = layout


def _layouts(call: Call) -> list[tuple[Tensor, Layout]]:
    return [(x, t) for x, t in call.tagged() if isinstance(t, Layout)]


def _only_layout(call: Call, tensor: Tensor | None = None) -> Layout:
    """The layout of ``tensor`` (or of the only batched argument)."""
    if tensor is not None:
        tag = call.tag_of(tensor)
        if not isinstance(tag, Layout):
            raise _Unfollowable("is called on a tensor that does not carry the batch")
        return tag
    found = _layouts(call)
    if len(found) != 1:
        raise _Unfollowable("combines several tensors that carry the batch")
    return found[0][1]


def _size(layout: Layout, batch_size: int) -> int:
    return layout.outer * batch_size * layout.inner


def _norm_dim(dim: int, ndim: int) -> int:
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise _Unfollowable(f"gets dimension {dim} of a {ndim}-D tensor")
    return dim % max(ndim, 1)


def _dims(value: Any, ndim: int) -> list[int] | None:
    """Normalised dims of a ``dim`` argument (None: every dimension)."""
    if value is None:
        return None
    if isinstance(value, int):
        return [_norm_dim(value, ndim)]
    values = list(value)
    if not values:
        return None  # sum(dim=[]) reduces everything
    return [_norm_dim(int(v), ndim) for v in values]


# -- elementwise operations, with broadcasting ----------------------------------------------------


def broadcast_dim(call: Call, out_ndim: int) -> tuple[int, Layout]:
    """(the result's batch dimension, the layout) for an elementwise op with broadcasting."""
    found: Layout | None = None
    for x, tag in _layouts(call):
        if x.shape[tag.dim] != _size(tag, call.batch_size):
            raise _Unfollowable("is given a tensor whose batch dimension has the wrong size")
        here = tag.moved(tag.dim + out_ndim - x.dim())
        if found is not None and here != found:
            raise _Unfollowable("combines tensors whose examples lie along different dimensions")
        found = here
    if found is None:
        raise _Unfollowable("has no argument that carries the batch")
    return found.dim, found


def _pointwise(call: Call) -> Layout:
    out = call.result if isinstance(call.result, Tensor) else _result_tensors(call.result)[0]
    dim, layout = broadcast_dim(call, out.dim())
    if out.shape[dim] != _size(layout, call.batch_size):
        raise _Unfollowable("broadcasts the batch dimension")
    return layout


def _aten_pointwise_names() -> set[str]:
    names = set()
    for name in dir(torch.ops.aten):
        try:
            packet = getattr(torch.ops.aten, name)
            overloads = packet.overloads()
        except Exception:  # noqa: BLE001 - not an operator packet
            continue
        for overload in overloads:
            try:
                if torch.Tag.pointwise in getattr(packet, overload).tags:
                    names.add(name)
                    break
            except Exception:  # noqa: BLE001
                continue
    return names


_POINTWISE = _aten_pointwise_names() - {"min", "max"}  # min/max(x, dim) reduce: below
_POINTWISE |= {
    # elementwise, but not tagged pointwise in aten (random, type conversions, composites)
    "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "rrelu", "rrelu_",
    "hardswish", "hardswish_", "logsigmoid", "softsign", "tanhshrink", "softmin_",
    "masked_fill_", "masked_fill", "fill_", "zero_", "copy_", "floor_divide", "floor_divide_",
    "bool", "float", "double", "half", "bfloat16", "int", "long", "short", "byte", "char",
    "to", "type", "type_as", "cpu", "cuda", "contiguous", "detach", "detach_", "clone",
    "requires_grad_", "pin_memory", "relu_", "sigmoid_", "tanh_", "where", "clamp", "clip",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "rsub", "positive", "conj", "resolve_conj", "resolve_neg", "square",
    "nan_to_num", "new_tensor_like", "abs_", "exp_", "log_", "neg_", "sqrt_", "rsqrt_",
    "__and__", "__or__", "__xor__", "__invert__", "__iand__", "__ior__", "__ixor__",
    "__rsub__", "__rdiv__", "__rtruediv__", "__rpow__", "__floordiv__", "__rfloordiv__",
    "__mod__", "__rmod__", "__radd__", "__rmul__", "__iadd__", "__isub__", "__imul__",
    "__idiv__", "__itruediv__", "__ipow__", "__add__", "__sub__", "__mul__", "__truediv__",
    "__div__", "__pow__", "__neg__", "__abs__", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "__rand__", "__ror__", "__rxor__", "__rlshift__", "__rrshift__",
    "dropout1d", "dropout2d", "dropout3d", "gelu_", "silu_", "mish_", "elu_", "selu_", "celu_",
    "leaky_relu_", "hardtanh_", "hardsigmoid_", "threshold_", "float_power", "true_divide_",
}  # fmt: skip
_register(_pointwise, *_POINTWISE)


def _min_max(call: Call):
    """min/max: elementwise with a second tensor, a reduction with a dim, everything without."""
    other = call.arg(1, "other")
    if isinstance(other, Tensor):
        return _pointwise(call)
    return _reduction(call)


_register(_min_max, "min", "max")


# -- reductions -----------------------------------------------------------------------------------


#: name -> (position of ``dim``, position of ``keepdim``, what no dim means: None = all dims)
_REDUCTIONS = {
    "sum": (1, 2, None), "mean": (1, 2, None), "nansum": (1, 2, None), "nanmean": (1, 2, None),
    "prod": (1, 2, None), "amax": (1, 2, None), "amin": (1, 2, None), "argmax": (1, 2, None),
    "argmin": (1, 2, None), "all": (1, 2, None), "any": (1, 2, None), "logsumexp": (1, 2, None),
    "count_nonzero": (1, None, None), "norm": (2, 3, None), "vector_norm": (2, 3, None),
    "linalg_vector_norm": (2, 3, None),
    "std": (1, None, None), "var": (1, None, None), "std_mean": (1, None, None),
    "var_mean": (1, None, None), "median": (1, 2, None), "nanmedian": (1, 2, None),
    "mode": (1, 2, -1), "aminmax": (None, None, None), "max": (1, 2, None), "min": (1, 2, None),
}  # fmt: skip


def _reduction(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    dim_at, keep_at, default = _REDUCTIONS[call.name]
    dim = call.kwargs.get("dim", call.arg(dim_at, "dim") if dim_at is not None else None)
    if dim is None:
        dim = default
    if isinstance(dim, Tensor):
        raise _Unfollowable("gets a tensor as dimension")
    dims = _dims(dim, x.dim())
    if dims is None or layout.dim in dims:
        raise _Unfollowable("reduces over the batch dimension (it mixes the examples)")
    keepdim = call.kwargs.get("keepdim", call.arg(keep_at, "keepdim") if keep_at else None)
    new = layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims)
    return layout.moved(new)


_register(_reduction, *(name for name in _REDUCTIONS if name not in ("min", "max")))


#: operations along one dimension that keep the shape: name -> (position of ``dim``, what no
#: dim means; None: every dimension, refused)
_ALONG = {
    "softmax": (1, None), "log_softmax": (1, None), "softmin": (1, None), "_softmax": (1, None),
    "_log_softmax": (1, None), "cumsum": (1, None), "cumprod": (1, None), "cummax": (1, None),
    "cummin": (1, None), "logcumsumexp": (1, None), "sort": (1, -1), "argsort": (1, -1),
    "msort": (1, 0), "topk": (2, -1), "normalize": (2, 1), "glu": (1, -1),
}  # fmt: skip


def _along(call: Call):
    """Operations along one dimension that keep the shape (softmax, cumsum, sort, normalize):
    the examples stay where they are, unless the operation runs along them."""
    x = call.args[0]
    layout = _only_layout(call, x)
    position, default = _ALONG[call.name]
    dim = call.kwargs.get("dim", call.arg(position, "dim"))
    if dim is None:
        dim = default
    if dim is None:
        raise _Unfollowable("without a dimension acts over every dimension")
    if not isinstance(dim, int):
        raise _Unfollowable("gets a dimension that is not an integer")
    if _norm_dim(dim, x.dim()) == layout.dim:
        raise _Unfollowable("acts along the batch dimension (it mixes the examples)")
    return layout


_register(_along, *_ALONG)


# -- shapes: views, permutations, indexing --------------------------------------------------------


def reshaped(layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], b: int) -> Layout:
    """The layout after a row-major reshape from ``in_shape`` to ``out_shape``.

    With OUTER = ∏ in_shape[:d] · outer and INNER = inner · ∏ in_shape[d+1:], element number k in
    row-major order holds example (k // INNER) % B. The result keeps the examples in one
    dimension e when ∏ out[:e] divides OUTER and ∏ out[e+1:] divides INNER.
    """
    d = layout.dim
    outer = math.prod(in_shape[:d]) * layout.outer
    inner = layout.inner * math.prod(in_shape[d + 1 :])
    before = 1
    for e, size in enumerate(out_shape):
        after = math.prod(out_shape[e + 1 :])
        if outer % before == 0 and inner % after == 0:
            if size == (outer // before) * b * (inner // after):
                return Layout(e, outer // before, inner // after)
        before *= size
        if before > outer:
            break
    raise _Unfollowable(
        f"reshapes {tuple(in_shape)} to {tuple(out_shape)}, splitting the batch across dimensions"
    )


def _reshape(call: Call):
    x, out = call.args[0], call.result
    return reshaped(_only_layout(call, x), x.shape, out.shape, call.batch_size)


_register(
    _reshape, "view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "_unsafe_view",
    "ravel", "atleast_1d", "atleast_2d", "atleast_3d",
)  # fmt: skip


def _unsqueeze(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    dim = _norm_dim(call.arg(1, "dim"), x.dim() + 1)
    return layout.moved(layout.dim + (dim <= layout.dim))


_register(_unsqueeze, "unsqueeze", "unsqueeze_")


def _squeeze(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    dims = _dims(call.arg(1, "dim"), x.dim())
    if dims is None:
        dims = [d for d in range(x.dim()) if x.shape[d] == 1]
    dims = [d for d in dims if x.shape[d] == 1]
    if layout.dim in dims:
        raise _Unfollowable("squeezes the batch dimension away")
    return layout.moved(layout.dim - sum(d < layout.dim for d in dims))


_register(_squeeze, "squeeze", "squeeze_")


def _view_dtype_or_shape(call: Call):
    dtype = call.arg(1, "dtype")
    if isinstance(dtype, torch.dtype):
        x = call.args[0]
        if x.element_size() != torch.empty(0, dtype=dtype).element_size():
            raise _Unfollowable("reinterprets the elements with another size")
        return _only_layout(call, x)
    return _reshape(call)


_HANDLERS[torch.Tensor.view] = _view_dtype_or_shape


def _permutation(call: Call) -> list[int]:
    x = call.args[0]
    n = x.dim()
    name = call.name
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        a = _norm_dim(call.arg(1, "dim0"), n)
        b = _norm_dim(call.arg(2, "dim1"), n)
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
        return order
    if name in ("t", "T", "numpy_T"):
        return list(reversed(range(n)))
    if name in ("mT", "mH", "adjoint"):
        order = list(range(n))
        order[-1], order[-2] = order[-2], order[-1]
        return order
    if name == "permute":
        dims = call.args[1:] if len(call.args) > 2 else call.arg(1, "dims")
        dims = list(dims) if not isinstance(dims, int) else [dims]
        return [_norm_dim(d, n) for d in dims]
    if name in ("movedim", "moveaxis"):
        source, destination = call.arg(1, "source"), call.arg(2, "destination")
        source = [source] if isinstance(source, int) else list(source)
        destination = [destination] if isinstance(destination, int) else list(destination)
        source = [_norm_dim(s, n) for s in source]
        destination = [_norm_dim(s, n) for s in destination]
        order = [None] * n
        for s, t in zip(source, destination, strict=True):
            order[t] = s
        rest = iter(d for d in range(n) if d not in source)
        return [o if o is not None else next(rest) for o in order]
    raise _Unfollowable("is not a permutation known here")


def _permute(call: Call):
    layout = _only_layout(call, call.args[0])
    order = _permutation(call)
    return layout.moved(order.index(layout.dim))


_register(
    _permute, "transpose", "swapaxes", "swapdims", "transpose_", "t", "T", "mT", "mH", "adjoint",
    "permute", "movedim", "moveaxis",
)  # fmt: skip


def _expand(call: Call):
    x, out = call.args[0], call.result
    if call.tag_of(x) is None and call.name == "expand_as":
        # x (not computed from the batch) expanded to the shape of a tensor that carries it:
        # the result's dimensions are other's, row for row
        other = call.arg(1, "other")
        layout = _only_layout(call, other)
        e = layout.dim - (other.dim() - x.dim())
        if e >= 0 and x.shape[e] not in (1, out.shape[layout.dim]):
            raise _Unfollowable("expands a tensor along the batch dimension with another size")
        return layout
    layout = _only_layout(call, x)
    new = layout.dim + out.dim() - x.dim()
    if out.shape[new] != x.shape[layout.dim]:
        raise _Unfollowable("expands the batch dimension")
    return layout.moved(new)


_register(_expand, "expand", "expand_as", "broadcast_to")


def _repeat(call: Call):
    x, out = call.args[0], call.result
    layout = _only_layout(call, x)
    new = layout.dim + out.dim() - x.dim()
    if out.shape[new] != x.shape[layout.dim]:
        raise _Unfollowable("repeats along the batch dimension")
    return layout.moved(new)


_register(_repeat, "repeat", "tile")


def _repeat_interleave(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    dim = call.kwargs.get("dim", call.arg(2, "dim"))
    if dim is None or _norm_dim(dim, x.dim()) == layout.dim:
        raise _Unfollowable("repeats along the batch dimension")
    return layout


_register(_repeat_interleave, "repeat_interleave")


def _same_dim_unless(call: Call, dims: list[int], what: str):
    layout = _only_layout(call, call.args[0])
    if layout.dim in dims:
        raise _Unfollowable(what)
    return layout


def _flip(call: Call):
    x = call.args[0]
    if call.name == "fliplr":
        dims = [1]
    elif call.name == "flipud":
        dims = [0]
    else:
        dims = _dims(call.arg(1, "dims"), x.dim()) or list(range(x.dim()))
    return _same_dim_unless(call, dims, "flips the batch dimension")


_register(_flip, "flip", "fliplr", "flipud")


def _roll(call: Call):
    x = call.args[0]
    dims = _dims(call.arg(2, "dims"), x.dim())
    return _same_dim_unless(call, dims or list(range(x.dim())), "rolls the batch dimension")


_register(_roll, "roll")


def _last_two(call: Call):
    x = call.args[0]
    return _same_dim_unless(call, [x.dim() - 2, x.dim() - 1], "acts on the batch dimension")


_register(_last_two, "tril", "triu", "tril_", "triu_")


def _narrow(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    dim = _norm_dim(call.arg(1, "dim"), x.dim())
    if dim == layout.dim and call.result.shape[dim] != x.shape[dim]:
        raise _Unfollowable("selects some examples of the batch")
    return layout


_register(_narrow, "narrow")


def _select(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    dim = _norm_dim(call.arg(1, "dim"), x.dim())
    if dim == layout.dim:
        raise _Unfollowable("selects one entry of the batch dimension")
    return layout.moved(layout.dim - (dim < layout.dim))


_register(_select, "select")


def _unfold_window(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    if _norm_dim(call.arg(1, "dimension"), x.dim()) == layout.dim:
        raise _Unfollowable("takes windows along the batch dimension")
    return layout


_HANDLERS[torch.Tensor.unfold] = _unfold_window


def _split(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    if call.name == "unbind":
        dim = _norm_dim(call.arg(1, "dim", 0), x.dim())
        if dim == layout.dim:
            raise _Unfollowable("splits the batch into its examples")
        return layout.moved(layout.dim - (dim < layout.dim))
    if call.name in ("hsplit", "vsplit", "dsplit"):
        dim = {"hsplit": 1 if x.dim() > 1 else 0, "vsplit": 0, "dsplit": 2}[call.name]
    else:
        dim = _norm_dim(call.kwargs.get("dim", call.arg(2, "dim", 0)), x.dim())
    if dim == layout.dim:
        raise _Unfollowable("splits the batch dimension")
    return layout


_register(_split, "split", "chunk", "tensor_split", "unbind", "hsplit", "vsplit", "dsplit",
          "split_with_sizes", "unsafe_split", "unsafe_chunk")  # fmt: skip


def _cat(call: Call):
    tensors = call.arg(0, "tensors")
    out = call.result
    stack = call.name in ("stack", "hstack", "vstack", "dstack", "column_stack")
    if call.name in ("hstack", "vstack", "dstack", "column_stack"):
        raise _Unfollowable("stacks along a dimension not followed here")
    dim = call.kwargs.get("dim", call.arg(1, "dim", 0))
    found: Layout | None = None
    for x in tensors:
        tag = call.tag_of(x)
        if not isinstance(tag, Layout):
            continue
        if stack:
            at = _norm_dim(dim, x.dim() + 1)
            here = tag.moved(tag.dim + (at <= tag.dim))
        else:
            at = _norm_dim(dim, x.dim())
            if at == tag.dim:
                raise _Unfollowable("concatenates along the batch dimension")
            here = tag
        if found is not None and here != found:
            raise _Unfollowable("joins tensors whose examples lie along different dimensions")
        found = here
    if found is None or out.shape[found.dim] != _size(found, call.batch_size):
        raise _Unfollowable("joins tensors without the batch dimension's size")
    return found


_register(_cat, "cat", "concat", "concatenate", "stack")


def _getitem(call: Call):
    x, index = call.args[0], call.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (Tensor, list)) for i in items):
        return _advanced_index(call, x, items)
    layout = _only_layout(call, x)
    # basic indexing: walk the dimensions of x
    expanded: list[Any] = []
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    for item in items:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (x.dim() - consumed))
        else:
            expanded.append(item)
    source, out_dim = 0, 0
    for item in expanded:
        if item is None:
            out_dim += 1
            continue
        if source == layout.dim:
            if isinstance(item, slice) and _full(item, x.shape[source]):
                return layout.moved(out_dim)
            raise _Unfollowable("selects some examples of the batch")
        if isinstance(item, bool):
            raise _Unfollowable("indexes with a boolean")
        if isinstance(item, int) or (isinstance(item, torch.SymInt)):
            source += 1
            continue
        source += 1
        out_dim += 1
    return layout.moved(out_dim + layout.dim - source)


def _full(item: slice, size: int) -> bool:
    start, stop, step = item.indices(size)
    return start == 0 and stop == size and step == 1


def _advanced_index(call: Call, x: Tensor, items: list):
    """Integer tensor indices (numpy's advanced indexing). The result holds the broadcast index
    dimensions where the indexed dimensions were (adjacent) or first (not adjacent). Examples can
    reach the result three ways, which must agree: from x's batch dimension when it is not
    indexed; from x's batch dimension indexed by exactly 0, 1, ..., size-1 along one broadcast
    dimension (read from the index's values: ``mask[torch.arange(B)[:, None], kv]``); from an
    index tensor that itself carries the batch.
    """
    if any(i is Ellipsis or i is None or isinstance(i, (int, bool)) for i in items):
        raise _Unfollowable("mixes tensor indices with integers, None or Ellipsis")
    advanced = [k for k, i in enumerate(items) if isinstance(i, (Tensor, list))]
    tensors = {k: torch.as_tensor(items[k]) for k in advanced}
    if any(t.dtype == torch.bool or t.is_floating_point() for t in tensors.values()):
        raise _Unfollowable("indexes with a mask (a shape that depends on the values)")
    shape = torch.broadcast_shapes(*(t.shape for t in tensors.values()))
    adjacent = advanced == list(range(advanced[0], advanced[-1] + 1))
    start = advanced[0] if adjacent else 0

    def position(d: int) -> int:
        """Where x's non-indexed dimension d lands in the result."""
        if adjacent:
            return d if d < advanced[0] else d - len(advanced) + len(shape)
        return len(shape) + sum(1 for k in range(d) if k not in advanced)

    agreed = _OneLayout("indexes so that the examples would land in two dimensions")
    keep = agreed.add
    tag_x = call.tag_of(x)
    if isinstance(tag_x, Layout):
        d = tag_x.dim
        if d in advanced:
            index = tensors[d]
            if call.tag_of(items[d]) is not None:
                raise _Unfollowable("indexes the batch dimension with a tensor from the batch")
            k = _identity_dimension(index, shape, x.shape[d])
            if k is None:
                raise _Unfollowable("indexes the batch dimension with a tensor")
            keep(tag_x.moved(start + k))
        else:
            if d < len(items):
                item = items[d]
                if not (isinstance(item, slice) and _full(item, x.shape[d])):
                    raise _Unfollowable("selects some examples of the batch")
            keep(tag_x.moved(position(d)))
    for k in advanced:
        tag = call.tag_of(items[k])
        if isinstance(tag, Layout):
            keep(tag.moved(start + tag.dim + len(shape) - tensors[k].dim()))
    if agreed.found is None:
        raise _Unfollowable("has no argument that carries the batch")
    return agreed.found


def _identity_dimension(index: Tensor, shape, size: int) -> int | None:
    """The broadcast dimension along which ``index`` is exactly 0, 1, ..., size-1 (and constant
    along every other), or None."""
    expanded = index.reshape((1,) * (len(shape) - index.dim()) + tuple(index.shape)).expand(shape)
    for k, n in enumerate(shape):
        if n != size:
            continue
        steps = torch.arange(size, device=index.device, dtype=index.dtype)
        reference = steps.reshape([-1 if j == k else 1 for j in range(len(shape))]).expand(shape)
        if torch.equal(expanded, reference):
            return k
    return None


_register(_getitem, "__getitem__")


def _setitem(call: Call):
    """``target[index] = value``: the target keeps its layout when the index leaves its batch
    dimension whole; a batched value written into an untagged target is not followed."""
    target, index, value = call.args[0], call.args[1], call.args[2]
    tag, value_tag = call.tag_of(target), call.tag_of(value) if isinstance(value, Tensor) else None
    if isinstance(tag, Layout):
        probe = Call("__getitem__", None, (target, index), {}, target[index], call.tag_of, 1)
        _getitem(probe)  # raises unless the batch dimension stays whole
        if isinstance(value_tag, Layout):
            return tag  # value's layout against the selection is checked by the watch
        return tag
    if value_tag is not None:
        raise _Unfollowable("writes tensors computed from the batch into another tensor")
    return None


_register(_setitem, "__setitem__")


# -- linear algebra -------------------------------------------------------------------------------


def matmul_layout(call: Call, a: Tensor, b: Tensor, out: Tensor) -> Layout:
    """torch.matmul semantics: leading dims broadcast; a's rows and b's columns are kept."""
    agreed = _OneLayout("multiplies tensors whose examples lie along different dimensions")
    keep = agreed.add
    for x, is_left in ((a, True), (b, False)):
        tag = call.tag_of(x)
        if not isinstance(tag, Layout):
            continue
        n = x.dim()
        if n == 1:
            raise _Unfollowable("contracts the batch dimension of a vector")
        if is_left:
            if tag.dim == n - 1:
                raise _Unfollowable("contracts over the batch dimension")
            if tag.dim == n - 2:  # rows
                keep(tag.moved(out.dim() - (2 if b.dim() > 1 else 1)))
            else:
                keep(tag.moved(tag.dim + out.dim() - n))
        else:
            if tag.dim == n - 2:
                raise _Unfollowable("contracts over the batch dimension")
            if tag.dim == n - 1:  # columns
                keep(tag.moved(out.dim() - 1))
            else:
                keep(tag.moved(tag.dim + out.dim() - n))
    if agreed.found is None:
        raise _Unfollowable("has no argument that carries the batch")
    return agreed.found


def _matmul(call: Call):
    a, b = call.args[0], call.args[1]
    if call.name == "__rmatmul__":
        a, b = b, a
    return matmul_layout(call, a, b, call.result)


_register(_matmul, "matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "mv")


def _addmm(call: Call):
    bias, a, b = call.args[0], call.args[1], call.args[2]
    layout = matmul_layout(call, a, b, call.result)
    if isinstance(call.tag_of(bias), Layout):
        out = call.result
        probe = Call("add", None, (out, bias), {}, out, call.tag_of, call.batch_size)
        if _pointwise(probe) != layout:
            raise _Unfollowable("adds a batched tensor along another dimension")
    return layout


_register(_addmm, "addmm", "baddbmm", "addbmm", "addmv")


def linear_layout(call: Call) -> Layout:
    x, weight = call.args[0], call.arg(1, "weight")
    layout = _only_layout(call, x)
    if call.tag_of(weight) is not None or call.tag_of(call.arg(2, "bias")) is not None:
        raise _Unfollowable("uses a weight computed from the batch")
    if layout.dim == x.dim() - 1:
        raise _Unfollowable("contracts over the batch dimension")
    return layout


_register(linear_layout, "linear")


def _einsum_operands(call: Call) -> tuple[str, list[Tensor]]:
    equation = call.args[0]
    operands = list(call.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or "..." in equation:
        raise _Unfollowable("uses an equation form not followed here (ellipsis or sublists)")
    return equation.replace(" ", ""), operands


def einsum_letters(call: Call) -> tuple[list[str], str, str]:
    """(input subscripts, output subscripts, the batch letter)."""
    equation, operands = _einsum_operands(call)
    if "->" not in equation:
        raise _Unfollowable("without an explicit output ('->') is not followed here")
    inputs, output = equation.split("->")
    subscripts = inputs.split(",")
    letter = None
    for sub, x in zip(subscripts, operands, strict=True):
        tag = call.tag_of(x)
        if not isinstance(tag, Layout):
            continue
        if not tag.plain:
            raise _Unfollowable("gets a folded batch dimension")
        here = sub[tag.dim]
        if letter is not None and here != letter:
            raise _Unfollowable("gets examples under two different letters")
        letter = here
    if letter is None:
        raise _Unfollowable("has no argument that carries the batch")
    for sub, x in zip(subscripts, operands, strict=True):
        tag = call.tag_of(x)
        if letter in sub and not isinstance(tag, Layout) and x.shape[sub.index(letter)] != 1:
            raise _Unfollowable("pairs the batch letter with a tensor that does not carry it")
    if letter not in output:
        raise _Unfollowable("sums over the batch letter")
    return subscripts, output, letter


def _einsum(call: Call):
    _, output, letter = einsum_letters(call)
    return Layout(output.index(letter))


_register(_einsum, "einsum")


# -- neural-network functions --------------------------------------------------------------------


def _embedding(call: Call):
    ids = call.args[0]
    layout = _only_layout(call, ids)
    if call.tag_of(call.arg(1, "weight")) is not None:
        raise _Unfollowable("uses a weight computed from the batch")
    return layout


_HANDLERS[F.embedding] = _embedding


def _torch_embedding(call: Call):  # torch.embedding(weight, indices, ...)
    weight, ids = call.args[0], call.args[1]
    if call.tag_of(weight) is not None:
        raise _Unfollowable("uses a weight computed from the batch")
    return _only_layout(call, ids)


_HANDLERS[torch.embedding] = _torch_embedding


def _first_dim(call: Call):
    """Convolutions, pooling, group/instance norm: the examples must be rows of dimension 0."""
    x = call.args[0]
    layout = _only_layout(call, x)
    for other in call.tagged()[1:]:
        if other[1] is not None and other[0] is not x:
            raise _Unfollowable("uses a weight computed from the batch")
    if layout.dim != 0:
        raise _Unfollowable("treats dimension 0 as its batch, but the examples are elsewhere")
    return layout


_register(
    _first_dim, "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "group_norm", "instance_norm", "max_pool1d", "max_pool2d",
    "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample",
    "pixel_shuffle", "pixel_unshuffle", "unfold_patches", "fold", "local_response_norm",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "fractional_max_pool2d", "fractional_max_pool3d", "channel_shuffle",
)  # fmt: skip
_HANDLERS[F.unfold] = _first_dim


def _batch_norm(call: Call):
    training = call.kwargs.get("training", call.arg(5, "training", False))
    if call.func is torch.batch_norm:
        training = call.arg(5, "training", False)
    if training:
        raise _Unfollowable("in training mode normalises with batch statistics (mixes examples)")
    return _first_dim(call)


_register(_batch_norm, "batch_norm")


def _trailing_norm(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    shape = call.arg(1, "normalized_shape")
    count = 1 if isinstance(shape, int) else len(shape)
    if layout.dim >= x.dim() - count:
        raise _Unfollowable("normalises over the batch dimension")
    return layout


_register(_trailing_norm, "layer_norm", "rms_norm")


def _pad(call: Call):
    x = call.args[0]
    layout = _only_layout(call, x)
    pad = call.arg(1, "pad")
    padded = len(pad) // 2
    if layout.dim >= x.dim() - padded:
        for k in range(padded):
            if x.dim() - 1 - k == layout.dim and (pad[2 * k] or pad[2 * k + 1]):
                raise _Unfollowable("pads the batch dimension")
    return layout


_register(_pad, "pad")


def _sdpa(call: Call):
    q, k, v = call.args[0], call.arg(1, "key"), call.arg(2, "value")
    out = call.result
    found: Layout | None = None
    for x in (q, k, v):
        tag = call.tag_of(x)
        if not isinstance(tag, Layout):
            continue
        if tag.dim >= x.dim() - 2:
            raise _Unfollowable("gets the examples along a sequence or feature dimension")
        here = tag.moved(tag.dim + out.dim() - x.dim())
        if found is not None and here != found:
            raise _Unfollowable("combines tensors whose examples lie along different dimensions")
        found = here
    mask = call.kwargs.get("attn_mask", call.arg(3, "attn_mask"))
    if isinstance(mask, Tensor) and isinstance(call.tag_of(mask), Layout):
        tag = call.tag_of(mask)
        here = tag.moved(tag.dim + out.dim() - mask.dim())
        if tag.dim >= mask.dim() - 2 or (found is not None and here != found):
            raise _Unfollowable("gets a mask whose examples lie along another dimension")
        found = found or here
    if found is None:
        raise _Unfollowable("has no argument that carries the batch")
    return found


_register(_sdpa, "scaled_dot_product_attention")


def _multi_head_attention(call: Call):
    """F.multi_head_attention_forward: sequence-first [T, B, E]; weights [B, T, S]."""
    q, k, v = call.args[0], call.args[1], call.args[2]
    layouts = [call.tag_of(x) for x in (q, k, v)]
    if q.dim() != 3 or any(not isinstance(t, Layout) or t != Layout(1) for t in layouts):
        raise _Unfollowable("needs query, key and value with the examples along dimension 1")
    for mask_name, index in (("key_padding_mask", 10), ("attn_mask", 13)):
        mask = call.kwargs.get(mask_name, call.arg(index, mask_name))
        if isinstance(mask, Tensor) and call.tag_of(mask) is not None:
            expected = Layout(0)
            if call.tag_of(mask) != expected or (mask_name == "attn_mask" and mask.dim() != 3):
                raise _Unfollowable(f"gets a {mask_name} whose examples cannot be matched")
    result = call.result
    tags: list[Tag] = [Layout(1)]
    if isinstance(result, tuple) and len(result) > 1 and isinstance(result[1], Tensor):
        tags.append(Layout(0))
    return tags


_HANDLERS[F.multi_head_attention_forward] = _multi_head_attention


def _recurrent(call: Call):
    """torch.lstm / gru / rnn_*: (input, hx, params, ..., batch_first); outputs follow input."""
    args = call.args
    if len(args) != 9 or not isinstance(args[2], (list, tuple)):
        raise _Unfollowable("with packed sequences is not followed")
    batch_first = bool(args[8])
    x = args[0]
    expected = Layout(0 if batch_first else 1)
    if call.tag_of(x) != expected:
        raise _Unfollowable("runs its recurrence along a dimension that carries examples")
    hx = args[1]
    for h in hx if isinstance(hx, (list, tuple)) else [hx]:
        if isinstance(h, Tensor) and call.tag_of(h) is not None and call.tag_of(h) != Layout(1):
            raise _Unfollowable("gets an initial state whose examples are not along dimension 1")
    out = _result_tensors(call.result)
    return [expected] + [Layout(1)] * (len(out) - 1)


for _kernel in (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu):
    _HANDLERS[_kernel] = _recurrent


def _loss(call: Call):
    """Loss functions: ``reduction='none'`` keeps the examples of dimension 0 (or of the extra
    dimensions); a mean or sum over the batch mixes them."""
    reduction = call.kwargs.get("reduction", "mean")
    if reduction != "none":
        raise _Unfollowable(f"with reduction='{reduction}' sums over the batch")
    x = call.args[0]
    layout = _only_layout(call, x)
    if call.name in ("cross_entropy", "nll_loss", "multi_margin_loss", "multilabel_margin_loss"):
        if x.dim() == 1:
            raise _Unfollowable("gets one unbatched prediction")
        if layout.dim == 1:
            raise _Unfollowable("gets the examples along the class dimension")
        return layout if layout.dim == 0 else layout.moved(layout.dim - 1)
    return _pointwise(call)


_register(
    _loss, "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "soft_margin_loss",
    "poisson_nll_loss", "gaussian_nll_loss",
)  # fmt: skip


def _same_as_input(call: Call):
    """Elementwise over the first argument (prelu's weight runs along the channels)."""
    return _only_layout(call, call.args[0])


_register(_same_as_input, "prelu", "_prelu_kernel")


def _one_hot(call: Call):
    return _only_layout(call, call.args[0])


_register(_one_hot, "one_hot")


def _gather(call: Call):
    """gather(x, dim, index): the result has index's shape; along the other dimensions result
    and x are paired position by position."""
    x, dim, index = call.args[0], call.arg(1, "dim"), call.arg(2, "index")
    dim = _norm_dim(dim, x.dim())
    tag_x, tag_i = call.tag_of(x), call.tag_of(index)
    found = None
    for tag in (tag_x, tag_i):
        if isinstance(tag, Layout):
            if tag.dim == dim:
                raise _Unfollowable("gathers along the batch dimension")
            if found is not None and tag != found:
                raise _Unfollowable("pairs tensors whose examples lie along different dimensions")
            found = tag
    if found is None:
        raise _Unfollowable("has no argument that carries the batch")
    size = _size(found, call.batch_size)
    if x.shape[found.dim] != size or index.shape[found.dim] != size:
        raise _Unfollowable("pairs the batch dimension with a dimension of another size")
    return found


_register(_gather, "gather", "take_along_dim")


def _index_select(call: Call):
    x, dim, index = call.args[0], call.arg(1, "dim"), call.arg(2, "index")
    if call.tag_of(index) is not None:
        raise _Unfollowable("selects with indices computed from the batch")
    layout = _only_layout(call, x)
    if _norm_dim(dim, x.dim()) == layout.dim:
        raise _Unfollowable("selects along the batch dimension")
    return layout


_register(_index_select, "index_select")


def _ignore(call: Call):
    """Results that are not computed from the values (shapes, constants)."""
    return None


#: reads of shapes, types and flags whose result is never a tensor: nothing to follow or capture
_READS = frozenset({
    "size", "dim", "shape", "numel", "nelement", "stride", "is_contiguous", "data_ptr",
    "element_size", "__len__", "dtype", "device", "is_floating_point", "is_complex",
    "requires_grad", "is_leaf", "grad_fn", "layout", "is_cuda", "ndim", "ndimension",
    "get_device", "storage_offset", "_version", "names", "is_sparse", "is_quantized", "is_meta",
    "is_mkldnn", "is_nested", "is_inference",
})  # fmt: skip
# ... and the calls that give values, constants, or a tensor handed back as it is
_register(
    _ignore, *_READS, "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
    "untyped_storage", "item", "tolist", "__bool__", "__int__", "__float__", "__index__",
    "equal", "allclose", "is_nonzero", "__format__", "__repr__", "__str__", "__hash__",
    "__reduce_ex__", "__deepcopy__", "grad", "data", "_base",
)  # fmt: skip
_IS_READ: dict[Any, bool] = {}


def reads_metadata_only(func: Any) -> bool:
    """Whether ``func`` only reads a shape, a type or a flag (the result is never a tensor): the
    watch lets such calls through untouched (a model reads ``x.shape`` more often than it
    computes)."""
    return _memo(_IS_READ, func, lambda: name_of(func) in _READS)


def is_metadata(func: Any) -> bool:
    """Calls that read shapes, types or flags, or hand a tensor back as it is (no values)."""
    return handler_for(func) is _ignore
