"""Capture every use of the trainable parameters in one forward pass, then the gradients that
give each example's share of it.

During the forward (:class:`Capture`, an interceptor of :class:`~impls._watch.BatchWatch`):

- a call a layer rule knows (``F.linear``, ``torch.addmm``, ``F.embedding``, convolutions,
  normalisations, a weight in a matmul) is recorded as a :class:`~impls.layers.Use`; opaque calls
  with a replacement (attention, recurrent kernels) run as followable steps instead;
- a tensor *shared* by all examples (computed from parameters alone, like a position table or a
  relative attention bias) that meets the batch in an elementwise call, a concatenation, an
  einsum or attention's mask is replaced there by a copy with the examples along their own
  dimension (``expand``: the same values, no copy of memory) whose gradient holds each
  example's part (:class:`Meeting`); a shared tensor whose dimension already pairs with the
  batch's is kept apart by a view, and its gradient's rows are the examples';
- a trainable parameter used in a computation on shared tensors only is replaced by a view of
  itself (:class:`Alias`), so that its direct uses are told apart from the layers it feeds;
- a parameter used in a call no rule knows marks the module call running it for the vmap
  fallback (``impls.layers.fallback``); a shared tensor meeting the batch where the meeting
  cannot be split by example is refused.

:meth:`Capture.backward` then asks autograd, once, for the gradients of the batched uses'
outputs, of the meetings and of the fallback calls' outputs (parameters are never asked for, so
no weight-gradient product is formed); streamed on large models, each use is handed over as
soon as its gradient is known. The per-example gradients of the shared tensors are pushed back
through the computation that made them, vmapped over the examples
(``autograd.grad(..., is_grads_batched=True)``), to the shared uses' outputs and the aliases.
Every parameter's per-example gradients come out as factors (``impls.factors``), one set per
use, reduced by the strategies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.utils._pytree import tree_flatten

from impls._layouts import (
    _POINTWISE,
    Call,
    Layout,
    Lost,
    _Unfollowable,
    broadcast_dim,
    canonical,
    einsum_letters,
    from_canonical,
    is_metadata,
    name_of,
    propagate,
)
from impls._watch import BatchWatch, Frame, tensor_arguments
from impls.base import Side, Unsupported, per_example_losses
from impls.factors import Dense, Factors, combine
from impls.layers import REPLACEMENT_FUNCTIONS, REPLACEMENTS, Use, rule_for
from impls.layers.fallback import ModuleCall, grad_samples

#: captured output bytes above which :meth:`Capture.backward` streams by default: below,
#: the fixed cost of its hooks (a graph walk, a hook per node) and reducing between the
#: backward's kernels outweigh what releasing saves. Measured (2 threads, Intel Xeon, ghost
#: against itself unstreamed): faster unstreamed by 3-5% at 4-16 MiB (transformer T=64 B=32,
#: 12.5 MiB; LSTM B=64 and B=128, 8 and 16 MiB; CNN B=64, 10 MiB), streamed by 3-8% from
#: 25 MiB (transformer T=64 B=64 and B=128, T=256 B=16). Unstreamed, the output gradients
#: (as many bytes as the outputs) are all held until the reductions.
STREAM_BYTES = 16 << 20

_NO_ALIAS = {"detach", "detach_", "requires_grad_"}


def no_values(func) -> bool:
    """Calls whose result holds no gradient path to their arguments' values."""
    return is_metadata(func) or name_of(func) in _NO_ALIAS


@dataclass(eq=False)
class Meeting:
    """A shared tensor meeting the batch: ``substitute`` stood in for ``source`` in that call.

    ``kind``: "broadcast" (``substitute`` is source expanded along the batch dimension ``dim`` of
    the result, whose layout is ``layout``), "aligned" (``substitute`` is a view of source, whose
    dimension ``dim`` held ``layout``'s examples) or "leading" (``substitute`` is source with a new
    first dimension of B examples: an einsum operand).
    """

    source: Tensor
    substitute: Tensor
    kind: str
    dim: int
    layout: Layout
    where: str
    edge: Any = None
    grad: Tensor | None = None
    frames: tuple = ()

    def per_example(self, batch_size: int) -> Tensor:
        """[B, *source.shape]: each example's share of the gradient of ``source`` here."""
        g, shape = self.grad, self.source.shape
        if self.kind == "leading":
            return g
        if self.kind == "broadcast":
            rows = canonical(g, self.layout.moved(self.dim), batch_size)
            return rows.sum(1).reshape(batch_size, *shape)
        # aligned: example n's rows of the gradient, zeros elsewhere
        layout = self.layout.moved(self.dim)
        rows = canonical(g, layout, batch_size)  # [B, r, *rest]
        out = []
        for n in range(batch_size):
            mine = torch.zeros_like(rows)
            mine[n] = rows[n]
            out.append(from_canonical(mine, layout, shape))
        return torch.stack(out)


@dataclass(eq=False)
class Alias:
    """A trainable parameter's direct use in a computation on shared tensors (a view of it)."""

    param: nn.Parameter
    alias: Tensor
    edge: Any
    frames: tuple = ()


@dataclass(eq=False)
class _Slot:
    """One gradient the backward delivers: to a use, a meeting or a fallback call's output."""

    owner: Any
    index: int
    edge: GradientEdge


def _flat_leaves(value) -> list:
    leaves, _ = tree_flatten(value)
    return leaves


class Capture:
    """Records a forward pass of ``side.model`` (use with :func:`captured_forward`)."""

    #: backward node types of the custom autograd Functions the capture itself runs
    own_functions: tuple[type, ...] = ()

    def __init__(self, side: Side, *, create_graph: bool = False):
        self.side = side
        self.batch_size = side.batch_size
        self.create_graph = create_graph
        self.names = {id(p): name for name, p in side.params.items()}
        self.params = {id(p): p for p in side.params.values()}
        self.uses: list[Use] = []
        self.meetings: list[Meeting] = []
        self.aliases: list[Alias] = []
        self.fallbacks: list[ModuleCall] = []
        #: (parameter, where) used while autograd was off during the forward
        self.unseen: list[tuple[str, str]] = []
        self.watch = BatchWatch(
            side.batch_size,
            side.batched_tensors(),
            model=side.model,
            interceptor=self.intercept,
        )

    # -- what a tensor is ----------------------------------------------------------------------

    def is_weight(self, x: Any) -> bool:
        """A tensor the per-example gradients flow into: a trainable parameter or a tensor
        computed from parameters alone (it requires grad and carries no batch)."""
        return isinstance(x, Tensor) and x.requires_grad and self.watch.tag_of(x) is None

    def describe(self, x: Tensor) -> str:
        if id(x) in self.names:
            return f"parameter '{self.names[id(x)]}'"
        return "a tensor computed from the parameters alone"

    def where(self, func) -> str:
        frame = self.watch.frame
        call = f"torch.{name_of(func)}"
        return f"{call} in {frame.label}" if frame is not None else f"{call} outside the model"

    def resolve(self, w: Tensor) -> tuple[str, int] | None:
        """(parameter name, first row) when ``w`` is a trainable parameter or a row slice of one."""
        if id(w) in self.names:
            return self.names[id(w)], 0
        base = w._base
        if base is None or id(base) not in self.names:
            return None
        if w.shape[1:] != base.shape[1:] or not base.is_contiguous() or not w.is_contiguous():
            return None
        offset = w.storage_offset() - base.storage_offset()
        row_size = base.stride(0) if base.dim() > 1 else 1
        if w.dim() == 0 or offset % row_size:
            return None
        return self.names[id(base)], offset // row_size

    # -- the forward: one call at a time -------------------------------------------------------

    def intercept(self, func, args: tuple, kwargs: dict):
        if not torch.is_grad_enabled():
            # inside a custom autograd.Function's forward (or a reentrant checkpoint) autograd is
            # off, yet the Function's backward may still differentiate what it uses: remember
            if self.names and not self.unseen:
                for x in tensor_arguments(args, kwargs):
                    if id(x) in self.names:
                        self.unseen.append((self.names[id(x)], self.where(func)))
                        break
            return NotImplemented
        replacement = REPLACEMENTS.get(func)
        if replacement is not None:
            with self.watch.following():  # the replacement's own calls are followed and captured
                result = replacement(args, kwargs, self)
            if result is not NotImplemented:
                return result
        tensors = tensor_arguments(args, kwargs)
        weights = [x for x in tensors if self.is_weight(x)]
        if not weights:
            return NotImplemented
        rule = rule_for(func)
        if rule is not None:
            binding = rule.bind(func, args, kwargs, self.is_weight)
            if binding is not None:
                return self._record(rule, binding, func, args, kwargs)
        tags = [self.watch.tag_of(x) for x in tensors]
        lost = next((t for t in tags if isinstance(t, Lost)), None)
        if lost is not None:
            raise Unsupported(
                f"{self.describe(weights[0])} meets tensors whose examples cannot be located "
                f"({self.where(func)}): {lost.reason}"
            )
        if any(isinstance(t, Layout) for t in tags):
            return self._meet(func, args, kwargs, weights)
        return self._alias(func, args, kwargs)

    def record_computed(self, func, args: tuple, kwargs: dict, stand_in: Tensor) -> Tensor:
        """Record the call ``func(*args, **kwargs)`` without running it, for a replacement
        that computed it inside a larger computation: ``stand_in`` is a tensor of the call's
        shape whose gradient is the call's output gradient (what the rest of the graph would
        send back to the call's output). Returns the tensor the replacement continues with in
        place of ``stand_in``."""
        rule = rule_for(func)
        binding = rule.bind(func, args, kwargs, self.is_weight) if rule is not None else None
        if binding is None:
            raise TypeError(f"record_computed: no rule binds torch.{name_of(func)} here")
        return self._record(rule, binding, func, args, kwargs, stand_in=stand_in)

    def _record(self, rule, binding, func, args, kwargs, stand_in=None):
        where = self.where(func)
        layouts = []
        for x in binding.activations:
            tag = self.watch.tag_of(x)
            if isinstance(tag, Lost):
                raise Unsupported(f"{where} is called on a tensor whose examples are lost: "
                                  f"{tag.reason}")  # fmt: skip
            layouts.append(tag)
        wanted = {
            role: w for role, w in binding.weights.items() if w is not None and self.is_weight(w)
        }
        use = Use(
            rule=rule,
            where=where,
            binding=binding,
            layouts=tuple(layouts),
            output=None,
            output_layout=None,
            batch_size=self.batch_size,
            create_graph=self.create_graph,
            wanted=wanted,
            versions=[(x, x._version) for x in binding.activations],
            frames=tuple(self.watch.frames),
        )
        rule.check(use)
        if stand_in is None:
            result = self._compute(use, func, args, kwargs)
        else:
            result = self._stand_in(use, stand_in)
        if not isinstance(result, Tensor):
            raise Unsupported(f"{where} returned {type(result).__name__}, not a tensor")
        use.output = result
        use.edge = get_gradient_edge(result) if result.requires_grad else None
        if layouts[0] is not None:
            call = Call(name_of(func), func, args, kwargs, result, self.watch.tag_of,
                        self.batch_size)  # fmt: skip
            tag = propagate(call)[0]
            if not isinstance(tag, Layout):
                reason = tag.reason if isinstance(tag, Lost) else "its output carries no batch"
                raise Unsupported(f"{where}: {reason}")
            use.output_layout = tag
            if stand_in is None:
                self.watch.followed(result, tag)
            else:  # not inside the watch's handling of a call: nothing to skip
                self.watch.set_tag(result, tag)
        self.uses.append(use)
        return result

    def _compute(self, use: Use, func, args, kwargs):
        """Run a recorded call (a strategy may compute it another way)."""
        return func(*args, **kwargs)

    def _stand_in(self, use: Use, stand_in: Tensor) -> Tensor:
        """What stands for a call computed elsewhere (:meth:`record_computed`)."""
        return stand_in

    def _meet(self, func, args, kwargs, weights):
        """A shared tensor meets the batch in ``func``: substitute it, or hand the call over."""
        name = name_of(func)
        where = self.where(func)
        if name in _POINTWISE or name in ("where", "masked_fill", "clamp"):
            return self._meet_elementwise(func, args, kwargs, where)
        if name == "scaled_dot_product_attention":
            return self._meet_elementwise(func, args, kwargs, where, leading=True)
        if name in ("cat", "concat", "concatenate", "stack"):
            return self._meet_joined(func, args, kwargs, where)
        if name == "expand_as" and self.is_weight(args[0]):
            return self._meet_expanded(func, args, kwargs, where)
        if name == "einsum":
            return self._meet_einsum(func, args, kwargs, where)
        if name in ("matmul", "__matmul__", "__rmatmul__", "bmm"):
            return self._meet_elementwise(func, args, kwargs, where, leading=True, matmul=True)
        return self._unknown(func, weights, where)

    def _result_layout(self, func, args, kwargs) -> tuple[int, Layout, int]:
        """(the result's batch dimension, its layout, the result's number of dimensions) for a
        call whose arguments broadcast against each other aligned on their last dimensions."""
        name = name_of(func)
        tensors = tensor_arguments(args, kwargs)
        if name == "scaled_dot_product_attention":  # the mask broadcasts against the scores
            out_ndim = (args[0] if args else kwargs["query"]).dim()
        elif name in ("matmul", "__matmul__", "__rmatmul__", "bmm"):
            out_ndim = max(x.dim() for x in tensors)
        else:
            try:
                out_ndim = len(torch.broadcast_shapes(*(x.shape for x in tensors)))
            except RuntimeError as error:
                raise Unsupported(f"torch.{name}: {error}") from None
        probe = Call(name, func, args, kwargs, None, self.watch.tag_of, self.batch_size)
        try:
            dim, layout = broadcast_dim(probe, out_ndim)
        except _Unfollowable as error:
            raise Unsupported(f"torch.{name} {error}") from None
        return dim, layout, out_ndim

    def _meet_elementwise(self, func, args, kwargs, where, leading=False, matmul=False):
        name = name_of(func)
        if name.endswith("_") and args and self.is_weight(args[0]):
            raise Unsupported(f"{where} writes the batch into a tensor shared by all examples")
        candidates = tensor_arguments(args, kwargs)
        dim, layout, out_ndim = self._result_layout(func, args, kwargs)
        if matmul:
            for x in tensor_arguments(args, kwargs):
                tag = self.watch.tag_of(x)
                if isinstance(tag, Layout) and tag.dim >= x.dim() - 2:
                    return self._unknown(func, [w for w in candidates if self.is_weight(w)],
                                         where)  # fmt: skip
        size = layout.outer * self.batch_size * layout.inner
        replaced: dict[int, Tensor] = {}
        for x in candidates:
            if not self.is_weight(x) or id(x) in replaced:
                continue
            aligned_dim = dim - (out_ndim - x.dim())
            if leading and aligned_dim >= x.dim() - 2 and x.dim() >= 2:
                return self._unknown(func, [x], where)
            if aligned_dim < 0 or x.shape[aligned_dim] == 1:
                view = x.reshape((1,) * max(0, out_ndim - x.dim()) + tuple(x.shape))
                shape = list(view.shape)
                shape[dim] = size
                substitute = view.expand(shape)
                meeting = Meeting(x, substitute, "broadcast", dim, layout, where)
            elif x.shape[aligned_dim] == size:
                substitute = x.view_as(x)
                meeting = Meeting(x, substitute, "aligned", aligned_dim, layout, where)
            else:
                raise Unsupported(f"{where}: a shared tensor meets the batch with another size")
            meeting.edge = get_gradient_edge(substitute)
            meeting.frames = tuple(self.watch.frames)
            self.meetings.append(meeting)
            replaced[id(x)] = substitute
        new_args, new_kwargs = _substituted(args, kwargs, replaced)
        return func(*new_args, **new_kwargs)

    def _meet_joined(self, func, args, kwargs, where):
        """cat / stack: a shared tensor joined to batched ones along another dimension has the
        batch dimension's full size there, row for row: its rows are the examples'."""
        tensors = args[0] if args else kwargs.get("tensors")
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        layout = next((t for x in tensors if isinstance(t := self.watch.tag_of(x), Layout)), None)
        replaced: dict[int, Tensor] = {}
        stack = name_of(func) == "stack"
        for x in tensors:
            if not self.is_weight(x) or id(x) in replaced:
                continue
            d = layout.dim
            if not stack and dim % x.dim() == d:
                raise Unsupported(f"{where} joins a shared tensor along the batch dimension")
            substitute = x.view_as(x)
            meeting = Meeting(x, substitute, "aligned", d, layout, where)
            meeting.edge = get_gradient_edge(substitute)
            meeting.frames = tuple(self.watch.frames)
            self.meetings.append(meeting)
            replaced[id(x)] = substitute
        joined = [replaced.get(id(x), x) for x in tensors]
        if args:
            return func(joined, *args[1:], **kwargs)
        return func(**{**kwargs, "tensors": joined})

    def _meet_expanded(self, func, args, kwargs, where):
        """``shared.expand_as(batched)``: the expansion is where the shared tensor meets the
        batch; its gradient per example is the result's."""
        x, other = args[0], args[1] if len(args) > 1 else kwargs["other"]
        layout = self.watch.tag_of(other)
        result = func(*args, **kwargs)
        dim = layout.dim
        e = dim - (other.dim() - x.dim())
        size = layout.outer * self.batch_size * layout.inner
        if e >= 0 and x.shape[e] == size:
            raise Unsupported(f"{where} expands a shared tensor that already has the batch's size")
        meeting = Meeting(x, result, "broadcast", dim, layout, where)
        meeting.edge = get_gradient_edge(result)
        meeting.frames = tuple(self.watch.frames)
        self.meetings.append(meeting)
        return result

    def _meet_einsum(self, func, args, kwargs, where):
        probe = Call("einsum", func, args, kwargs, None, self.watch.tag_of, self.batch_size)
        try:
            subscripts, output, letter = einsum_letters(probe)
        except _Unfollowable as error:
            raise Unsupported(f"{where}: torch.einsum {error}") from None
        operands = list(args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        new_subscripts, new_operands = [], []
        for sub, x in zip(subscripts, operands, strict=True):
            if self.is_weight(x):
                if letter in sub:
                    raise Unsupported(f"{where}: a shared operand already has the batch letter")
                substitute = x.unsqueeze(0).expand(self.batch_size, *x.shape)
                meeting = Meeting(x, substitute, "leading", 0, Layout(0), where)
                meeting.edge = get_gradient_edge(substitute)
                meeting.frames = tuple(self.watch.frames)
                self.meetings.append(meeting)
                new_subscripts.append(letter + sub)
                new_operands.append(substitute)
            else:
                new_subscripts.append(sub)
                new_operands.append(x)
        equation = ",".join(new_subscripts) + "->" + output
        return func(equation, *new_operands)

    def _unknown(self, func, weights, where):
        """A call no rule knows uses a parameter with the batch: the module running it gets the
        vmap fallback for that parameter; a shared tensor cannot be split here."""
        frame = self.watch.frame
        for w in weights:
            if id(w) not in self.names:
                raise Unsupported(
                    f"{self.describe(w)} meets the batch in {where}, a call pegbench cannot split "
                    "by example"
                )
            if frame is None:
                raise Unsupported(
                    f"parameter '{self.names[id(w)]}' is used in {where} (in loss_fn?), where no "
                    "module call can be redone per example"
                )
            frame.notes.setdefault("fallback", {})[id(w)] = w
        return NotImplemented

    def _alias(self, func, args, kwargs):
        """A computation on shared tensors: trainable parameters go in as views of themselves."""
        if no_values(func):
            return NotImplemented
        replaced: dict[int, Tensor] = {}
        for x in tensor_arguments(args, kwargs):
            if id(x) in self.params and id(x) not in replaced:
                alias = x.view_as(x)
                self.aliases.append(
                    Alias(x, alias, get_gradient_edge(alias), tuple(self.watch.frames))
                )
                replaced[id(x)] = alias
        if not replaced:
            return NotImplemented
        new_args, new_kwargs = _substituted(args, kwargs, replaced)
        return func(*new_args, **new_kwargs)

    # -- after the forward ---------------------------------------------------------------------

    def __enter__(self):
        self.watch.__enter__()
        return self

    def __exit__(self, *exc):
        self.watch.__exit__(*exc)
        # the watch's interceptor is this capture's method: without this, capture and watch
        # would hold each other, and every recorded tensor would wait for the cyclic collector
        self.watch.interceptor = None
        return False

    def check_losses(self, losses: Tensor) -> None:
        if self.unseen and losses.grad_fn is not None:
            own = self.own_functions + tuple(f._backward_cls for f in REPLACEMENT_FUNCTIONS)
            foreign = _custom_functions(losses.grad_fn, own)
            if foreign:
                name, where = self.unseen[0]
                raise Unsupported(
                    f"parameter '{name}' is used by {where} while autograd is off, and the "
                    f"graph holds {foreign[0]} (a custom autograd.Function or a reentrant "
                    "checkpoint): what its backward differentiates cannot be seen per example"
                )
        tag = self.watch.tag_of(losses)
        if isinstance(tag, Lost):
            raise Unsupported(f"the per-example losses cannot be traced to the examples: "
                              f"{tag.reason}")  # fmt: skip
        if tag != Layout(0):
            raise Unsupported(
                "the per-example losses do not carry the examples one per entry (they are not "
                "computed from the batch's inputs entry by entry)"
            )

    def finish_forward(self) -> None:
        """Build the fallback calls and drop what they redo."""
        for frame in self.watch.calls:
            marked = frame.notes.get("fallback")
            if marked:
                self.fallbacks.append(self._fallback_call(frame, marked))
        if not self.fallbacks:
            return
        redone = [(call.frame, {id(p) for p in call.wanted.values()}) for call in self.fallbacks]

        def inside(frames: tuple, key: int) -> bool:
            return any(f in frames and key in keys for f, keys in redone)

        for use in self.uses:
            for role, w in list(use.wanted.items()):
                resolved = self.resolve(w)
                key = id(self.side.params[resolved[0]]) if resolved else id(w)
                if inside(use.frames, key):
                    del use.wanted[role]
        self.uses = [u for u in self.uses if u.wanted]
        self.meetings = [m for m in self.meetings if not inside(m.frames, id(m.source))]
        self.aliases = [a for a in self.aliases if not inside(a.frames, id(a.param))]

    def _fallback_call(self, frame: Frame, marked: dict) -> ModuleCall:
        local = {id(p): name for name, p in frame.module.named_parameters()}
        wanted = {}
        for key, p in marked.items():
            if key not in local:
                raise Unsupported(
                    f"parameter '{self.names[key]}' is used by {frame.label} in a call no rule "
                    "knows, and it is not that module's own: its use cannot be redone per example"
                )
            wanted[local[key]] = p
        leaves = _flat_leaves((frame.args, frame.kwargs))
        arg_layouts = [self._layout(x, frame) for x in leaves]
        outputs = _flat_leaves(frame.outputs)
        output_layouts = [self._layout(x, frame) for x in outputs]
        return ModuleCall(
            frame.label, frame.module, frame.args, frame.kwargs, arg_layouts, frame.outputs,
            output_layouts, wanted, self.batch_size, self.create_graph, frame=frame,
            forward_precision=self.side.forward_precision,
        )  # fmt: skip

    def _layout(self, x, frame: Frame) -> Layout | None:
        if not isinstance(x, Tensor):
            return None
        tag = self.watch.tag_of(x)
        if isinstance(tag, Lost):
            raise Unsupported(
                f"{frame.label} needs the vmap fallback but is called on a tensor whose examples "
                f"cannot be located: {tag.reason}"
            )
        return tag

    # -- which parameter each contribution goes to ---------------------------------------------

    def contributions(self) -> dict[int, int]:
        """id(parameter) -> how many factor contributions it will receive."""
        counts: dict[int, int] = defaultdict(int)
        for use in self.uses:
            for w in use.wanted.values():
                resolved = self.resolve(w)
                if resolved is not None:
                    counts[id(self.side.params[resolved[0]])] += 1
        for m in self.meetings:
            if id(m.source) in self.params:
                counts[id(m.source)] += 1
        for a in self.aliases:
            counts[id(a.param)] += 1
        for call in self.fallbacks:
            for p in call.wanted.values():
                counts[id(p)] += 1
        return counts

    def captured_bytes(self) -> int:
        """Bytes of the batched outputs the backward hands over (what streaming releases)."""
        total = 0
        for use in self.uses:
            if not use.shared and use.output is not None:
                total += use.output.numel() * use.output.element_size()
        return total

    # -- the backward --------------------------------------------------------------------------

    def backward(
        self,
        loss: Tensor,
        consume: Callable[[list[tuple[int, Factors]]], None],
        *,
        stream: bool | None = None,
    ) -> None:
        """Deliver every contribution as ``consume([(id(parameter), factors), ...])``, one list
        per use (a layer's weight and bias together).

        Batched uses are handed over as soon as their output gradient is known: during the
        backward pass when streamed (default: captured outputs above :data:`STREAM_BYTES`),
        after it otherwise; each use's tensors are released after its factors are known.
        """
        if stream is None:
            stream = self.captured_bytes() > STREAM_BYTES
        n = self.batch_size
        slots: list[_Slot] = []
        shared_uses = [u for u in self.uses if u.shared]
        derived: list[tuple[Tensor, Tensor]] = []  # (shared tensor, per-example gradients)

        def ready_use(use: Use) -> None:
            use.check_inputs_unchanged()
            described = use.rule.factors(use)
            delivered = []
            for role, factors in described.items():
                w = use.wanted[role]
                resolved = self.resolve(w)
                if resolved is None:  # a weight computed from parameters: pushed back later
                    derived.append((w, factors.materialise()))
                    continue
                name, row = resolved
                p = self.side.params[name]
                delivered.append((id(p), factors.placed(p.shape, row)))
            use.release()
            if delivered:
                consume(delivered)

        pending: dict[int, int] = {}
        for use in self.uses:
            if use.shared:
                continue
            if use.edge is None:
                use.grad_output = torch.zeros_like(canonical(use.output, use.output_layout, n))
                ready_use(use)
                continue
            slots.append(_Slot(use, 0, use.edge))
        for meeting in self.meetings:
            slots.append(_Slot(meeting, 0, meeting.edge))
        for call in self.fallbacks:
            for k in call.gradient_leaves():
                if call.output_layouts[k] is not None:
                    slots.append(_Slot(call, k, call.frame.edges[k]))
        for slot in slots:
            pending[id(slot.owner)] = pending.get(id(slot.owner), 0) + 1

        def deliver(slot: _Slot, grad: Tensor | None) -> None:
            owner = slot.owner
            if isinstance(owner, Use):
                target = owner.output
                grad = torch.zeros_like(target) if grad is None else grad
                owner.grad_output = canonical(grad, owner.output_layout, n)
            elif isinstance(owner, Meeting):
                owner.grad = torch.zeros_like(owner.substitute) if grad is None else grad
            else:
                leaf = owner.output_leaves()[slot.index]
                owner.grads[slot.index] = torch.zeros_like(leaf) if grad is None else grad
            pending[id(owner)] -= 1
            if pending[id(owner)] == 0 and isinstance(owner, Use):
                ready_use(owner)

        _run_backward(loss, slots, deliver, stream, self.create_graph)
        self._shared_phase(shared_uses, derived, ready_use, consume)
        for call in self.fallbacks:
            samples = grad_samples(call)
            consume([(id(call.wanted[local]), Dense(g)) for local, g in samples.items()])

    def _shared_phase(self, shared_uses, derived, ready_use, consume) -> None:
        """Push each example's gradient of the shared tensors back to the shared uses' outputs,
        the aliases and the fallback calls' shared outputs."""
        n = self.batch_size
        sources: dict[int, tuple[Tensor, Tensor]] = {}

        def add(tensor: Tensor, per_example: Tensor) -> None:
            if id(tensor) in sources:
                t, g = sources[id(tensor)]
                sources[id(tensor)] = (t, g + per_example)
            else:
                sources[id(tensor)] = (tensor, per_example)

        for meeting in self.meetings:
            per_example = meeting.per_example(n)
            if id(meeting.source) in self.params:
                consume([(id(meeting.source), Dense(per_example))])
            else:
                add(meeting.source, per_example)
        for tensor, per_example in derived:
            add(tensor, per_example)
        stops: list[tuple[Any, int, GradientEdge]] = []
        for use in shared_uses:
            if use.edge is not None:
                stops.append((use, 0, use.edge))
        for alias in self.aliases:
            stops.append((alias, 0, alias.edge))
        for call in self.fallbacks:
            for k in call.gradient_leaves():
                if call.output_layouts[k] is None:
                    stops.append((call, k, call.frame.edges[k]))
        grads: list[Tensor | None] = [None] * len(stops)
        if sources and stops:
            outputs = [t for t, _ in sources.values()]
            cotangents = [g for _, g in sources.values()]
            try:
                grads = list(
                    torch.autograd.grad(
                        outputs,
                        [edge for _, _, edge in stops],
                        cotangents,
                        is_grads_batched=True,
                        allow_unused=True,
                        create_graph=self.create_graph,
                        retain_graph=self.create_graph or None,
                    )
                )
            except RuntimeError as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else "error"
                raise Unsupported(
                    "the per-example gradients of the tensors shared by all examples cannot be "
                    f"pushed back through the computation that made them: {reason}"
                ) from error
        for (owner, k, _), g in zip(stops, grads, strict=True):
            if isinstance(owner, Use):
                shape = owner.output.shape
                owner.grad_output = (
                    g if g is not None else owner.output.new_zeros(n, *shape)
                ).reshape(n, *shape)
                ready_use(owner)
            elif isinstance(owner, Alias):
                p = owner.param
                value = g if g is not None else p.new_zeros(n, *p.shape)
                consume([(id(p), Dense(value))])
            else:
                leaf = owner.output_leaves()[k]
                owner.grads[k] = g if g is not None else leaf.new_zeros(n, *leaf.shape)
        for use in shared_uses:  # a shared use whose output carries no gradient
            if use.output is not None and use.edge is None:
                use.grad_output = use.output.new_zeros(n, *use.output.shape)
                ready_use(use)


def _custom_functions(root: Node, own: tuple[type, ...]) -> list[str]:
    """Names of the custom autograd.Function nodes in the graph below ``root`` (not ``own``)."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, BackwardCFunction) and not isinstance(node, own):
            found.append(type(node).__name__)
        stack.extend(child for child, _ in node.next_functions)
    return found


def _substituted(args, kwargs, replaced: dict[int, Tensor]):
    def swap(value):
        if isinstance(value, Tensor):
            return replaced.get(id(value), value)
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        return value

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


def _run_backward(loss, slots: list[_Slot], deliver, stream: bool, create_graph: bool) -> None:
    """One autograd call for every slot's gradient; streamed, slots above the lowest ones are
    delivered by node pre-hooks while the backward runs."""
    by_node: dict[Node, list[tuple[_Slot, int]]] = defaultdict(list)
    for slot in slots:
        by_node[slot.edge.node].append((slot, slot.edge.output_nr))
    failure: list[BaseException] = []

    def safe(slot, grad):
        try:
            deliver(slot, grad)
        except BaseException as error:
            failure.append(error)
            raise

    root = loss.grad_fn if loss.requires_grad else None
    above = _nodes_above(root, set(by_node)) if stream and root is not None else set()
    handles, asked = [], []
    for node, targets in by_node.items():
        if node in above:

            def hook(grad_outputs, targets=targets):
                for slot, output_nr in targets:
                    safe(slot, grad_outputs[output_nr])

            handles.append(node.register_prehook(hook))
        else:
            asked.extend((slot, GradientEdge(node, output_nr)) for slot, output_nr in targets)
    grads: list = [None] * len(asked)
    try:
        if asked and root is not None:
            grads = list(
                torch.autograd.grad(
                    loss,
                    [edge for _, edge in asked],
                    allow_unused=True,
                    create_graph=create_graph,
                )
            )
    except BaseException:
        if failure:  # the error of a reduction, whatever autograd wrapped it in
            raise failure[0] from None
        raise
    finally:
        for handle in handles:
            handle.remove()
    if root is None:  # nothing reaches the loss: every gradient is zero
        for node, targets in by_node.items():
            if node in above:
                for slot, _ in targets:
                    deliver(slot, None)
    for j, (slot, _) in enumerate(asked):
        grad, grads[j] = grads[j], None  # held by its owner only: released with it
        deliver(slot, grad)


def _nodes_above(root: Node, captured: set[Node]) -> set[Node]:
    """The autograd nodes reachable from ``root`` with a node of ``captured`` strictly below.

    autograd runs exactly those when the lowest captured nodes are its requested inputs.
    """
    above: set[Node] = set()
    done: set[Node] = set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            if any(n is not None and (n in captured or n in above) for n, _ in node.next_functions):
                above.add(node)
            done.add(node)
            continue
        if node in done:
            continue
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None and child not in done:
                stack.append((child, False))
    return above


def captured_forward(side: Side, loss_fn, create_graph: bool) -> tuple[Capture, Tensor]:
    """Run the forward and loss under a capture: the capture and the summed loss."""
    capture = Capture(side, create_graph=create_graph)
    with capture, side.forward_precision():
        outputs = side.call_model()
        losses = per_example_losses(loss_fn, outputs, side.targets, side.batch_size)
        capture.check_losses(losses)
    capture.finish_forward()
    return capture, losses.sum()


def parameter_factors(side: Side, loss_fn, create_graph: bool, consume) -> None:
    """``consume({name: factors, ...})`` for the trainable parameters reached, each with the
    factors of its per-example gradients over all its uses, as soon as its last use is in (the
    parameters one use completes come in one dict: a layer's weight and bias together)."""
    capture, loss = captured_forward(side, loss_fn, create_graph)
    names = capture.names
    expected = capture.contributions()
    waiting: dict[int, list[Factors]] = defaultdict(list)

    def collect(items: list[tuple[int, Factors]]) -> None:
        group = {}
        for key, factors in items:
            waiting[key].append(factors)
            if len(waiting[key]) == expected[key]:
                group[names[key]] = combine(waiting.pop(key))
        if group:
            consume(group)

    capture.backward(loss, collect)
    if waiting:  # a contribution expected but never delivered would be a bug: say so
        missing = ", ".join(names[key] for key in waiting)
        raise RuntimeError(f"pegbench: incomplete per-example gradients for {missing}")
