"""Boxes for phrases from Kosmos-2: batched, left-padded greedy generation, then the boxes of the entities named like
the phrase (the generation-based half of ``mmcore eval rec`` and ``mmcore eval flickr``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmcore.data.problems import Problems
from mmcore.eval.boxes import Box
from mmcore.models.kosmos2.ground import generate_grounded


@dataclass(frozen=True)
class PhraseQuery:
    """One generation: the image file, the prompt, and the phrase whose boxes are wanted."""

    image: Path
    prompt: str
    phrase: str


def _name(text: str) -> str:
    return " ".join(text.split())


def phrase_boxes(entities, phrase: str) -> list[Box]:
    """The boxes of every entity named ``phrase`` (whitespace-insensitive), in order: unilm keeps all of them."""
    want = _name(phrase)
    return [tuple(b) for name, _, boxes in entities if _name(name) == want for b in boxes]


class _Images:
    """Opens images as RGB, remembering the last few (RefCOCO asks about one image several times in a row)."""

    def __init__(self, keep: int = 16):
        self.keep, self.cache = keep, {}

    def get(self, path: Path):
        from PIL import Image

        if path not in self.cache:
            with Image.open(path) as im:
                image = im.convert("RGB")
            if len(self.cache) >= self.keep:
                self.cache.pop(next(iter(self.cache)))
            self.cache[path] = image
        return self.cache[path]


def generate_phrase_boxes(
    model,
    processor,
    queries: Sequence[PhraseQuery],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    problems: Problems | None = None,
    progress: bool = True,
    **generate_kwargs,
) -> Iterator[list[Box] | None]:
    """Yield, per query in order, the normalised (x1, y1, x2, y2) boxes generated for its phrase ([] when none can be
    decoded), or None when its image cannot be read (counted in ``problems`` as ``missing_image``; the run goes on).
    Greedy by default; ``generate_kwargs`` go to ``model.generate``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    problems = problems if problems is not None else Problems()
    images = _Images()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(queries), unit="query", file=sys.stderr, desc="generating")
    try:
        for s in range(0, len(queries), batch_size):
            chunk = queries[s : s + batch_size]
            results: list[list[Box] | None] = [None] * len(chunk)
            rows, pics = [], []
            for i, q in enumerate(chunk):
                try:
                    pics.append(images.get(Path(q.image)))
                    rows.append(i)
                except (OSError, ValueError) as e:
                    problems.note("missing_image", f"{q.image}: {e}")
            if rows:
                prompts = [chunk[i].prompt for i in rows]
                outputs = generate_grounded(model, processor, pics, prompts, max_new_tokens, **generate_kwargs)
                for i, (_, entities) in zip(rows, outputs, strict=True):
                    results[i] = phrase_boxes(entities, chunk[i].phrase)
            yield from results
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def to_pixels(boxes: Sequence[Box] | None, width: int, height: int) -> list[Box] | None:
    """Normalised boxes -> pixels of a ``width`` x ``height`` image (as unilm: x * width, y * height)."""
    if boxes is None:
        return None
    return [(x1 * width, y1 * height, x2 * width, y2 * height) for x1, y1, x2, y2 in boxes]
