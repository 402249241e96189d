"""Entities -> Kosmos-2 grounded text, and -> markdown links.

The inverse of ``extract_entities``: given clean text and entities ``(name, (start, end), boxes)`` (spans
in the clean text, boxes as normalised ``(x1, y1, x2, y2)`` or as ``(top_left, bottom_right)`` index
pairs), write the text the model reads and writes::

    An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming ...

or, for people, ``An image of [a snowman](0.39,0.05,0.98,0.83) warming ...``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmcore.grounding.entities import cell_pair_to_box
from mmcore.grounding.tokens import loc_token
from mmcore.ops.grounding import boxes_to_loc_indices

DELIMITER = "</delimiter_of_multi_objects/>"


def _spans(text: str, entities: Sequence) -> list[tuple[int, int, list]]:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    out = []
    for k, ent in enumerate(entities):
        try:
            _, (start, end), boxes = ent
        except (TypeError, ValueError):
            raise ValueError(f"entities[{k}] must be (name, (start, end), boxes), got {ent!r}") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(text)):
            raise ValueError(f"entities[{k}] has span ({start!r}, {end!r}) outside the text of length {len(text)}")
        out.append((start, end, list(boxes), k))
    out.sort(key=lambda s: (s[0], s[1]))
    for (s0, e0, _, k0), (s1, _, _, k1) in zip(out, out[1:], strict=False):
        if s1 < e0:
            raise ValueError(f"entities[{k0}] and entities[{k1}] overlap ({s0}:{e0} and {s1}:...)")
    return [(s, e, b) for s, e, b, _ in out]


def _index_pairs(boxes: list, num_bins: int, rounding: str) -> list[tuple[int, int]]:
    pairs, coords = [], []
    for box in boxes:
        if len(box) == 2:
            ul, lr = (int(v) for v in box)
            cells = num_bins * num_bins
            if not (0 <= ul < cells and 0 <= lr < cells):
                raise ValueError(f"index pair {tuple(box)} is outside the {num_bins}x{num_bins} grid [0, {cells})")
            pairs.append((ul, lr))
        elif len(box) == 4:
            pairs.append(None)
            coords.append(box)
        else:
            raise ValueError(f"a box is (x1, y1, x2, y2) or (top_left, bottom_right), got {box!r}")
    if coords:
        encoded = iter(boxes_to_loc_indices(torch.tensor(coords, dtype=torch.float64), num_bins, rounding).tolist())
        pairs = [p if p is not None else tuple(next(encoded)) for p in pairs]
    return pairs


def to_grounded_text(text: str, entities: Sequence, num_bins: int = 32, rounding: str = "hf") -> str:
    """Insert ``<phrase>…</phrase><object>…</object>`` tags for each entity into ``text``.

    A space just before a phrase moves inside it (``of<phrase> a snowman</phrase>``), as Kosmos-2 writes
    it; ``extract_entities`` of the result gives back ``text`` and the spans. An entity with an empty span
    becomes a bare ``<object>``; one with no boxes a bare phrase. Raises ValueError on overlapping spans,
    spans outside the text or invalid boxes.
    """
    parts, prev = [], 0
    for start, end, boxes in _spans(text, entities):
        pairs = _index_pairs(boxes, num_bins, rounding)
        phrase_start = start - 1 if start > prev and start < end and text[start - 1] == " " else start
        parts.append(text[prev:phrase_start])
        if start < end:
            parts.append(f"<phrase>{text[phrase_start:end]}</phrase>")
        if pairs:
            parts.append("<object>" + DELIMITER.join(loc_token(ul) + loc_token(lr) for ul, lr in pairs) + "</object>")
        prev = end
    parts.append(text[prev:])
    return "".join(parts)


def to_markdown(text: str, entities: Sequence, digits: int = 2, num_bins: int = 32) -> str:
    """Write each entity as a markdown link ``[span](x1,y1,x2,y2)``; several boxes are joined by ``;``.

    Boxes given as index pairs are decoded to their cells' coordinates on a ``num_bins`` grid."""
    parts, prev = [], 0
    for start, end, boxes in _spans(text, entities):
        coords = []
        for box in boxes:
            if len(box) == 2:
                box = cell_pair_to_box(*_index_pairs([box], num_bins, "hf")[0], num_bins)
            coords.append(",".join(f"{float(v):.{digits}f}" for v in box))
        parts.append(f"{text[prev:start]}[{text[start:end]}]({';'.join(coords)})")
        prev = end
    parts.append(text[prev:])
    return "".join(parts)


def grounded_text_to_markdown(grounded: str, num_bins: int = 32, digits: int = 2) -> str:
    """Model output -> markdown: ``extract_entities`` then ``to_markdown``."""
    from mmcore.grounding.entities import extract_entities

    return to_markdown(*extract_entities(grounded, num_bins), digits=digits)
