"""nn.MultiheadAttention: ``F.multi_head_attention_forward`` replaced by a copy of itself whose
torch calls the watch follows.

The copy has its own globals (nothing global is patched) in which ``has_torch_function`` is
false, so the copy runs its body under the capture instead of handing the call back to it: the
packed ``in_proj_weight`` (or its row slices: ``split`` when key is value, ``chunk`` otherwise),
``q/k/v_proj_weight`` and ``out_proj``'s parameters are then ``F.linear`` calls (the linear
rule; a row slice of a parameter is placed at its rows), ``bias_k``/``bias_v`` are parameters
meeting the batch in a concatenation. One change from the original: the self-attention
projection returns ``proj.unbind(0)`` instead of ``proj[0], proj[1], proj[2]`` (the same
tensors, but one backward node instead of three that each fill a zero [3, T, n, E]).

Plain batched self-attention (query, key and value one tensor, no masks, no ``bias_k``/``bias_v``
or zero attention, packed projection, ``need_weights=False``: what ``nn.TransformerEncoderLayer``
and most models call) takes :func:`_self_attention` instead: the same calls the original makes in
that configuration (projection, ``scaled_dot_product_attention``, output projection), nine calls
through the watch where the copy makes fifty-two (its checks, mask handling and reshapes).
"""

from __future__ import annotations

import functools
import inspect
import types

import torch.nn.functional as F

from impls.layers.replacements import register_replacement


@functools.cache
def _followable_attention_forward():
    namespace = dict(vars(F))
    namespace["has_torch_function"] = lambda *args: False
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
    """``_in_projection_packed`` whose self-attention result is ``proj.unbind(0)``: the same
    tensors (views of one contiguous [3, T, n, E]), but the backward stacks the three gradients
    once, where three ``select``s each fill a zero [3, T, n, E] and autograd adds the three
    (about a tenth of an attention layer's forward and backward at T=64, n=128, E=256).

    The self-attention branch is PyTorch's own, written out: its calls are followed one by one,
    and the original's indexing (and probing its result to unbind it) would be eleven calls more.
    """

    def projected(q, k, v, w, b=None):
        if q is k and k is v:  # self-attention: one projection, split in three
            proj = F.linear(q, w, b)
            proj = proj.unflatten(-1, (3, q.size(-1))).unsqueeze(0).transpose(0, -2).squeeze(-2)
            return list(proj.contiguous().unbind(0))
        return in_projection_packed(q, k, v, w, b)

    return projected


_SIGNATURE = inspect.signature(F.multi_head_attention_forward)

#: the arguments that must be None / false for :func:`_self_attention`
_ABSENT = ("bias_k", "bias_v", "add_zero_attn", "key_padding_mask", "need_weights", "attn_mask",
           "use_separate_proj_weight", "static_k", "static_v", "is_causal")  # fmt: skip


def _self_attention(args, kwargs):
    """``F.multi_head_attention_forward`` for plain batched self-attention (see the module), or
    None for any other call. The query [T, n, E] is time-major, as the module passes it."""
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None  # the original reports it
    bound.apply_defaults()
    p = bound.arguments
    query = p["query"]
    if query is not p["key"] or query is not p["value"] or query.dim() != 3:
        return None
    if any(p[name] is not None and p[name] is not False for name in _ABSENT):
        return None
    steps, n, embed = query.shape
    heads = p["num_heads"]
    if embed != p["embed_dim_to_check"] or embed % heads or p["in_proj_weight"] is None:
        return None  # the original's checks say what is wrong
    dropout = p["dropout_p"] if p["training"] else 0.0
    projected = F.linear(query, p["in_proj_weight"], p["in_proj_bias"])  # [T, n, 3E]
    q, k, v = projected.view(steps, n, 3, heads, embed // heads).permute(2, 1, 3, 0, 4).unbind(0)
    attended = F.scaled_dot_product_attention(q, k, v, None, dropout, False)  # [n, heads, T, d]
    attended = attended.permute(2, 0, 1, 3).reshape(steps * n, embed)
    out = F.linear(attended, p["out_proj_weight"], p["out_proj_bias"])
    return out.view(steps, n, embed), None


def _replacement(args, kwargs, capture):
    result = _self_attention(args, kwargs)
    if result is not None:
        return result
    return _followable_attention_forward()(*args, **kwargs)


register_replacement(F.multi_head_attention_forward, _replacement)
