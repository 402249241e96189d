"""GrIT reader: the training rules by hand (score, resize + centre crop remapping, 20% area, containment, the
grounded/plain draw), samples equal to the processor's output for the expected strings, streaming over JSONL and
parquet shards with DataLoader workers, the packed collator, and bad input counted without changing good samples."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from mmcore.data import grit_reader as gr
from mmcore.data.packing import collate_kosmos2_packed
from mmcore.data.problems import Problems
from mmcore.testing import make_kosmos2_tokenizer

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("transformers")

SIZE = 32  # the tiny processor's input size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    from mmcore.models.kosmos2 import Kosmos2Processor

    return Kosmos2Processor(make_kosmos2_tokenizer(), image_size=SIZE, num_image_tokens=3)


# ------------------------------------------------------------------------------------------ geometry


def test_resized_size():
    assert gr.resized_size(448, 224, 224) == (448, 224)  # shortest side already 224
    assert gr.resized_size(300, 600, 224) == (224, 448)
    assert gr.resized_size(640, 427, 224) == (335, 224)  # int(224 * 640 / 427) = int(335.7)


def test_centercrop_box_by_hand():
    # 448 x 224: no resize, the crop keeps x in [112, 336]
    assert gr.centercrop_box((0.25, 0.0, 0.75, 1.0), 448, 224, 224) == (0.0, 0.0, 1.0, 1.0)
    assert gr.centercrop_box((0.0, 0.0, 0.2, 1.0), 448, 224, 224) is None  # x in [0, 89.6]: outside
    # x in [89.6, 134.4] -> [0, 22.4] after the crop: half the area stays (>= 20%)
    assert gr.centercrop_box((0.2, 0.0, 0.3, 1.0), 448, 224, 224) == pytest.approx((0.0, 0.0, 0.1, 1.0))
    # x in [100.8, 123.2] -> [0, 11.2]: exactly half stays; keep 0.6 of it -> dropped with a 0.6 threshold
    assert gr.centercrop_box((0.225, 0.0, 0.275, 1.0), 448, 224, 224, drop_crop_threshold=0.6) is None
    # 300 x 600 -> 224 x 448, crop y in [112, 336]: y = 0.5 +- 0.125 of 448 = [168, 280] -> [56, 168]
    assert gr.centercrop_box((0.0, 0.375, 1.0, 0.625), 300, 600, 224) == pytest.approx((0.0, 0.25, 1.0, 0.75))


def test_resize_and_crop_matches_pil():
    image = PIL.new("RGB", (80, 40))
    image.putdata([(x * 3 % 256, y * 5 % 256, (x + y) % 256) for y in range(40) for x in range(80)])
    out = gr.resize_and_crop(image, SIZE)
    expected = image.resize((64, 32), PIL.Resampling.BICUBIC).crop((16, 0, 48, 32))
    assert out.size == (SIZE, SIZE) and np.array_equal(np.asarray(out), np.asarray(expected))


# ------------------------------------------------------------------------------------------ rules


CAPTION = "a dog in a field of flowers"


def test_rules_on_entries():
    entries = [
        [0, 27, 0.1, 0.1, 0.4, 0.4, 0.9],  # the expression: kept
        [0, 27, 0.5, 0.5, 0.9, 0.9, 0.7],  # second box of the same span: clustered
        [9, 27, 0.0, 0.6, 1.0, 1.0, 0.95],  # inside the first span: dropped in expression mode
        [20, 27, 0.2, 0.2, 0.3, 0.3, 0.64],  # below 0.65
        [20, 27, 0.2, 0.2, 0.3, 0.3, 0.65],  # exactly 0.65: kept (unilm drops score < 0.65) but contained
        [0, 5, -0.1, 0.0, 0.5, 0.5, 0.9],  # out of range
        [0, 99, 0.1, 0.1, 0.2, 0.2, 0.9],  # span past the caption
        [0, 5, 0.1, 0.1, 0.2],  # not 7 numbers
    ]
    problems, stats = Problems(), Counter()
    ents = gr.grounded_entities(CAPTION, entries, 64, 64, SIZE, problems=problems, stats=stats)
    assert ents == [(CAPTION, (0, 27), [pytest.approx((0.1, 0.1, 0.4, 0.4)), pytest.approx((0.5, 0.5, 0.9, 0.9))])]
    assert problems.summary()["counts"] == {"bad_entry": 1, "box_out_of_range": 1, "span_out_of_range": 1}
    assert stats["box_below_score"] == 1 and stats["span_contained"] == 2
    # phrase mode (noun chunks, disjoint): no containment rule
    chunks = [[0, 5, 0.1, 0.1, 0.4, 0.4, 0.9], [20, 27, 0.2, 0.2, 0.3, 0.3, 0.65]]
    assert [e[1] for e in gr.grounded_entities(CAPTION, chunks, 64, 64, SIZE, mode="phrase")] == [(0, 5), (20, 27)]
    # spans that overlap without nesting cannot both be tagged: the later one is dropped
    stats = Counter()
    overlap = [[0, 8, 0.1, 0.1, 0.4, 0.4, 0.9], [2, 12, 0.1, 0.1, 0.4, 0.4, 0.9]]
    assert [e[1] for e in gr.grounded_entities(CAPTION, overlap, 64, 64, SIZE, stats=stats)] == [(0, 8)]
    assert stats["span_overlapping"] == 1


def test_grounded_caption_uses_training_rounding():
    ents = [("a dog", (0, 5), [(0.25, 0.25, 0.5, 0.5)]), ("flowers", (20, 27), [(0.0, 0.0, 1.0, 1.0)])]
    text = gr.grounded_caption(CAPTION, ents)
    # (0.25, 0.25, 0.5, 0.5) -> (264, 528) with unilm's floor(min(x, 0.99999) * 32) (transformers gives 495)
    assert text == (
        "<grounding><phrase>a dog</phrase><object><patch_index_0264><patch_index_0528></object> in a field of"
        "<phrase> flowers</phrase><object><patch_index_0000><patch_index_1023></object>"
    )


def _row(key, caption=CAPTION, entries=None, image=None):
    entries = entries if entries is not None else [[0, 5, 0.25, 0.25, 0.5, 0.5, 0.9]]
    return {"key": key, "caption": caption, "width": 64, "height": 48, "noun_chunks": entries, "ref_exps": entries,
            "image": image or f"{key}.png"}  # fmt: skip


def test_sample_equals_processor_output(processor):
    image = PIL.new("RGB", (64, 48), (10, 120, 200))
    rng = random.Random(0)
    cfg = gr.GritConfig(grounded_probability=1.0)
    sample = gr.make_sample(_row("k"), image, processor, rng, cfg, Problems(), Counter())
    # 64 x 48 -> 42 x 32 (int(32 * 64 / 48)), crop x in [5, 37]: box x 0.25..0.5 of 42 = 10.5..21 -> 5.5..16
    box = gr.centercrop_box((0.25, 0.25, 0.5, 0.5), 64, 48, SIZE)
    assert box == pytest.approx((5.5 / 32, 0.25, 16 / 32, 0.5))
    text = gr.grounded_caption(CAPTION, [("a dog", (0, 5), [box])])
    enc = processor(images=[gr.resize_and_crop(image, SIZE)], text=[text], return_tensors="pt")
    eos = processor.tokenizer.eos_token_id
    assert sample["input_ids"].tolist() == enc["input_ids"][0].tolist() + [eos]
    assert sample["image_embeds_position_mask"].tolist() == enc["image_embeds_position_mask"][0].tolist() + [0]
    assert torch.equal(sample["pixel_values"], enc["pixel_values"][0]) and sample["grounded"]
    never = gr.GritConfig(grounded_probability=0.0)
    plain = gr.make_sample(_row("k"), image, processor, rng, never, Problems(), Counter())
    assert processor.tokenizer.decode(plain["input_ids"][-12:]).endswith("flowers</s>")
    assert not plain["grounded"]


# ------------------------------------------------------------------------------------------ streaming


def _shards(tmp_path, n_shards=4, rows_per_shard=5, bad=False):
    """JSONL shards with their images beside them; with ``bad``, malformed lines, a missing image and bad boxes."""
    paths, keys = [], []
    for s in range(n_shards):
        lines = []
        for r in range(rows_per_shard):
            key = f"{s:02d}{r:03d}"
            PIL.new("RGB", (40 + r, 32), (s * 40, r * 30, 100)).save(tmp_path / f"{key}.png")
            lines.append(json.dumps(_row(key)))
            keys.append(key)
        if bad:
            lines.insert(1, "{not json")
            lines.insert(2, json.dumps(_row(f"{s:02d}miss")))  # no image file
            lines.insert(3, json.dumps({"key": "x", "ref_exps": []}))  # no caption
            lines.insert(4, json.dumps(["a", "list"]))
            row = json.loads(lines[0])
            row["ref_exps"].append([0, 5, 0.5, 0.5, 1.5, 0.9, 0.9])  # out of range: dropped, row kept
            lines[0] = json.dumps(row)
        path = tmp_path / f"shard{s}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths, keys


def _key_ids(samples):
    return {s["key"]: (s["input_ids"].tolist(), s["grounded"]) for s in samples}


def test_stream_jsonl_with_workers(processor, tmp_path):
    paths, keys = _shards(tmp_path)
    ds = gr.GritDataset(paths, processor, seed=3, report=False)
    alone = list(ds)
    assert sorted(s["key"] for s in alone) == sorted(keys)
    assert ds.stats["samples"] == len(keys) and 0 < ds.stats["grounded"] < len(keys), "about half grounded"
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert _key_ids(loader) == _key_ids(alone), "each shard read once, samples independent of the worker"
    # the draw follows the seed; ranks split the shards
    other = _key_ids(gr.GritDataset(paths, processor, seed=4, report=False))
    assert [g for _, g in other.values()] != [g for _, g in _key_ids(alone).values()]
    ranks = [{s["key"] for s in gr.GritDataset(paths, processor, rank=r, world_size=2, report=False)} for r in (0, 1)]
    assert not ranks[0] & ranks[1] and ranks[0] | ranks[1] == set(keys)


def test_packed_collate(processor, tmp_path):
    paths, _ = _shards(tmp_path, n_shards=1, rows_per_shard=3)
    samples = list(gr.GritDataset(paths, processor, config=gr.GritConfig(grounded_probability=1.0), report=False))
    batch = collate_kosmos2_packed(
        samples, image_end_id=processor.tokenizer.convert_tokens_to_ids("</image>"), latent_query_num=3
    )
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert batch["cu_seqlens"].tolist()[-1] == sum(len(s["input_ids"]) for s in samples)
    assert int(batch["image_embeds_position_mask"].sum()) == 9


def test_parquet_shard(processor, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    paths, keys = _shards(tmp_path, n_shards=1, rows_per_shard=4)
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    for r in rows:  # as in GrIT's parquet: every entry value a double
        r["ref_exps"] = [[float(v) for v in e] for e in r["ref_exps"]]
        r["noun_chunks"] = r["ref_exps"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shard.parquet", row_group_size=2)
    from_parquet = _key_ids(gr.GritDataset([tmp_path / "shard.parquet"], processor, seed=1, report=False))
    assert from_parquet == _key_ids(gr.GritDataset(paths, processor, seed=1, report=False))


def test_bad_input_counted_not_fatal(processor, tmp_path, capsys):
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good_paths, keys = _shards(tmp_path / "good", n_shards=2, rows_per_shard=3)
    bad_paths, _ = _shards(tmp_path / "bad", n_shards=2, rows_per_shard=3, bad=True)
    ds = gr.GritDataset(bad_paths, processor, seed=5, config=gr.GritConfig(grounded_probability=1.0))
    bad = _key_ids(ds)
    good = _key_ids(gr.GritDataset(good_paths, processor, seed=5, config=gr.GritConfig(grounded_probability=1.0),
                                   report=False))  # fmt: skip
    assert bad == good, "the good rows' samples do not change (the out-of-range box is dropped, the row kept)"
    counts = ds.summary()["problems"]["counts"]
    assert counts == {"box_out_of_range": 2, "malformed_row": 6, "missing_image": 2}
    line = capsys.readouterr().err
    assert "6 samples (6 grounded)" in line and "2 missing_image" in line and "6 malformed_row" in line


def test_dataset_argument_errors(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such shard"):
        gr.GritDataset([tmp_path / "nope.jsonl"], processor)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=".jsonl, .json or .parquet"):
        gr.GritDataset([tmp_path / "x.txt"], processor)
    with pytest.raises(ValueError, match="mode"):
        gr.GritConfig(mode="words")
