"""Pictures of grounded output: an image with labelled boxes, one colour per entity."""

from __future__ import annotations

from collections.abc import Sequence

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
)


def draw_entities(image, entities: Sequence, *, line_width: int | None = None, extra_boxes: Sequence = ()):
    """A copy of ``image`` (PIL) with each entity's boxes drawn and labelled with its name.

    entities: ``[(name, (start, end), [(x1, y1, x2, y2), ...]), ...]`` with coordinates normalised to [0, 1] (what
    ``mmcore.grounding.extract_entities`` returns). extra_boxes: ``[(label, (x1, y1, x2, y2), (r, g, b))]`` drawn
    in their own colour (e.g. ground-truth boxes)."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = line_width or max(1, round(min(w, h) / 100))

    def box(label, coords, color):
        x1, y1, x2, y2 = (float(c) for c in coords)
        xy = [x1 * w, y1 * h, max(x1 * w, x2 * w), max(y1 * h, y2 * h)]
        draw.rectangle(xy, outline=color, width=width)
        if label:
            left, top, right, bottom = draw.textbbox((xy[0], xy[1]), label)
            y = xy[1] - (bottom - top) - 2 if xy[1] - (bottom - top) - 2 >= 0 else xy[1]
            draw.rectangle([xy[0], y, xy[0] + (right - left) + 4, y + (bottom - top) + 2], fill=color)
            draw.text((xy[0] + 2, y), label, fill=(255, 255, 255))

    for i, (name, _span, boxes) in enumerate(entities):
        for coords in boxes:
            box(name, coords, PALETTE[i % len(PALETTE)])
    for label, coords, color in extra_boxes:
        box(label, coords, color)
    return out
