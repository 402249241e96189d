"""Entities -> grounded text / markdown, token ids, and round-trip properties (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index

from mmcore.grounding import (
    boxes_to_loc_indices,
    extract_entities,
    grounded_text_to_markdown,
    is_loc_token,
    loc_indices_to_boxes,
    loc_indices_to_token_ids,
    loc_token,
    loc_tokens,
    to_grounded_text,
    to_markdown,
    token_ids_to_loc_indices,
)

SNOWMAN_TEXT = "An image of a snowman warming himself by a fire."
SNOWMAN_ENTITIES = [
    ("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
    ("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)]),
]


def test_grounded_text_is_what_kosmos2_writes():
    got = to_grounded_text(SNOWMAN_TEXT, SNOWMAN_ENTITIES)
    assert got == (
        "An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
        " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
    )
    assert extract_entities(got) == (SNOWMAN_TEXT, SNOWMAN_ENTITIES)


def test_grounded_text_with_index_pairs_several_boxes_and_bare_objects():
    got = to_grounded_text("two dogs", [("two dogs", (0, 8), [(1, 34), (0.5, 0.5, 1.0, 1.0)]), ("", (8, 8), [(3, 4)])])
    assert got == (
        "<phrase>two dogs</phrase><object><patch_index_0001><patch_index_0034>"
        "</delimiter_of_multi_objects/><patch_index_0528><patch_index_1023></object>"
        "<object><patch_index_0003><patch_index_0004></object>"
    )


def test_markdown_links():
    assert (
        to_markdown(SNOWMAN_TEXT, SNOWMAN_ENTITIES)
        == "An image of [a snowman](0.39,0.05,0.98,0.83) warming himself by [a fire](0.17,0.02,0.48,0.89)."
    )
    grounded = to_grounded_text(SNOWMAN_TEXT, SNOWMAN_ENTITIES)
    assert grounded_text_to_markdown(grounded) == to_markdown(SNOWMAN_TEXT, SNOWMAN_ENTITIES)
    assert (
        to_markdown("dogs", [("dogs", (0, 4), [(0, 1023), (0.0, 0.0, 0.5, 0.5)])], digits=1)
        == "[dogs](0.0,0.0,1.0,1.0;0.0,0.0,0.5,0.5)"
    )


@pytest.mark.parametrize(
    ("entities", "match"),
    [
        ([("x", (3, 2), [])], "outside the text"),
        ([("x", (0, 99), [])], "outside the text"),
        ([("a", (0, 4), []), ("b", (2, 6), [])], "overlap"),
        ([("a", (0, 4))], r"must be \(name, \(start, end\), boxes\)"),
        ([("a", (0, 4), [(0.5, 0.5, 0.2, 0.9)])], "x2 > x1"),
        ([("a", (0, 4), [(0, 5000)])], "outside the 32x32 grid"),
        ([("a", (0, 4), [(0.1, 0.2, 0.3)])], r"\(x1, y1, x2, y2\) or \(top_left, bottom_right\)"),
    ],
)
def test_bad_entities_raise(entities, match):
    with pytest.raises(ValueError, match=match):
        to_grounded_text("some text", entities)


def test_location_tokens_and_ids():
    assert loc_token(44) == "<patch_index_0044>"
    assert len(loc_tokens()) == 1024 and loc_tokens()[-1] == "<patch_index_1023>"
    assert loc_indices_to_token_ids([44, 863]).tolist() == [64057, 64876]
    assert token_ids_to_loc_indices(torch.tensor([[64013, 65036]])).tolist() == [[0, 1023]]
    assert is_loc_token([64012, 64013, 65036, 65037]).tolist() == [False, True, True, False]
    assert loc_indices_to_token_ids([1], first_loc_token_id=10).tolist() == [11]
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 65037 is not a location token id"):
        token_ids_to_loc_indices([64013, 65037])
    with pytest.raises(ValueError, match=r"indices\[0, 1\] = 1024 is outside the 32x32 grid"):
        loc_indices_to_token_ids([[0, 1024]])
    with pytest.raises(TypeError, match="integers"):
        loc_indices_to_token_ids([0.5])
    with pytest.raises(ValueError, match="non-negative int"):
        loc_token(-1)


# ------------------------------------------------------------------------------------------ properties

coord = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def boxes(draw):
    x1, x2 = sorted((draw(coord), draw(coord)))
    y1, y2 = sorted((draw(coord), draw(coord)))
    if x2 == x1 or y2 == y1:
        x1, y1, x2, y2 = 0.0, 0.0, 0.5, 0.5
    return (x1, y1, x2, y2)


@settings(max_examples=300, deadline=None)
@given(st.lists(boxes(), min_size=1, max_size=20), st.sampled_from([32, 16, 64]), st.sampled_from(["hf", "unilm"]))
def test_encode_decode_encode_is_stable(bs, num_bins, rounding):
    # Decoded boxes lie on the grid, so re-encoding returns the same cells on a power-of-two grid.
    idx = boxes_to_loc_indices(bs, num_bins, rounding)
    again = boxes_to_loc_indices(loc_indices_to_boxes(idx, num_bins), num_bins, "hf")
    assert torch.equal(again, idx)
    if rounding == "hf":  # (boxes ending below 1e-15 are where mmcore clamps transformers' cell -1 to 0)
        assert all(
            idx.tolist()[i] == list(coordinate_to_patch_index(b, num_bins))
            for i, b in enumerate(bs)
            if min(b[2], b[3]) > 1e-15
        )


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.data())
def test_decode_encode_round_trips_every_ordered_pair(num_bins, data):
    uy, ly = sorted(data.draw(st.lists(st.integers(0, num_bins - 1), min_size=2, max_size=2)))
    ux, lx = sorted(data.draw(st.lists(st.integers(0, num_bins - 1), min_size=2, max_size=2)))
    pair = [uy * num_bins + ux, ly * num_bins + lx]
    box = loc_indices_to_boxes([pair], num_bins)
    # On grids that are not powers of two, cell edges are not exact binary fractions: floor(x1 * P) can land
    # one cell low. Centres (distinct row and column) are always safe; edges are exact for powers of two.
    if (ux != lx and uy != ly) or num_bins & (num_bins - 1) == 0:
        assert boxes_to_loc_indices(box, num_bins).tolist() == [pair]


words = st.lists(st.sampled_from(["a", "red", "dog", "by", "the", "sea", "é", "snow", "man"]), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(words, st.data())
def test_grounded_text_round_trips_through_extraction(ws, data):
    text = " ".join(ws) + "."
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == " "]
    chosen = sorted(set(data.draw(st.lists(st.sampled_from(range(len(ws))), max_size=4))))
    entities = []
    for k in chosen:
        start = starts[k]
        end = start + len(ws[k])
        b = data.draw(st.lists(boxes(), min_size=1, max_size=3))
        entities.append((text[start:end], (start, end), b))
    grounded = to_grounded_text(text, entities)
    clean, got = extract_entities(grounded)
    assert clean == text
    assert [(n, s) for n, s, _ in got] == [(n, s) for n, s, _ in entities]
    for (_, _, got_boxes), (_, _, want_boxes) in zip(got, entities, strict=True):
        expected = loc_indices_to_boxes(boxes_to_loc_indices(want_boxes)).tolist()
        assert [list(b) for b in got_boxes] == expected
