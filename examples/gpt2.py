"""A Hugging Face GPT-2 for ``python -m bench compare examples/gpt2.py``.

GPT2LMHeadModel at a small size built locally (no download): n_embd 256, 4 layers, 4 heads, a
vocabulary of 8192, sequences of 128 tokens, dropout off. Its parameters sit where hook-based
methods used to be blind: the position table ``wpe`` is indexed by ``torch.arange`` and
broadcast over the batch, and ``lm_head`` is tied to ``wte``. The batch is the mapping users
pass to ``model(**batch)``; the loss sums each sequence's next-token cross-entropies. Run::

    python -m bench compare examples/gpt2.py --quick     # B = 8, 32
    python -m bench compare examples/gpt2.py --batch-sizes 16 32
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

VOCAB, LENGTH = 8192, 128


def loss_fn(outputs, labels):
    """Per-sequence sum of next-token cross-entropies (-100 labels, e.g. padding, ignored)."""
    logits, labels = outputs.logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
        reduction="none",
    )  # fmt: skip
    return losses.reshape(labels.shape).sum(1)


def make_case():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=4, n_positions=LENGTH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    generator = torch.Generator().manual_seed(0)

    def make_batch(batch_size: int):
        ids = torch.randint(0, VOCAB, (batch_size, LENGTH), generator=generator)
        return {"input_ids": ids}, ids

    return model, loss_fn, make_batch
