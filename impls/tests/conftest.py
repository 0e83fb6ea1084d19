"""What the implementation tests share (the root conftest already runs torch on one thread)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

DOUBLE = torch.float64


def ce(outputs, targets):
    """Per-example cross-entropy (reduction "none")."""
    return F.cross_entropy(outputs, targets, reduction="none")


def double(x):
    """Floating-point tensors of a batch value (tensor, tuple, list or mapping) in float64."""
    if torch.is_tensor(x):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return type(x)({k: double(v) for k, v in x.items()})
    if isinstance(x, (tuple, list)):
        return type(x)(double(t) for t in x)
    return x
