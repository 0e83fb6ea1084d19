"""nn.MultiheadAttention: the projections run inside ``F.multi_head_attention_forward`` as
``linear(x, w, b)`` calls on the packed ``in_proj_weight`` (or its row slices: ``split`` when
key is value, ``chunk`` otherwise), on ``q/k/v_proj_weight`` when kdim/vdim differ from
embed_dim, and on ``out_proj``'s parameters (whose own forward never runs).

The capture offers this rule the call of ``F.multi_head_attention_forward``; the rule runs a
copy of that function (and of the ``_in_projection*`` helpers it calls) whose ``linear`` also
records each call's input and output (:class:`LinearUse`). Nothing global is patched: the copy
has its own globals, and the recorder it appends to is thread-local, so other threads running
the same module are unaffected. The recorded projections are Linear layers with positions:

- in-projections: input [T, n, E_in] (the function's sequence-first layout), rows
  ``row_start`` .. of the parameter they slice;
- out-projection: input [T·n, E] with row t·n + b.

Each projection's weight gradient is kept factored (``Outer`` with its row offset), biases are
materialised. Parameters used any other way (``bias_k``/``bias_v`` with add_bias_kv), calls the
recording could not see (a LayerCall built elsewhere, unbatched inputs) or a layout that does not
match the above: the vmap fallback over the whole module, as before.

With ``create_graph`` the recorded forward runs attention on the math backend of
``scaled_dot_product_attention`` (the fused CPU kernel has no double backward), so results
stay differentiable w.r.t. the parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections import defaultdict

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from impls.layers.base import record_linear, recording, register_rule
from impls.layers.factored import Dense, Outer, combine
from impls.layers.fallback import VmapFallback

#: parameters the projections account for; anything else goes to the vmap fallback
_PROJECTIONS = {
    "in_proj_weight",
    "in_proj_bias",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "out_proj.weight",
    "out_proj.bias",
}


@functools.cache
def _recording_attention_forward():
    """``F.multi_head_attention_forward`` with a recording ``linear`` (copies, own globals)."""
    namespace = dict(vars(F))
    namespace["linear"] = record_linear
    for name in ("multi_head_attention_forward", "_in_projection_packed", "_in_projection"):
        original = getattr(F, name)
        copy = types.FunctionType(
            original.__code__,
            namespace,
            original.__name__,
            original.__defaults__,
            original.__closure__,
        )
        copy.__kwdefaults__ = original.__kwdefaults__
        namespace[name] = copy
    namespace["_in_projection_packed"] = _unbound(namespace["_in_projection_packed"])
    return namespace["multi_head_attention_forward"]


def _unbound(in_projection_packed):
    """``_in_projection_packed`` whose self-attention result is ``proj.unbind(0)`` instead of
    ``proj[0], proj[1], proj[2]``: the same tensors (views of one contiguous [3, T, n, E]), but
    the backward stacks the three gradients once, where three ``select``s each fill a zero
    [3, T, n, E] and autograd adds the three (about a tenth of an attention layer's forward and
    backward at T=64, n=128, E=256). Any other result is returned as it is.
    """

    def projected(q, k, v, w, b=None):
        parts = in_projection_packed(q, k, v, w, b)
        base = parts[0]._base if len(parts) == 3 else None
        if base is None or base.dim() < 2 or base.shape[0] != 3 or not base.is_contiguous():
            return parts
        for j, part in enumerate(parts):
            offset = base.storage_offset() + j * base.stride(0)
            if part._base is not base or part.shape != base.shape[1:]:
                return parts
            if part.storage_offset() != offset or part.stride() != base.stride()[1:]:
                return parts
        return list(base.unbind(0))

    return projected


def _locate(module: nn.Module, tensor: Tensor) -> tuple[str, int] | None:
    """(local parameter name, first row) of a parameter or of a row slice (view) of one."""
    for name, p in module.named_parameters():
        if tensor is p:
            return name, 0
        if tensor._base is p and tensor.shape[1:] == p.shape[1:] and p.is_contiguous():
            offset = tensor.storage_offset() - p.storage_offset()
            row_size = p.stride(0) if p.dim() > 1 else 1
            if tensor.is_contiguous() and offset % row_size == 0:
                return name, offset // row_size
    return None


class MultiheadAttentionRule(VmapFallback):
    types = (nn.MultiheadAttention,)
    intercepts = True

    def __init__(self):
        super().__init__(recursive=True)

    def intercept(self, func, args, kwargs, uses, create_graph):
        if func is not F.multi_head_attention_forward:
            return NotImplemented
        with contextlib.ExitStack() as stack:
            stack.enter_context(recording(uses))
            if create_graph:
                # the fused CPU attention kernels have no double backward; the math backend
                # computes the same attention with differentiable ops
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            return _recording_attention_forward()(*args, **kwargs)

    def factors(self, call):
        projections = self._projection_factors(call)
        if projections is None:
            return {n: Dense(g) for n, g in super().grad_samples(call).items()}
        rest = {n: p for n, p in call.wanted.items() if n not in projections}
        out = dict(projections)
        if rest:
            others = super().grad_samples(dataclasses.replace(call, wanted=rest))
            out.update((n, Dense(g)) for n, g in others.items())
        return out

    def grad_samples(self, call):
        return {n: f.materialize() for n, f in self.factors(call).items()}

    def _projection_factors(self, call):
        """Local name -> factors of the projections' parameters, or None (use the fallback)."""
        query = call.args[0] if call.args else call.kwargs.get("query")
        if not call.uses or not isinstance(query, Tensor) or query.dim() != 3:
            return None
        n, module = call.batch_size, call.module
        parts = defaultdict(list)
        for use in call.uses:
            x, g = use.input, use.grad_output
            if not call.create_graph:
                x = x.detach()
            if use.weight is module.out_proj.weight:
                if x.dim() != 2 or x.shape[0] % n:
                    return None
                # [T·n, f] with row t·n + b -> [n, T, f]
                x = x.reshape(-1, n, x.shape[-1]).transpose(0, 1)
                g = g.reshape(-1, n, g.shape[-1]).transpose(0, 1)
            else:
                if x.dim() != 3 or x.shape[1] != n:
                    return None
                x, g = x.transpose(0, 1), g.transpose(0, 1)  # [T, n, f] -> [n, T, f]
            weight = _locate(module, use.weight)
            bias = None if use.bias is None else _locate(module, use.bias)
            if weight is None or use.bias is not None and bias is None:
                return None
            name, start = weight
            if name in call.wanted:
                shape = call.wanted[name].shape
                parts[name].append(Outer(g.unsqueeze(1), x.unsqueeze(1), shape, start))
            if bias is not None and bias[0] in call.wanted:
                name, start = bias
                total = call.wanted[name].shape[0]
                summed = g.sum(1)
                parts[name].append(Dense(F.pad(summed, (start, total - start - g.shape[-1]))))
        expected = {n for n in call.wanted if n in _PROJECTIONS}
        if set(parts) != expected:
            return None  # a projection parameter the recording did not see: do not guess
        return {name: combine(fs) for name, fs in parts.items()}


register_rule(MultiheadAttentionRule())
