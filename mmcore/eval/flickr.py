"""Flickr30k Entities phrase grounding, the ANY-BOX protocol, as Kosmos-2 evaluates it.

Annotations: MDETR's preprocessed ``final_flickr_separateGT_{val,test}.json``. Each ``images`` entry is one sentence
(``id``, ``file_name``, ``height``, ``width``, ``caption``, ``original_img_id``, ``sentence_id``,
``tokens_positive_eval`` = one ``[[start, end]]`` character span per phrase that has boxes); each ``annotations``
entry is one box (``image_id``, ``bbox`` = [x, y, width, height] in pixels, ``tokens_positive`` = the spans of the
phrases it belongs to).

Protocol (shared/research/kosmos2.md section 2.4; unilm's ``flickr_entities_evaluate.py``): one query per phrase,
prompt ``<grounding>{caption before the phrase} <phrase>{phrase}</phrase>``; the predictions are the boxes of the
generated entities named like the phrase, in order. ANY-BOX: R@k counts a phrase as found when any of its first k
predicted boxes has IoU >= 0.5 with any of its ground-truth boxes.

NOTE: unilm reads the ground-truth boxes from the Flickr30k Entities XML files; here they come from the MDETR JSON,
whose preprocessing keeps one box of each group of a sentence's boxes that overlap with IoU >= 0.95. Recall can differ
from unilm's only for phrases whose boxes were such near-duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmcore.data.problems import Problems
from mmcore.eval.boxes import Box, box_iou, coco_box
from mmcore.eval.refexp import IOU_THRESHOLD, _size

RECALL_AT = (1, 5, 10)


@dataclass(frozen=True)
class FlickrPhrase:
    """One phrase of one sentence: its image, the sentence, the phrase's character span and its ground-truth boxes
    (x1, y1, x2, y2) in pixels."""

    image_id: int
    original_img_id: int | str | None
    sentence_id: int | None
    file_name: str
    caption: str
    span: tuple[int, int]
    boxes: tuple[Box, ...]
    width: int
    height: int

    @property
    def phrase(self) -> str:
        return self.caption[self.span[0] : self.span[1]]


def flickr_prompt(caption: str, span: tuple[int, int]) -> str:
    """``<grounding>{caption[:start]} <phrase>{caption[start:end]}</phrase>``, as unilm's ``cook_data.py``."""
    start, end = span
    return f"<grounding>{caption[:start]} <phrase>{caption[start:end]}</phrase>"


def _span(value) -> tuple[int, int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value):
        return int(value[0]), int(value[1])
    return None


def load_flickr(path: str | Path, problems: Problems | None = None) -> list[FlickrPhrase]:
    """Read an MDETR Flickr30k Entities JSON file: one ``FlickrPhrase`` per entry of ``tokens_positive_eval``.
    Sentences or phrases that cannot be evaluated (no caption, no size, a span outside the caption, a phrase without
    a valid box) are skipped and counted in ``problems``; a file that is not such JSON raises ValueError."""
    problems = problems if problems is not None else Problems()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not an MDETR/COCO annotation file (no 'images' list)")
    if not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} is not an MDETR/COCO annotation file (no 'annotations' list)")

    boxes_of: dict = {}  # image id -> {span: [boxes]}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("tokens_positive"), list):
            problems.note("malformed_row", f"annotations[{k}]: no image_id or tokens_positive")
            continue
        box = coco_box(ann.get("bbox"))
        if box is None:
            problems.note("bad_box", f"annotations[{k}]: bbox {ann.get('bbox')!r}")
            continue
        per_span = boxes_of.setdefault(ann["image_id"], {})
        for s in ann["tokens_positive"]:
            span = _span(s)
            if span is not None:
                per_span.setdefault(span, []).append(box)

    phrases = []
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            problems.note("malformed_row", f"images[{k}] is not an object")
            continue
        caption, file_name = img.get("caption"), img.get("file_name")
        width, height = _size(img.get("width")), _size(img.get("height"))
        evals = img.get("tokens_positive_eval")
        if not isinstance(caption, str) or not isinstance(file_name, str) or not isinstance(evals, list):
            problems.note("malformed_row", f"images[{k}]: no caption, file_name or tokens_positive_eval")
            continue
        if width is None or height is None:
            problems.note("malformed_row", f"images[{k}]: no positive width/height")
            continue
        per_span = boxes_of.get(img.get("id"), {})
        for j, spans in enumerate(evals):
            span = _span(spans[0]) if isinstance(spans, list) and spans else None
            if span is None or not 0 <= span[0] < span[1] <= len(caption):
                problems.note("malformed_row", f"images[{k}].tokens_positive_eval[{j}] = {spans!r}")
                continue
            gt = per_span.get(span)
            if not gt:
                problems.note("bad_box", f"images[{k}]: phrase {caption[span[0] : span[1]]!r} has no valid box")
                continue
            phrases.append(
                FlickrPhrase(
                    img.get("id"),
                    img.get("original_img_id"),
                    img.get("sentence_id"),
                    file_name,
                    caption,
                    span,
                    tuple(gt),
                    width,
                    height,
                )
            )
    return phrases


def phrase_hits(predicted: Sequence[Box] | None, targets: Sequence[Box], ks=RECALL_AT, threshold=IOU_THRESHOLD):
    """{k: bool}: whether any of the first k ``predicted`` boxes has IoU >= ``threshold`` with any target."""
    boxes = [tuple(b) for b in (predicted or ()) if b is not None and len(b) == 4]
    if not boxes:
        return {k: False for k in ks}
    best = box_iou(boxes, targets).amax(1) >= threshold  # (predicted,): this box matches some target
    hit_at = best.cumsum(0) > 0
    return {k: bool(hit_at[min(k, len(boxes)) - 1]) for k in ks}


def any_box_recall(
    phrases: Sequence[FlickrPhrase],
    predictions: Sequence[Sequence[Box] | None],
    ks: Sequence[int] = RECALL_AT,
    threshold: float = IOU_THRESHOLD,
) -> dict:
    """ANY-BOX recall (percent) of ``predictions`` (per phrase: its predicted boxes (x1, y1, x2, y2) in pixels, in the
    order generated, or None): ``{"R@1": ..., "R@5": ..., "R@10": ..., "total": n}``."""
    if len(phrases) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(phrases)} phrases")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    found = dict.fromkeys(ks, 0)
    for phrase, pred in zip(phrases, predictions, strict=True):
        for k, hit in phrase_hits(pred, phrase.boxes, ks, threshold).items():
            found[k] += hit
    n = len(phrases)
    return {**{f"R@{k}": 100.0 * found[k] / n if n else 0.0 for k in ks}, "total": n}
