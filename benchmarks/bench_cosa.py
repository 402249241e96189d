"""COSA pretraining step: mmcore's COSAModel against a baseline written the way the original code works.

One training step (forward + backward of the whole objective set: ITC and ITM on the single samples, ITC, ITM, MLM
and masked captioning on the concatenated pseudo video-paragraph pairs, concat = 4) on the same model weights, the
same batch and the same random draws. Work unit: samples (the batch size of one step).

- **mmcore**: ``COSAModel.forward(pixel_values, input_ids, attention_mask, concat=4, generator=g)`` + backward:
  packed text (no padding), every attention through ``mmcore.ops.packed_attention``, partners' vision features
  reused from the single-sample pass, captions joined at the token level, the tied LM head fused into the loss on
  the masked tokens only. A second row runs it with ``reencode=True`` (the joined pixels re-encoded, as the
  original does), to show how much of the gap the re-encoding is. On the CPU, mmcore and the baseline are also
  timed on one thread (rows ``..., 1 thread``): two threads on a 2-core machine that other work shares are slowed
  far more (and more erratically) than one.
- **baseline** (the official ``TXH-mercury/COSA`` ``model/pretrain.py``, shared/research/cosa.md section 3), as
  functions over the same module's parameters: captions right-padded to the longest in the batch; each sample's
  pixels and its partners' pixels re-encoded through the ViT (5 images per sample instead of 1); the joined caption
  strings (``" ".join``) re-tokenised every step by a BERT WordPiece tokenizer (padding="longest", truncation to
  the 80-token budget; transformers' Rust tokenizer, where the original's ``BertTokenizer`` was transformers 4's
  Python one); BERT on padded ``(batch, seq, D)`` with ``F.scaled_dot_product_attention`` and
  materialised additive masks ``(1 - m) * -10000`` (``(B, 1, 1, L)`` for padding, ``(B, 1, L, L)`` causal for
  captioning, an all-zero ``(B, 1, 1, Lv)`` for cross-attention, as transformers' BERT makes from the all-ones
  ``encoder_attention_mask``); the LM head over every position (``BertForMaskedLM(labels=...)``) then
  ``F.cross_entropy(ignore_index=-100)``.

Where the baseline is kinder than the original (so the ratios are conservative): captions are padded to the
longest, not to ``max_length`` (40 single, 80 joined); the single captions are tokenised once outside the step
(the original tokenises them inside ``forward`` too); q/k/v use mmcore's fused weight (one GEMM, not three);
ITC and ITM passes skip the LM head (the original goes through ``BertForMaskedLM`` and computes its logits on
every call); the token masker, the hard negatives and the partners are mmcore's vectorised draws on a shared
``torch.Generator`` (the original loops in Python with ``random`` / numpy), which is also what makes both sides
pick the same partners, negatives and masked tokens. Both sides pair the first third of the batch for the
concatenated ITM, as the original's ``cret`` (``COSAConfig.concat_itm_divisor``). Dropout is 0 (so the two compute
the same losses).

Before timing, both are run on the same batch and draws and compared: in float64 the losses (and, on the CPU,
every parameter gradient) must agree to 1e-8 relative (the same computation); in the timed precision the losses
must agree to 1e-4 (CPU, float32) or are reported (GPU, bfloat16 autocast, where a hard negative drawn from
slightly different similarities may differ). On the GPU the float64 check runs mmcore's torch backends (its Triton
kernels have no float64), and a check that fails (or raises) is reported in the output and the verdicts instead of
ending the run: the GPU machine is lent for a few minutes, and the timing is still worth having.

Configurations (random weights, vocabulary 30,522 with bert-base-uncased's special ids, captions of 8-32 tokens,
1 frame per sample):

- CPU: BERT 4 layers x 256 (4 heads, FFN 1024) with cross-attention in every layer; CLIP ViT 4 x 256 (4 heads,
  FFN 1024) at 224 px, patch 32 (50 tokens per image); batch 8; float32.
- GPU (``--device cuda``; the GPU case only): BERT-base (12 x 768) + ViT-B/16 at 224 (197 tokens per image),
  batch 32, bfloat16 autocast on float32 weights.
- ``--quick``: a tiny model (2 x 64 each, ViT at 64 px) and batch 4 (8 with ``--device cuda``): a smoke run.

Targets (issue 6): mmcore >= 1.3x the baseline's samples/s on the CPU, >= 1.5x on the GPU, at concat = 4.

    python benchmarks/bench_cosa.py [--quick] [--device {cpu,cuda}] [--no-save]
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from _harness import Case, Impl, parse_args, report, run_cases

from mmcore.models.cosa import COSAConfig, COSAModel
from mmcore.models.cosa.concat import sample_partners
from mmcore.models.cosa.objectives import IGNORE_INDEX, mask_tokens, sample_hard_negatives
from mmcore.models.layers.vit import ACTIVATIONS

SEED = 0
CONCAT = 4
VOCAB = 30522  # bert-base-uncased: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, words from 106
CAPTION_TOKENS = (8, 32)  # caption lengths, [CLS] and [SEP] included, drawn uniformly
MASK_ADD = -10000.0  # transformers' BERT (v4, as COSA's copy): extended mask = (1 - m) * -10000

DROPOUT0 = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SPECS = {
    "cpu": dict(
        name="BERT 4x256 + ViT 4x256 224/32",
        text=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, **DROPOUT0),
        vision=dict(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=224, patch_size=32),
        batch=8,
        target=1.3,
    ),
    "cpu-quick": dict(
        name="tiny: BERT 2x64 + ViT 2x64 64/32",
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, **DROPOUT0),
        vision=dict(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, image_size=64, patch_size=32),
        batch=4,
        target=1.3,
    ),
    "cuda": dict(
        name="BERT-base + ViT-B/16 224",
        text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, **DROPOUT0),
        vision=dict(
            hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, image_size=224, patch_size=16
        ),
        batch=32,
        target=1.5,
    ),
}
SPECS["cuda-quick"] = {**SPECS["cpu-quick"], "batch": 8, "target": 1.5}


# ------------------------------------------------------------------------------------------ data


def word(i: int) -> str:
    """Vocabulary entry ``i`` (>= 106): ``i`` in base 26 with letters, so every word is one WordPiece token."""
    s = ""
    while True:
        s = chr(97 + i % 26) + s
        i //= 26
        if i == 0:
            return s


def build_tokenizer(directory: str):
    """A BERT WordPiece tokenizer over a bert-base-uncased-shaped vocabulary (special tokens at their ids)."""
    import transformers

    special = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    special += ["[unused99]", "[unused100]"]
    vocab = special + [word(i) for i in range(len(special), VOCAB)]
    assert len(vocab) == VOCAB and vocab[101] == "[CLS]" and vocab[103] == "[MASK]"
    Path(directory, "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizerFast.from_pretrained(directory)


def make_batch(batch: int, image_size: int, device: str, tokenizer, seed: int = SEED):
    """Captions (strings), their ids right-padded to the longest (and mask), pixels (batch, 1, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, (batch,), generator=g).tolist()
    captions = [" ".join(word(int(t)) for t in torch.randint(106, VOCAB, (n - 2,), generator=g)) for n in lengths]
    enc = tokenizer(captions, padding="longest", return_tensors="pt")
    assert enc.attention_mask.sum(1).tolist() == lengths, "every word must be one token"
    pixels = torch.randn(batch, 1, 3, image_size, image_size, generator=g)
    return {
        "captions": captions,
        "input_ids": enc.input_ids.to(device),
        "attention_mask": enc.attention_mask.to(device),
        "pixel_values": pixels.to(device),
    }


def build_model(spec: dict, device: str) -> COSAModel:
    """Initialised on ``device``: on a GPU, BERT-base + ViT-B/16's 226M weights take milliseconds there, seconds on
    the CPU (one thread draws them) before the copy."""
    torch.manual_seed(SEED)
    config = COSAConfig(text=spec["text"], vision=spec["vision"], concat=CONCAT)
    with torch.device(device):
        return COSAModel(config).init_weights().train()


# ------------------------------------------------------------------------------------------ the baseline


def sdpa_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, D) -> (N, heads, L, D / heads)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """0/1 mask -> transformers' extended additive mask ``(1 - m) * -10000`` in ``dtype``."""
    return (1.0 - mask.to(dtype)) * MASK_ADD


def vit(vm, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP's vision tower on (batch, frames, 3, H, W) -> (batch, frames, tokens, D), post-LN on every token; the
    attention is ``F.scaled_dot_product_attention`` (what ``nn.MultiheadAttention`` runs with need_weights=False)."""
    cfg = vm.config
    b, n = pixel_values.shape[:2]
    x = F.conv2d(pixel_values.flatten(0, 1), vm.patch_embed.weight, stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([vm.class_embedding.expand(x.shape[0], 1, -1), x], 1) + vm.position_embedding
    x = F.layer_norm(x, x.shape[-1:], vm.pre_norm.weight, vm.pre_norm.bias, cfg.layer_norm_eps)
    act = ACTIVATIONS[cfg.hidden_act]
    for blk in vm.blocks:
        h = F.layer_norm(x, x.shape[-1:], blk.norm1.weight, blk.norm1.bias, cfg.layer_norm_eps)
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = (sdpa_heads(t, cfg.num_heads) for t in qkv.chunk(3, -1))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + F.linear(h, blk.attn.out_proj.weight, blk.attn.out_proj.bias)
        h = F.layer_norm(x, x.shape[-1:], blk.norm2.weight, blk.norm2.bias, cfg.layer_norm_eps)
        x = x + F.linear(act(F.linear(h, blk.fc1.weight, blk.fc1.bias)), blk.fc2.weight, blk.fc2.bias)
    x = F.layer_norm(x, x.shape[-1:], vm.post_norm.weight, vm.post_norm.bias, cfg.layer_norm_eps)
    return x.view(b, n, *x.shape[1:])


def video_input(m: COSAModel, feats: torch.Tensor) -> torch.Tensor:
    """The original's ``get_multimodal_forward_input_video``: (b, n, x, c) -> Linear + LN + frame embedding
    (nearest-interpolated to n slots) -> (b, n * x, D)."""
    b, n, x, _ = feats.shape
    v = F.layer_norm(F.linear(feats, m.bridge.weight, m.bridge.bias), (m.bridge.out_features,),
                     m.bridge_norm.weight, m.bridge_norm.bias, m.bridge_norm.eps)  # fmt: skip
    emb = m.frame_embedding.weight.t()[None]  # (1, D, slots)
    if n != emb.shape[-1]:
        emb = F.interpolate(emb, n, mode="nearest")
    return (v + emb.permute(0, 2, 1).unsqueeze(-2)).reshape(b, n * x, -1)


def bert(m: COSAModel, ids: torch.Tensor, mask: torch.Tensor, vision: torch.Tensor | None = None) -> torch.Tensor:
    """Padded BERT (post-LN), cross-attention when ``vision`` (N, Lv, D) is given. ids (N, L); mask: (N, L) padding
    or (N, L, L) 3-D (causal) 0/1 mask, turned into the additive mask that SDPA adds to the scores."""
    tm, t = m.text_model, m.config.text
    heads, eps = t.num_attention_heads, t.layer_norm_eps
    emb = tm.embeddings
    x = emb.word_embeddings(ids) + emb.position_embeddings.weight[: ids.shape[1]] + emb.token_type_embeddings.weight[0]
    x = F.layer_norm(x, x.shape[-1:], emb.norm.weight, emb.norm.bias, eps)
    self_mask = additive(mask[:, None, None, :] if mask.dim() == 2 else mask[:, None], x.dtype)
    cross_mask = None
    if vision is not None:
        cross_mask = additive(torch.ones(vision.shape[0], 1, 1, vision.shape[1], device=x.device), x.dtype)
    act = ACTIVATIONS[t.hidden_act]
    for layer in tm.layers:
        sa = layer.self_attn
        q, k, v = (sdpa_heads(y, heads) for y in F.linear(x, sa.qkv.weight, sa.qkv.bias).chunk(3, -1))
        if self_mask.dtype != q.dtype:  # autocast: the masks in the dtype SDPA computes in (once)
            self_mask = self_mask.to(q.dtype)
            cross_mask = cross_mask.to(q.dtype) if cross_mask is not None else None
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask).transpose(1, 2).flatten(2)
        h = F.linear(h, sa.out_proj.weight, sa.out_proj.bias)
        x = F.layer_norm(x + h, x.shape[-1:], layer.self_attn_norm.weight, layer.self_attn_norm.bias, eps)
        if vision is not None:
            ca = layer.cross_attn
            q = sdpa_heads(F.linear(x, ca.q_proj.weight, ca.q_proj.bias), heads)
            k, v = (sdpa_heads(y, heads) for y in F.linear(vision, ca.kv.weight, ca.kv.bias).chunk(2, -1))
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=cross_mask).transpose(1, 2).flatten(2)
            h = F.linear(h, ca.out_proj.weight, ca.out_proj.bias)
            x = F.layer_norm(x + h, x.shape[-1:], layer.cross_attn_norm.weight, layer.cross_attn_norm.bias, eps)
        h = F.linear(act(F.linear(x, layer.fc1.weight, layer.fc1.bias)), layer.fc2.weight, layer.fc2.bias)
        x = F.layer_norm(x + h, x.shape[-1:], layer.ffn_norm.weight, layer.ffn_norm.bias, eps)
    return x


def lm_loss(m: COSAModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BertForMaskedLM(labels=...): the tied head over every position, then cross-entropy ignoring -100."""
    head = m.mlm_head
    h = F.layer_norm(F.gelu(F.linear(hidden, head.dense.weight, head.dense.bias)), hidden.shape[-1:],
                     head.norm.weight, head.norm.bias, head.norm.eps)  # fmt: skip
    logits = F.linear(h, m.word_embeddings, head.bias)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX)


def mask_padded(m: COSAModel, ids, attention_mask, probability: float, generator):
    """The token masker on padded ids, drawing exactly what mmcore's masker draws for the same tokens: the non-pad
    tokens in row order get the packed draws (the shared generator), pads stay unmasked."""
    t = m.config.text
    keep = attention_mask.bool()
    cu = F.pad(keep.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    rng = (t.random_token_start, t.vocab_size)
    packed, packed_labels = mask_tokens(
        ids[keep], cu, probability, mask_token_id=t.mask_token_id, random_range=rng, generator=generator
    )
    masked, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    masked[keep], labels[keep] = packed, packed_labels
    return masked, labels


def ret_losses(m: COSAModel, ids, attention_mask, feats, generator, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's ``forward_ret``: ITC on the text-only [CLS] against the pooled video, then ITM on (text,
    video), (text, hard-negative video), (hard-negative text, video), all padded; with ``rows`` (``cret``) only the
    first rows samples make ITM pairs, the negatives drawn for all."""
    cfg = m.config
    b = ids.shape[0]
    feat_t = F.normalize(F.linear(bert(m, ids, attention_mask)[:, 0], m.contra_head_t.weight), dim=-1)
    feat_v = F.normalize(F.linear(feats[:, :, 0].mean(1), m.contra_head_v.weight), dim=-1)
    sim_t2v, sim_v2t = feat_t @ feat_v.t() / m.contra_temp, feat_v @ feat_t.t() / m.contra_temp
    targets = torch.arange(b, device=ids.device)
    itc = (F.cross_entropy(sim_t2v.float(), targets, label_smoothing=cfg.label_smoothing)
           + F.cross_entropy(sim_v2t.float(), targets, label_smoothing=cfg.label_smoothing)) / 2  # fmt: skip
    neg_video = sample_hard_negatives(sim_t2v, targets, generator)
    neg_text = sample_hard_negatives(sim_v2t, targets, generator)
    n = b if rows is None else rows
    own_ids, own_mask, own_feats = ids[:n], attention_mask[:n], feats[:n]
    neg_video, neg_text, targets, b = neg_video[:n], neg_text[:n], targets[:n], n
    pair_ids = torch.cat([own_ids, own_ids, ids[neg_text]])
    pair_mask = torch.cat([own_mask, own_mask, attention_mask[neg_text]])
    pair_video = video_input(m, torch.cat([own_feats, feats[neg_video], own_feats]))
    logits = m.itm_head(bert(m, pair_ids, pair_mask, pair_video)[:, 0])
    labels = torch.cat([targets.new_ones(b), targets.new_zeros(2 * b)])
    return itc, cfg.itm_ratio * F.cross_entropy(logits.float(), labels)


def baseline_losses(m: COSAModel, batch: dict, tokenizer, generator) -> dict:
    """The original's pretraining forward (``ret`` on the single samples; ``cret``, ``cmlm``, ``ccap`` on the
    concatenated ones) over ``m``'s parameters; the same loss names as ``COSAModel.forward``."""
    cfg = m.config
    ids, attention_mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    device, b = ids.device, ids.shape[0]
    out = {}
    feats = vit(m.vision_model, pixels)
    out["itc_origin"], out["itm_origin"] = ret_losses(m, ids, attention_mask, feats, generator)

    # process_batch_concatenated: partners, the joined pixels re-encoded, the joined strings re-tokenised
    members = sample_partners(b, b, CONCAT, generator=generator).to(device)
    feats_c = vit(m.vision_model, pixels[members].flatten(1, 2))  # (b, concat * frames, tokens, D)
    rows = members.tolist()
    paragraphs = [" ".join(batch["captions"][j] for j in row) for row in rows]
    enc = tokenizer(paragraphs, padding="longest", truncation=True, max_length=cfg.max_concat_tokens,
                    return_tensors="pt")  # fmt: skip
    c_ids, c_mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    vision_c = video_input(m, feats_c)
    itm_rows = max(1, b // cfg.concat_itm_divisor)
    out["itc_concatenated"], out["itm_concatenated"] = ret_losses(m, c_ids, c_mask, feats_c, generator, itm_rows)

    masked, labels = mask_padded(m, c_ids, c_mask, cfg.mlm_probability, generator)
    out["mlm_concatenated"] = lm_loss(m, bert(m, masked, c_mask, vision_c), labels)

    masked, labels = mask_padded(m, c_ids, c_mask, cfg.caption_probability, generator)
    seq = c_mask.shape[1]
    causal = torch.tril(c_mask[:, None, :].expand(-1, seq, -1))  # the original's 3-D mask: tril of the padding
    out["cap_concatenated"] = lm_loss(m, bert(m, masked, causal, vision_c), labels)
    out["loss"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------ steps and checks


def autocast(device: str, dtype):
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def generator(device: str) -> torch.Generator:
    return torch.Generator(device).manual_seed(SEED + 1)


def mmcore_losses(m: COSAModel, batch: dict, reencode: bool = False, amp=None) -> dict:
    with autocast(batch["input_ids"].device.type, amp):
        return m(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], concat=CONCAT,
                 reencode=reencode, generator=generator(batch["input_ids"].device.type))  # fmt: skip


def base_losses(m: COSAModel, batch: dict, tokenizer, amp=None) -> dict:
    with autocast(batch["input_ids"].device.type, amp):
        return baseline_losses(m, batch, tokenizer, generator(batch["input_ids"].device.type))


def step(losses_fn, m: COSAModel):
    """A training step: zero the gradients, the losses, backward of their sum."""

    def run():
        m.zero_grad(set_to_none=True)
        out = losses_fn()
        out["loss"].backward()
        return out

    return run


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def mismatch(facts: dict, message: str, strict: bool) -> None:
    """A failed check: raised (``strict``), else printed and listed in ``facts["mismatches"]``."""
    if strict:
        raise AssertionError(message)
    print(f"  MISMATCH: {message}", flush=True)
    facts.setdefault("mismatches", []).append(message)


def compare(outs: dict, tol: float | None, what: str, facts: dict, strict: bool) -> None:
    """Each mmcore run's losses against the baseline's, into ``facts``: max relative difference; above ``tol``
    (None: only reported) a ``mismatch``."""
    ref = outs["baseline"]
    for name in ("mmcore", "mmcore reencode"):
        if list(outs[name]) != list(ref):
            mismatch(facts, f"{name} returns losses {list(outs[name])}, the baseline {list(ref)}", strict)
            continue
        per_loss = {k: rel_diff(outs[name][k], ref[k]) for k in ref}
        worst = max(per_loss, key=per_loss.get)
        facts[f"{name} max relative loss difference ({what})"] = per_loss[worst]
        limit = f"tolerance {tol:g}" if tol is not None else "reported, not required"
        print(f"  {name} vs baseline ({what}): losses max relative difference {per_loss[worst]:.1e} ({worst}; "
              f"{limit})")  # fmt: skip
        if tol is not None and not per_loss[worst] <= tol:
            a, b = float(outs[name][worst]), float(ref[worst])
            message = f"{name} ({what}): {worst} {a:.6f} vs baseline {b:.6f}, relative difference {per_loss[worst]:.1e}"
            mismatch(facts, f"{message} > {tol:g}", strict)
    print(f"  baseline losses ({what}): " + ", ".join(f"{k} {float(v):.5f}" for k, v in ref.items()))


@contextlib.contextmanager
def float64(m: COSAModel, batch: dict):
    """The model and pixels in float64 for the duration (float32 -> float64 -> float32 is exact: the timed model is
    unchanged)."""
    pixels = batch["pixel_values"]
    m.double()
    batch["pixel_values"] = pixels.double()
    try:
        yield
    finally:
        m.zero_grad(set_to_none=True)
        m.float()
        batch["pixel_values"] = pixels


def check(m: COSAModel, batch: dict, tokenizer, *, grads: bool, amp, tol: float | None, strict: bool = True) -> dict:
    """mmcore (reusing features, and re-encoding) against the baseline on the same batch and draws.

    float64: the losses, and with ``grads`` every parameter gradient of their sum, to 1e-8 relative (the same
    math: in float32 the gradients of the ITC heads and temperature, sums with much cancellation at random
    initialisation, differ by up to ~1e-2 relative, rounding alone). Then the losses in the timed precision
    (float32, or ``amp`` autocast) to ``tol`` (None: reported only -- under bfloat16 a hard negative drawn from
    slightly different similarities can differ, which changes an ITM loss). strict: a failed check raises; else
    it is listed in the returned ``facts["mismatches"]``."""
    runs = {
        "baseline": lambda amp=None: base_losses(m, batch, tokenizer, amp=amp),
        "mmcore": lambda amp=None: mmcore_losses(m, batch, amp=amp),
        "mmcore reencode": lambda amp=None: mmcore_losses(m, batch, reencode=True, amp=amp),
    }
    facts = {}
    with float64(m, batch):
        outs, gs = {}, {}
        for name, fn in runs.items():
            if grads:
                outs[name] = {k: v.detach() for k, v in step(fn, m)().items()}
                gs[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            else:
                with torch.no_grad():
                    outs[name] = fn()
        compare(outs, 1e-8, "float64", facts, strict)
        for name in gs:
            if name == "baseline":
                continue
            if set(gs[name]) != set(gs["baseline"]):
                mismatch(facts, f"{name}: gradients reach {set(gs[name]) ^ set(gs['baseline'])} differently", strict)
                continue
            per_param = {n: rel_diff(g, gs["baseline"][n]) for n, g in gs[name].items()}
            worst = max(per_param, key=per_param.get)
            facts[f"{name} max relative gradient difference (float64)"] = per_param[worst]
            print(f"  {name} vs baseline (float64): {len(per_param)} parameter gradients, max relative difference "
                  f"{per_param[worst]:.1e} ({worst}; tolerance 1e-8)")  # fmt: skip
            if not per_param[worst] <= 1e-8:
                message = f"{name} (float64): gradient of {worst} differs by {per_param[worst]:.1e} > 1e-8"
                mismatch(facts, message, strict)
    with torch.no_grad():
        outs = {name: fn(amp=amp) for name, fn in runs.items()}
    what = f"{str(amp).replace('torch.', '')} autocast" if amp is not None else "float32"
    compare(outs, tol, what, facts, strict)
    return facts


def token_counts(batch: dict, tokenizer, m: COSAModel) -> dict:
    """Real and padded token counts of the single captions and the joined paragraphs of the check's draw."""
    b = batch["input_ids"].shape[0]
    g = generator(batch["input_ids"].device.type)
    # the partners are the third draw of the step; replay the first two (the origin ITM negatives)
    with torch.no_grad():
        ret_losses(m, batch["input_ids"], batch["attention_mask"], vit(m.vision_model, batch["pixel_values"]), g)
    rows = sample_partners(b, b, CONCAT, generator=g).tolist()
    enc = tokenizer([" ".join(batch["captions"][j] for j in row) for row in rows], padding="longest",
                    truncation=True, max_length=m.config.max_concat_tokens)  # fmt: skip
    para = [sum(r) for r in enc.attention_mask]
    return {
        "caption_tokens": int(batch["attention_mask"].sum()),
        "caption_padded": int(batch["attention_mask"].numel()),
        "paragraph_tokens": sum(para),
        "paragraph_padded": len(para) * max(para),
        "paragraph_lengths": para,
    }


# ------------------------------------------------------------------------------------------ cases


def cosa_case(
    key: str, device: str, *, amp, tol: float | None, grads: bool, strict: bool, one_thread: bool
) -> tuple[Case, dict]:
    """The case and its facts. amp, tol, grads, strict: as ``check`` (not strict: a check that raises is reported
    too, and the case is timed all the same); one_thread: CPU rows on one thread besides."""
    spec = SPECS[key]
    t0 = time.perf_counter()
    m = build_model(spec, device)
    n_params = sum(p.numel() for p in m.parameters())
    with tempfile.TemporaryDirectory() as d:
        tokenizer = build_tokenizer(d)
    batch = make_batch(spec["batch"], spec["vision"]["image_size"], device, tokenizer)
    counts = token_counts(batch, tokenizer, m)
    print(f"{key}: {spec['name']}, {n_params / 1e6:.1f}M parameters, batch {spec['batch']}, concat {CONCAT}; "
          f"captions {counts['caption_tokens']} tokens (padded {counts['caption_padded']}), paragraphs "
          f"{counts['paragraph_lengths']} (padded {counts['paragraph_padded']}); built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    try:
        checks = check(m, batch, tokenizer, grads=grads, amp=amp, tol=tol, strict=strict)
    except Exception as e:  # any failure: the GPU machine's time is short, the timing still worth having
        if strict:
            raise
        traceback.print_exc()
        checks = {"mismatches": [f"the check raised {type(e).__name__}: {e}"]}
    facts = {"parameters": n_params, **counts, **checks}
    b = spec["batch"]
    amp_note = f", {str(amp).replace('torch.', '')} autocast" if amp is not None else ", float32"
    impls = [
        Impl("mmcore", step(lambda: mmcore_losses(m, batch, amp=amp), m), b, device=device,
             note="forward(concat=4) + backward: packed, features reused"),
        Impl("mmcore reencode", step(lambda: mmcore_losses(m, batch, reencode=True, amp=amp), m), b,
             device=device, note="forward(concat=4, reencode=True) + backward"),
        Impl("baseline", step(lambda: base_losses(m, batch, tokenizer, amp=amp), m), b, peer=True, device=device,
             note="original-style: padded, SDPA + additive masks, re-encode, re-tokenise"),
    ]  # fmt: skip
    if one_thread:  # one thread: far less disturbed than two when other work shares the 2 cores
        impls += [
            Impl("mmcore, 1 thread", impls[0].fn, b, threads=1, note=impls[0].note),
            Impl("baseline, 1 thread", impls[2].fn, b, peer=True, threads=1, note=impls[2].note),
        ]
    case = Case(
        f"{device} train step {spec['name']} batch {b}{amp_note}",
        "samples",
        f"batch {b} samples per step (concat {CONCAT}; 6 losses: itc/itm origin, itc/itm/mlm/cap concatenated)",
        impls,
    )
    return case, {"config": {k: spec[k] for k in ("name", "text", "vision", "batch")}, "checks": facts}


def verdict(what: str, ratio: float, target: float) -> str:
    return f"{what}: mmcore {ratio:.2f}x the baseline's samples/s (target >= {target:g}x: " + (
        "met)" if ratio >= target else "NOT met)"
    )


def run(args, device: str, key: str, **settings) -> list[str]:
    """Check and time the case ``SPECS[key]`` on ``device`` (``settings``: cosa_case's); the verdicts."""
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    case, extra = cosa_case(key, device, **settings)
    amp = settings["amp"]
    print(f"checks done in {time.perf_counter() - t0:.0f} s; timing", flush=True)
    results = run_cases([case], quick=args.quick)
    report("cosa", [case], results, device=device, quick=args.quick, save=not args.no_save,
           extra={"seed": SEED, "concat": CONCAT, "vocab": VOCAB, "caption_tokens": CAPTION_TOKENS,
                  "autocast": str(amp), **extra})  # fmt: skip
    lines = [f"{device}: CHECK FAILED (timed all the same): {m}" for m in extra["checks"].get("mismatches", [])]
    name, target = f"{device} {SPECS[key]['name']}", SPECS[key]["target"]
    for r in results:
        if r.impl == "mmcore":
            lines.append(verdict(name, r.speedup["baseline"], target))
        elif r.impl == "mmcore, 1 thread":
            lines.append(verdict(f"{name}, both on 1 thread", r.speedup["baseline, 1 thread"], target))
    for r in results:
        if r.impl == "mmcore reencode":
            lines.append(f"{device}: mmcore reencode=True {r.speedup['baseline']:.2f}x the baseline (no target)")
    return lines


def run_cpu(args) -> list[str]:
    """float32; float64 losses and gradients checked, a failed check raises; rows on 1 thread too."""
    key = "cpu-quick" if args.quick else "cpu"
    return run(args, "cpu", key, amp=None, tol=1e-4, grads=True, strict=True, one_thread=True)


def run_gpu(args, device: str = "cuda") -> list[str]:
    """bfloat16 autocast on float32 weights; float64 losses checked (no gradients: the GPU case's model and batch
    make that a long pass), a failed check reported, not raised. ``device``: "cpu" only to try this code path on a
    machine without a GPU (``--quick --no-save``: CPU autocast)."""
    key = "cuda-quick" if args.quick else "cuda"
    return run(args, device, key, amp=torch.bfloat16, tol=None, grads=False, strict=False, one_thread=False)


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    lines = run_gpu(args) if args.device == "cuda" else run_cpu(args)
    print()
    if args.quick:
        print("QUICK: a smoke run; the ratios below are not results")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
