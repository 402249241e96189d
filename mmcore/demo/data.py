"""Synthetic grounding data for the demo: coloured shapes drawn with PIL, grounded captions, referring expressions.

A scene is one to ``max_shapes`` shapes (circle, square, triangle, diamond) of different colours and sizes on a
white square, no two overlapping and no two of the same colour and kind, so every shape has a unique referring
expression ("the red circle"). Each scene gives

- an image (``Scene.image()``), each shape filling its box exactly: the drawn pixels of a shape span
  ``[x1, x2) x [y1, y2)`` in pixels, touching all four sides (tests/demo/test_demo.py checks this);
- a grounded caption in the processor's format, the shapes from left to right with the relation between
  neighbours: ``"<grounding><phrase> a red circle</phrase> above<phrase> a blue square</phrase>"`` with one
  normalised box per phrase (``Scene.caption()``);
- one referring expression per shape: ``("<grounding><phrase> the blue square</phrase>", box)``
  (``Scene.expressions()``).

Scenes are deterministic: scene ``index`` of split ``split`` under ``seed`` is drawn from its own
``random.Random`` seeded with the string ``"mmcore-shapes/{split}/{seed}/{index}"`` (string seeds hash with
SHA-512, the same in every process), so the train and held-out splits come from disjoint seeds and any scene can
be rebuilt from its index alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
}
KINDS = ("circle", "square", "triangle", "diamond")
BACKGROUND = (255, 255, 255)
GAP = 2  # pixels between two shapes' boxes, so no shape touches another
SPLITS = ("train", "heldout")


def words() -> list[str]:
    """Every word a caption or an expression uses, sorted (the demo tokenizer's vocabulary)."""
    return sorted({*COLORS, *KINDS, "a", "the", "left", "of", "above", "below"})


@dataclass(frozen=True)
class Shape:
    """kind: one of ``KINDS``; color: a key of ``COLORS``; box: ``(x1, y1, x2, y2)`` pixels, x2/y2 exclusive."""

    kind: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    image_size: int
    shapes: tuple[Shape, ...]

    def image(self):
        """The scene as an RGB PIL image (image_size x image_size), no anti-aliasing."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            _draw(draw, shape)
        return image

    def box(self, shape: Shape) -> tuple[float, float, float, float]:
        """The shape's box normalised to [0, 1], as the processor and ``extract_entities`` write boxes."""
        return tuple(v / self.image_size for v in shape.box)

    def ordered(self) -> list[Shape]:
        """The shapes from left to right (by box centre; ties top to bottom): the caption's order."""
        return sorted(self.shapes, key=lambda s: (s.box[0] + s.box[2], s.box[1] + s.box[3]))

    def caption(self) -> tuple[str, list[tuple[float, float, float, float]]]:
        """(grounded caption for ``Kosmos2Processor``, one normalised box per phrase): the shapes from left to
        right (``ordered``); between neighbours "above" / "below" when they are further apart vertically than
        horizontally, else "left of"."""
        ordered = self.ordered()
        text = "<grounding>"
        for i, shape in enumerate(ordered):
            if i:
                text += " " + _relation(ordered[i - 1], shape)
            text += f"<phrase> a {shape.name}</phrase>"
        return text, [self.box(s) for s in ordered]

    def text(self) -> str:
        """The caption as plain text, without tags or boxes: ``"a red circle above a blue square"``."""
        ordered = self.ordered()
        words = [f"a {ordered[0].name}"] if ordered else []
        for prev, shape in zip(ordered, ordered[1:], strict=False):
            words += [_relation(prev, shape), f"a {shape.name}"]
        return " ".join(words)

    def expressions(self) -> list[tuple[str, tuple[float, float, float, float]]]:
        """One (referring-expression prompt, normalised target box) per shape."""
        return [(f"<grounding><phrase> the {s.name}</phrase>", self.box(s)) for s in self.shapes]


def _relation(a: Shape, b: Shape) -> str:
    """How ``a`` lies relative to ``b`` (``a`` is left of or level with ``b``)."""
    dx = (b.box[0] + b.box[2]) - (a.box[0] + a.box[2])
    dy = (b.box[1] + b.box[3]) - (a.box[1] + a.box[3])
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return "left of"


def _draw(draw, shape: Shape) -> None:
    """Fill exactly the pixels of ``shape`` in its box (PIL's coordinates are inclusive, hence the - 1)."""
    x1, y1, x2, y2 = shape.box
    r, b = x2 - 1, y2 - 1
    cx, cy = (x1 + r) / 2, (y1 + b) / 2
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse([x1, y1, r, b], fill=fill)
    elif shape.kind == "square":
        draw.rectangle([x1, y1, r, b], fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(x1, b), (r, b), (cx, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=fill)


def make_scene(
    rng: random.Random,
    *,
    image_size: int = 64,
    min_shapes: int = 1,
    max_shapes: int = 3,
    min_size: int | None = None,
    max_size: int | None = None,
) -> Scene:
    """A random scene from ``rng``: ``min_shapes`` to ``max_shapes`` shapes (fewer when placement fails 100 times
    in a row, which the default sizes make rare), sides from ``min_size`` to ``max_size`` pixels (default a quarter
    and 45 % of the image: a 16 x 16 location grid then decodes the true cells to a box of IoU >= 0.5 with the
    shape)."""
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes} and {max_shapes}")
    lo = min_size if min_size is not None else image_size // 4
    hi = max_size if max_size is not None else int(image_size * 0.45)
    if not 1 <= lo <= hi <= image_size:
        raise ValueError(f"shape sizes must satisfy 1 <= min_size <= max_size <= image_size, got {lo}, {hi}")
    count = rng.randint(min_shapes, max_shapes)
    kinds = [(c, k) for c in COLORS for k in KINDS]
    shapes: list[Shape] = []
    for color, kind in rng.sample(kinds, count):
        for _ in range(100):
            side = rng.randint(lo, hi)
            x, y = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
            box = (x, y, x + side, y + side)
            if all(_apart(box, s.box) for s in shapes):
                shapes.append(Shape(kind, color, box))
                break
    return Scene(image_size, tuple(shapes))


def _apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def scene(split: str, seed: int, index: int, **kwargs) -> Scene:
    """Scene ``index`` of ``split`` (``"train"`` or ``"heldout"``) under ``seed``; kwargs go to ``make_scene``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return make_scene(random.Random(f"mmcore-shapes/{split}/{seed}/{index}"), **kwargs)


def scenes(split: str, seed: int, start: int = 0, **kwargs) -> Iterator[Scene]:
    """Scenes ``start``, ``start + 1``, ... of ``split`` under ``seed``, without end."""
    index = start
    while True:
        yield scene(split, seed, index, **kwargs)
        index += 1
