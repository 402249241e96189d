"""COSA's fixed-shape layout (``PackedText.valid_lengths``) and its whole training forward under
torch.compile(fullgraph=True): the padded layout gives what the packed one gives, and the compiled forward and
backward give what eager gives, with no graph break."""

import functools

import pytest
import torch

from mmcore.models.cosa import concat as C
from mmcore.models.cosa import modeling as M

pytest.importorskip("transformers")

from cosa_tiny import CLS, MASK, SEP, captions, pixels, tiny_cosa  # noqa: E402

LENGTHS = [5, 9, 3, 7, 12, 4]  # right-padded to 14 below: every row has padding


@pytest.fixture(scope="module")
def batch():
    ids, mask = captions(LENGTHS, seed=3, pad_to=14)
    return pixels(len(LENGTHS), frames=2, seed=4), ids, mask


def deterministic_model(**kw):
    """Next-token captioning and no MLM: every loss is a function of the generator's partner and negative draws,
    which both layouts make alike."""
    tasks = dict(origin_tasks=("itc", "itm"), concat_tasks=("itc", "itm", "cap"), caption_mode="next_token")
    return tiny_cosa(seed=1, **{**tasks, **kw})


def padded_forward(monkeypatch):
    monkeypatch.setattr(M, "pack_padded", functools.partial(C.pack_padded, keep_padding=True))


def test_pack_padded_layouts(batch):
    _, ids, mask = batch
    packed, padded = C.pack_padded(ids, mask), C.pack_padded(ids, mask, keep_padding=True)
    assert not packed.padded and padded.padded and len(padded) == len(packed) == len(LENGTHS)
    assert padded.lengths.tolist() == packed.lengths.tolist() == LENGTHS
    assert padded.extents.tolist() == [14] * len(LENGTHS) and padded.max_seqlen == 14
    assert torch.equal(padded.input_ids[padded.real()], packed.input_ids)
    assert torch.equal(padded.input_ids[padded.first], torch.full((len(LENGTHS),), CLS))
    x = torch.randn(len(padded.input_ids), 3)
    want = torch.where(mask.bool()[..., None], x.view(len(LENGTHS), 14, 3), 0.0)
    torch.testing.assert_close(C.unpack(x, padded, 14), want)
    torch.testing.assert_close(C.unpack(x[padded.real()], packed, 14), want)
    index = torch.tensor([4, 0, 4, 2])
    got, ref = C.select_segments(padded, index), C.select_segments(packed, index)
    assert (
        got.padded and torch.equal(got.input_ids[got.real()], ref.input_ids) and got.lengths.tolist() == [12, 5, 12, 3]
    )


@pytest.mark.parametrize("max_tokens", [40, 16])  # 16 cuts the later bodies
def test_concat_captions_padded_equals_packed(batch, max_tokens):
    _, ids, mask = batch
    packed, padded = C.pack_padded(ids, mask), C.pack_padded(ids, mask, keep_padding=True)
    members = torch.tensor([[0, 3, 4], [1, 1, 5], [2, 0, 3], [3, 4, 4], [4, 2, 1], [5, 0, 1]])
    ref = C.concat_captions(packed, members, max_tokens, CLS, SEP)
    got = C.concat_captions(padded, members, max_tokens, CLS, SEP, pad_id=0)
    assert got.text.padded and got.text.lengths.tolist() == ref.text.lengths.tolist()
    real = got.text.real()
    assert torch.equal(got.text.input_ids[real], ref.text.input_ids)
    assert torch.equal(got.member[real], ref.member)
    assert bool((got.text.input_ids[~real] == 0).all()) and bool((got.member[~real] == -1).all())


def test_masking_and_labels_in_the_padded_layout(batch):
    model = tiny_cosa(seed=1)
    _, ids, mask = batch
    padded = C.pack_padded(ids, mask, keep_padding=True)
    masked, labels = model._mask(padded, 0.5, generator=torch.Generator().manual_seed(0))
    picked = labels != -100
    real, pos = padded.real(), C.token_positions(padded)
    assert bool(picked.any()) and not bool((picked & ~real).any()) and not bool((picked & (pos == 0)).any())
    assert torch.equal(masked[~picked], padded.input_ids[~picked])
    assert bool((masked[picked] == MASK).any())
    next_labels = M.next_token_labels(padded)
    packed = C.pack_padded(ids, mask)
    has = next_labels != -100
    assert not bool((has & ~real).any())
    assert torch.equal(next_labels[real], M.next_token_labels(packed))


def test_encoders_equal_in_both_layouts(batch):
    model = tiny_cosa(seed=1)
    px, ids, mask = batch
    packed, padded = C.pack_padded(ids, mask), C.pack_padded(ids, mask, keep_padding=True)
    with torch.no_grad():
        features = model.encode_vision(px)
        torch.testing.assert_close(model.text_features(padded), model.text_features(packed))
        for mode in ("full", "causal"):
            got = model.joint(padded, features, mode)[padded.real()]
            torch.testing.assert_close(got, model.joint(packed, features, mode), atol=1e-5, rtol=1e-5)


def test_forward_losses_equal_in_both_layouts(batch, monkeypatch):
    model = deterministic_model()
    px, ids, mask = batch
    want = model(px, ids, mask, concat=3, generator=torch.Generator().manual_seed(5))
    padded_forward(monkeypatch)
    got = model(px, ids, mask, concat=3, generator=torch.Generator().manual_seed(5))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


def test_whole_forward_and_backward_compile_fullgraph(batch):
    """COSA's training forward (single-sample and concatenated passes, ITC, ITM with hard negatives, MLM, masked
    captioning) traced as one graph: no graph break; aot_eager's loss and gradients equal eager's on the padded
    layout under the same random state (the global generator: torch.Generator arguments are not traced)."""
    torch._dynamo.reset()
    model = tiny_cosa(seed=1)
    px, ids, mask = batch

    def loss(px, ids, mask):
        return model(px, ids, mask, concat=3)["loss"]

    explanation = torch._dynamo.explain(loss)(px, ids, mask)
    assert explanation.graph_break_count == 0, [b.reason.splitlines()[0] for b in explanation.break_reasons]

    def eager_padded(px, ids, mask):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(M, "pack_padded", functools.partial(C.pack_padded, keep_padding=True))
            return loss(px, ids, mask)

    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(11)
    eager = eager_padded(px, ids, mask)
    want = torch.autograd.grad(eager, params, allow_unused=True)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    got_loss = compiled(px, ids, mask)
    got = torch.autograd.grad(got_loss, params, allow_unused=True)
    torch.testing.assert_close(got_loss, eager, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
