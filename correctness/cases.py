"""The model zoo as data: each case is a model factory, a batch factory and a loss.

Shared by the correctness harness (small sizes, below) and the benchmark (the same families at
realistic sizes: ``bench/cases.py``). Factories are deterministic: a case builds the same model
and the same batch for the same (batch size, seed) on every call, without touching the global
random state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from correctness import hf_models, losses, models


@dataclass(frozen=True)
class Case:
    """One model + batch + loss.

    ``make_model()`` returns a fresh model (seeded), in ``dtype`` and the mode it is used in;
    ``make_batch(batch_size, seed)`` returns ``(inputs, targets)`` on the CPU in ``dtype``.
    ``defined=False`` marks models whose per-example gradients are undefined (every
    implementation must refuse them).
    """

    name: str
    model: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], tuple[Any, Any]]
    loss_fn: Callable
    dtype: torch.dtype = torch.float32
    train: bool = True
    defined: bool = True
    tags: tuple[str, ...] = field(default=())

    def make_model(self, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model()
        model = model.to(device=device, dtype=self.dtype)
        return model.train(self.train)

    def make_batch(self, batch_size: int, seed: int = 0, device="cpu") -> tuple[Any, Any]:
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = self.batch(batch_size, generator)
        return _to(inputs, device, self.dtype), _to(targets, device, self.dtype)

    def __str__(self) -> str:
        return self.name


def _to(x, device, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    if isinstance(x, Mapping):
        return type(x)({k: _to(v, device, dtype) for k, v in x.items()})
    if isinstance(x, (tuple, list)):
        return type(x)(_to(t, device, dtype) for t in x)
    return x


# -- batch factories: (batch_size, generator) -> (inputs, targets) --------------------------------


def features_and_classes(b, gen, *, shape, classes):
    return torch.randn(b, *shape, generator=gen), torch.randint(0, classes, (b,), generator=gen)


def features_and_values(b, gen, *, shape, outputs):
    return torch.randn(b, *shape, generator=gen), torch.randn(b, *outputs, generator=gen)


def tokens_and_classes(b, gen, *, length, vocab, classes, padding_idx=None):
    tokens = torch.randint(0, vocab, (b, length), generator=gen)
    if padding_idx is not None and length > 2:  # pad the tail of every other example
        tokens[::2, -2:] = padding_idx
    return tokens, torch.randint(0, classes, (b,), generator=gen)


def tokens_and_next_tokens(b, gen, *, length, vocab):
    tokens = torch.randint(0, vocab, (b, length + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def two_inputs(b, gen, *, classes):
    inputs = (torch.randn(b, 4, generator=gen), torch.randn(b, 3, generator=gen))
    return inputs, torch.randint(0, classes, (b,), generator=gen)


def _frozen_first_layer():
    model = models.MLP((6, 10, 10, 3))
    model[0].requires_grad_(False)
    return model


CE, MSE = losses.cross_entropy, losses.squared_error

CASES: list[Case] = [
    Case(
        "mlp",
        partial(models.MLP, (8, 16, 16, 3)),
        partial(features_and_classes, shape=(8,), classes=3),
        CE,
        tags=("linear",),
    ),
    Case(
        "mlp_f64",
        partial(models.MLP, (8, 16, 16, 3)),
        partial(features_and_classes, shape=(8,), classes=3),
        CE,
        dtype=torch.float64,
        tags=("linear",),
    ),
    Case(
        "mlp_regression",
        partial(models.MLP, (5, 12, 2)),
        partial(features_and_values, shape=(5,), outputs=(2,)),
        MSE,
        tags=("linear",),
    ),
    Case(
        "cnn",
        partial(models.CNN, 3, 4, 5),
        partial(features_and_classes, shape=(3, 8, 8), classes=5),
        CE,
        tags=("conv",),
    ),
    Case(
        "cnn_groupnorm_f64",
        partial(models.CNN, 3, 4, 5, norm="group"),
        partial(features_and_classes, shape=(3, 8, 8), classes=5),
        CE,
        dtype=torch.float64,
        tags=("conv", "norm"),
    ),
    Case(
        "conv1d",
        models.Conv1dNet,
        partial(features_and_classes, shape=(4, 16), classes=3),
        CE,
        tags=("conv",),
    ),
    Case(
        "conv3d",
        models.Conv3dNet,
        partial(features_and_classes, shape=(2, 4, 6, 6), classes=3),
        CE,
        tags=("conv",),
    ),
    Case(
        "sequence_linear",
        models.SequenceRegressor,
        partial(features_and_values, shape=(5, 6), outputs=(5, 2)),
        MSE,
        tags=("linear",),
    ),
    Case(
        "layer_group_rms_norm",
        models.NormNet,
        partial(features_and_classes, shape=(5, 8), classes=3),
        CE,
        tags=("norm",),
    ),
    Case(
        "embedding",
        models.EmbeddingBagOfWords,
        partial(tokens_and_classes, length=7, vocab=50, classes=4, padding_idx=0),
        CE,
        tags=("embedding",),
    ),
    Case(
        "attention",
        models.AttentionClassifier,
        partial(tokens_and_classes, length=6, vocab=40, classes=3),
        CE,
        tags=("attention",),
    ),
    Case(
        "transformer",
        models.TinyTransformer,
        partial(tokens_and_classes, length=8, vocab=64, classes=4),
        CE,
        tags=("attention", "embedding", "norm", "linear"),
    ),
    Case(
        "lstm",
        models.LSTMClassifier,
        partial(features_and_classes, shape=(6, 5), classes=3),
        CE,
        tags=("rnn",),
    ),
    Case(
        "frozen_layer",
        _frozen_first_layer,
        partial(features_and_classes, shape=(6,), classes=3),
        CE,
        tags=("linear",),
    ),
    Case(
        "tied_embedding",
        models.TiedLanguageModel,
        partial(tokens_and_next_tokens, length=6, vocab=30),
        losses.token_cross_entropy,
        tags=("embedding", "tied"),
    ),
    Case(
        "bare_parameter",
        models.ScaledMLP,
        partial(features_and_classes, shape=(6,), classes=3),
        CE,
        tags=("fallback",),
    ),
    Case(
        "reused_layer",
        models.ReusedLayer,
        partial(features_and_classes, shape=(6,), classes=3),
        CE,
        tags=("linear", "tied"),
    ),
    Case(
        "caller_hooks",
        models.HookedPReLU,
        partial(features_and_classes, shape=(6,), classes=3),
        CE,
        tags=("fallback",),
    ),
    Case(
        "linear_subclass",
        models.LowRankMLP,
        partial(features_and_classes, shape=(6,), classes=3),
        CE,
        tags=("fallback",),
    ),
    Case("two_inputs", models.TwoInputNet, partial(two_inputs, classes=2), CE, tags=("linear",)),
    # a trap: the sequence length equals the harness's batch size (5), so only data flow tells
    # that the position embedding is shared; hook-based methods must refuse, never answer
    Case(
        "shared_position_ids",
        models.SharedPositionIds,
        partial(tokens_and_classes, length=5, vocab=30, classes=3),
        CE,
        tags=("embedding", "trap"),
    ),
    # a learned table indexed by torch.arange(T) in a module no rule knows (its output is shared
    # by all examples), at T equal to the batch size (5) and at another length
    Case(
        "learned_positions",
        partial(models.LearnedPositions, length=5),
        partial(tokens_and_classes, length=5, vocab=30, classes=3),
        CE,
        tags=("shared",),
    ),
    Case(
        "learned_positions_t7",
        partial(models.LearnedPositions, length=7),
        partial(tokens_and_classes, length=7, vocab=30, classes=3),
        CE,
        tags=("shared",),
    ),
    Case(
        "batchnorm_eval",
        models.BatchNormMLP,
        partial(features_and_classes, shape=(6,), classes=3),
        CE,
        train=False,
        tags=("norm",),
    ),
    Case(
        "batchnorm_no_running_stats",
        partial(models.BatchNormMLP, running_stats=False),
        partial(features_and_classes, shape=(6,), classes=3),
        CE,
        train=False,
        defined=False,
        tags=("norm",),
    ),
    Case(
        "batchnorm_train",
        models.BatchNormMLP,
        partial(features_and_classes, shape=(6,), classes=3),
        CE,
        defined=False,
        tags=("norm",),
    ),
]

#: real models (Hugging Face transformers, tiny configurations built locally), called with a
#: mapping of inputs (``model(**batch)``); in the zoo when transformers is installed. Tag
#: "float32_inside": the model computes parts in float32 whatever its dtype (T5's and Llama's
#: RMSNorm cast), so float64 checks tighter than float32 rounding do not apply to it.
HF_CASES: list[Case] = [
    Case("hf_gpt2", hf_models.gpt2_lm, hf_models.tokens, losses.next_token_cross_entropy,
         tags=("hf", "shared", "tied")),
    Case("hf_gpt2_padded", hf_models.gpt2_lm, hf_models.padded_tokens,
         losses.next_token_cross_entropy, tags=("hf", "shared", "tied", "padded")),
    Case("hf_bert", hf_models.bert_classifier, hf_models.tokens_and_classes,
         losses.logits_cross_entropy, tags=("hf", "shared")),
    Case("hf_bert_mlm_padded", hf_models.bert_masked_lm, hf_models.masked_lm_batch,
         losses.masked_token_cross_entropy, tags=("hf", "shared", "tied", "padded")),
    Case("hf_t5_encoder", hf_models.T5EncoderClassifier, hf_models.tokens_and_classes,
         losses.logits_cross_entropy, tags=("hf", "shared", "tied", "float32_inside")),
    Case("hf_t5_encoder_padded", hf_models.T5EncoderClassifier,
         hf_models.padded_tokens_and_classes, losses.logits_cross_entropy,
         tags=("hf", "shared", "tied", "padded", "float32_inside")),
    Case("hf_vit", hf_models.vit_classifier, hf_models.images_and_classes,
         losses.logits_cross_entropy, tags=("hf", "shared")),
    Case("hf_llama", hf_models.llama_lm, hf_models.tokens, losses.next_token_cross_entropy,
         tags=("hf", "float32_inside")),
]  # fmt: skip
if hf_models.available():
    CASES += HF_CASES

BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"


def get_case(name: str) -> Case:
    if name not in BY_NAME:
        raise KeyError(f"unknown case '{name}'; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]
