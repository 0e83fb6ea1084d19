"""Per-example loss functions (reduction 'none'): loss_fn(outputs, targets) -> Tensor[B]."""

from __future__ import annotations

import torch.nn.functional as F


def cross_entropy(outputs, targets):
    """Classification: outputs [B, C] logits, targets [B] class indices."""
    return F.cross_entropy(outputs, targets, reduction="none")


def squared_error(outputs, targets):
    """Regression: half the squared error summed over each example's outputs."""
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1)


def token_cross_entropy(outputs, targets):
    """Sequence model: outputs [B, T, V], targets [B, T]; each example's loss sums its tokens."""
    b, t, v = outputs.shape
    losses = F.cross_entropy(outputs.reshape(b * t, v), targets.reshape(b * t), reduction="none")
    return losses.reshape(b, t).sum(1)
