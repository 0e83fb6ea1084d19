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


def _logits(outputs):
    """The logits of a Hugging Face ModelOutput, or the tensor itself."""
    return outputs.logits if hasattr(outputs, "logits") else outputs


def logits_cross_entropy(outputs, targets):
    """Classification from a model output with ``.logits`` [B, C]; targets [B]."""
    return F.cross_entropy(_logits(outputs), targets, reduction="none")


def next_token_cross_entropy(outputs, labels):
    """Causal language modelling: the logits at position t predict label t+1; each example's
    loss sums its tokens, and a label of -100 (padding) contributes nothing."""
    logits = _logits(outputs)[:, :-1]
    labels = labels[:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
        reduction="none",
    )  # fmt: skip
    return losses.reshape(labels.shape).sum(1)


def masked_token_cross_entropy(outputs, labels):
    """Masked language modelling: each example's loss sums its labelled positions (-100 is
    ignored)."""
    logits = _logits(outputs)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
        reduction="none",
    )  # fmt: skip
    return losses.reshape(labels.shape).sum(1)
