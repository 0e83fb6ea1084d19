"""Model families of the zoo, sized by arguments so the benchmark can build them bigger."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    def __init__(self, sizes=(784, 512, 512, 10)):
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=False):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
        super().__init__(*layers[:-1])


class CNN(nn.Module):
    """Conv2d with stride, padding and groups, pooling, a classifier head (CIFAR-shaped)."""

    def __init__(self, channels=3, width=32, classes=10, norm: str | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=2)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding="same", padding_mode="reflect")
        self.norm = {
            None: nn.Identity(),
            "group": nn.GroupNorm(4, 2 * width),
            "batch": nn.BatchNorm2d(2 * width),
        }[norm]
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.conv2(x))
        x = F.relu(self.norm(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class Conv1dNet(nn.Module):
    def __init__(self, channels=4, width=8, classes=3):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, width, 5, stride=2, padding=2, dilation=1)
        self.conv2 = nn.Conv1d(width, width, 3, dilation=2, groups=2, bias=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(x.mean(-1))


class Conv3dNet(nn.Module):
    def __init__(self, channels=2, width=4, classes=3):
        super().__init__()
        self.conv = nn.Conv3d(channels, width, 3, stride=(1, 2, 2), padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3, 4)))


class SequenceRegressor(nn.Module):
    """Linear layers on 3-D inputs [B, T, F]."""

    def __init__(self, features=6, hidden=16, outputs=2):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


class NormNet(nn.Module):
    """LayerNorm, RMSNorm and GroupNorm (affine) between Linear layers."""

    def __init__(self, features=8, hidden=12, classes=3):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.layer_norm = nn.LayerNorm(hidden)
        self.rms_norm = nn.RMSNorm(hidden)
        self.group_norm = nn.GroupNorm(3, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):  # x [B, T, F]
        h = self.layer_norm(self.inp(x))
        h = self.rms_norm(torch.tanh(h))
        h = self.group_norm(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


class EmbeddingBagOfWords(nn.Module):
    """Embedding (with padding_idx) of token ids [B, T], mean-pooled, two Linear layers."""

    def __init__(self, vocab=50, dim=16, hidden=32, classes=4, padding_idx=0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.hidden = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        return self.head(torch.relu(self.hidden(self.embed(tokens).mean(1))))


class AttentionClassifier(nn.Module):
    """nn.MultiheadAttention (self-attention, batch_first) on embedded tokens."""

    def __init__(self, vocab=40, dim=16, heads=2, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Embedding + positional embedding, transformer blocks, a mean-pooled classifier."""

    def __init__(self, vocab=64, dim=16, heads=2, hidden=32, blocks=1, max_len=64, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(blocks))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        # position ids carry the batch dimension, as in Hugging Face models: an embedding called
        # on unbatched ids has an output shared by all examples, which per-example methods refuse
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, features=5, hidden=8, classes=3, layers=1):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TiedLanguageModel(nn.Module):
    """Token embedding tied to the output projection: one Parameter in two modules."""

    def __init__(self, vocab=30, dim=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens):
        return self.decoder(torch.tanh(self.mix(self.embed(tokens))))


class ScaledMLP(nn.Module):
    """A bare nn.Parameter used in the model's own forward (no layer formula sees it)."""

    def __init__(self, features=6, hidden=10, classes=3):
        super().__init__()
        self.body = nn.Linear(features, hidden)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, hidden))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)) * self.scale)


class TwoInputNet(nn.Module):
    """Two input tensors (a tuple of inputs)."""

    def __init__(self, features_a=4, features_b=3, classes=2):
        super().__init__()
        self.a = nn.Linear(features_a, 8)
        self.b = nn.Linear(features_b, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, xa, xb):
        return self.head(torch.tanh(self.a(xa) + self.b(xb)))


class BatchNormMLP(nn.Module):
    def __init__(self, features=6, hidden=10, classes=3, running_stats=True):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.bn = nn.BatchNorm1d(hidden, track_running_stats=running_stats)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class ReusedLayer(nn.Module):
    """One Linear applied twice in the forward (its per-example gradient sums both uses)."""

    def __init__(self, features=6, classes=3):
        super().__init__()
        self.shared = nn.Linear(features, features)
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class LowRankLinear(nn.Linear):
    """A Linear subclass whose forward adds a low-rank update: not nn.Linear's formula."""

    def __init__(self, fan_in, fan_out, rank=2):
        super().__init__(fan_in, fan_out)
        self.down = nn.Parameter(torch.randn(rank, fan_in) / fan_in**0.5)
        self.up = nn.Parameter(torch.randn(fan_out, rank) / rank)

    def forward(self, x):
        return super().forward(x) + (x @ self.down.T) @ self.up.T


class LowRankMLP(nn.Module):
    def __init__(self, features=6, hidden=8, classes=3):
        super().__init__()
        self.body = LowRankLinear(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class SharedPositionIds(nn.Module):
    """Position embedding called on ``torch.arange(T)``: its output is shared by all examples.

    A trap for hook-based methods: with T equal to the batch size every shape looks batched,
    and reading per-example gradients from the hooks gives silently wrong numbers.
    """

    def __init__(self, vocab=30, length=5, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(length, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position(torch.arange(tokens.shape[1]))
        return self.head(torch.tanh(h).mean(1))


class PositionTable(nn.Module):
    """A learned position table read by indexing (no layer rule knows this module)."""

    def __init__(self, length=5, dim=8):
        super().__init__()
        self.table = nn.Parameter(torch.randn(length, dim) / dim**0.5)

    def forward(self, positions):
        return self.table[positions]


class LearnedPositions(nn.Module):
    """Token embeddings plus a learned table indexed by ``torch.arange(T)``: the table's output
    is shared by all examples and broadcast over the batch."""

    def __init__(self, vocab=30, length=5, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.positions = PositionTable(length, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens) + self.positions(torch.arange(tokens.shape[1]))
        return self.head(torch.tanh(h).mean(1))


class HookedPReLU(nn.Module):
    """The caller's own module hooks on a module no layer formula knows (nn.PReLU): a forward
    pre-hook that rescales its input and a forward hook that rescales its output by a function of
    the module's own parameter. What runs in the hooks is part of the model, and a method that
    redoes the module's call per example must apply them exactly once."""

    def __init__(self, features=6, hidden=4, classes=3):
        super().__init__()
        self.body = nn.Linear(features, hidden)
        self.act = nn.PReLU(hidden)
        self.head = nn.Linear(hidden, classes)
        self.act.register_forward_pre_hook(_doubled_input)
        self.act.register_forward_hook(_output_scaled_by_weight)

    def forward(self, x):
        return self.head(self.act(self.body(x)))


def _doubled_input(module, args):
    return (args[0] * 2,)


def _output_scaled_by_weight(module, args, output):
    return output * torch.tanh(module.weight)
