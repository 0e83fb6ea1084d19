"""Affine parameters of normalisations: ``F.layer_norm``, ``F.rms_norm``, ``F.group_norm`` and
``F.batch_norm`` in evaluation (running statistics). With x̂ the normalised input,
∇w ℓ_n = Σ_positions g_n ⊙ x̂_n and ∇b ℓ_n = Σ_positions g_n. The parameters are small:
materialised (``Dense``). Batch norm with batch statistics mixes the examples: refused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from impls.base import Unsupported
from impls.factors import Dense
from impls.layers.base import Binding, OpRule, register_rule, require_first_dimension


def _args(args, kwargs, names, defaults):
    return [
        args[k] if k < len(args) else kwargs.get(name, default)
        for k, (name, default) in enumerate(zip(names, defaults, strict=True))
    ]


def _bound(x, weight, bias, is_weight, config: dict) -> Binding | None:
    """The binding of a normalisation of ``x`` with an affine ``weight``/``bias``, or None when
    neither is a weight to differentiate (or x is not an activation)."""
    if not isinstance(x, Tensor) or is_weight(x):
        return None
    weights = {"weight": weight, "bias": bias}
    if not any(is_weight(w) for w in weights.values() if isinstance(w, Tensor)):
        return None
    return Binding((x,), weights, config)


def _affine(use, normalised: Tensor, grads: Tensor, reduce_dims) -> dict:
    out = {}
    if "weight" in use.wanted:
        out["weight"] = Dense((grads * normalised).sum(reduce_dims))
    if "bias" in use.wanted:
        out["bias"] = Dense(grads.sum(reduce_dims))
    return out


class TrailingNormRule(OpRule):
    """layer_norm / rms_norm over the trailing ``normalized_shape`` dimensions."""

    functions = (F.layer_norm, F.rms_norm)

    def bind(self, func, args, kwargs, is_weight):
        if func is F.layer_norm:
            x, shape, weight, bias, eps = _args(
                args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                (None, None, None, None, 1e-5),
            )  # fmt: skip
        else:
            x, shape, weight, eps = _args(
                args, kwargs, ("input", "normalized_shape", "weight", "eps"), (None,) * 4
            )
            bias = None
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        config = {"shape": shape, "eps": eps, "rms": func is F.rms_norm}
        return _bound(x, weight, bias, is_weight, config)

    def factors(self, use):
        shape, eps = use.config["shape"], use.config["eps"]
        x = use.activation()
        if use.config["rms"]:
            normalised = F.rms_norm(x, shape, eps=eps)
        else:
            normalised = F.layer_norm(x, shape, eps=eps)
        n = use.batch_size
        g = use.output_gradient().reshape(n, -1, *shape)
        return _affine(use, normalised.reshape(g.shape), g, 1)


class GroupNormRule(OpRule):
    functions = (F.group_norm,)

    def bind(self, func, args, kwargs, is_weight):
        x, groups, weight, bias, eps = _args(
            args, kwargs, ("input", "num_groups", "weight", "bias", "eps"),
            (None, None, None, None, 1e-5),
        )  # fmt: skip
        return _bound(x, weight, bias, is_weight, {"groups": groups, "eps": eps})

    def check(self, use):
        require_first_dimension(use, "normalises each row")

    def factors(self, use):
        n = use.batch_size
        x = use.activation()  # [n, r, C, *spatial]
        rows = x.shape[1]
        normalised = F.group_norm(x.reshape(n * rows, *x.shape[2:]), use.config["groups"],
                                  eps=use.config["eps"])  # fmt: skip
        channels = x.shape[2]
        normalised = normalised.reshape(n, rows, channels, -1)
        g = use.output_gradient().reshape(n, rows, channels, -1)
        return _affine(use, normalised, g, (1, 3))


class BatchNormRule(OpRule):
    """``F.batch_norm`` with running statistics: an affine map per channel (dimension 1)."""

    functions = (F.batch_norm,)

    def bind(self, func, args, kwargs, is_weight):
        x, mean, var, weight, bias, training, _, eps = _args(
            args, kwargs,
            ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps"),
            (None, None, None, None, None, False, 0.1, 1e-5),
        )  # fmt: skip
        config = {"mean": mean, "var": var, "training": bool(training), "eps": eps}
        return _bound(x, weight, bias, is_weight, config)

    def check(self, use):
        if use.config["training"] or use.config["mean"] is None:
            raise Unsupported(
                f"{use.where} normalises with batch statistics: it mixes the examples of a batch"
            )
        require_first_dimension(use, "normalises each row")

    def factors(self, use):
        n = use.batch_size
        x = use.activation()  # [n, r, C, *spatial]
        rows, channels = x.shape[1], x.shape[2]
        x = x.reshape(n, rows, channels, -1)
        mean = use.config["mean"].detach().reshape(1, 1, channels, 1)
        var = use.config["var"].detach().reshape(1, 1, channels, 1)
        normalised = (x - mean) * (var + use.config["eps"]).rsqrt()
        g = use.output_gradient().reshape(n, rows, channels, -1)
        return _affine(use, normalised, g, (1, 3))


register_rule(TrailingNormRule())
register_rule(GroupNormRule())
register_rule(BatchNormRule())
