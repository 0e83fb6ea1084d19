"""The bench cases: the zoo's model families at realistic sizes.

Built from the zoo's own ``Case`` dataclass, model classes and batch factories
(``correctness.cases`` / ``correctness.models``), so the benchmark times the very models the
agreement harness checks, only bigger. ``mlp_mnist`` and ``transformer_t64`` are the two models
issue 3's performance targets name (the MLP 784-512-512-10; Embedding, attention and MLP blocks
at T=64).
"""

from __future__ import annotations

from functools import partial

from correctness import hf_models, losses, models
from correctness.cases import Case, features_and_classes, tokens_and_classes

CE = losses.cross_entropy

#: powers of two from 16 to 1024: the sweep's batch sizes unless told otherwise
ALL_BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)

_TRANSFORMER = dict(vocab=1000, dim=64, heads=4, hidden=256, blocks=2, classes=10)


def _transformer(length: int) -> Case:
    return Case(
        f"transformer_t{length}",
        partial(models.TinyTransformer, max_len=length, **_TRANSFORMER),
        partial(tokens_and_classes, length=length, vocab=_TRANSFORMER["vocab"], classes=10),
        CE,
        tags=("attention", "embedding", "norm", "linear"),
    )


BENCH_CASES: list[Case] = [
    Case(
        "mlp_mnist",
        partial(models.MLP, (784, 512, 512, 10)),
        partial(features_and_classes, shape=(784,), classes=10),
        CE,
        tags=("linear",),
    ),
    Case(
        "cnn_cifar",
        partial(models.CNN, 3, 32, 10),
        partial(features_and_classes, shape=(3, 32, 32), classes=10),
        CE,
        tags=("conv",),
    ),
    _transformer(64),
    _transformer(256),
    Case(
        "lstm",
        partial(models.LSTMClassifier, features=32, hidden=128, classes=10),
        partial(features_and_classes, shape=(32, 32), classes=10),
        CE,
        tags=("rnn",),
    ),
]

#: a real model: Hugging Face GPT-2 (default position ids broadcast over the batch, lm_head
#: tied to wte), built locally at a small size, on sequences of 128 tokens
GPT2 = dict(vocab=8192, dim=256, layers=4, heads=4, positions=128)
if hf_models.available():
    BENCH_CASES.append(
        Case(
            "gpt2",
            partial(hf_models.gpt2_lm, **GPT2),
            partial(hf_models.tokens, length=GPT2["positions"], vocab=GPT2["vocab"]),
            losses.next_token_cross_entropy,
            tags=("hf", "shared", "tied"),
        )
    )

#: one line per case for the report
DESCRIPTIONS = {
    "mlp_mnist": "MLP 784-512-512-10 (ReLU) on MNIST-shaped inputs [B, 784], 10 classes",
    "cnn_cifar": "CNN on CIFAR-shaped inputs [B, 3, 32, 32]: 3 conv (32/64/64 channels, stride, "
    "groups, reflect padding), max pool, global average pool, Linear head",
    "transformer_t64": "transformer, T=64 tokens: Embedding(1000, 64) + positions, 2 blocks "
    "(LayerNorm, 4-head nn.MultiheadAttention, MLP 64-256-64), LayerNorm, mean pool, Linear",
    "transformer_t256": "the same transformer at T=256 tokens",
    "lstm": "LSTM (32 features -> 128 hidden, 32 steps), Linear head on the last step",
    "gpt2": "Hugging Face GPT2LMHeadModel (n_embd 256, 4 layers, 4 heads, vocabulary 8192, "
    "lm_head tied to wte, default position ids), next-token loss on T=128, model(**batch)",
}

#: CPU default batch sizes per case: the full ladder where a plain step is cheap, shorter where
#: one plain forward+backward at B=1024 already takes seconds on 2 cores (keeps the default
#: sweep within 15 minutes); ``--batch-sizes`` overrides them for every case
CPU_BATCH_SIZES = {
    "mlp_mnist": ALL_BATCH_SIZES,
    "cnn_cifar": (16, 32, 64, 128, 256),
    "transformer_t64": (16, 32, 64, 128),
    "transformer_t256": (16, 32),
    "lstm": (16, 32, 64, 128, 256),
    "gpt2": (16, 32),
}

#: the cases the quick sweep also runs in low precision when ``--dtype`` is not given: their bf16
#: and bf16 autocast cells beside the float32 ones (``bench.precision``)
LOW_PRECISION = {
    "mlp_mnist": ("bf16", "autocast-bf16"),
    "transformer_t64": ("bf16", "autocast-bf16"),
}

#: cases whose plain step alone takes seconds get a longer cell budget (a multiple of the
#: settings' ``budget_s``), so that a cell still fits a few interleaved rounds
BUDGET_SCALE = {"gpt2": 6.0}

BY_NAME = {case.name: case for case in BENCH_CASES}
assert len(BY_NAME) == len(BENCH_CASES), "bench case names must be unique"
assert set(BY_NAME) <= set(DESCRIPTIONS) and set(BY_NAME) <= set(CPU_BATCH_SIZES)


def get_case(name: str) -> Case:
    if name not in BY_NAME:
        raise KeyError(f"unknown bench case '{name}'; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def budget_scale(case) -> float:
    """How many times the settings' cell budget a bench case gets (1 for any other case, a
    user's model in ``compare`` included)."""
    if BY_NAME.get(case.name) is not case:
        return 1.0
    return BUDGET_SCALE.get(case.name, 1.0)


def default_batch_sizes(case_name: str, device: str) -> tuple[int, ...]:
    """The batch sizes the default sweep measures for a case on a device type."""
    if device == "cpu":
        return CPU_BATCH_SIZES.get(case_name, ALL_BATCH_SIZES)
    return ALL_BATCH_SIZES
