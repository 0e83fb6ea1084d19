"""Capture every layer call of a forward pass, then the gradients of the layers' outputs.

``LayerCapture`` hooks the modules that have a rule (``impls.layers``) or own trainable
parameters, records each call's inputs and outputs, and watches every torch call for trainable
parameters used where no hooked module accounts for them (a parent calling
``F.linear(x, self.child.weight)``, a parameter used in ``loss_fn``): such a use makes the answer
impossible to get from the hooks, so it is refused.

``backward`` asks autograd for the gradients of the summed losses w.r.t. the captured outputs
only. Parameters are not among the requested inputs, so autograd skips the weight-gradient
products altogether. Outputs are addressed by their gradient edge at capture time, so a later
in-place op (``ReLU(inplace=True)``) does not shift which tensor's gradient is returned.
With a callback, each call is handed over as soon as its output gradients are known, during the
backward pass for large captures (streamed), and its tensors are released after it.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from impls.base import Unsupported
from impls.layers import LayerCall, LayerRule, VmapFallback, rule_for

_DIRECT_FALLBACK = VmapFallback(recursive=False)

#: captured output bytes above which :meth:`LayerCapture.backward` streams by default: below,
#: the fixed cost of its hooks (a graph walk, a hook per node) outweighs what releasing saves
STREAM_BYTES = 4 << 20


def _carries_gradient(result) -> bool:
    if isinstance(result, Tensor):
        return result.requires_grad
    if isinstance(result, (tuple, list)):
        return any(isinstance(r, Tensor) and r.requires_grad for r in result)
    return False


class _ParameterUseWatch(TorchFunctionMode):
    """Remember the first trainable parameter used while no hooked module covers it, and offer
    the torch calls made inside an intercepting rule's module to that rule.

    ``active`` is a stack of (rule, uses) for the intercepting modules whose forward is running.
    The mode lives on this thread's torch-function mode stack, so other threads are not seen.
    """

    def __init__(self, names_by_id: dict[int, str], coverage: dict[int, int]):
        super().__init__()
        self.names_by_id = names_by_id
        self.coverage = coverage
        self.uncovered: str | None = None
        self.active: list[tuple[LayerRule, list]] = []
        self.create_graph = False
        self.batched: dict[int, weakref.ref] | None = None  # id -> tensor, once tracking

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = NotImplemented
        if self.active:
            rule, uses = self.active[-1]
            result = rule.intercept(func, args, kwargs, uses, self.create_graph)
        if result is NotImplemented:
            result = func(*args, **kwargs)
        # only a call whose result carries gradient uses a parameter: reading p.dtype, p.shape
        # or p.device, or p.detach(), is no gradient path
        if self.uncovered is None and _carries_gradient(result):
            self._check(args)
            if kwargs:
                self._check(kwargs.values())
        if self.batched is not None and (
            self._any_batched(args) or (kwargs and self._any_batched(kwargs.values()))
        ):
            self.track_batch(result)
        return result

    # -- which tensors carry the batch ---------------------------------------------------------
    # A tensor carries the batch when it is computed from the model's inputs: the inputs are
    # tagged, and every torch call with a tagged argument tags its results. A layer called on an
    # untagged tensor (``self.position(torch.arange(T))``) has an output shared by all examples,
    # so its per-example gradients cannot be read from its hooks, even when T happens to equal B
    # and every shape looks batched.

    def track_batch(self, tensors) -> None:
        if self.batched is None:
            self.batched = {}
        for t in tensors if isinstance(tensors, (tuple, list)) else (tensors,):
            if isinstance(t, Tensor):
                self.batched[id(t)] = weakref.ref(t)

    def is_batched(self, tensor) -> bool | None:
        """True/False for a tensor, None when the batch is not tracked."""
        if self.batched is None:
            return None
        ref = self.batched.get(id(tensor))
        return ref is not None and ref() is tensor

    def _any_batched(self, args) -> bool:
        batched = self.batched
        for arg in args:
            for x in arg if isinstance(arg, (list, tuple)) else (arg,):
                ref = batched.get(id(x))
                if ref is not None and ref() is x:
                    return True
        return False

    def _check(self, arguments):
        names, coverage = self.names_by_id, self.coverage
        for arg in arguments:
            if isinstance(arg, (list, tuple)):
                for x in arg:
                    if id(x) in names and not coverage[id(x)]:
                        self.uncovered = names[id(x)]
            elif id(arg) in names and not coverage[id(arg)]:
                self.uncovered = names[id(arg)]


class LayerCapture:
    """Context manager: hooks on ``model`` while the forward pass (and loss_fn) run inside it."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        batch_size: int,
        *,
        create_graph: bool = False,
        rules: dict[type, LayerRule] | None = None,
        inputs: tuple[Tensor, ...] | None = None,
    ):
        self.model = model
        self.params = params
        self.batch_size = batch_size
        self.create_graph = create_graph
        self.rules = rules or {}
        self.calls: list[LayerCall] = []
        self._handles = []
        names_by_id = {id(p): n for n, p in params.items()}
        self._coverage: dict[int, int] = defaultdict(int)
        self._watch = _ParameterUseWatch(names_by_id, self._coverage)
        self._watch.create_graph = create_graph
        if inputs is not None:  # tag the batch, so layers fed a shared tensor can be refused
            self._watch.track_batch(tuple(inputs))

    # -- which modules are hooked, and with which rule --------------------------------------

    def _rule(self, module: nn.Module) -> LayerRule | None:
        for module_type in type(module).__mro__:
            if module_type in self.rules:
                if type(module).forward is module_type.forward:
                    return self.rules[module_type]
                break
        rule = rule_for(module)
        if rule is not None:
            return rule
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return _DIRECT_FALLBACK
        return None

    def _plan(self):
        trainable = {id(p) for p in self.params.values()}
        skip: set[int] = set()
        for name, module in self.model.named_modules():
            if id(module) in skip:
                continue
            rule = self._rule(module)
            if rule is None:
                continue
            wanted = {n: p for n, p in rule.parameters(module).items() if id(p) in trainable}
            if not wanted:
                continue
            rule.check(module, name)
            if rule.recursive:
                skip.update(id(m) for m in module.modules())
            yield name, module, rule, wanted

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self):
        try:
            for name, module, rule, wanted in self._plan():
                self._hook(name, module, rule, wanted)
        except BaseException:
            self._remove()
            raise
        self._watch.__enter__()
        return self

    def __exit__(self, *exc):
        self._watch.__exit__(*exc)
        self._remove()
        if exc[0] is None and self._watch.uncovered is not None:
            raise Unsupported(
                f"parameter '{self._watch.uncovered}' is used outside the forward of a module "
                "that owns it (no layer hook can see that use)"
            )
        return False

    def _remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name, module, rule, wanted):
        keys = [id(p) for p in wanted.values()]
        coverage = self._coverage
        active = self._watch.active
        intercepts = rule.intercepts
        # the hooks sit on the caller's modules, which other threads may run meanwhile: only
        # this thread's calls are recorded
        owner = threading.get_ident()

        def before(module, args):
            if threading.get_ident() != owner:
                return
            for key in keys:
                coverage[key] += 1
            if intercepts:
                active.append((rule, []))

        def after(module, args, kwargs, outputs):
            if threading.get_ident() != owner:
                return
            for key in keys:
                coverage[key] -= 1
            uses = active.pop()[1] if intercepts else []
            leaves = [outputs] if isinstance(outputs, Tensor) else tree_flatten(outputs)[0]
            tensors = [x for x in leaves if isinstance(x, Tensor) and x.requires_grad]
            in_leaves = args if not kwargs else tree_flatten((args, kwargs))[0]
            if any(not isinstance(x, Tensor) and isinstance(x, (list, tuple, dict)) for x in args):
                in_leaves = tree_flatten((args, kwargs))[0]
            versions = [(x, x._version) for x in in_leaves if isinstance(x, Tensor)]
            call = LayerCall(
                module=module,
                name=name or type(module).__name__,
                rule=rule,
                args=args,
                kwargs=kwargs,
                outputs=outputs,
                output_tensors=tensors,
                wanted=wanted,
                batch_size=self.batch_size,
                create_graph=self.create_graph,
                versions=versions,
                edges=[get_gradient_edge(t) for t in tensors],
                uses=uses,
                input_batched=self._watch.is_batched(args[0]) if args else None,
            )
            self.calls.append(call)

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after, with_kwargs=True))

    def captured_bytes(self) -> int:
        """Bytes of the captured output tensors (what streaming can release early)."""
        tensors = [t for call in self.calls for t in call.output_tensors]
        tensors += [use.output for call in self.calls for use in call.uses]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- backward ------------------------------------------------------------------------------

    def backward(
        self,
        loss: Tensor,
        on_ready: Callable[[LayerCall], None] | None = None,
        *,
        stream: bool | None = None,
    ) -> None:
        """Fill each call's ``grad_outputs`` (and its linear uses' ``grad_output``) with
        d(loss)/d(output), zeros where an output does not reach the loss.

        ``on_ready(call)``, when given, runs once per call as soon as all of its output
        gradients are known, and the call's tensors are released right after it. Streamed
        (``stream``; default: when the captured outputs exceed :data:`STREAM_BYTES`), that is
        during the backward pass: pre-hooks on the autograd nodes above the lowest captured ones
        see the gradients as they pass, so the activations and gradients of layers already
        reduced are freed while autograd works on the layers below (the memory of a plain
        backward, not of every layer at once). Otherwise autograd returns every gradient at once
        and ``on_ready`` runs after it, without the hooks' fixed cost (small models).
        Without ``on_ready``, every call keeps its tensors and gradients.
        """
        if on_ready is None:
            stream = False
        elif stream is None:
            stream = self.captured_bytes() > STREAM_BYTES
        calls = self.calls
        pending = [len(call.edges) + len(call.uses) for call in calls]
        slots: dict[Node, list[tuple[int, int, int]]] = defaultdict(list)  # node -> targets
        for c, call in enumerate(calls):
            for k, edge in enumerate(call.edges):
                slots[edge.node].append((c, k, edge.output_nr))
            for k, use in enumerate(call.uses):
                slots[use.edge.node].append((c, len(call.edges) + k, use.edge.output_nr))
        for call in calls:
            call.grad_outputs = [None] * len(call.edges)
        failure: list[BaseException] = []

        def deliver(c: int, k: int, grad: Tensor | None) -> None:
            call = calls[c]
            if k < len(call.edges):
                target = call.output_tensors[k]
                call.grad_outputs[k] = torch.zeros_like(target) if grad is None else grad
            else:
                use = call.uses[k - len(call.edges)]
                use.grad_output = torch.zeros_like(use.output) if grad is None else grad
            pending[c] -= 1
            if pending[c] == 0:
                finish(c)

        def finish(c: int) -> None:
            # may run inside autograd's backward: an error stops it, and is re-raised unchanged
            call = calls[c]
            try:
                call.check_inputs_unchanged()
                if on_ready is not None:
                    on_ready(call)
                    call.release()
            except BaseException as error:
                failure.append(error)
                raise

        for c in range(len(calls)):
            if pending[c] == 0:
                finish(c)
        # Streamed, nodes above another captured node run in this backward: a pre-hook on them
        # sees their output gradients as they pass; the lowest captured nodes (all of them, not
        # streamed) are asked of autograd.grad.
        root = loss.grad_fn if loss.requires_grad else None
        above = _nodes_above(root, set(slots)) if stream and root is not None else set()
        handles, asked = [], []
        for node, targets in slots.items():
            if node in above:

                def hook(grad_outputs, targets=targets):
                    for c, k, output_nr in targets:
                        deliver(c, k, grad_outputs[output_nr])

                handles.append(node.register_prehook(hook))
            else:
                asked.extend((c, k, GradientEdge(node, output_nr)) for c, k, output_nr in targets)
        grads = [None] * len(asked)
        try:
            if asked and root is not None:
                grads = torch.autograd.grad(
                    loss,
                    [edge for _, _, edge in asked],
                    allow_unused=True,
                    create_graph=self.create_graph,
                )
        except BaseException:
            if failure:  # the error of a reduction, whatever autograd wrapped it in
                raise failure[0] from None
            raise
        finally:
            for handle in handles:
                handle.remove()
        grads = list(grads)
        for j, (c, k, _) in enumerate(asked):
            grad, grads[j] = grads[j], None  # held by its call only: released with it
            deliver(c, k, grad)


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
