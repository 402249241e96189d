"""Grounded captioning of image files: batched generation, markdown-linked captions, annotated pictures.

The engine behind ``mmcore ground`` (``mmcore/cli.py``); usable from Python as ``ground_images``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmcore.grounding import to_markdown

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_PROMPT = "<grounding> An image of"


@dataclass
class Grounded:
    """One image's result: the caption without tags, its entities (name, (start, end), boxes in [0, 1]) and the
    caption with markdown links ``[a snowman](0.39,0.05,0.98,0.83)``."""

    path: str
    text: str
    entities: list
    markdown: str

    def to_json(self) -> str:
        ents = [{"name": n, "span": list(s), "boxes": [list(b) for b in bs]} for n, s, bs in self.entities]
        return json.dumps({"image": self.path, "text": self.text, "markdown": self.markdown, "entities": ents})


def image_paths(path: Path) -> list[Path]:
    """One image file, or the image files of a folder (sorted by name; other files skipped)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return found
    raise FileNotFoundError(f"no such image or folder: {path}")


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def generate_grounded(model, processor, images, prompts, max_new_tokens: int, **generate_kwargs) -> list[tuple]:
    """One batch: PIL images and their prompts -> ``[(clean text, entities)]`` through left-padded batched
    generation and the processor's post-processing. ``generate_kwargs`` go to ``model.generate``."""
    device = model.lm_head_weight.device
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"  # generation pads prompts on the left; the caller's setting comes back
    try:
        inputs = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = side
    ids = model.generate(
        inputs["pixel_values"].to(device),
        inputs["input_ids"].to(device),
        inputs["image_embeds_position_mask"].to(device),
        inputs["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
    texts = processor.batch_decode(ids.cpu(), skip_special_tokens=True)
    return [processor.post_process_generation(text) for text in texts]


def ground_images(
    model,
    processor,
    paths: Sequence[Path],
    *,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    **generate_kwargs,
) -> Iterator[tuple[Grounded, object]]:
    """Yield ``(Grounded, PIL image)`` per path, generating ``batch_size`` images at a time (left-padded prompts).
    Unreadable images are reported on stderr and skipped."""
    from PIL import Image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), unit="image", file=sys.stderr, desc="grounding")
    try:
        for chunk in _batches(list(paths), batch_size):
            images, kept = [], []
            for p in chunk:
                try:
                    with Image.open(p) as im:
                        images.append(im.convert("RGB"))
                    kept.append(p)
                except (OSError, ValueError) as e:
                    print(f"skipping {p}: {e}", file=sys.stderr)
            if images:
                outputs = generate_grounded(model, processor, images, [prompt] * len(images), max_new_tokens,
                                            **generate_kwargs)  # fmt: skip
                for p, image, (clean, entities) in zip(kept, images, outputs, strict=True):
                    yield Grounded(str(p), clean, entities, to_markdown(clean, entities)), image
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def load(checkpoint: str, *, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) from a local Hugging Face Kosmos-2 folder or a hub id; dtype: a floating torch dtype or
    its name (checked by ``from_pretrained``)."""
    from mmcore.models.kosmos2 import Kosmos2ForConditionalGeneration
    from mmcore.models.kosmos2.processing import Kosmos2Processor

    model = Kosmos2ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(device)
    processor = Kosmos2Processor.from_pretrained(checkpoint)
    return model, processor


def annotated_names(paths: Sequence[Path]) -> dict[Path, str]:
    """The annotated PNG's file name for each image: ``<stem>.png``, or ``<name with dots as _>.png`` where two
    images share a stem (``a.png`` and ``a.jpg`` -> ``a_png.png`` and ``a_jpg.png``), so none overwrites another."""
    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    return {p: f"{p.stem if stems[p.stem] == 1 else p.name.replace('.', '_')}.png" for p in paths}


def _check_device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA device")
    return name


def _check_out(out: Path | None, single: bool) -> None:
    """Before any work: --out must be a savable image file (one image) or a folder (a folder of images)."""
    if out is None:
        return
    if single:
        from PIL import Image

        fmt = Image.registered_extensions().get(out.suffix.lower())
        if fmt is None or fmt not in Image.SAVE:
            raise ValueError(f"--out {out}: give an image file name PIL can write, e.g. annotated.png")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out {out}: no such folder {out.parent}")
    elif out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; for a folder of images give an output folder")


def run_cli(args) -> int:
    """``mmcore ground``: one image -> caption on stdout (+ ``--out`` annotated PNG); a folder -> JSONL + PNGs.
    Exit status 0; 1 when some images of a folder could not be read (each named on stderr); 2 (a ValueError or
    FileNotFoundError, reported by ``mmcore.cli``) when the arguments are wrong or no image could be read."""
    from mmcore.models.kosmos2.annotate import draw_entities

    paths = image_paths(Path(args.image))
    single = Path(args.image).is_file()
    out = Path(args.out) if args.out else (None if single else Path("mmcore_ground"))
    _check_out(out, single)
    model, processor = load(args.checkpoint, device=_check_device(args.device), dtype=args.dtype)
    if out is not None and not single:
        out.mkdir(parents=True, exist_ok=True)
    names = annotated_names(paths)
    results = ground_images(
        model,
        processor,
        paths,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not single,
        do_sample=args.sample,
        seed=args.seed,
        num_beams=args.num_beams,
    )
    jsonl = open(out / "results.jsonl", "w") if (out is not None and not single) else None  # noqa: SIM115
    done = 0
    try:
        for result, image in results:
            done += 1
            if single:
                print(result.markdown)
                if out is not None:
                    draw_entities(image, result.entities).save(out)
                    print(f"annotated image: {out}", file=sys.stderr)
            else:
                name = names[Path(result.path)]
                jsonl.write(json.dumps({**json.loads(result.to_json()), "annotated": name}) + "\n")
                draw_entities(image, result.entities).save(out / name)
    finally:
        if jsonl is not None:
            jsonl.close()
            print(f"wrote {out / 'results.jsonl'} and annotated images in {out}", file=sys.stderr)
    if done == 0:
        what = (
            f"{paths[0]} is not an image PIL can read" if single else f"none of the {len(paths)} images could be read"
        )
        raise ValueError(what)
    if done < len(paths):
        print(
            f"mmcore ground: {len(paths) - done} of {len(paths)} images could not be read (named above)",
            file=sys.stderr,
        )
        return 1
    return 0
