"""Tiny random COSA models and batches for the COSA tests (imported by test_cosa_*.py; not a test module)."""

from __future__ import annotations

import torch

VOCAB, CLS, SEP, MASK, RANDOM_START = 120, 1, 2, 3, 5
IMAGE, PATCH = 16, 8  # 4 patches + [CLS] = 5 tokens per frame


def bert_config(**kw):
    import transformers

    c = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    c.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, **kw)
    return transformers.BertConfig(**c)


def clip_model(hidden_size=24):
    import transformers

    c = transformers.CLIPVisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    return transformers.CLIPVisionModel(c).eval()


def cosa_from_hf(text, vision, **kw):
    from mmcore.models.cosa import COSAModel

    kw = {"contra_dim": 16, "max_concat_tokens": 24, **kw}
    ids = dict(cls_token_id=CLS, sep_token_id=SEP, mask_token_id=MASK, random_token_start=RANDOM_START)
    return COSAModel.from_hf(text=text, vision=vision, **ids, **kw)


def tiny_cosa(seed=0, **kw):
    """A COSAModel converted from a random BertForMaskedLM with cross-attention and a random CLIPVisionModel."""
    import transformers

    torch.manual_seed(seed)
    bert = transformers.BertForMaskedLM(bert_config(is_decoder=True, add_cross_attention=True)).eval()
    return cosa_from_hf(bert, clip_model(), **kw)


def captions(lengths, seed=0, pad_to=None):
    """Right-padded captions ``[CLS] body [SEP]`` of the given total lengths (>= 2): ids, attention_mask."""
    g = torch.Generator().manual_seed(seed)
    width = pad_to or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(RANDOM_START, VOCAB, (n,), generator=g)
        ids[r, 0], ids[r, n - 1] = CLS, SEP
        mask[r, :n] = 1
    return ids, mask


def pixels(batch, frames=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, IMAGE, IMAGE, generator=g)
