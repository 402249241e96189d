"""mmcore demo: the synthetic shapes (boxes match the pixels, determinism), the demo's encoding against the
processor, and a shortened run end to end through the command line."""

import json
import types

import numpy as np
import pytest
import torch

from mmcore.demo import data
from mmcore.grounding import boxes_to_loc_indices, cell_pair_to_box

pytest.importorskip("PIL")


def _scenes(n=150):
    return [data.scene(split, seed, i) for split in data.SPLITS for seed in (0, 7) for i in range(n)]


def _check_pixels(scene):
    """The drawn pixels of each shape span exactly its box, and nothing is drawn outside the boxes."""
    pixels = np.asarray(scene.image())
    drawn = (pixels != data.BACKGROUND).any(-1)
    covered = np.zeros_like(drawn)
    for shape in scene.shapes:
        x1, y1, x2, y2 = shape.box
        covered[y1:y2, x1:x2] = True
        # a ring one pixel wide around the box: other shapes are at least data.GAP away, so only this shape's colour
        # can be there, and it must not be
        lo_x, lo_y = max(0, x1 - 1), max(0, y1 - 1)
        region = (pixels[lo_y : y2 + 1, lo_x : x2 + 1] == data.COLORS[shape.color]).all(-1)
        ys, xs = np.nonzero(region)
        assert len(xs), f"{shape} is not drawn"
        got = (int(xs.min()) + lo_x, int(ys.min()) + lo_y, int(xs.max()) + lo_x + 1, int(ys.max()) + lo_y + 1)
        assert got == shape.box, f"{shape}: its pixels span {got}, its box is {shape.box}"
    outside = drawn & ~covered
    assert not outside.any(), f"pixels drawn outside every box, e.g. (y, x) = {np.argwhere(outside)[0].tolist()}"


def test_boxes_match_drawn_pixels():
    for scene in _scenes():
        _check_pixels(scene)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_boxes_match_drawn_pixels_other_sizes(size):
    for i in range(100):
        _check_pixels(data.scene("train", 1, i, image_size=size))


def test_scenes_are_valid():
    counts = set()
    for scene in _scenes():
        assert 1 <= len(scene.shapes) <= 3
        counts.add(len(scene.shapes))
        names = [s.name for s in scene.shapes]
        assert len(set(names)) == len(names), f"two shapes share a name: {names}"
        for a in scene.shapes:
            assert a.kind in data.KINDS and a.color in data.COLORS
            side = a.box[2] - a.box[0]
            assert a.box[3] - a.box[1] == side and 16 <= side <= 28
            for b in scene.shapes:
                if a is not b:
                    assert data._apart(a.box, b.box), f"{a} and {b} overlap or touch"
    assert counts == {1, 2, 3}


def test_deterministic_per_seed_and_split():
    a, b = data.scene("train", 3, 42), data.scene("train", 3, 42)
    assert a == b and a.image().tobytes() == b.image().tobytes()
    train = [data.scene("train", 3, i) for i in range(50)]
    assert train != [data.scene("heldout", 3, i) for i in range(50)]
    assert train != [data.scene("train", 4, i) for i in range(50)]
    stream = data.scenes("train", 3, start=10)
    assert [next(stream) for _ in range(5)] == train[10:15]
    with pytest.raises(ValueError, match="split"):
        data.scene("test", 0, 0)


def test_caption_and_expressions():
    scene = data.Scene(
        64,
        (
            data.Shape("square", "blue", (40, 40, 60, 60)),
            data.Shape("circle", "red", (2, 4, 22, 24)),
            data.Shape("triangle", "green", (30, 2, 50, 22)),
        ),
    )
    text, boxes = scene.caption()
    assert text == (
        "<grounding><phrase> a red circle</phrase> left of<phrase> a green triangle</phrase> above"
        "<phrase> a blue square</phrase>"
    )
    assert boxes == [
        (2 / 64, 4 / 64, 22 / 64, 24 / 64),
        (30 / 64, 2 / 64, 50 / 64, 22 / 64),
        (40 / 64, 40 / 64, 60 / 64, 60 / 64),
    ]
    assert scene.text() == "a red circle left of a green triangle above a blue square"
    assert scene.expressions()[1] == ("<grounding><phrase> the red circle</phrase>", boxes[0])
    assert {w for e, _ in scene.expressions() for w in e.split("<phrase>")[1][:-9].split()} <= set(data.words())


def test_true_cells_decode_to_a_hit():
    """With the default sizes on a 16 x 16 grid, the true location tokens decode to IoU >= 0.5: a perfect model
    scores 1.0."""
    from mmcore.eval.boxes import box_iou

    for scene in _scenes(100):
        for _, box in scene.expressions():
            tl, br = boxes_to_loc_indices(torch.tensor([box], dtype=torch.float64), 16, rounding="hf")[0].tolist()
            assert box_iou([cell_pair_to_box(tl, br, 16)], [box])[0, 0] >= 0.5, box


def test_encoder_matches_processor():
    pytest.importorskip("transformers")
    from mmcore.demo.kosmos2 import DemoConfig, Encoder, build_processor
    from mmcore.ops import GroundingTokens

    config = DemoConfig(latent_query_num=16)
    processor = build_processor(config)
    encoder = Encoder(processor)
    scenes = [data.scene("train", 0, i) for i in range(8)]
    pairs = [s.caption() for s in scenes] + [(t, [b]) for s in scenes for t, b in s.expressions()]
    texts, boxes = [t for t, _ in pairs], [b for _, b in pairs]
    images = [s.image() for s in scenes] + [s.image() for s in scenes for _ in s.shapes]
    ref = processor(images=images, text=texts, bboxes=boxes, return_tensors=None)
    pad = processor.tokenizer.pad_token_id
    rows = encoder.ids(texts, boxes)
    for row, want, mask in zip(rows, ref["input_ids"], ref["image_embeds_position_mask"], strict=True):
        # the processor right-pads a batch to its longest row; the encoder appends </s> instead
        assert row[-1] == processor.tokenizer.eos_token_id
        assert row[:-1] == want[: len(row) - 1] and set(want[len(row) - 1 :]) <= {pad}
        assert encoder.image_mask == mask[: len(encoder.image_mask)] and not any(mask[len(encoder.image_mask) :])
    assert "<unk>" not in processor.tokenizer.convert_ids_to_tokens(rows[-1])
    text_config = types.SimpleNamespace(vocab_size=len(processor.tokenizer), eos_token_id=2, pad_token_id=1)
    assert GroundingTokens.from_config(text_config, num_bins=16) == processor.grounding_tokens()


def test_demo_end_to_end(tmp_path, monkeypatch):
    """``mmcore demo`` through the command line on a tiny model: writes metrics, pictures and the curve."""
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    import functools

    from mmcore import cli
    from mmcore.demo import kosmos2

    tiny = functools.partial(
        kosmos2.DemoConfig,
        width=32,
        heads=2,
        vision_layers=1,
        text_layers=1,
        latent_query_num=8,
        token_budget=512,
        warmup_steps=5,
        eval_every=10,
        curve_expressions=8,
        eval_expressions=16,
        pictures=2,
    )
    monkeypatch.setattr(kosmos2, "DemoConfig", tiny)
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        argv = ["demo", "--out", str(out), "--steps", "20", "--blind-steps", "5", "--seed", "1", "--threads", "1"]
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("rec_accuracy", "blind_accuracy", "caption_exact", "caption_box_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["steps"] == 20 and metrics["blind_steps"] == 5 and metrics["seconds"] > 0
    assert metrics["rec_expressions"] == 16 and [c["step"] for c in metrics["curve"]] == [10, 20]
    assert len(metrics["captions"]) == 2
    for name in metrics["files"]:
        assert (out / name).stat().st_size > 0, name
    assert {"learning_curve.png", "examples.png", "caption_0.png", "rec_1.png"} <= set(metrics["files"])


def test_curriculum_ramps_over_each_runs_own_steps():
    """One shape first, up to max_shapes after the curriculum's share of the run: the blind baseline's shorter run
    ramps over its own steps, so it trains on the same mix of scenes as the model."""
    from mmcore.demo.kosmos2 import DemoConfig, max_shapes_at

    config = DemoConfig(curriculum=0.4, max_shapes=3)
    assert [max_shapes_at(config, s, 3000) for s in (0, 399, 400, 799, 800, 2999)] == [1, 1, 2, 2, 3, 3]
    assert [max_shapes_at(config, s, 750) for s in (0, 99, 100, 200, 749)] == [1, 1, 2, 3, 3]
    assert max_shapes_at(DemoConfig(curriculum=0.0), 0, 3000) == 3
