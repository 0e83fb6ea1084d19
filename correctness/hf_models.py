"""Real models nobody on the team wrote: tiny Hugging Face ``transformers`` configurations built
locally (no downloads: ``HF_HUB_OFFLINE=1``), called the way their users call them,
``model(**batch)``.

Each one puts parameters where hook-based methods used to be blind: GPT-2's position table is
indexed by ``torch.arange`` and broadcast over the batch, and its ``lm_head`` is tied to ``wte``;
BERT's token-type ids are a buffer expanded to the batch's size; T5's relative attention bias is
an Embedding indexed by bucket ids computed from ``arange`` and added to every example's
attention scores; ViT's class token and position embeddings are parameters read by their parent
module; Llama's RMSNorm multiplies by its weight directly. Padded batches carry an attention mask
and labels with ``ignore_index`` (-100) at the positions that must contribute nothing.
"""

from __future__ import annotations

import os

import torch
from torch import nn

IGNORE_INDEX = -100


def transformers():
    """The ``transformers`` package, offline and quiet (imported on first use)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as module

    module.logging.set_verbosity_error()
    return module


def available() -> bool:
    try:
        transformers()
    except ImportError:
        return False
    return True


_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def gpt2_lm(vocab: int = 50, dim: int = 16, layers: int = 2, heads: int = 2, positions: int = 16):
    """GPT2LMHeadModel: default position ids, ``lm_head`` tied to ``wte``, Conv1D layers."""
    t = transformers()
    config = t.GPT2Config(
        vocab_size=vocab, n_embd=dim, n_layer=layers, n_head=heads, n_positions=positions,
        bos_token_id=0, eos_token_id=0, **_NO_DROPOUT,
    )  # fmt: skip
    return t.GPT2LMHeadModel(config)


def _bert_config(vocab=50, dim=16, layers=2, heads=2, positions=16, **options):
    t = transformers()
    return t.BertConfig(
        vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * dim, max_position_embeddings=positions, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0, **options,
    )  # fmt: skip


def bert_classifier(classes: int = 3):
    """BertForSequenceClassification: token-type ids from a buffer, positions from arange."""
    return transformers().BertForSequenceClassification(_bert_config(num_labels=classes))


def bert_masked_lm():
    """BertForMaskedLM: the decoder tied to the word embeddings, with a bias of its own."""
    return transformers().BertForMaskedLM(_bert_config())


class T5EncoderClassifier(nn.Module):
    """T5EncoderModel (relative attention bias; ``shared`` tied to ``embed_tokens``), mean
    pooled over the unmasked positions, and a linear head."""

    def __init__(self, vocab=50, dim=16, layers=2, heads=2, classes=3):
        super().__init__()
        t = transformers()
        config = t.T5Config(
            vocab_size=vocab, d_model=dim, d_kv=dim // heads, d_ff=2 * dim, num_layers=layers,
            num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            dropout_rate=0.0, feed_forward_proj="relu",
        )  # fmt: skip
        self.encoder = t.T5EncoderModel(config)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            return self.head(hidden.mean(1))
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1))


def vit_classifier(classes: int = 3):
    """ViTForImageClassification: a class token and position embeddings read by the parent."""
    t = transformers()
    config = t.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_channels=3, num_labels=classes, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return t.ViTForImageClassification(config)


def llama_lm():
    """LlamaForCausalLM: RMSNorm multiplying by its weight, rotary positions, grouped queries."""
    t = transformers()
    config = t.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return t.LlamaForCausalLM(config)


# -- batches: (batch_size, generator) -> (inputs, targets) ---------------------------------------


def _lengths(b: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Sequence lengths between 2 and ``length``, the first example at full length."""
    lengths = torch.randint(2, length + 1, (b,), generator=gen)
    if b:
        lengths[0] = length
    return lengths


def _mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    return (torch.arange(length)[None, :] < lengths[:, None]).long()


def tokens(b, gen, *, length=7, vocab=50):
    ids = torch.randint(1, vocab, (b, length), generator=gen)
    return {"input_ids": ids}, ids


def padded_tokens(b, gen, *, length=7, vocab=50):
    """Right-padded sequences of different lengths; labels -100 where padded."""
    ids = torch.randint(1, vocab, (b, length), generator=gen)
    mask = _mask(_lengths(b, length, gen), length)
    ids = ids * mask  # pad token 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask}, labels


def tokens_and_classes(b, gen, *, length=7, vocab=50, classes=3):
    ids = torch.randint(1, vocab, (b, length), generator=gen)
    return {"input_ids": ids}, torch.randint(0, classes, (b,), generator=gen)


def padded_tokens_and_classes(b, gen, *, length=7, vocab=50, classes=3):
    ids = torch.randint(1, vocab, (b, length), generator=gen)
    mask = _mask(_lengths(b, length, gen), length)
    return {"input_ids": ids * mask, "attention_mask": mask}, torch.randint(
        0, classes, (b,), generator=gen
    )


def masked_lm_batch(b, gen, *, length=7, vocab=50, mask_token=1):
    """Padded sequences with about a third of the real tokens masked; labels are the original
    tokens at the masked positions and -100 everywhere else (padding included)."""
    ids = torch.randint(2, vocab, (b, length), generator=gen)
    mask = _mask(_lengths(b, length, gen), length)
    ids = ids * mask
    chosen = (torch.rand(b, length, generator=gen) < 0.35) & (mask == 1)
    if b:
        chosen[:, 0] |= mask[:, 0] == 1  # at least one prediction per example
    labels = ids.masked_fill(~chosen, IGNORE_INDEX)
    inputs = ids.masked_fill(chosen, mask_token)
    token_types = torch.zeros_like(ids)
    return {"input_ids": inputs, "attention_mask": mask, "token_type_ids": token_types}, labels


def images_and_classes(b, gen, *, classes=3):
    return {"pixel_values": torch.randn(b, 3, 8, 8, generator=gen)}, torch.randint(
        0, classes, (b,), generator=gen
    )
