"""Metric math on hand-made predictions: IoU, REC accuracy, ANY-BOX recall, CIDEr-D (hand-computed values),
retrieval from scores and features; the MDETR readers on small files written here, bad entries counted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmcore.data.problems import Problems
from mmcore.eval import (
    any_box_recall,
    box_iou,
    cider_d,
    cosine_scores,
    flickr_prompt,
    load_flickr,
    load_refexp,
    phrase_hits,
    rec_accuracy,
    rec_prompt,
    retrieval_metrics,
    simple_tokenize,
)
from mmcore.models.cosa.retrieval import rank_metrics


def test_box_iou_hand_values():
    a = [(0, 0, 10, 10), (5, 5, 15, 15), (0, 0, 0, 0)]
    b = [(0, 0, 10, 10), (0, 0, 5, 20)]
    iou = box_iou(a, b)
    assert iou.shape == (3, 2) and iou.dtype == torch.float64
    assert iou[0, 0] == 1.0
    assert iou[1, 0] == pytest.approx(25 / 175)  # 5x5 overlap, 100 + 100 - 25
    assert iou[0, 1] == pytest.approx(50 / 150)  # 5x10 overlap, 100 + 100 - 50
    assert iou[1, 1] == 0.0  # touching at x = 5: no area
    assert iou[2].tolist() == [0.0, 0.0], "a box with no area overlaps nothing (no 0/0)"
    assert box_iou([(2, 2, 1, 1)], [(2, 2, 1, 1)]).item() == 0.0, "an inverted box has no area"


# ------------------------------------------------------------------------------------------ REC


def _refexp_file(path, entries, extra_images=(), extra_annotations=()):
    """MDETR refexp layout: one image entry (the expression) and one annotation (the box, xywh pixels) each."""
    images, annotations = [], []
    for i, (caption, bbox, dataset) in enumerate(entries):
        images.append({"file_name": f"COCO_train2014_{i:012d}.jpg", "height": 100, "width": 200, "id": i,
                       "original_id": 1000 + i, "caption": caption, "dataset_name": dataset,
                       "tokens_negative": [[0, len(caption)]]})  # fmt: skip
        annotations.append({"area": 1.0, "iscrowd": 0, "image_id": i, "category_id": 1, "id": i, "bbox": bbox,
                            "original_id": 5000 + i, "tokens_positive": [[0, len(caption)]]})  # fmt: skip
    data = {"info": {}, "licenses": [], "images": images + list(extra_images),
            "annotations": annotations + list(extra_annotations), "categories": []}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def test_rec_accuracy_first_box_only(tmp_path):
    entries = [("the man on the left", [10, 10, 40, 60], "refcoco"), ("red car", [100, 20, 50, 50], "refcoco"),
               ("dog", [0, 0, 20, 20], "refcoco+"), ("tree", [150, 0, 50, 100], "refcoco+")]  # fmt: skip
    examples = load_refexp(_refexp_file(tmp_path / "refcoco.json", entries))
    assert [e.box for e in examples][:2] == [(10, 10, 50, 70), (100, 20, 150, 70)], "xywh -> xyxy"
    predictions = [
        [(10, 10, 50, 70)],  # exact: right
        [(0, 0, 10, 10), (100, 20, 150, 70)],  # only the second box matches: wrong (first box counts)
        [(0, 0, 20, 14)],  # IoU 280/400 = 0.7: right
        [],  # nothing generated: wrong
    ]
    m = rec_accuracy(examples, predictions)
    assert (m["correct"], m["total"], m["accuracy"]) == (2, 4, 50.0)
    assert m["per_dataset"]["refcoco"]["accuracy"] == 50.0 and m["per_dataset"]["refcoco+"]["correct"] == 1
    # IoU exactly 0.5 counts (unilm: >= 0.5); just below does not
    half = [[(10, 10, 50, 70)], [(100, 20, 150, 45)], [(0, 0, 20, 9.9)], None]
    assert rec_accuracy(examples, half)["correct"] == 2
    with pytest.raises(ValueError, match="predictions"):
        rec_accuracy(examples, predictions[:3])


def test_rec_prompt():
    assert rec_prompt("  the man on the left ") == "<grounding><phrase> the man on the left</phrase>"


def test_refexp_bad_entries_counted(tmp_path):
    entries = [("ok", [1, 1, 5, 5], "refcoco"), ("zero width", [1, 1, 0, 5], "refcoco"),
               ("nan", [1, 1, float("nan"), 5], "refcoco"), ("short", [1, 1, 5], "refcoco")]  # fmt: skip
    extra_images = [{"id": 99, "caption": "no annotation", "file_name": "x.jpg", "height": 10, "width": 10},
                    {"id": 98, "file_name": "x.jpg", "height": 10, "width": 10}, "not an object"]  # fmt: skip
    path = _refexp_file(tmp_path / "bad.json", entries, extra_images, extra_annotations=[{"bbox": [0, 0, 1, 1]}])
    problems = Problems()
    examples = load_refexp(path, problems)
    assert [e.expression for e in examples] == ["ok"]
    assert problems["bad_box"] == 3 and problems["malformed_row"] == 4, problems.summary()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_refexp(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="no 'images'"):
        load_refexp(tmp_path / "list.json")


# ------------------------------------------------------------------------------------------ Flickr


def _flickr_file(path, sentences, bad=False):
    """MDETR separateGT layout: one image entry per sentence, one annotation per box with its phrases' spans."""
    images, annotations = [], []
    for i, (caption, phrases) in enumerate(sentences):
        spans = [[caption.index(p), caption.index(p) + len(p)] for p, _ in phrases]
        images.append({"file_name": f"{100 + i}.jpg", "height": 100, "width": 100, "id": i, "caption": caption,
                       "dataset_name": "flickr", "tokens_negative": [[0, len(caption)]], "sentence_id": 0,
                       "original_img_id": 100 + i, "tokens_positive_eval": [[s] for s in spans]})  # fmt: skip
        for span, (_, boxes) in zip(spans, phrases, strict=True):
            for b in boxes:
                annotations.append({"area": b[2] * b[3], "iscrowd": 0, "image_id": i, "category_id": 1,
                                    "id": len(annotations), "bbox": b, "tokens_positive": [span]})  # fmt: skip
    if bad:
        images[0]["tokens_positive_eval"].append([[500, 510]])  # outside the caption
        annotations.append({"image_id": 0, "bbox": "nope", "tokens_positive": [[0, 1]]})
        annotations.append({"bbox": [0, 0, 1, 1]})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def test_any_box_recall(tmp_path):
    sentences = [
        ("A man and two dogs play", [("A man", [[0, 0, 10, 10]]), ("two dogs", [[50, 50, 10, 10], [70, 70, 10, 10]])]),
        ("A tree", [("A tree", [[20, 20, 30, 30]])]),
    ]
    phrases = load_flickr(_flickr_file(tmp_path / "flickr.json", sentences))
    assert [p.phrase for p in phrases] == ["A man", "two dogs", "A tree"]
    assert phrases[1].boxes == ((50, 50, 60, 60), (70, 70, 80, 80)), "every box of the phrase is a target"
    far = (90, 0, 99, 9)
    predictions = [
        [(0, 0, 10, 10)],  # first box hits
        [far, far, (70, 70, 80, 80)],  # third box hits the second target: R@5, R@10 but not R@1
        [far] * 5 + [(20, 20, 50, 50)],  # sixth box: R@10 only
    ]
    m = any_box_recall(phrases, predictions)
    assert m == {"R@1": pytest.approx(100 / 3), "R@5": pytest.approx(200 / 3), "R@10": 100.0, "total": 3}
    assert phrase_hits(None, phrases[0].boxes) == {1: False, 5: False, 10: False}
    assert any_box_recall(phrases, [[], None, []])["R@10"] == 0.0
    assert flickr_prompt("A man and two dogs play", (10, 18)) == "<grounding>A man and  <phrase>two dogs</phrase>"


def test_flickr_bad_entries_counted(tmp_path):
    sentences = [("A man", [("A man", [[0, 0, 10, 10]])]), ("A cat", [("A cat", [[0, 0, 0, 10]])])]
    problems = Problems()
    phrases = load_flickr(_flickr_file(tmp_path / "bad.json", sentences, bad=True), problems)
    assert [p.phrase for p in phrases] == ["A man"]
    # a zero-width box and "nope": bad_box x2, the cat then has no box: bad_box; span outside + no image_id: malformed
    assert problems["bad_box"] == 3 and problems["malformed_row"] == 2, problems.summary()


# ------------------------------------------------------------------------------------------ CIDEr-D


def test_cider_single_image_is_zero():
    """With one image every n-gram has df = N = 1: idf log(1) - log(1) = 0, as pycocoevalcap."""
    assert cider_d(["a man rides a horse"], [["a man rides a horse"]]) == (0.0, [0.0])


def test_cider_hand_computed():
    # idf of every n-gram below is log 2 - log 1 (each occurs in one of the two images' references); it cancels in
    # the cosines. Image 1: candidate "a b", reference "a b c". Unigrams: dot 2, norms sqrt 2, sqrt 3. Bigrams
    # ("a b" vs "a b", "b c"): dot 1, norms 1, sqrt 2. Trigrams/4-grams: the candidate has none -> 0. Lengths
    # (bigram counts) 1 and 2: penalty exp(-1 / 72).
    s1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    # Image 2: identical unigram and bigram vectors: (1 + 1 + 0 + 0) / 4 * 10.
    mean, scores = cider_d(["a b", "d e"], [["a b c"], ["d e"]])
    assert scores == pytest.approx([s1, 5.0], abs=1e-12)
    assert mean == pytest.approx((s1 + 5.0) / 2, abs=1e-12)


def test_cider_clipping_and_references_averaged():
    # Candidate "a a b" vs reference "a b": unigram tf-idf (2L, L) vs (L, L); clipped dot min(2L, L) L + L L = 2 L^2
    # (unclipped would be 3 L^2), norms sqrt 5 L and sqrt 2 L. Bigrams ("a a", "a b") vs ("a b"): 1 / sqrt 2.
    # Lengths 2 vs 1: exp(-1 / 72). Second image: "c" vs "c": unigram cosine 1, no bigram -> 10 / 4.
    s1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
    _, scores = cider_d(["a a b", "c"], [["a b"], ["c"]])
    assert scores == pytest.approx([s1, 2.5], abs=1e-12)
    # Two references: the per-reference similarities are averaged. "c" vs "c" gives 1/4 * 10 and vs "x" gives 0; the
    # idf of "c" stays log 2 (df counts images, not references).
    _, scores = cider_d({"i1": "a a b", "i2": "c"}, {"i1": ["a b"], "i2": ["c", "x"]})
    assert scores[1] == pytest.approx(1.25, abs=1e-12)


def test_cider_length_penalty_sigma():
    # Same n-grams on both sides except a 13-word tail: the penalty depends on sigma only through the bigram gap.
    cand = "a b"
    ref = "a b " + " ".join(f"w{i}" for i in range(13))
    _, base = cider_d([cand, "z"], [[ref], ["z"]])
    _, wide = cider_d([cand, "z"], [[ref], ["z"]], sigma=1e9)
    assert base[0] / wide[0] == pytest.approx(math.exp(-(13**2) / 72), rel=1e-9)


def test_cider_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        cider_d(["a"], [[]])
    with pytest.raises(ValueError, match="same image ids"):
        cider_d({"a": "x"}, {"b": ["x"]})
    assert simple_tokenize("A man, riding a HORSE's back!") == "a man riding a horse's back"


# ------------------------------------------------------------------------------------------ retrieval


def test_retrieval_metrics_reuse_rank_metrics():
    torch.manual_seed(0)
    scores = torch.randn(12, 4)
    video_of_text = torch.arange(12) % 4  # 3 captions per video
    m = retrieval_metrics(scores, video_of_text)
    pos = video_of_text[:, None] == torch.arange(4)[None, :]
    assert m["t2v"] == rank_metrics(scores, pos) and m["v2t"] == rank_metrics(scores.t(), pos.t())
    eye = retrieval_metrics(torch.eye(5))
    assert eye["t2v"]["R@1"] == 100.0 and eye["v2t"]["median_rank"] == 1.0
    with pytest.raises(ValueError, match="video of each text"):
        retrieval_metrics(scores)


def test_cosine_scores_batched():
    t, v = torch.randn(7, 5), torch.randn(3, 5)
    ref = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).t()
    torch.testing.assert_close(cosine_scores(t, v, batch_size=2), ref)
