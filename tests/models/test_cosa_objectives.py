"""COSA's objectives against plain reference formulas: ITC (label smoothing, symmetric), hard negatives, ITM, the
token masker, MLM, captioning (masked, and next-token against transformers' BertLMHeadModel), QA with a prefix mask,
and the pretraining forward's named losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmcore.models.cosa import PackedText, pack_padded
from mmcore.models.cosa.concat import select_segments
from mmcore.models.cosa.objectives import itc_loss, mask_tokens, sample_hard_negatives

transformers = pytest.importorskip("transformers")

from cosa_tiny import MASK, RANDOM_START, VOCAB, captions, pixels, tiny_cosa  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_cosa()


@pytest.fixture(scope="module")
def hf(model):
    """transformers' BERT decoder (BertLMHeadModel) with the model's text weights."""
    hf_mlm = model.to_hf()["text"]
    hf = transformers.BertLMHeadModel(hf_mlm.config).eval()
    hf.load_state_dict(hf_mlm.state_dict())
    return hf


def smoothed_ce(logits, targets, eps):
    """-sum_j q_j log p_j with q = (1 - eps) one-hot + eps / classes, averaged over rows."""
    logp = torch.log_softmax(logits.double(), 1)
    q = torch.full_like(logp, eps / logits.shape[1])
    q[torch.arange(len(targets)), targets] += 1 - eps
    return -(q * logp).sum(1).mean()


def test_itc_loss_formula():
    sim_t2v, sim_v2t = torch.randn(3, 7) * 5, torch.randn(3, 7) * 5
    targets = torch.tensor([2, 3, 4])  # a rank holding samples 2..4 of a global batch of 7
    ref = (smoothed_ce(sim_t2v, targets, 0.1) + smoothed_ce(sim_v2t, targets, 0.1)) / 2
    assert abs(float(itc_loss(sim_t2v, sim_v2t, targets, 0.1)) - float(ref)) < 1e-6


def test_contrastive_similarities(model):
    ids, mask = captions([5, 7, 3], seed=1)
    feats = model.encode_vision(pixels(3, 2))
    with torch.no_grad():
        sim_t2v, sim_v2t, targets = model.contrastive(pack_padded(ids, mask), feats)
        t = F.normalize(model.encode_text(ids, mask)[:, 0] @ model.contra_head_t.weight.t(), dim=-1)
        cls_per_frame = feats[:, :, 0]  # CLIP: each frame's [CLS], mean over frames
        v = F.normalize(cls_per_frame.mean(1) @ model.contra_head_v.weight.t(), dim=-1)
    assert torch.allclose(sim_t2v, t @ v.t() / 0.07, atol=1e-5)
    assert torch.allclose(sim_v2t, v @ t.t() / 0.07, atol=1e-5)
    assert targets.tolist() == [0, 1, 2]


def test_hard_negatives_follow_softmax_and_skip_own():
    sim = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 0.5, 0.0]])
    targets = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, targets, g) for _ in range(4000)])
    assert (draws != targets).all()
    for r in range(2):
        w = torch.softmax(sim[r], 0) + 1e-4
        w[targets[r]] = 0
        freq = torch.bincount(draws[:, r], minlength=4).float() / len(draws)
        assert (freq - w / w.sum()).abs().max() < 0.03
    assert sample_hard_negatives(torch.zeros(1, 1), torch.tensor([0])).tolist() == [0]


def test_token_masker_rates_and_rules():
    lengths = torch.tensor([1, 2, 40, 300, 5000])
    ids = torch.randint(RANDOM_START, VOCAB, (int(lengths.sum()),))
    text = PackedText.from_lengths(ids, lengths)
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(
        ids, text.cu_seqlens, 0.15, mask_token_id=MASK, random_range=(RANDOM_START, VOCAB), generator=g
    )
    picked = labels != -100
    assert not picked[text.first].any()  # [CLS] never
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    per_segment = torch.zeros(5, dtype=torch.long).index_add_(
        0, torch.repeat_interleave(torch.arange(5), lengths), picked.long()
    )
    assert per_segment[0] == 0 and (per_segment[1:] >= 1).all()  # at least one where one is eligible
    assert abs(picked.float().mean().item() - 0.15) < 0.015
    kinds = masked[picked]
    as_mask = (kinds == MASK).float().mean().item()
    unchanged = (kinds == ids[picked]).float().mean().item()
    expect_unchanged = 0.1 + 0.1 / (VOCAB - RANDOM_START)  # a random id may draw the original
    assert abs(as_mask - 0.8) < 0.04 and abs(unchanged - expect_unchanged) < 0.04
    assert ((kinds >= RANDOM_START) | (kinds == MASK)).all()


def test_token_masker_eligible():
    ids = torch.arange(10) + RANDOM_START
    cu = torch.tensor([0, 10], dtype=torch.int32)
    eligible = torch.arange(10) >= 7
    _, labels = mask_tokens(ids, cu, 0.99, mask_token_id=MASK, random_range=(RANDOM_START, VOCAB), eligible=eligible)
    assert (labels[:7] == -100).all() and (labels[7:] != -100).all()


def lm_loss_ref(model, hidden, labels):
    """Materialised logits of the tied head and F.cross_entropy over the labelled tokens."""
    logits = F.linear(model.mlm_head(hidden), model.word_embeddings, model.mlm_head.bias)
    return F.cross_entropy(logits.double(), labels, ignore_index=-100)


def test_mlm_loss_formula(model):
    ids, mask = captions([6, 9, 4], seed=2)
    text = pack_padded(ids, mask)
    feats = model.encode_vision(pixels(3))
    with torch.no_grad():
        ours = model.mlm_loss(text, feats, torch.Generator().manual_seed(3))
        masked, labels = model._mask(text, 0.15, generator=torch.Generator().manual_seed(3))
        hidden = model.joint(PackedText(masked, text.cu_seqlens, text.max_seqlen), feats, "full")
        ref = lm_loss_ref(model, hidden, labels)
    assert abs(float(ours) - float(ref)) < 1e-5


def test_masked_caption_loss_formula(model):
    ids, mask = captions([6, 9, 4], seed=2)
    text = pack_padded(ids, mask)
    feats = model.encode_vision(pixels(3))
    with torch.no_grad():
        ours = model.caption_loss(text, feats, torch.Generator().manual_seed(4), mode="masked")
        masked, labels = model._mask(text, 0.6, generator=torch.Generator().manual_seed(4))
        hidden = model.joint(PackedText(masked, text.cu_seqlens, text.max_seqlen), feats, "causal")
        ref = lm_loss_ref(model, hidden, labels)
    assert abs(float(ours) - float(ref)) < 1e-5


def test_next_token_caption_loss_equals_bert_lm_head_model(model, hf):
    ids, mask = captions([6, 9, 4], seed=5)
    feats = model.encode_vision(pixels(3, 2))
    with torch.no_grad():
        ours = model.caption_loss(pack_padded(ids, mask), feats, mode="next_token")
        vision, _ = model.vision_tokens(feats)
        labels = ids.masked_fill(mask == 0, -100)
        ref = hf(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=vision.view(3, -1, vision.shape[-1]),
            labels=labels,
        ).loss
    assert abs(float(ours) - float(ref)) < 1e-5


def test_itm_loss_formula(model):
    ids, mask = captions([6, 9, 4, 5], seed=6)
    text = pack_padded(ids, mask)
    feats = model.encode_vision(pixels(4))
    with torch.no_grad():
        sim_t2v, sim_v2t, targets = model.contrastive(text, feats)
        ours = model.itm_loss(text, feats, sim_t2v, sim_v2t, targets, torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)
        neg_video = sample_hard_negatives(sim_t2v, targets, g)
        neg_text = sample_hard_negatives(sim_v2t, targets, g)
        pairs = [(i, i, 1) for i in range(4)] + [(i, int(neg_video[i]), 0) for i in range(4)]
        pairs += [(int(neg_text[i]), i, 0) for i in range(4)]
        losses = []
        for t, v, label in pairs:  # one pair at a time, as a plain loop
            one = select_segments(text, torch.tensor([t]))
            logits = model.itm_head(model.joint(one, feats[v : v + 1])[0])
            losses.append(-torch.log_softmax(logits.double(), 0)[label])
        ref = torch.stack(losses).mean()
    assert abs(float(ours) - float(ref)) < 1e-5


def test_qa_prefix_visibility_and_loss(model):
    q_ids, q_mask = captions([5, 3], seed=8)
    a_ids, a_mask = captions([3, 2], seed=9)
    a_ids[:, 0] = 9  # answers: words then [SEP], no [CLS]
    px = pixels(2)
    feats = model.encode_vision(px).detach()
    with torch.no_grad():
        ours = model.qa_loss(px, q_ids, q_mask, a_ids, a_mask, generator=torch.Generator().manual_seed(1))
        ids = torch.cat([q_ids, a_ids], 1)[torch.cat([q_mask, a_mask], 1).bool()]
        text = PackedText.from_lengths(ids, torch.tensor([8, 5]))
        answer = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1]).bool()
        masked, labels = model._mask(text, 0.99, eligible=answer, generator=torch.Generator().manual_seed(1))
        assert (labels[~answer] == -100).all()
        prefix = torch.tensor([5, 3], dtype=torch.int32)
        packed = PackedText(masked, text.cu_seqlens, text.max_seqlen)
        hidden = model.joint(packed, feats, "prefix", prefix)
        assert abs(float(ours) - float(lm_loss_ref(model, hidden, labels))) < 1e-5
        # the question does not see the answer; the answer is causal
        other = masked.clone()
        other[7] = 11  # the last answer token of sample 0
        changed = model.joint(PackedText(other, text.cu_seqlens, text.max_seqlen), feats, "prefix", prefix)
        assert torch.equal(changed[:7], hidden[:7]) and (changed[7] - hidden[7]).abs().max() > 1e-4
        other = masked.clone()
        other[1] = 11  # a question token: the whole question and answer see it
        changed = model.joint(PackedText(other, text.cu_seqlens, text.max_seqlen), feats, "prefix", prefix)
        assert ((changed[:8] - hidden[:8]).abs().amax(1) > 1e-5).all() and torch.equal(changed[8:], hidden[8:])


def test_forward_returns_named_losses_and_their_sum(model):
    ids, mask = captions([6, 9, 4, 5], seed=10)
    model.train()
    try:
        out = model(pixels(4), ids, mask, concat=3, generator=torch.Generator().manual_seed(0))
        names = ["itc_origin", "itm_origin", "itc_concatenated", "itm_concatenated", "mlm_concatenated"]
        assert list(out) == [*names, "cap_concatenated", "loss"]
        assert torch.allclose(out["loss"], sum(v for k, v in out.items() if k != "loss"))
        out["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert model.contra_temp.grad != 0 and model.frame_embedding.weight.grad[1:].abs().sum() > 0
        single = model(pixels(4), ids, mask, concat=1, generator=torch.Generator().manual_seed(0))
        assert list(single) == ["itc_origin", "itm_origin", "mlm_origin", "cap_origin", "loss"]
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_forward_is_reproducible_with_a_generator(model):
    ids, mask = captions([6, 9, 4, 5], seed=11)
    with torch.no_grad():
        a = model(pixels(4), ids, mask, generator=torch.Generator().manual_seed(5))
        b = model(pixels(4), ids, mask, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_greedy_next_token_captions_equal_bert_lm_head_model(model, hf):
    feats = model.encode_vision(pixels(2, 2, seed=3)).detach()
    ours = model.generate_captions(features=feats, max_new_tokens=6, mode="next_token")
    with torch.no_grad():
        vision, _ = model.vision_tokens(feats)
        vision = vision.view(2, -1, vision.shape[-1])
        seq = torch.full((2, 1), 1)
        for _ in range(6):  # plain greedy loop over transformers' decoder (no cache)
            logits = hf(input_ids=seq, encoder_hidden_states=vision, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert ours.shape[1] <= 7
    for r in range(2):  # equal up to and including the first [SEP]; [PAD] after it
        row, ref = ours[r].tolist(), seq[r].tolist()
        end = ref.index(2) + 1 if 2 in ref[1:] else len(ref)
        assert row[:end] == ref[: len(row[:end])]
        assert all(t == 0 for t in row[end:])


@pytest.mark.parametrize("sep_boost", [0.0, 0.2, 0.3])
@pytest.mark.parametrize("beams, penalty", [(3, 0.6), (2, 1.0), (4, 0.0), (3, 2.0), (3, -1.0)])
def test_beam_captions_equal_transformers_beam_search(model, hf, beams, penalty, sep_boost):
    """num_beams > 1 in next-token mode: transformers' beam search on its BERT decoder with the same weights (the
    original evaluates captions with 3 beams, length penalty 0.6). sep_boost raises [SEP]'s bias in both models so
    that beams finish at different lengths and the finished-hypothesis rules decide (with this random model's flat
    logits, 0.2 and 0.3 give captions of 2 to 10 tokens)."""
    feats = model.encode_vision(pixels(3, 2, seed=7)).detach()
    with torch.no_grad():
        model.mlm_head.bias[2] += sep_boost
        hf.cls.predictions.bias[2] += sep_boost
        try:
            ours = model.generate_captions(features=feats, max_new_tokens=10, mode="next_token", num_beams=beams,
                                           length_penalty=penalty)  # fmt: skip
            vision = model.vision_tokens(feats)[0].view(3, -1, model.bridge.out_features)
            ref = hf.generate(input_ids=torch.full((3, 1), 1), encoder_hidden_states=vision,
                              num_beams=beams, length_penalty=penalty, max_new_tokens=10, do_sample=False,
                              eos_token_id=2, pad_token_id=0, early_stopping=False, use_cache=False)  # fmt: skip
        finally:
            model.mlm_head.bias[2] -= sep_boost
            hf.cls.predictions.bias[2] -= sep_boost
    for r in range(3):
        row, want = ours[r].tolist(), ref[r].tolist()
        end = want.index(2, 1) + 1 if 2 in want[1:] else len(want)
        assert row[:end] == want[:end], (r, row, want)
        assert all(tok == 0 for tok in row[end:])


def test_beam_captions_arguments(model):
    feats = model.encode_vision(pixels(1, 1, seed=4)).detach()
    with pytest.raises(ValueError, match="num_beams"):
        model.generate_captions(features=feats, num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate_captions(features=feats, max_new_tokens=0)
    one = model.generate_captions(features=feats, max_new_tokens=3, mode="masked", num_beams=2)
    assert one.shape[0] == 1 and one[0, 0] == 1 and 2 <= one.shape[1] <= 4


def test_greedy_masked_captions_predict_the_appended_mask(model):
    feats = model.encode_vision(pixels(1, 1, seed=4)).detach()
    ours = model.generate_captions(features=feats, max_new_tokens=2, mode="masked")
    with torch.no_grad():
        text = PackedText(torch.tensor([1, MASK]), torch.tensor([0, 2], dtype=torch.int32), 2)
        h = model.joint(text, feats, "causal")[-1:]
        first = F.linear(model.mlm_head(h), model.word_embeddings, model.mlm_head.bias).argmax(-1)
    assert ours[0, 0] == 1 and ours[0, 1] == first


def test_itm_loss_on_the_first_rows(model):
    """rows=k (the original's cret): negatives drawn for every sample, pairs made for the first k only."""
    ids, mask = captions([6, 9, 4, 5, 7, 3], seed=8)
    text = pack_padded(ids, mask)
    feats = model.encode_vision(pixels(6))
    with torch.no_grad():
        sim_t2v, sim_v2t, targets = model.contrastive(text, feats)
        ours = model.itm_loss(text, feats, sim_t2v, sim_v2t, targets, torch.Generator().manual_seed(9), rows=2)
        g = torch.Generator().manual_seed(9)
        neg_video = sample_hard_negatives(sim_t2v, targets, g)
        neg_text = sample_hard_negatives(sim_v2t, targets, g)
        pairs = [(i, i, 1) for i in range(2)] + [(i, int(neg_video[i]), 0) for i in range(2)]
        pairs += [(int(neg_text[i]), i, 0) for i in range(2)]
        losses = []
        for t, v, label in pairs:
            one = select_segments(text, torch.tensor([t]))
            logits = model.itm_head(model.joint(one, feats[v : v + 1])[0])
            losses.append(-torch.log_softmax(logits.double(), 0)[label])
        ref = torch.stack(losses).mean()
    assert abs(float(ours) - float(ref)) < 1e-5


@pytest.mark.parametrize(
    "divisor, want", [(3, {"origin": None, "concatenated": 2}), (1, {"origin": None, "concatenated": None})]
)
def test_concatenated_itm_uses_batch_over_divisor_rows(model, monkeypatch, divisor, want):
    """The concatenated pass's ITM pairs batch // concat_itm_divisor samples (7 // 3 = 2); the single-sample pass
    all of them."""
    seen = {}
    real = type(model).itm_loss

    def spy(self, text, features, *args, **kw):
        rows = args[4] if len(args) > 4 else kw.get("rows")
        seen["concatenated" if features.shape[1] > 1 else "origin"] = rows
        return real(self, text, features, *args, **kw)

    monkeypatch.setattr(type(model), "itm_loss", spy)
    monkeypatch.setattr(model.config, "concat_itm_divisor", divisor)
    ids, mask = captions([6, 9, 4, 5, 7, 3, 8], seed=10)
    with torch.no_grad():
        out = model(pixels(7), ids, mask, concat=2, generator=torch.Generator().manual_seed(0))
    assert seen == want and torch.isfinite(out["itm_concatenated"])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests run these kernels themselves")
def test_gpu_kernels_give_the_same_losses_and_gradients(model):
    """What a GPU runs, on the CPU: with dispatch choosing as for CUDA tensors (the Triton attention in full, causal
    and prefix modes, cross-attention with Lq != Lk, and the Triton cross-entropy, interpreted), the pretraining
    forward at concat 3 gives the CPU path's named losses and gradients."""
    from mmcore.testing import gpu_dispatch_on_cpu

    pytest.importorskip("triton")
    ids, mask = captions([6, 9, 4, 5], seed=12)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(pixels(4), ids, mask, concat=3, generator=torch.Generator().manual_seed(2))
        out["loss"].backward()
        return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    try:
        losses, grads = step()
        with gpu_dispatch_on_cpu():
            gpu_losses, gpu_grads = step()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert list(gpu_losses) == list(losses)
    for k in losses:
        torch.testing.assert_close(gpu_losses[k], losses[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for n, g in grads.items():
        torch.testing.assert_close(gpu_grads[n], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
