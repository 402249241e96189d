"""Box helpers for evaluation: IoU of (x1, y1, x2, y2) boxes, COCO (x, y, w, h) -> corners, checks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Box = tuple[float, float, float, float]


def box_iou(boxes1, boxes2) -> torch.Tensor:
    """IoU of every pair: boxes1 (n, 4), boxes2 (m, 4) as (x1, y1, x2, y2) -> (n, m) float64.

    A box with no area (x2 <= x1 or y2 <= y1) overlaps nothing: its IoU is 0, also with itself (no 0 / 0)."""
    a = torch.as_tensor(boxes1, dtype=torch.float64).reshape(-1, 4)
    b = torch.as_tensor(boxes2, dtype=torch.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-300), torch.zeros_like(union))


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO ``[x, y, width, height]`` -> ``(x1, y1, x2, y2)``."""
    x, y, w, h = (float(v) for v in box)
    return x, y, x + w, y + h


def coco_box(bbox) -> Box | None:
    """COCO ``[x, y, width, height]`` (4 finite numbers, width and height > 0) -> ``(x1, y1, x2, y2)``; else None."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    box = xywh_to_xyxy(bbox)
    return box if valid_box(box) else None


def valid_box(box, *, normalised: bool = False) -> bool:
    """True for 4 finite numbers with x2 > x1 and y2 > y1 (and inside [0, 1] when ``normalised``)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return False
    x1, y1, x2, y2 = box
    if normalised and not all(0.0 <= v <= 1.0 for v in box):
        return False
    return x2 > x1 and y2 > y1
