"""mmcore's Kosmos-2 against transformers' on tiny random models: logits, loss, weights round trip, generation."""

from __future__ import annotations

import pytest
import torch

from mmcore import ops
from mmcore.models.kosmos2 import Kosmos2Config, Kosmos2ForConditionalGeneration, generation
from mmcore.models.kosmos2.modeling import segment_positions, shift_targets

transformers = pytest.importorskip("transformers")

NUM_BINS = 4  # 16 location tokens: the vocabulary stays tiny
VOCAB = 140
LATENTS = 3


def hf_config(**text):
    t = dict(vocab_size=VOCAB, embed_dim=32, layers=2, attention_heads=4, ffn_dim=37, max_position_embeddings=128)
    t.update(dropout=0.0, attention_dropout=0.0, **text)
    v = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    v.update(intermediate_size=37)
    return transformers.Kosmos2Config(text_config=t, vision_config=v, latent_query_num=LATENTS)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf = transformers.Kosmos2ForConditionalGeneration(hf_config()).eval()
    return hf, Kosmos2ForConditionalGeneration.from_hf(hf, num_bins=NUM_BINS)


def make_batch(lengths, plen=None, seed=0, image_rows=None):
    """Left-padded prompts: bos, <image>, LATENTS image slots, </image>, random text."""
    g = torch.Generator().manual_seed(seed)
    plen = plen or max(lengths)
    batch = len(lengths)
    ids = torch.ones(batch, plen, dtype=torch.long)
    mask = torch.zeros(batch, plen, dtype=torch.long)
    img = torch.zeros(batch, plen, dtype=torch.long)
    for r, n in enumerate(lengths):
        row = torch.randint(4, 90, (n,), generator=g)
        row[0] = 0
        ids[r, plen - n :] = row
        mask[r, plen - n :] = 1
        if image_rows is None or r in image_rows:
            img[r, plen - n + 2 : plen - n + 2 + LATENTS] = 1
    n_images = int(img.any(1).sum())
    pixels = torch.randn(n_images, 3, 32, 32, generator=g)
    return ids, mask, img, pixels


def hf_logits(hf, ids, mask, img, pixels):
    with torch.no_grad():
        return hf(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask).logits


def assert_close_at(a, b, where, rtol=1e-4):
    err = (a[where] - b[where]).abs().max().item()
    scale = a[where].abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} over max |logit| {scale:.3g} (rtol {rtol})"


def test_logits_equal_transformers_unpadded(models):
    hf, mm = models
    ids, mask, img, pixels = make_batch([11, 11, 11])
    with torch.no_grad():
        ours = mm(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask).logits
    assert_close_at(hf_logits(hf, ids, mask, img, pixels), ours, mask.bool())


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_equal_transformers_padded(models, side):
    hf, mm = models
    ids, mask, img, pixels = make_batch([12, 7, 9], seed=1)
    if side == "right":
        for r in range(3):
            n = int(mask[r].sum())
            ids[r] = torch.cat([ids[r, -n:], ids[r, : 12 - n]])
            mask[r] = torch.cat([mask[r, -n:], mask[r, : 12 - n]])
            img[r] = torch.cat([img[r, -n:], img[r, : 12 - n]])
    with torch.no_grad():
        ours = mm(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask).logits
    assert_close_at(hf_logits(hf, ids, mask, img, pixels), ours, mask.bool())
    assert bool((ours[~mask.bool()] == 0).all()), "logits at padded positions are zeros"


def test_rows_without_image(models):
    hf, mm = models
    ids, mask, img, pixels = make_batch([9, 9, 9], seed=2, image_rows={0, 2})
    with torch.no_grad():
        ours = mm(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask).logits
    ref = hf_logits(hf, ids, mask, img, pixels)
    assert_close_at(ref, ours, mask.bool())


def test_loss_and_grads_equal_transformers(models):
    hf, mm = models
    ids, mask, img, pixels = make_batch([10, 8], seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    out_hf = hf(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask, labels=labels)
    out_mm = mm(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_mm.loss, out_hf.loss, rtol=1e-5, atol=1e-6)
    out_hf.loss.backward()
    out_mm.loss.backward()
    pairs = {
        "text_model.embed_tokens.weight": "text_model.model.embed_tokens.weight",
        "text_model.layers.0.fc1.weight": "text_model.model.layers.0.ffn.fc1.weight",
        "image_to_text_projection.latent_query": "image_to_text_projection.latent_query",
        "vision_model.blocks.1.fc2.weight": "vision_model.model.encoder.layers.1.mlp.fc2.weight",
        "vision_model.patch_embed.weight": "vision_model.model.embeddings.patch_embedding.weight",
    }
    ours, theirs = dict(mm.named_parameters()), dict(hf.named_parameters())
    for a, b in pairs.items():
        torch.testing.assert_close(ours[a].grad, theirs[b].grad, rtol=1e-4, atol=1e-6, msg=lambda m, a=a: f"{a}: {m}")
    mm.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    assert out_mm.stats["tokens"] == int((labels[:, 1:] != -100).sum())


def test_checkpoint_round_trip(models, tmp_path):
    hf, mm = models
    hf.save_pretrained(tmp_path / "hf")
    loaded = Kosmos2ForConditionalGeneration.from_hf(tmp_path / "hf", num_bins=NUM_BINS)
    for name, t in mm.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    back = loaded.to_hf().state_dict()
    for name, t in hf.state_dict().items():
        assert torch.equal(t, back[name]), name
    ids, mask, img, pixels = make_batch([8], seed=4)
    assert_close_at(
        hf_logits(hf, ids, mask, img, pixels), hf_logits(loaded.to_hf(), ids, mask, img, pixels), mask.bool()
    )


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(hf_config().to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickled weights are not loaded"):
        Kosmos2ForConditionalGeneration.from_hf(tmp_path)


def test_config_round_trip():
    cfg = Kosmos2Config.from_hf(hf_config(), num_bins=NUM_BINS)
    again = Kosmos2Config.from_hf(cfg.to_hf(), num_bins=NUM_BINS)
    assert again == cfg
    assert Kosmos2Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("ngram", [0, 3])
def test_greedy_equals_transformers(models, ngram):
    hf, mm = models
    ids, mask, img, pixels = make_batch([9], seed=5)
    ref = hf.generate(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask,
                      max_new_tokens=24, do_sample=False, no_repeat_ngram_size=ngram)  # fmt: skip
    ours = mm.generate(pixels, ids, img, mask, max_new_tokens=24, no_repeat_ngram_size=ngram, constrain_boxes=False)
    assert ours.tolist() == ref.tolist()


def test_left_padded_batch_equals_each_row_alone(models):
    """Each row of a left-padded batch gets what it gets alone (transformers' cached positions count the pads)."""
    hf, mm = models
    lengths = [12, 6, 9, 7]
    ids, mask, img, pixels = make_batch(lengths, seed=6)
    batch = mm.generate(pixels, ids, img, mask, max_new_tokens=16, min_new_tokens=16, constrain_boxes=False)
    for r, n in enumerate(lengths):
        alone = hf.generate(pixel_values=pixels[r : r + 1], input_ids=ids[r : r + 1, -n:],
                            image_embeds_position_mask=img[r : r + 1, -n:], attention_mask=mask[r : r + 1, -n:],
                            max_new_tokens=16, min_new_tokens=16, do_sample=False, no_repeat_ngram_size=3)  # fmt: skip
        assert batch[r, -16:].tolist() == alone[0, -16:].tolist(), f"row {r}"


def _well_formed(seq: list[int], t: ops.GroundingTokens) -> bool:
    """Location tokens only as <object> (loc loc (delim loc loc)*) </object>, bottom-right not above/left."""
    i = 0
    while i < len(seq):
        tok = seq[i]
        if t.first_loc <= tok < t.loc_end or tok in (t.object_close, t.delimiter):
            return False
        if tok == t.object_open:
            i += 1
            while True:
                if i + 1 >= len(seq):
                    return True  # cut off by max_new_tokens
                a, b = seq[i] - t.first_loc, seq[i + 1] - t.first_loc
                if not (0 <= a < t.num_bins**2 and 0 <= b < t.num_bins**2):
                    return False
                if b // t.num_bins < a // t.num_bins or b % t.num_bins < a % t.num_bins:
                    return False
                i += 2
                if i >= len(seq):
                    return True
                if seq[i] == t.object_close:
                    break
                if seq[i] != t.delimiter:
                    return False
                i += 1
        i += 1
    return True


def test_sampling_gives_well_formed_boxes(models):
    _, mm = models
    tokens = ops.GroundingTokens.from_config(mm.config.text, NUM_BINS)
    ids, mask, img, pixels = make_batch([8] * 16, seed=7)
    # make boxes likely: the prompt opens a phrase and the temperature flattens the distribution
    ids[:, -1] = tokens.phrase_close
    out = mm.generate(pixels, ids, img, mask, max_new_tokens=40, do_sample=True, temperature=50.0, seed=11,
                      no_repeat_ngram_size=0)  # fmt: skip
    new = out[:, ids.shape[1] :]
    assert bool((new[:, 0] == tokens.object_open).all()), "after </phrase> comes <object>"
    opened = 0
    for row in new.tolist():
        assert _well_formed(row, tokens), row
        opened += row.count(tokens.object_open)
    assert opened > 16
    full_head = mm.generate(pixels, ids, img, mask, max_new_tokens=40, do_sample=True, temperature=50.0, seed=11,
                            no_repeat_ngram_size=0, narrow_head=False)  # fmt: skip
    assert torch.equal(out, full_head), "computing only the grammar's rows of the head changes no token"


def test_narrow_head_greedy_same_tokens(models):
    _, mm = models
    tokens = ops.GroundingTokens.from_config(mm.config.text, NUM_BINS)
    ids, mask, img, pixels = make_batch([9, 7, 8], seed=12)
    ids[:, -1] = tokens.phrase_close
    runs = [mm.generate(pixels, ids, img, mask, max_new_tokens=12, narrow_head=n) for n in (True, False)]
    assert torch.equal(*runs)
    assert bool((runs[0][:, ids.shape[1]] == tokens.object_open).all())


@pytest.mark.skipif(not ops.ScreenedHead.available(), reason="mmcore._C has no decode_logits kernel")
@pytest.mark.parametrize("lengths", [[9], [9, 7], [9, 7, 8, 5]], ids=["batch1", "batch2", "batch4"])
@pytest.mark.parametrize("ngram, constrain", [(3, True), (0, False), (1, True)], ids=["ngram3", "free", "ngram1"])
def test_screened_head_greedy_same_tokens(models, monkeypatch, lengths, ngram, constrain):
    """The bfloat16-screened head changes no token (left padding, n-gram bans, the grammar, a minimum length), and
    it did screen: most steps computed only a few rows exactly."""
    _, mm = models
    tokens = ops.GroundingTokens.from_config(mm.config.text, NUM_BINS)
    ids, mask, img, pixels = make_batch(lengths, seed=21)
    if len(lengths) > 1:  # one row in a box, the others not: the grammar narrows nothing, the screen does
        ids[0, -1] = tokens.phrase_close
    screened = []
    real = generation._screened_logits

    def spy(*args):
        out = real(*args)
        screened.append(None if out is None else int(torch.isfinite(out[0]).sum()))
        return out

    monkeypatch.setattr(generation, "_screened_logits", spy)
    kw = dict(max_new_tokens=14, min_new_tokens=6, no_repeat_ngram_size=ngram, constrain_boxes=constrain)
    on = mm.generate(pixels, ids, img, mask, **kw)
    narrowed = [n for n in screened if n is not None]
    off = mm.generate(pixels, ids, img, mask, screen_head=False, **kw)
    assert torch.equal(on, off)
    assert len(narrowed) >= len(screened) // 2 > 0, screened
    assert max(narrowed) <= mm.config.text.vocab_size // 8


def test_screened_head_rebuilt_when_the_weights_change(models):
    _, mm = models
    ids, mask, img, pixels = make_batch([8], seed=22)
    mm.generate(pixels, ids, img, mask, max_new_tokens=3)
    first = generation._SCREENS[mm]
    mm.generate(pixels, ids, img, mask, max_new_tokens=3)
    assert generation._SCREENS[mm] is first, "reused while the weights are unchanged"
    with torch.no_grad():
        mm.lm_head_weight.mul_(1.0)
    mm.generate(pixels, ids, img, mask, max_new_tokens=3)
    assert generation._SCREENS[mm] is not first
    assert not any(isinstance(v, ops.ScreenedHead) for v in vars(mm).values()), "nothing extra to pickle"


def test_packed_equals_per_sample(models):
    """Three samples in one packed stream: loss and gradients equal the separate forwards'."""
    _, mm = models
    ids, mask, img, pixels = make_batch([10, 6, 8], seed=8, image_rows={0, 2})
    samples = []
    for r in range(3):
        keep = mask[r].bool()
        samples.append((ids[r][keep], img[r][keep]))
    labels = [s[0].clone() for s in samples]
    for lab in labels:
        lab[:3] = -100
    sum_loss, n_targets = 0.0, 0
    for p in mm.parameters():
        p.grad = None
    pix = iter(pixels)
    for (sid, simg), lab in zip(samples, labels, strict=True):
        px = next(pix)[None] if simg.any() else None
        out = mm(pixel_values=px, input_ids=sid[None], image_embeds_position_mask=simg[None], labels=lab[None])
        n = int((lab[1:] != -100).sum())
        (out.loss * n).backward()
        sum_loss, n_targets = sum_loss + out.loss.item() * n, n_targets + n
    separate = {k: p.grad.clone() for k, p in mm.named_parameters()}
    for p in mm.parameters():
        p.grad = None
    cu = torch.tensor([0, 10, 16, 24], dtype=torch.int32)
    packed = mm.forward_packed(pixels, torch.cat([s[0] for s in samples]), torch.cat([s[1] for s in samples]), cu, 10,
                               labels=torch.cat(labels))  # fmt: skip
    assert packed.stats["tokens"] == n_targets
    torch.testing.assert_close(packed.loss.item() * n_targets, sum_loss, rtol=1e-5, atol=1e-5)
    (packed.loss * n_targets).backward()
    for k, p in mm.named_parameters():
        torch.testing.assert_close(p.grad, separate[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for p in mm.parameters():
        p.grad = None


def test_gradient_checkpointing_same_grads(models):
    _, mm = models
    ids, mask, img, pixels = make_batch([9, 9], seed=9)
    grads = []
    for ckpt in (False, True):
        (mm.gradient_checkpointing_enable if ckpt else mm.gradient_checkpointing_disable)()
        mm.train()
        mm(
            pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask, labels=ids
        ).loss.backward()
        grads.append({k: p.grad.clone() for k, p in mm.named_parameters()})
        mm.zero_grad(set_to_none=True)
    mm.gradient_checkpointing_disable()
    mm.eval()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], msg=lambda m, k=k: f"{k}: {m}")


def test_helpers():
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    assert segment_positions(cu, 5).tolist() == [0, 1, 2, 0, 1]
    assert shift_targets(torch.tensor([1, 2, 3, 4, 5]), cu).tolist() == [2, 3, -100, 5, -100]


def test_bad_input(models):
    _, mm = models
    ids, mask, img, pixels = make_batch([8, 6], seed=10)
    holes = mask.clone()
    holes[0, 4] = 0
    with pytest.raises(ValueError, match="attention_mask\\[0\\] has holes"):
        mm(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=holes)
    with pytest.raises(ValueError, match="marks 6 slots but the images give 3"):
        mm(pixel_values=pixels[:1], input_ids=ids, image_embeds_position_mask=img, attention_mask=mask)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        mm(pixel_values=pixels[:, :, :16], input_ids=ids, image_embeds_position_mask=img, attention_mask=mask)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="not left padding"):
        mm.generate(pixels, ids, img, right, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mm.generate(pixels, ids, img, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="image_embeds_position_mask must have shape"):
        mm(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img[:, :3], attention_mask=mask)


def test_token_ids_outside_the_vocabulary(models):
    _, mm = models
    ids, mask, img, pixels = make_batch([8, 6], seed=10)
    vocab = mm.config.text.vocab_size
    for bad in (-3, vocab):
        wrong = ids.clone()
        wrong[0, -1] = bad
        with pytest.raises(ValueError, match=f"input_ids holds token id {bad}, outside the vocabulary"):
            mm(pixel_values=pixels, input_ids=wrong, image_embeds_position_mask=img, attention_mask=mask)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            mm.generate(pixels, wrong, img, mask, max_new_tokens=2)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            keep = mask.bool()
            cu = torch.tensor([0, int(keep[0].sum()), int(keep.sum())], dtype=torch.int32)
            mm.forward_packed(pixels, wrong[keep], img[keep], cu, 8)


def test_image_slots_are_counted_per_row(models):
    # the right total (2 images x 3 latents) spread 4 + 2 over the rows: row 0's fourth slot would take row 1's
    # first latent
    _, mm = models
    ids, mask, img, pixels = make_batch([8, 6], seed=10)
    uneven = img.clone()
    uneven[1, uneven[1].nonzero()[0, 0]] = 0
    uneven[0, uneven[0].nonzero()[-1, 0] + 1] = 1
    assert uneven.sum(1).tolist() == [LATENTS + 1, LATENTS - 1]
    match = f"marks {LATENTS + 1} slots in row 0: .* one image's {LATENTS} slots or none"
    with pytest.raises(ValueError, match=match):
        mm(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=uneven, attention_mask=mask)
    with pytest.raises(ValueError, match=match):
        mm.generate(pixels, ids, uneven, mask, max_new_tokens=2)
    # packed: one sample's slots split over two segments
    keep = mask.bool()
    flat, flat_img = ids[keep], img[keep]
    first = int(flat_img.nonzero()[0, 0])
    cu = torch.tensor([0, first + 1, flat.numel()], dtype=torch.int32)
    with pytest.raises(ValueError, match="slots in row 0"):
        mm.forward_packed(pixels, flat, flat_img, cu, flat.numel())


@pytest.mark.parametrize("size", [(48, 48), (40, 56), (32, 32)], ids=["48x48", "40x56", "native"])
def test_interpolate_pos_encoding_equals_transformers(models, size):
    """Images of another size than the ViT's 32 x 32: the learned position table resized bicubically, as
    transformers' interpolate_pos_encoding=True; logits and greedy tokens equal."""
    hf, mm = models
    ids, mask, img, _ = make_batch([10, 7], seed=4)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    kw = dict(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask)
    with torch.no_grad():
        want = hf(**kw, interpolate_pos_encoding=True).logits
        ours = mm(**kw, interpolate_pos_encoding=True).logits
        assert_close_at(want, ours, mask.bool())
        # transformers' generate takes no interpolate_pos_encoding: its image embeddings come from get_image_features
        embeds = hf.get_image_features(pixels, interpolate_pos_encoding=True, return_dict=True).pooler_output
        ours_embeds = mm.encode_images(pixels, interpolate_pos_encoding=True)
        torch.testing.assert_close(ours_embeds, embeds, atol=1e-5, rtol=1e-4)
        hf_ids = hf.generate(image_embeds=embeds, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask,
                             max_new_tokens=6, do_sample=False, no_repeat_ngram_size=0, pad_token_id=1)  # fmt: skip
        mm_ids = mm.generate(pixels, ids, img, mask, max_new_tokens=6, constrain_boxes=False, no_repeat_ngram_size=0,
                             interpolate_pos_encoding=True)  # fmt: skip
    assert torch.equal(mm_ids, hf_ids[:, : mm_ids.shape[1]])


def test_other_image_sizes_need_interpolate_pos_encoding(models):
    _, mm = models
    ids, mask, img, _ = make_batch([10], seed=4)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        mm(pixel_values=torch.randn(1, 3, 48, 48), input_ids=ids, image_embeds_position_mask=img, attention_mask=mask)
    with pytest.raises(ValueError, match="at least 8 x 8"):
        mm.encode_images(torch.randn(1, 3, 4, 48), interpolate_pos_encoding=True)


def test_sincos_positions_follow_the_grid():
    """The fixed 2D sin-cos embedding of another grid is that grid's own code (nothing to interpolate)."""
    from mmcore.models.layers.vit import VisionTransformer, ViTConfig, sincos_2d

    vit = VisionTransformer(ViTConfig(hidden_size=32, intermediate_size=40, num_layers=1, num_heads=4, image_size=32,
                                      patch_size=8, position_embedding="sincos2d"))  # fmt: skip
    torch.testing.assert_close(vit.positions(4, 4), sincos_2d(4, 32))
    table = vit.positions(3, 5)
    assert table.shape == (16, 32)
    torch.testing.assert_close(table[1 + 2 * 5 + 4], sincos_2d(5, 32)[1 + 2 * 5 + 4])  # row 2, col 4
    assert vit(torch.randn(2, 3, 24, 40), interpolate_pos_encoding=True).shape == (2, 16, 32)


@pytest.fixture(scope="module")
def eos_models():
    """A pair whose EOS row of the tied head is pushed up by ``scale`` x 0.02 (copied into mmcore by from_hf), so that
    beams finish at different lengths and the finished-hypothesis rules decide."""
    out = {}
    for scale in (0.0, 3.0, 5.0, 8.0):
        torch.manual_seed(0)
        hf = transformers.Kosmos2ForConditionalGeneration(hf_config()).eval()
        with torch.no_grad():
            w = hf.get_output_embeddings().weight
            w[2] += scale * 0.02 * torch.sign(torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1)))
        out[scale] = (hf, Kosmos2ForConditionalGeneration.from_hf(hf, num_bins=NUM_BINS))
    return out


@pytest.mark.parametrize("scale", [0.0, 3.0, 5.0, 8.0])
@pytest.mark.parametrize("beams, penalty, ngram", [(3, 0.6, 0), (2, 1.0, 3), (4, 0.0, 3)])
def test_beam_search_equals_transformers(eos_models, scale, beams, penalty, ngram):
    """generate(num_beams=k, constrain_boxes=False) equals transformers' beam search (same length penalty, n-gram
    blocking), with sequences finishing at 1 to 8 new tokens."""
    hf, mm = eos_models[scale]
    ids, mask, img, pixels = make_batch([11, 11], seed=3)
    with torch.no_grad():
        want = hf.generate(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask,
                           num_beams=beams, length_penalty=penalty, max_new_tokens=8, do_sample=False,
                           no_repeat_ngram_size=ngram, eos_token_id=2, pad_token_id=1)  # fmt: skip
        ours = mm.generate(pixels, ids, img, mask, max_new_tokens=8, constrain_boxes=False, no_repeat_ngram_size=ngram,
                           num_beams=beams, length_penalty=penalty)  # fmt: skip
    assert torch.equal(ours, want[:, : ours.shape[1]]) and bool((want[:, ours.shape[1] :] == 1).all())


def test_beam_search_keeps_the_box_grammar(models):
    """With the grammar on, every beam's location tokens come in well-formed boxes; bad arguments are refused."""
    _, mm = models
    tokens = ops.GroundingTokens.from_config(mm.config.text, NUM_BINS)
    ids, mask, img, pixels = make_batch([9, 6], seed=5)
    with torch.no_grad():
        # open a box in the prompt so that the grammar has to close it
        ids = torch.cat([ids, torch.tensor([[tokens.phrase_close], [tokens.phrase_close]])], 1)
        mask, img = torch.nn.functional.pad(mask, (0, 1), value=1), torch.nn.functional.pad(img, (0, 1))
        out = mm.generate(pixels, ids, img, mask, max_new_tokens=6, num_beams=3, no_repeat_ngram_size=0)
    for row in out[:, ids.shape[1] :].tolist():
        assert row[:4][0] == tokens.object_open and all(tokens.first_loc <= t < tokens.loc_end for t in row[1:3])
        top, bottom = row[1] - tokens.first_loc, row[2] - tokens.first_loc
        assert top // NUM_BINS <= bottom // NUM_BINS and top % NUM_BINS <= bottom % NUM_BINS
        assert row[3] in (tokens.object_close, tokens.delimiter)
    with pytest.raises(ValueError, match="num_beams"):
        mm.generate(pixels, ids, img, mask, max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match="do_sample"):
        mm.generate(pixels, ids, img, mask, max_new_tokens=2, num_beams=2, do_sample=True)


@pytest.mark.parametrize("beams", [1, 2])
def test_non_finite_model_output_is_an_error(models, beams):
    """A model whose logits are NaN (here a NaN final LayerNorm weight) stops generation with an error naming the
    row, greedy and beam search alike, instead of emitting whatever token the NaN's index is."""
    import copy

    mm = copy.deepcopy(models[1])
    with torch.no_grad():
        mm.text_model.layer_norm.weight[3] = float("nan")
    ids, mask, img, pixels = make_batch([9, 6], seed=5)
    what = "grounded_decode_step" if beams == 1 else r"generate\(num_beams > 1\)"
    with pytest.raises(ValueError, match=what + ": the logits of row 0 hold NaN"):
        mm.generate(pixels, ids, img, mask, max_new_tokens=3, num_beams=beams)


def test_step_layouts_equal_the_layout_built_afresh():
    from mmcore.models.kosmos2 import generation

    starts = torch.tensor([0, 3, 1, 7, 0])
    layouts = generation._StepLayouts(starts, 20)
    for end in (7, 8, 12, 20):
        got, want = layouts.at(end), generation._layout(starts, end, torch.ones_like(starts), 20, 1)
        assert torch.equal(got.cu_seqlens_q, want.cu_seqlens_q) and torch.equal(got.cu_seqlens_k, want.cu_seqlens_k)
        assert (got.max_seqlen_q, got.max_seqlen_k) == (want.max_seqlen_q, want.max_seqlen_k)
        assert got.cu_seqlens_k.dtype == torch.int32


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests run these kernels themselves")
def test_gpu_kernels_generate_and_train_the_same(models):
    """What a GPU runs, on the CPU: with dispatch choosing as for CUDA tensors (the Triton kernels, interpreted),
    batched generation with the box grammar (prefill, cached steps through the Triton attention, the Triton decoding
    step) makes the CPU path's tokens, and packed training its loss and gradients."""
    from mmcore.testing import gpu_dispatch_on_cpu

    pytest.importorskip("triton")
    _, mm = models
    ids, mask, img, pixels = make_batch([9, 5], seed=11)
    want = mm.generate(pixels, ids, img, mask, max_new_tokens=6, min_new_tokens=6)
    cu = torch.tensor([0, 9, 14], dtype=torch.int32)
    flat, flat_img = ids[mask.bool()], img[mask.bool()]
    labels = flat.clone()
    labels[[0, 1, 9, 10]] = -100

    def train():
        for p in mm.parameters():
            p.grad = None
        out = mm.forward_packed(pixels, flat, flat_img, cu, 9, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {k: p.grad.clone() for k, p in mm.named_parameters() if p.grad is not None}

    loss, grads = train()
    mm.text_model.fused_step = False  # the fused decoder step is a CPU op: the module path is the GPU's
    try:
        with gpu_dispatch_on_cpu():
            # the CPU's head shortcuts off, as on a GPU: the whole head through decode_logits' torch backend
            got = mm.generate(pixels, ids, img, mask, max_new_tokens=6, min_new_tokens=6, narrow_head=False,
                              screen_head=False)  # fmt: skip
            gpu_loss, gpu_grads = train()
    finally:
        mm.text_model.fused_step = True
        for p in mm.parameters():
            p.grad = None
    assert got.tolist() == want.tolist()
    torch.testing.assert_close(gpu_loss, loss, rtol=1e-5, atol=1e-6)
    assert gpu_grads.keys() == grads.keys()
    for k, g in grads.items():
        torch.testing.assert_close(gpu_grads[k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_head_on_a_gpu_computes_transformers_logits():
    """With half-precision weights on a GPU the generation head is transformers' product (in the weights' dtype,
    then float32), not decode_logits' float32 upcast of the whole head; float32 weights keep decode_logits."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 64, generator=g).bfloat16(), torch.randn(500, 64, generator=g).bfloat16()
    half = generation._head(h, w, None, half_product=True)
    assert half.dtype == torch.float32 and torch.equal(half, torch.nn.functional.linear(h, w).float())
    upcast = generation._head(h, w, None, half_product=False)
    torch.testing.assert_close(upcast, torch.nn.functional.linear(h.float(), w.float()), rtol=1e-5, atol=1e-5)
    assert not torch.equal(half, upcast)  # the product's bfloat16 rounding
    h32, w32 = h.float(), w.float()
    assert torch.equal(generation._head(h32, w32, None, half_product=True), ops.decode_logits(h32, w32))
    assert generation._head(h, w, (10, 20), half_product=True)[:, :10].isneginf().all()  # rows: decode_logits'
