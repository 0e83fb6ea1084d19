"""An example model file for ``python -m bench compare examples/small_transformer.py``.

A compare file defines ``make_case()`` returning ``(model, loss_fn, make_batch)``:

- ``model``: the torch.nn.Module, in the mode (train/eval), dtype and device you use it in;
- ``loss_fn(outputs, targets)``: per-example losses, Tensor[B] (reduction "none");
- ``make_batch(batch_size)``: ``(inputs, targets)`` with the batch dimension first; inputs a
  Tensor, a tuple of Tensors or a dict of names (``model(**inputs)``).

This one is a small transformer text classifier: token and position embeddings, two
pre-LayerNorm blocks of self-attention and a GELU MLP, mean pooling, a linear head
(533,508 parameters, sequences of 64 tokens). Run::

    python -m bench compare examples/small_transformer.py --quick   # about 35 s on 2 cores
    python -m bench compare examples/small_transformer.py           # B = 16, 64, 256

See docs/compare.md for the output and the options.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, LENGTH, CLASSES = 1000, 64, 4


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
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


class TextClassifier(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, hidden: int = 512, blocks: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim)
        self.positions = nn.Embedding(LENGTH, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(blocks))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens):
        # position ids with the batch dimension, as Hugging Face models pass them
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(1))


def loss_fn(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")


def make_case():
    torch.manual_seed(0)
    model = TextClassifier().train()
    generator = torch.Generator().manual_seed(0)

    def make_batch(batch_size: int):
        tokens = torch.randint(0, VOCAB, (batch_size, LENGTH), generator=generator)
        labels = torch.randint(0, CLASSES, (batch_size,), generator=generator)
        return tokens, labels

    return model, loss_fn, make_batch
