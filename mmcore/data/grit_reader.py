"""GrIT-20M rows -> Kosmos-2 training samples, streamed from local JSONL / parquet shards.

A GrIT row (``huggingface.co/datasets/zzliang/GRIT``; images fetched separately, e.g. with img2dataset) holds
``caption``, ``noun_chunks`` and ``ref_exps``: ``[start, end, x0, y0, x1, y1, score]`` entries with character
offsets into the caption and boxes normalised to the image. The original training rules (unilm
``data/vl/obj_utils.py``, ``laion2b_obj_loader.py``; shared/research/kosmos2.md section 2.3), applied here:

- entries scoring below 0.65 are dropped;
- the image is resized so its shortest side is the model's input size, then centre-cropped to a square; each box is
  mapped through the same resize and crop, and dropped when it leaves the crop or keeps < 20% of its area;
- "expression" mode (the default, ``ref_exps``): entries whose span lies inside another kept entry's span are
  dropped; the boxes of one span are joined by ``</delimiter_of_multi_objects/>``;
- location tokens use the training encoder (``rounding="unilm"``: bottom-right ``floor(min(x, 0.99999) * 32)``);
- with probability 0.5 (when any box is left) the text is the grounded caption ``<grounding>...<phrase> a dog
  </phrase><object><patch_index_....><patch_index_....></object>...``, otherwise the plain caption; ``</s>`` ends
  every sample, as in training.

``GritDataset`` is a ``torch.utils.data.IterableDataset`` over shard files: each DataLoader worker (and each rank)
reads its own shards, one row (JSONL) or one record batch (parquet) at a time, so no shard set is ever loaded whole.
Its samples (``input_ids``, ``image_embeds_position_mask``, ``pixel_values``) go straight into
``mmcore.data.packing.collate_kosmos2_packed``. Bad input (malformed rows, missing images, boxes out of range or
with a span outside the caption) is skipped and counted, and each worker prints a summary line when its shards are
done; it never stops a run.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmcore.data.problems import Problems
from mmcore.grounding.text import to_grounded_text

SCORE_THRESHOLD = 0.65  # box_score_threshold: entries with score < 0.65 are dropped
DROP_CROP_THRESHOLD = 0.2  # drop_crop_thr: a box keeping less than 20% of its area after the crop is dropped
GROUNDED_PROBABILITY = 0.5  # use_object_bbox_prob
MODES = {"expression": "ref_exps", "phrase": "noun_chunks"}
PARQUET_BATCH_ROWS = 256


# ------------------------------------------------------------------------------------------ geometry


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shortest side to ``size`` (the long side truncated, as torchvision's
    ``Resize(size)`` and unilm's box remapping compute it)."""
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def centercrop_box(
    box: Sequence[float], width: int, height: int, size: int, drop_crop_threshold: float = DROP_CROP_THRESHOLD
) -> tuple[float, float, float, float] | None:
    """A normalised (x1, y1, x2, y2) box of a ``width`` x ``height`` image -> the same box normalised to the
    ``size`` x ``size`` centre crop of the image resized to shortest side ``size``; None when less than
    ``drop_crop_threshold`` of its area stays inside the crop, or nothing does (unilm's ``centercrop_norm_bbox``).

    NOTE: the crop offset is (resized - size) / 2 unrounded, as in unilm's box code; the image crop rounds it to
    whole pixels (torchvision's ``CenterCrop``), so boxes can be off by up to half a pixel."""
    rw, rh = resized_size(width, height, size)
    x1, y1, x2, y2 = box[0] * rw, box[1] * rh, box[2] * rw, box[3] * rh
    left, top = (rw - size) / 2.0, (rh - size) / 2.0
    cx1, cx2 = (min(max(v - left, 0.0), size) for v in (x1, x2))
    cy1, cy2 = (min(max(v - top, 0.0), size) for v in (y1, y2))
    area = (x2 - x1) * (y2 - y1)
    if area <= 0 or (cx2 - cx1) * (cy2 - cy1) / area < drop_crop_threshold:
        return None
    if not (cx2 > cx1 and cy2 > cy1):
        return None
    return cx1 / size, cy1 / size, cx2 / size, cy2 / size


def resize_and_crop(image, size: int):
    """PIL image -> RGB, shortest side resized to ``size`` (bicubic), centre-cropped to ``size`` x ``size``."""
    from PIL import Image

    image = image.convert("RGB")
    rw, rh = resized_size(image.width, image.height, size)
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------ rows


def _entry(value, caption_len: int) -> tuple[int, int, tuple[float, ...], float] | str:
    """A checked ``[start, end, x0, y0, x1, y1, score]`` entry, or the name of what is wrong with it."""
    if not isinstance(value, (list, tuple)) or len(value) != 7:
        return "bad_entry"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return "bad_entry"
    start, end = value[0], value[1]
    if start != int(start) or end != int(end) or not 0 <= start < end <= caption_len:
        return "span_out_of_range"
    box = tuple(float(v) for v in value[2:6])
    if not all(0.0 <= v <= 1.0 for v in box) or not (box[2] > box[0] and box[3] > box[1]):
        return "box_out_of_range"
    return int(start), int(end), box, float(value[6])


def grounded_entities(
    caption: str,
    entries: Sequence,
    width: int,
    height: int,
    size: int,
    *,
    mode: str = "expression",
    score_threshold: float = SCORE_THRESHOLD,
    drop_crop_threshold: float = DROP_CROP_THRESHOLD,
    problems: Problems | None = None,
    stats: Counter | None = None,
) -> list[tuple[str, tuple[int, int], list[tuple[float, float, float, float]]]]:
    """The training rules on one row's entries -> ``(name, (start, end), boxes)`` in text order, boxes normalised to
    the crop. Invalid entries are counted in ``problems`` (``bad_entry``, ``span_out_of_range``,
    ``box_out_of_range``); rule drops in ``stats`` (``box_below_score``, ``box_cropped_out``, ``span_contained``,
    ``span_overlapping``)."""
    problems = problems if problems is not None else Problems()
    stats = stats if stats is not None else Counter()
    kept: list[tuple[int, int, tuple[float, float, float, float]]] = []
    for value in entries:
        entry = _entry(value, len(caption))
        if isinstance(entry, str):
            problems.note(entry, f"{value!r:.120} in {caption!r:.80}")
            continue
        start, end, box, score = entry
        if score < score_threshold:
            stats["box_below_score"] += 1
            continue
        cropped = centercrop_box(box, width, height, size, drop_crop_threshold)
        if cropped is None:
            stats["box_cropped_out"] += 1
            continue
        kept.append((start, end, cropped))
    if mode == "expression":
        spans = {(s, e) for s, e, _ in kept}
        inside = {(s, e) for s, e in spans if any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2 in spans)}
        stats["span_contained"] += sum((s, e) in inside for s, e, _ in kept)
        kept = [k for k in kept if (k[0], k[1]) not in inside]
    elif mode != "phrase":
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    clusters: dict[tuple[int, int], list] = {}
    for s, e, box in kept:
        clusters.setdefault((s, e), []).append(box)
    out, last_end = [], -1
    for (s, e), boxes in sorted(clusters.items()):
        if s < last_end:  # partial overlap with the previous span: tags cannot nest
            stats["span_overlapping"] += 1
            continue
        out.append((caption[s:e], (s, e), boxes))
        last_end = e
    return out


def grounded_caption(caption: str, entities, num_bins: int = 32) -> str:
    """``<grounding>`` + the caption with ``<phrase>...</phrase><object>...</object>`` after each entity (training
    rounding); a space before a phrase moves inside it, as Kosmos-2 writes it."""
    return "<grounding>" + to_grounded_text(caption, entities, num_bins=num_bins, rounding="unilm")


@dataclass
class GritConfig:
    """The training rules' settings (defaults: the original values)."""

    mode: str = "expression"
    score_threshold: float = SCORE_THRESHOLD
    drop_crop_threshold: float = DROP_CROP_THRESHOLD
    grounded_probability: float = GROUNDED_PROBABILITY
    min_side: int = 0  # skip images narrower or shorter than this (unilm: 200 for LAION only, so 0 for GrIT/COYO)
    max_tokens: int | None = None  # skip samples longer than this (``too_long``)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.grounded_probability <= 1.0:
            raise ValueError(f"grounded_probability must be in [0, 1], got {self.grounded_probability}")


def make_sample(row: dict, image, processor, rng: random.Random, config: GritConfig, problems: Problems, stats) -> dict:
    """One Kosmos-2 sample from a checked row and its PIL image: ``input_ids`` (L,), ``image_embeds_position_mask``
    (L,), ``pixel_values`` (3, S, S), ``grounded`` (bool) and ``key``."""
    size = processor.image_size
    entities = grounded_entities(
        row["caption"],
        row.get(MODES[config.mode]) or [],
        image.width,
        image.height,
        size,
        mode=config.mode,
        score_threshold=config.score_threshold,
        drop_crop_threshold=config.drop_crop_threshold,
        problems=problems,
        stats=stats,
    )
    grounded = bool(entities) and rng.random() < config.grounded_probability
    text = grounded_caption(row["caption"], entities, processor.num_bins) if grounded else row["caption"]
    enc = processor(images=[resize_and_crop(image, size)], text=[text], return_tensors="pt")
    ids, mask = enc["input_ids"][0], enc["image_embeds_position_mask"][0]
    eos = processor.tokenizer.eos_token_id
    if eos is not None and (len(ids) == 0 or int(ids[-1]) != eos):
        ids = torch.cat([ids, ids.new_tensor([eos])])
        mask = torch.cat([mask, mask.new_zeros(1)])
    return {
        "input_ids": ids,
        "image_embeds_position_mask": mask,
        "pixel_values": enc["pixel_values"][0],
        "grounded": grounded,
        "key": str(row.get("key", "")),
    }


# ------------------------------------------------------------------------------------------ shards


def iter_shard(path: Path, problems: Problems) -> Iterator[dict]:
    """Rows of one ``.jsonl`` / ``.json`` (one object per line) or ``.parquet`` shard, streamed; lines that are not
    JSON objects are counted (``malformed_row``) and skipped."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install 'mmcore[data]'") from None
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                problems.note("malformed_row", f"{path}:{n}: not JSON")
                continue
            if not isinstance(row, dict):
                problems.note("malformed_row", f"{path}:{n}: not an object")
                continue
            yield row


def default_image_path(row: dict, shard: Path, image_root: Path | None) -> Path | None:
    """``row["image"]`` (or ``image_path`` / ``file_name``) relative to ``image_root`` (default: the shard's folder),
    else ``<key>.jpg`` there (img2dataset's file layout); None when the row names no image."""
    root = image_root if image_root is not None else shard.parent
    for field in ("image", "image_path", "file_name"):
        if isinstance(row.get(field), str) and row[field]:
            return root / row[field]
    if row.get("key") not in (None, ""):
        return root / f"{row['key']}.jpg"
    return None


class GritDataset(IterableDataset):
    """Kosmos-2 samples from GrIT shards (``.jsonl``/``.json``/``.parquet`` paths), streamed.

    Shards are split over ``world_size`` ranks and, within a rank, over the DataLoader's workers (shard i goes to
    global worker i mod (world_size x num_workers)); give at least as many shards as workers in all. The grounded /
    plain draw is seeded by (seed, epoch, shard), so a sample does not depend on which worker reads it; call
    ``set_epoch`` between epochs. ``shuffle_shards`` permutes the shard order per epoch (same seed on every worker).
    image_root / image_path: where images are (default: ``default_image_path``). ``problems`` and ``stats`` hold the
    counts of the last pass when iterated in this process (``num_workers=0``); workers print their own summary line
    to stderr when done (``report=True``)."""

    def __init__(
        self,
        shards: Sequence[str | Path],
        processor,
        *,
        config: GritConfig | None = None,
        image_root: str | Path | None = None,
        image_path: Callable[[dict, Path, Path | None], Path | None] = default_image_path,
        seed: int = 0,
        shuffle_shards: bool = False,
        rank: int = 0,
        world_size: int = 1,
        report: bool = True,
    ):
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise ValueError("shards is empty")
        missing = [s for s in self.shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"no such shard: {missing[0]} ({len(missing)} missing)")
        bad = [s for s in self.shards if s.suffix not in (".jsonl", ".json", ".parquet")]
        if bad:
            raise ValueError(f"shards must be .jsonl, .json or .parquet files, got {bad[0]}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.processor = processor
        self.config = config if config is not None else GritConfig()
        self.image_root = Path(image_root) if image_root is not None else None
        self.image_path = image_path
        self.seed, self.shuffle_shards, self.rank, self.world_size = seed, shuffle_shards, rank, world_size
        self.report = report
        self.epoch = 0
        self.problems = Problems()
        self.stats: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def my_shards(self) -> list[tuple[int, Path]]:
        """(index, path) of the shards this rank and worker read, in reading order."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(order)
        me, total = self.rank * workers + worker, self.world_size * workers
        return [(i, self.shards[i]) for i in order[me::total]]

    def __iter__(self) -> Iterator[dict]:
        from PIL import Image

        self.problems, self.stats = Problems(), Counter()
        for index, shard in self.my_shards():
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            for row in iter_shard(shard, self.problems):
                self.stats["rows"] += 1
                caption = row.get("caption")
                entries = row.get(MODES[self.config.mode])
                if not isinstance(caption, str) or not caption.strip() or not isinstance(entries, (list, tuple)):
                    self.problems.note("malformed_row", f"{shard}: row {row.get('key')!r} lacks a caption or entries")
                    continue
                path = self.image_path(row, shard, self.image_root)
                try:
                    if path is None:
                        raise FileNotFoundError("the row names no image")
                    with Image.open(path) as im:
                        image = im.convert("RGB")
                except (OSError, ValueError) as e:
                    self.problems.note("missing_image", f"{path}: {e}")
                    continue
                if min(image.size) < self.config.min_side:
                    self.stats["image_too_small"] += 1
                    continue
                sample = make_sample(row, image, self.processor, rng, self.config, self.problems, self.stats)
                if self.config.max_tokens is not None and len(sample["input_ids"]) > self.config.max_tokens:
                    self.stats["too_long"] += 1
                    continue
                self.stats["samples"] += 1
                self.stats["grounded"] += sample["grounded"]
                yield sample
        if self.report:
            print(self.summary_line(), file=sys.stderr)

    def summary(self) -> dict:
        return {"stats": dict(sorted(self.stats.items())), "problems": self.problems.summary()}

    def summary_line(self) -> str:
        info = get_worker_info()
        who = f"rank {self.rank} worker {info.id if info is not None else 0}"
        s = self.stats
        drops = ", ".join(
            f"{s[k]} {k}" for k in ("box_below_score", "box_cropped_out", "span_contained", "span_overlapping") if s[k]
        )
        return (
            f"grit ({who}): {s['rows']} rows -> {s['samples']} samples ({s['grounded']} grounded); "
            f"rules dropped: {drops or 'nothing'}; {self.problems.line('skipped input')}"
        )
