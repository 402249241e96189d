"""COSA's online concatenation on packed tokens: partner draws, token-level caption joining (a plain Python join as the
reference), which tokens see which in the concatenated pass, temporal slots, feature reuse and re-encoding."""

from __future__ import annotations

import pytest
import torch

from mmcore.models.cosa import concatenate, pack_padded, sample_partners
from mmcore.models.cosa.concat import concat_captions, select_segments
from mmcore.models.cosa.modeling import next_token_labels

pytest.importorskip("transformers")

from cosa_tiny import CLS, SEP, captions, pixels, tiny_cosa  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_cosa()


def join_ref(rows, members, max_tokens):
    """The original's paragraph: [CLS] + the members' words in order + [SEP], cut at the end to max_tokens."""
    out = []
    for m in members.tolist():
        body = [t for j in m for t in rows[j][1:-1]][: max_tokens - 2]
        out.append([CLS, *body, SEP])
    return out


def test_partners_are_distinct_and_own_sample_first():
    g = torch.Generator().manual_seed(0)
    members = sample_partners(6, 24, 4, offset=12, generator=g)
    assert members.shape == (6, 4)
    assert members[:, 0].tolist() == list(range(12, 18))
    for row in members[:, 1:].tolist():
        assert len(set(row)) == 3 and all(0 <= j < 24 for j in row)
    assert sample_partners(3, 3, 1).tolist() == [[0], [1], [2]]
    small = sample_partners(2, 2, 4, generator=g)  # fewer samples than partners: repeats allowed
    assert small.shape == (2, 4) and int(small.max()) < 2


def test_partners_are_uniform():
    g = torch.Generator().manual_seed(1)
    members = sample_partners(4000, 8, 4, generator=g)[:, 1:]
    counts = torch.bincount(members.reshape(-1), minlength=8).float()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.01


@pytest.mark.parametrize("max_tokens", [80, 12, 4], ids=["fits", "cut-mid-member", "cut-first"])
def test_captions_join_at_token_level(max_tokens):
    ids, mask = captions([5, 9, 2, 7], seed=3)
    text = pack_padded(ids, mask)
    rows = [ids[r, : int(mask[r].sum())].tolist() for r in range(4)]
    members = torch.tensor([[0, 3, 1, 2], [1, 1, 0, 3], [2, 0, 1, 3]])
    joined = concat_captions(text, members, max_tokens, CLS, SEP)
    ref = join_ref(rows, members, max_tokens)
    lengths = [len(r) for r in ref]
    assert joined.text.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert joined.text.input_ids.tolist() == [t for r in ref for t in r]
    assert joined.text.max_seqlen == max(lengths)
    # member of each token: -1 for [CLS]/[SEP], else the slot it came from
    for r, m in enumerate(members.tolist()):
        seg = joined.member[joined.text.cu_seqlens[r] : joined.text.cu_seqlens[r + 1]].tolist()
        expect = [j for j, s in enumerate(m) for _ in rows[s][1:-1]][: max_tokens - 2]
        assert seg == [-1, *expect, -1]


def test_select_segments():
    ids, mask = captions([3, 6, 4], seed=1)
    text = pack_padded(ids, mask)
    picked = select_segments(text, torch.tensor([2, 0, 2]))
    assert picked.cu_seqlens.tolist() == [0, 4, 7, 11]
    rows = [ids[r, : int(mask[r].sum())].tolist() for r in range(3)]
    assert picked.input_ids.tolist() == rows[2] + rows[0] + rows[2]


def test_concatenated_batch_reuses_features_in_frame_order(model):
    ids, mask = captions([5, 6, 4, 7], seed=2)
    text = pack_padded(ids, mask)
    feats = model.encode_vision(pixels(4, 2))
    g = torch.Generator().manual_seed(0)
    batch = concatenate(text, feats, 3, max_tokens=24, cls_id=CLS, sep_id=SEP, generator=g)
    assert batch.features.shape == (4, 6, *feats.shape[2:])
    for i, m in enumerate(batch.members.tolist()):
        assert m[0] == i
        for j, s in enumerate(m):
            assert torch.equal(batch.features[i, 2 * j : 2 * j + 2], feats[s])
    # gradients reach the reused features of every member
    batch.features.sum().backward()
    assert model.vision_model.post_norm.weight.grad is not None


def test_reencoding_matches_reuse_in_eval(model):
    ids, mask = captions([5, 6, 4], seed=2)
    text, px = pack_padded(ids, mask), pixels(3)
    with torch.no_grad():
        feats = model.encode_vision(px)
        a = concatenate(text, feats, 2, max_tokens=24, cls_id=CLS, sep_id=SEP, generator=torch.Generator())
        b = concatenate(
            text, feats, 2, max_tokens=24, cls_id=CLS, sep_id=SEP, generator=torch.Generator(),
            pixel_values=px, encode=model.encode_vision,
        )  # fmt: skip
    assert torch.equal(a.members, b.members) and torch.equal(a.text.input_ids, b.text.input_ids)
    assert (a.features - b.features).abs().max() < 1e-5


def test_temporal_slots_follow_members(model):
    """Member j's frame f gets slot j * frames + f; with one frame per sample, the single pass uses slot 0."""
    feats = model.encode_vision(pixels(2, 1)).detach()
    single, _ = model.vision_tokens(feats)
    w = model.frame_embedding.weight
    plain = model.bridge_norm(model.bridge(feats))
    assert torch.allclose(single.view(2, 1, 5, -1), plain + w[0], atol=1e-6)
    joined = torch.cat([feats, feats.flip(0)], 1)  # (2, 2 frames = 2 members, ...)
    tokens, seg = model.vision_tokens(joined)
    expect = model.bridge_norm(model.bridge(joined)) + w[[0, 2]][None, :, None, :]  # 4 slots -> 2 frames: e0, e2
    assert torch.allclose(tokens.view(2, 2, 5, -1), expect, atol=1e-6)
    four = torch.cat([feats] * 4, 1)
    tokens, _ = model.vision_tokens(four)
    expect = model.bridge_norm(model.bridge(four)) + w[None, :, None, :]
    assert torch.allclose(tokens.view(2, 4, 5, -1), expect, atol=1e-6)
    assert seg.cu_seqlens.tolist() == [0, 10, 20]


@pytest.mark.parametrize("mode", ["full", "causal"])
def test_paragraph_sees_only_itself_and_its_members_frames(model, mode):
    """Each paragraph's states equal a pass over that paragraph and its own frames alone; changing another sample's
    tokens or frames changes nothing; causal tokens do not see later ones."""
    ids, mask = captions([5, 6, 4], seed=5)
    text = pack_padded(ids, mask)
    with torch.no_grad():
        feats = model.encode_vision(pixels(3))
        batch = concatenate(text, feats, 2, max_tokens=24, cls_id=CLS, sep_id=SEP, generator=torch.Generator())
        out = model.joint(batch.text, batch.features, mode)
        cu = batch.text.cu_seqlens.tolist()
        for s in range(3):
            alone = select_segments(batch.text, torch.tensor([s]))
            ref = model.joint(alone, batch.features[s : s + 1], mode)
            assert (out[cu[s] : cu[s + 1]] - ref).abs().max() < 1e-5
        other = batch.features.clone()
        other[1:] = torch.randn_like(other[1:])
        changed = model.joint(batch.text, other, mode)
        assert torch.equal(changed[: cu[1]], out[: cu[1]])
        assert (changed[cu[1] :] - out[cu[1] :]).abs().max() > 1e-3
        if mode == "causal":
            tail = batch.text.input_ids.clone()
            tail[cu[1] - 2] = 7  # the token before [SEP] of paragraph 0
            later = model.joint(
                type(batch.text)(tail, batch.text.cu_seqlens, batch.text.max_seqlen), batch.features, mode
            )
            assert torch.equal(later[: cu[1] - 2], out[: cu[1] - 2])


def test_single_and_concatenated_passes_share_token_ids(model):
    """The concatenated stream is made of the single-sample tokens (no re-tokenising): every body token of a
    paragraph is the token of its member's caption at the same offset."""
    ids, mask = captions([5, 6, 4, 3], seed=6)
    text = pack_padded(ids, mask)
    feats = model.encode_vision(pixels(4)).detach()
    batch = concatenate(text, feats, 4, max_tokens=80, cls_id=CLS, sep_id=SEP, generator=torch.Generator())
    body = batch.member >= 0
    assert int(body.sum()) == int((text.lengths - 2)[batch.members].sum())  # max_tokens cuts nothing here
    para = torch.repeat_interleave(torch.arange(len(batch.text)), batch.text.lengths)
    offset_in_paragraph = torch.arange(batch.text.input_ids.numel()) - batch.text.first[para]
    for t in body.nonzero()[:, 0].tolist():
        row, j = int(para[t]), int(batch.member[t])
        sample = int(batch.members[row, j])
        before = int((text.lengths - 2)[batch.members[row, :j]].sum())  # body tokens of the members before j
        offset = int(offset_in_paragraph[t]) - 1 - before  # within member j's body
        assert batch.text.input_ids[t] == text.input_ids[text.first[sample] + 1 + offset]


def test_next_token_labels_stay_in_segment():
    ids, mask = captions([3, 4], seed=0)
    text = pack_padded(ids, mask)
    labels = next_token_labels(text)
    assert labels.tolist() == [*ids[0, 1:3].tolist(), -100, *ids[1, 1:4].tolist(), -100]
