"""mmcore's COSA model layer against transformers on tiny random models: the text-only path against BertModel, the
vision path against CLIPVisionModel + post-layernorm, the cross-attention path against a BERT decoder, the MLM head
against BertForMaskedLM, conversion round trips, frame-embedding resizing and bad input."""

from __future__ import annotations

import pytest
import torch

from mmcore.models.cosa import COSAConfig, COSAModel, PackedText, pack_padded
from mmcore.models.cosa.modeling import resize_slots
from mmcore.testing import error_report

transformers = pytest.importorskip("transformers")

from cosa_tiny import CLS, bert_config, captions, clip_model, cosa_from_hf, pixels, tiny_cosa  # noqa: E402

TOL = 1e-5


def assert_close(out, ref, name, tol=TOL):
    err, mean, where = error_report(out, ref)
    assert err <= tol, f"{name}: max error {err:.3e} at {list(where)}, mean {mean:.3e}, tolerance {tol:g}"


@pytest.fixture(scope="module")
def bert_and_clip():
    torch.manual_seed(0)
    return transformers.BertModel(bert_config(), add_pooling_layer=False).eval(), clip_model()


@pytest.fixture(scope="module")
def model():
    return tiny_cosa()


@pytest.mark.parametrize("lengths", [[7, 5, 2], [1, 9], [12]], ids=["mixed", "one-token", "single"])
def test_text_only_path_equals_bert_model(bert_and_clip, lengths):
    bert, clip = bert_and_clip
    m = cosa_from_hf(bert, clip)
    ids, mask = captions([max(n, 2) for n in lengths], seed=len(lengths), pad_to=13)
    mask[:, :] = 0
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    with torch.no_grad():
        ours = m.encode_text(ids, mask)
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert_close(ours[keep], ref[keep], "last hidden state")
    assert ours[~keep].abs().sum() == 0


@pytest.mark.parametrize("frames", [1, 3])
def test_vision_path_equals_clip_with_post_layernorm(bert_and_clip, frames):
    bert, clip = bert_and_clip
    m = cosa_from_hf(bert, clip)
    px = pixels(2, frames)
    with torch.no_grad():
        ours = m.encode_vision(px)
        hidden = clip(pixel_values=px.flatten(0, 1)).last_hidden_state
        ref = clip.post_layernorm(hidden).view(2, frames, *hidden.shape[1:])
        pooled = clip(pixel_values=px.flatten(0, 1)).pooler_output.view(2, frames, -1)
    assert ours.shape == (2, frames, 5, 24)
    assert_close(ours, ref, "vision tokens")
    assert_close(m.pool_vision(ours), pooled.mean(1), "pooled [CLS] (pooler_output) averaged over frames")


def test_cross_attention_path_equals_bert_decoder(model):
    """The causal multimodal pass (captioning) against transformers' BERT decoder fed the same vision tokens."""
    hf = model.to_hf()["text"]
    ids, mask = captions([6, 9, 3], seed=3)
    feats = model.encode_vision(pixels(3, 2, seed=1))
    with torch.no_grad():
        vision, _ = model.vision_tokens(feats)
        ours = model.joint(pack_padded(ids, mask), feats, "causal")
        ref = hf.bert(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=vision.view(3, -1, vision.shape[-1])
        ).last_hidden_state
    assert_close(ours, ref[mask.bool()], "causal pass with cross-attention")


def test_mlm_head_equals_bert_for_masked_lm():
    torch.manual_seed(1)
    hf = transformers.BertForMaskedLM(bert_config()).eval()
    m = cosa_from_hf(hf, clip_model())
    ids, mask = captions([5, 8], seed=4)
    with torch.no_grad():
        hidden = m.encode_text(ids, mask)
        ours = torch.nn.functional.linear(m.mlm_head(hidden), m.word_embeddings, m.mlm_head.bias)
        ref = hf(input_ids=ids, attention_mask=mask).logits
    assert_close(ours[mask.bool()], ref[mask.bool()], "MLM logits")


def test_plain_bert_gets_fresh_cross_attention_and_head(bert_and_clip):
    bert, clip = bert_and_clip
    m = cosa_from_hf(bert, clip)
    assert m.text_model.layers[0].cross_attn.q_proj.weight.std() > 0
    assert torch.equal(m.mlm_head.bias, torch.zeros_like(m.mlm_head.bias))
    assert float(m.contra_temp.detach()) == pytest.approx(0.07)
    assert m.contra_head_t.out_features == 16 and m.contra_head_t.bias is None


def test_round_trip_through_transformers(model):
    hf = model.to_hf()
    again = COSAModel.from_hf(text=hf["text"], vision=hf["vision"], config=model.config)
    a, b = model.state_dict(), again.state_dict()
    heads = ("bridge", "frame_embedding", "contra_head", "itm_head")  # no transformers counterpart
    same = [k for k in a if not k.startswith(heads)]
    assert len(same) > 50
    for k in same:
        assert torch.equal(a[k], b[k]), k


def test_build_and_state_dict_round_trip():
    cfg = COSAConfig(
        text=dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                  cls_token_id=1, sep_token_id=2, mask_token_id=3, random_token_start=4),
        vision=dict(hidden_size=8, intermediate_size=10, num_layers=1, num_heads=2, image_size=8, patch_size=4),
        contra_dim=4,
    )  # fmt: skip
    m = COSAModel(cfg).init_weights()
    again = COSAModel(COSAConfig.from_dict(cfg.to_dict()))
    again.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_frame_embedding_nearest_interpolation(model):
    w = model.frame_embedding.weight
    assert torch.equal(resize_slots(w, 8), w[[0, 0, 1, 1, 2, 2, 3, 3]])
    assert torch.equal(resize_slots(w, 1), w[[0]])
    assert torch.equal(resize_slots(w, 2), w[[0, 2]])
    # run time: each frame's tokens get its slot
    feats = model.encode_vision(pixels(1, 8)).detach()
    tokens, seg = model.vision_tokens(feats)
    plain = model.bridge_norm(model.bridge(feats))
    expected = plain + w[[0, 0, 1, 1, 2, 2, 3, 3]][None, :, None, :]
    assert_close(tokens, expected.reshape(-1, expected.shape[-1]), "vision tokens with 8 frames")
    assert seg.cu_seqlens.tolist() == [0, 40] and seg.max_seqlen == 40


def test_loading_frame_embeddings_for_another_frame_count(model):
    cfg = COSAConfig.from_dict({**model.config.to_dict(), "frame_slots": 8})
    eight = COSAModel(cfg)
    eight.load_state_dict(model.state_dict())
    assert torch.equal(eight.frame_embedding.weight, model.frame_embedding.weight[[0, 0, 1, 1, 2, 2, 3, 3]])
    # the original's layout, video_frame_embedding (1, slots, D)
    state = model.state_dict()
    state["frame_embedding.weight"] = state["frame_embedding.weight"][None]
    eight.load_state_dict(state)
    assert torch.equal(eight.frame_embedding.weight, model.frame_embedding.weight[[0, 0, 1, 1, 2, 2, 3, 3]])
    state["frame_embedding.weight"] = state["frame_embedding.weight"][0, :0]
    with pytest.raises(ValueError, match="no frame slot"):
        eight.load_state_dict(state)


def test_encode_text_is_text_only(model):
    """encode_text is the text-only pass (no cross-attention); the joint pass differs from it."""
    ids, mask = captions([4, 6], seed=2)
    with torch.no_grad():
        h = model.encode_text(ids, mask)
        text = pack_padded(ids, mask)
        assert torch.equal(h[mask.bool()], model.text_model(text))
        joint = model.joint(text, model.encode_vision(pixels(2)))
    assert (joint - h[mask.bool()]).abs().max() > 1e-3


def test_bad_input(model):
    ids, mask = captions([4, 6], seed=2)
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right padding"):
        model.encode_text(ids, left)
    with pytest.raises(ValueError, match="batch, frames, 3, H, W"):
        model.encode_vision(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="holds no frame"):
        model.encode_vision(torch.randn(0, 1, 3, 16, 16))
    with pytest.raises(ValueError, match="concat"):
        model(pixels(2), ids, mask, concat=0)
    with pytest.raises(ValueError, match="samples"):
        model(pixels(3), ids, mask)
    with pytest.raises(ValueError, match="caption_mode"):
        COSAConfig(caption_mode="greedy")
    with pytest.raises(ValueError, match="unknown tasks"):
        COSAConfig(concat_tasks=("itc", "vqa"))


def test_captions_must_be_framed_and_in_the_vocabulary(model):
    ids, mask = captions([4, 6], seed=2)
    unframed = ids.clone()
    unframed[1, 0] = 10  # no [CLS]: concatenation would drop the first word
    with pytest.raises(ValueError, match=r"input_ids row 1 must start with \[CLS\]"):
        model(pixels(2), unframed, mask)
    unframed = ids.clone()
    unframed[0, 3] = 11  # the last real token of row 0 is not [SEP]
    with pytest.raises(ValueError, match=r"input_ids row 0 must end with \[SEP\]"):
        model(pixels(2), unframed, mask)
    for bad in (-1, model.config.text.vocab_size):
        out_of_vocab = ids.clone()
        out_of_vocab[1, 2] = bad
        with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary"):
            model(pixels(2), out_of_vocab, mask)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.encode_text(out_of_vocab, mask)
    with pytest.raises(ValueError, match="no caption"):
        model(pixels(0), ids[:0], mask[:0])


def test_itm_needs_two_samples(model):
    # a batch of one has no negative to draw: (text, video) would be labelled both 1 and 0
    ids, mask = captions([5], seed=3)
    with pytest.raises(ValueError, match="only one sample"):
        model(pixels(1), ids, mask, concat=1)
    one_without_itm = cosa_from_hf(
        *_bert_and_clip_for_tasks(), origin_tasks=("itc", "mlm"), concat_tasks=("itc", "mlm", "cap")
    )
    out = one_without_itm(pixels(1), ids, mask, concat=4)
    assert torch.isfinite(out["loss"]) and not any("itm" in k for k in out)


def _bert_and_clip_for_tasks():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(bert_config(is_decoder=True, add_cross_attention=True)).eval(), clip_model()


def test_lengths_are_checked_up_front(model):
    with pytest.raises(ValueError, match="max_concat_tokens .* exceeds .* max_position_embeddings"):
        COSAConfig(text=dict(max_position_embeddings=64), max_concat_tokens=100)
    limit = model.config.text.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_new_tokens = {limit} makes captions of {limit + 2} positions"):
        model.generate_captions(pixels(1), max_new_tokens=limit)
    assert model.generate_captions(pixels(1), max_new_tokens=limit - 2, mode="masked").shape[1] <= limit - 1


def test_caption_modes_are_checked(model):
    ids, mask = captions([4, 6], seed=2)
    text = pack_padded(ids, mask)
    feats = model.encode_vision(pixels(2))
    for call in (
        lambda: model.caption_loss(text, feats, mode="greedy"),
        lambda: model.generate_captions(features=feats, mode="nonsense"),
    ):
        with pytest.raises(ValueError, match="caption mode must be one of"):
            call()


def test_qa_arguments_are_named(model):
    q_ids, q_mask = captions([5, 3], seed=8)
    a_ids, a_mask = captions([3, 2], seed=9)
    with pytest.raises(ValueError, match="answer_ids has 1 rows but question_ids has 2"):
        model.qa_loss(pixels(2), q_ids, q_mask, a_ids[:1], a_mask[:1])
    a_mask[1] = 0
    with pytest.raises(ValueError, match="answer_mask row 1 is empty"):
        model.qa_loss(pixels(2), q_ids, q_mask, a_ids, a_mask)


def test_swin_without_timm_says_so():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="timm"):
            COSAModel(COSAConfig(vision_type="swin"))
    else:
        pytest.skip("timm is installed")


def test_packed_text_helpers():
    ids, mask = captions([3, 5], seed=0, pad_to=6)
    text = pack_padded(ids, mask)
    assert text.cu_seqlens.tolist() == [0, 3, 8] and text.max_seqlen == 5
    assert text.input_ids[text.first].tolist() == [CLS, CLS]
    assert isinstance(text, PackedText) and len(text) == 2


def test_image_size_follows_the_vision_encoder():
    """The frame side the model takes (what mmcore.train's synthetic COSA data draws): the ViT's or the Swin's."""
    from mmcore.models.cosa.config import COSAConfig, TimmSwinConfig

    swin = TimmSwinConfig(
        model_name="swin_tiny_patch4_window7_224",
        img_size=64,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
    )
    assert COSAConfig(vision_type="swin", swin=swin).image_size == 64
    assert COSAConfig().image_size == COSAConfig().vision.image_size == 224
