"""``mmcore eval`` end to end: a tiny random Kosmos-2 checkpoint, annotation files in MDETR's formats and images
written here. Targets are set from the boxes the model generates (through the Python API, batch size 1), so the
expected accuracy and recall are known; missing images and malformed entries are counted, never fatal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmcore import cli
from mmcore.eval.kosmos2 import PhraseQuery, generate_phrase_boxes, to_pixels
from mmcore.eval.refexp import rec_prompt

PIL = pytest.importorskip("PIL.Image")

W, H = 64, 48
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
EXPRESSIONS = ["a dog", "the red ball", "a man in a blue shirt", "the cat"]
FAR = [W - 3, H - 3, 2, 2]  # xywh: a small corner box no generated box overlaps by half (checked below)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "train2014").mkdir()
    for i, color in enumerate(COLORS):
        PIL.new("RGB", (W, H), color).save(root / "train2014" / f"COCO_train2014_{i:012d}.jpg")
    return root


@pytest.fixture(scope="module")
def generated(kosmos2_checkpoint, images):
    """The normalised boxes the tiny model generates for each expression (batch size 1)."""
    from mmcore.models.kosmos2.ground import load

    model, processor = load(str(kosmos2_checkpoint))
    queries = [PhraseQuery(images / "train2014" / f"COCO_train2014_{i:012d}.jpg", rec_prompt(e), e)
               for i, e in enumerate(EXPRESSIONS)]  # fmt: skip
    return list(generate_phrase_boxes(model, processor, queries, batch_size=1, progress=False, constrain_boxes=True))


def _xywh(box):
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


def test_rec_end_to_end(kosmos2_checkpoint, images, generated, tmp_path, capsys):
    assert all(g is not None for g in generated)
    images_json, annotations = [], []
    expected = []
    for i, (expr, boxes) in enumerate(zip(EXPRESSIONS, generated, strict=True)):
        pixels = to_pixels(boxes, W, H)
        hit = i % 2 == 0 and bool(pixels)
        bbox = _xywh(pixels[0]) if hit else FAR
        expected.append(hit)
        images_json.append({"file_name": f"COCO_train2014_{i:012d}.jpg", "height": H, "width": W, "id": i,
                            "caption": expr, "dataset_name": "refcoco"})  # fmt: skip
        annotations.append({"image_id": i, "id": i, "bbox": bbox, "category_id": 1})
    # bad input: an image that is not there, an entry without a caption, an annotation without image_id
    images_json.append({"file_name": "COCO_train2014_missing.jpg", "height": H, "width": W, "id": 10,
                        "caption": "ghost", "dataset_name": "refcoco"})  # fmt: skip
    annotations.append({"image_id": 10, "id": 10, "bbox": [1, 1, 5, 5]})
    images_json.append({"file_name": "x.jpg", "height": H, "width": W, "id": 11})
    annotations.append({"bbox": [1, 1, 5, 5]})
    ann = tmp_path / "finetune_refcoco_val.json"
    ann.write_text(json.dumps({"images": images_json, "annotations": annotations}))

    out, preds = tmp_path / "report.json", tmp_path / "preds.jsonl"
    argv = ["eval", "rec", "--checkpoint", str(kosmos2_checkpoint), "--annotations", str(ann), "--images",
            str(images), "--out", str(out), "--predictions", str(preds), "--batch-size", "3",
            "--constrain-boxes"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert (m["correct"], m["total"]) == (sum(expected), 4), "batched CLI run == one-by-one generation"
    assert report["examples"] == 5 and report["evaluated"] == 4
    assert report["problems"]["counts"] == {"malformed_row": 2, "missing_image": 1}
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["correct"] for r in rows] == expected
    assert [r["boxes"] for r in rows] == [[list(b) for b in to_pixels(g, W, H)] for g in generated]
    captured = capsys.readouterr()
    assert captured.out.startswith("rec: accuracy") and "missing_image" in captured.err


def test_flickr_end_to_end(kosmos2_checkpoint, images, tmp_path):
    caption = "a dog and the red ball"
    spans = [(0, 5), (10, 22)]
    images_json = [{"file_name": "train2014/COCO_train2014_000000000000.jpg", "height": H, "width": W, "id": 0,
                    "caption": caption, "sentence_id": 0, "original_img_id": 7,
                    "tokens_positive_eval": [[list(s)] for s in spans]},
                   {"file_name": "gone.jpg", "height": H, "width": W, "id": 1, "caption": caption,
                    "tokens_positive_eval": [[list(spans[0])]]}]  # fmt: skip
    from mmcore.eval.flickr import flickr_prompt
    from mmcore.models.kosmos2.ground import load

    model, processor = load(str(kosmos2_checkpoint))
    queries = [PhraseQuery(images / images_json[0]["file_name"], flickr_prompt(caption, s), caption[s[0] : s[1]])
               for s in spans]  # fmt: skip
    gen = list(generate_phrase_boxes(model, processor, queries, max_new_tokens=64, progress=False, batch_size=1))
    # The first phrase's target is its first generated box (when any), the second's a far corner box.
    first = to_pixels(gen[0], W, H)
    targets = [_xywh(first[0]) if first else FAR, FAR]
    annotations = [{"image_id": 0, "id": j, "bbox": targets[j], "tokens_positive": [list(spans[j])]} for j in range(2)]
    annotations.append({"image_id": 1, "id": 2, "bbox": FAR, "tokens_positive": [list(spans[0])]})
    ann = tmp_path / "final_flickr_separateGT_val.json"
    ann.write_text(json.dumps({"images": images_json, "annotations": annotations}))
    out = tmp_path / "flickr.json"
    argv = ["eval", "flickr", "--checkpoint", str(kosmos2_checkpoint), "--annotations", str(ann), "--images",
            str(images), "--out", str(out), "--batch-size", "2", "--quiet", "--constrain-boxes"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["evaluated"] == 2 and report["problems"]["counts"] == {"missing_image": 1}
    assert report["metrics"]["total"] == 2
    far_hit = any(b[0] > 0.9 * W and b[1] > 0.9 * H for b in to_pixels(gen[1], W, H))
    assert report["metrics"]["R@10"] == 50.0 * bool(first) + 50.0 * far_hit


def test_retrieval_cli(tmp_path, capsys):
    torch.manual_seed(0)
    text, video = torch.randn(6, 8), torch.randn(3, 8)
    np.save(tmp_path / "t.npy", text.numpy())
    torch.save(video, tmp_path / "v.pt")
    (tmp_path / "map.json").write_text(json.dumps([0, 0, 1, 1, 2, 2]))
    out = tmp_path / "ret.json"
    argv = ["eval", "retrieval", "--text-features", str(tmp_path / "t.npy"), "--video-features",
            str(tmp_path / "v.pt"), "--video-of-text", str(tmp_path / "map.json"), "--out", str(out),
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    from mmcore.eval.retrieval import cosine_scores, retrieval_metrics

    expected = retrieval_metrics(cosine_scores(text, video), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert json.loads(out.read_text())["metrics"] == expected
    assert "t2v: R@1" in capsys.readouterr().out
    # scores directly; errors are one line, exit code 2
    np.save(tmp_path / "s.npy", np.eye(4, dtype=np.float32))
    assert cli.main(["eval", "retrieval", "--scores", str(tmp_path / "s.npy"), "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["metrics"]["t2v"]["R@1"] == 100.0
    assert cli.main(["eval", "retrieval", "--scores", str(tmp_path / "nope.npy"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["eval", "retrieval", "--scores", str(tmp_path / "s.npy"), "--video-of-text",
                     str(tmp_path / "map.json"), "--out", str(out)]) == 2  # fmt: skip
    assert "maps 6 texts" in capsys.readouterr().err
