"""Referring expression comprehension (RefCOCO, RefCOCO+, RefCOCOg) as Kosmos-2 evaluates it.

Annotations: MDETR's preprocessed COCO-style JSON (``finetune_refcoco_val.json``, ``finetune_refcoco+_testA.json``,
``finetune_refcocog_test.json``, ...): one ``images`` entry per expression (``id``, ``file_name``, ``height``,
``width``, ``caption`` = the expression, ``dataset_name``) and one ``annotations`` entry per expression (``image_id``,
``bbox`` = [x, y, width, height] in pixels).

Protocol (shared/research/kosmos2.md section 2.4, unilm's ``refexp_evaluate.py``): the prompt is
``<grounding><phrase> {expression}</phrase>``; the prediction is the first box of the generated entities named like
the expression; it is correct when its IoU with the target is >= 0.5. No box (nothing generated for the phrase, or an
undecodable location sequence) counts as wrong.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmcore.data.problems import Problems
from mmcore.eval.boxes import Box, box_iou, coco_box, valid_box

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class RefExample:
    """One expression: its image, the target box (x1, y1, x2, y2) in pixels, the image size and the dataset name."""

    id: int
    file_name: str
    expression: str
    box: Box
    width: int
    height: int
    dataset: str


def rec_prompt(expression: str) -> str:
    """``<grounding><phrase> {expression}</phrase>`` (the model continues with ``<object>...``)."""
    return f"<grounding><phrase> {expression.strip()}</phrase>"


def _size(value) -> int | None:
    try:
        v = int(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def load_refexp(path: str | Path, problems: Problems | None = None) -> list[RefExample]:
    """Read an MDETR refexp JSON file. Entries that cannot be evaluated (no caption or file name, no size, no
    annotation, a bbox that is not 4 finite numbers with positive width and height) are skipped and counted in
    ``problems`` (``malformed_row``, ``bad_box``); a file that is not such JSON raises ValueError."""
    problems = problems if problems is not None else Problems()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not an MDETR/COCO annotation file (no 'images' list)")
    annotations = data.get("annotations")
    if not isinstance(annotations, list):
        raise ValueError(f"{path} is not an MDETR/COCO annotation file (no 'annotations' list)")
    box_of: dict = {}
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann:
            problems.note("malformed_row", f"annotations[{k}]: no image_id")
            continue
        box_of.setdefault(ann["image_id"], ann.get("bbox"))

    examples = []
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            problems.note("malformed_row", f"images[{k}] is not an object")
            continue
        caption, file_name = img.get("caption"), img.get("file_name")
        width, height = _size(img.get("width")), _size(img.get("height"))
        if not isinstance(caption, str) or not caption.strip() or not isinstance(file_name, str) or not file_name:
            problems.note("malformed_row", f"images[{k}]: no caption or file_name")
            continue
        if width is None or height is None:
            problems.note("malformed_row", f"images[{k}]: no positive width/height")
            continue
        if img.get("id") not in box_of:
            problems.note("malformed_row", f"images[{k}]: no annotation with image_id {img.get('id')!r}")
            continue
        box = coco_box(box_of[img["id"]])
        if box is None:
            problems.note("bad_box", f"images[{k}] (id {img['id']}): bbox {box_of[img['id']]!r}")
            continue
        dataset = img.get("dataset_name") if isinstance(img.get("dataset_name"), str) else "unknown"
        examples.append(RefExample(img["id"], file_name, caption, box, width, height, dataset))
    return examples


def rec_correct(predicted: Sequence[Box] | None, target: Box, threshold: float = IOU_THRESHOLD) -> bool:
    """True when the first predicted box (pixels) has IoU >= ``threshold`` with ``target``; no box is wrong."""
    if not predicted:
        return False
    first = predicted[0]
    if not valid_box(tuple(first)):
        return False
    return bool(box_iou([first], [target])[0, 0] >= threshold)


def rec_accuracy(
    examples: Sequence[RefExample], predictions: Sequence[Sequence[Box] | None], threshold: float = IOU_THRESHOLD
) -> dict:
    """Accuracy (percent) of ``predictions`` (per example: its predicted boxes (x1, y1, x2, y2) in pixels, in the order
    generated, or None) over all examples and per ``dataset_name``: ``{"accuracy", "correct", "total",
    "per_dataset": {name: {...}}}``."""
    if len(examples) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples")
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ex, pred in zip(examples, predictions, strict=True):
        per[ex.dataset][0] += rec_correct(pred, ex.box, threshold)
        per[ex.dataset][1] += 1
    correct, total = sum(c for c, _ in per.values()), sum(t for _, t in per.values())

    def entry(c: int, t: int) -> dict:
        return {"accuracy": 100.0 * c / t if t else 0.0, "correct": c, "total": t}

    return {**entry(correct, total), "per_dataset": {name: entry(*ct) for name, ct in sorted(per.items())}}
