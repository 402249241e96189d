"""GRIT construction (Kosmos-2 section 2, shared/research/kosmos2.md section 2.3): captions + images -> grounded
noun chunks and referring expressions in the GrIT-20M row format. The original code was never released; this
follows the paper's description.

Text side, ``referring_expressions(doc)`` on a spaCy ``Doc`` with a dependency parse:
  1. the noun chunks, except those whose root is an abstract noun (``ABSTRACT_NOUNS``, extend it as needed);
  2. each chunk expanded to its root's dependency subtree (the paper's recursive traversal of the children), except
     chunks whose root has conjuncts, which stay as they are ("a dog and a cat" would otherwise swallow each other);
  3. only expressions not contained in another are kept ("a dog in a field of flowers" drops "a field of flowers"
     and "flowers"); each keeps the chunk it grew from, and inherits that chunk's boxes.

Box side: a ``Grounder`` (any callable ``(image, phrases) -> [(boxes, scores)]``; ``OwlV2Grounder`` adapts a local
transformers OWLv2 checkpoint) proposes boxes per chunk; ``select_boxes`` runs non-maximum suppression across all
chunks of the image and keeps boxes scoring above 0.65; chunks left without a box are dropped.

``mmcore grit`` (``run_cli``) reads captions + images and writes GrIT-format JSONL:
``{"key", "caption", "width", "height", "noun_chunks": [[start, end, x0, y0, x1, y1, score], ...], "ref_exps": [...]}``
with character offsets into the caption and boxes normalised to [0, 1].
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from mmcore.data.problems import Problems

SCORE_THRESHOLD = 0.65  # paper: keep pairs with confidence > 0.65
NMS_IOU = 0.5  # NOTE: the paper does not give the NMS overlap; 0.5 is a common detector default (unverified)

# Roots that name no visible thing: the paper's examples ("time", "love", "freedom") and more of their kind. Matched
# against the root's lemma and its lower-cased text. A module-level set so users can extend it:
# ``mmcore.data.grit.ABSTRACT_NOUNS.update({"vibe", "mood"})``.
ABSTRACT_NOUNS: set[str] = {
    "time", "love", "freedom", "life", "idea", "concept", "fact", "truth", "justice", "beauty", "happiness",
    "peace", "hope", "faith", "joy", "fear", "anger", "sadness", "success", "failure", "knowledge", "information",
    "experience", "quality", "future", "past", "history", "reason", "way", "kind", "type", "sort", "lot", "number",
    "variety", "part", "use", "fun", "thing", "something", "anything", "nothing", "everything", "moment", "opinion",
    "meaning", "purpose", "nature", "style", "inspiration", "memory", "imagination", "friendship", "culture",
    "education", "health", "wealth", "power", "energy", "art",
}  # fmt: skip


def is_abstract(token, abstract_nouns: Iterable[str] | None = None) -> bool:
    """Whether a chunk root names an abstract noun (its lemma or lower-cased text is in the list)."""
    nouns = ABSTRACT_NOUNS if abstract_nouns is None else abstract_nouns
    return token.lemma_.lower() in nouns or token.lower_ in nouns


def noun_chunks(doc, abstract_nouns: Iterable[str] | None = None) -> list:
    """The doc's noun chunks whose root is not abstract (needs a dependency parse)."""
    if not doc.has_annotation("DEP"):
        raise ValueError("the Doc has no dependency parse: use a spaCy pipeline with a parser (e.g. en_core_web_sm)")
    return [c for c in doc.noun_chunks if not is_abstract(c.root, abstract_nouns)]


def expand(chunk):
    """The chunk's referring expression: its root's dependency subtree, or the chunk itself when the root has
    conjuncts. The result always covers the chunk."""
    root = chunk.root
    if root.conjuncts:
        return chunk
    doc = chunk.doc
    return doc[min(root.left_edge.i, chunk.start) : max(root.right_edge.i + 1, chunk.end)]


def referring_expressions(doc, chunks: Sequence | None = None, abstract_nouns: Iterable[str] | None = None) -> list:
    """``(expression, noun_chunk)`` pairs of spaCy ``Span``s, in text order (see the module docstring).

    chunks: the noun chunks to expand (default: ``noun_chunks(doc)``); GRIT passes the chunks that kept a box, so an
    expression is dropped only when another grounded expression contains it. Of expressions covering the same
    tokens, the first is kept."""
    if chunks is None:
        chunks = noun_chunks(doc, abstract_nouns)
    pairs = [(expand(c), c) for c in chunks]
    bounds = [(e.start, e.end) for e, _ in pairs]
    kept = []
    for i, (s, e) in enumerate(bounds):
        inside = any(
            j != i and s2 <= s and e <= e2 and ((s2, e2) != (s, e) or j < i) for j, (s2, e2) in enumerate(bounds)
        )
        if not inside:
            kept.append(pairs[i])
    return sorted(kept, key=lambda p: (p[0].start, p[0].end))


# ------------------------------------------------------------------------------------------ boxes


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = NMS_IOU) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first. boxes (n, 4) xyxy, scores (n,).
    A box is dropped when its IoU with a kept, higher-scoring box exceeds ``iou_threshold`` (ties: lower index
    first)."""
    from mmcore.eval.boxes import box_iou

    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    iou = box_iou(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(iou[i, k] <= iou_threshold for k in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long)


def select_boxes(
    proposals: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = NMS_IOU,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per chunk (boxes (k, 4) normalised xyxy, scores (k,)) -> the boxes that survive non-maximum suppression across
    all chunks and score above ``score_threshold``, in descending score order per chunk.

    NOTE: suppression before or after the threshold gives the same boxes (a box is only suppressed by a higher-scoring
    one, which passes the threshold whenever the suppressed box does)."""
    if not proposals:
        return []
    sizes = torch.tensor([len(s.reshape(-1)) for _, s in proposals], dtype=torch.long)
    owner = torch.arange(len(proposals)).repeat_interleave(sizes)  # the chunk of each proposal
    boxes = torch.cat([b.reshape(-1, 4).double() for b, _ in proposals])
    scores = torch.cat([s.reshape(-1).double() for _, s in proposals])
    keep = nms(boxes, scores, iou_threshold)
    keep = keep[scores[keep] > score_threshold]
    out = []
    for c in range(len(proposals)):
        mine = keep[owner[keep] == c]
        out.append((boxes[mine], scores[mine]))
    return out


@runtime_checkable
class Grounder(Protocol):
    """Boxes for phrases in an image: ``grounder(image, phrases)`` -> one ``(boxes, scores)`` per phrase, boxes
    (k, 4) as (x1, y1, x2, y2) normalised to the image's width and height, scores (k,) in [0, 1]."""

    def __call__(self, image, phrases: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


class OwlV2Grounder:
    """A transformers ``Owlv2ForObjectDetection`` as a ``Grounder``: each phrase is a text query; every image patch
    predicts one box and a score per query (sigmoid of the logit). Boxes above ``min_score`` (at most ``max_boxes``
    per phrase) are returned for NMS and the GRIT threshold.

    Images are padded to a square (bottom and right, grey 0.5, as OWLv2 does), resized to the model's input size
    with PIL's bicubic filter and normalised with CLIP's mean and std. NOTE: transformers' ``Owlv2ImageProcessor``
    (which needs scipy or torchvision) resizes with its own anti-aliasing, so pixel values differ slightly; pass
    ``image_processor=`` to use it instead."""

    def __init__(self, model, tokenizer, *, image_processor=None, min_score: float = 0.1, max_boxes: int = 10):
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.min_score, self.max_boxes = float(min_score), int(max_boxes)
        self.size = model.config.vision_config.image_size
        self.max_text = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu", **kwargs) -> OwlV2Grounder:
        """Load a local OWLv2 folder (model + tokenizer); nothing is downloaded."""
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no such detector folder: {path} (a local OWLv2 checkpoint)")
        model = Owlv2ForObjectDetection.from_pretrained(path, local_files_only=True).to(device)
        return cls(model, AutoTokenizer.from_pretrained(path, local_files_only=True), **kwargs)

    def pixel_values(self, image) -> torch.Tensor:
        """(1, 3, size, size): padded to a square, resized, CLIP-normalised."""
        from PIL import Image

        from mmcore.models.kosmos2.processing import CLIP_MEAN, CLIP_STD

        if self.image_processor is not None:
            return self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        image = image.convert("RGB")
        side = max(image.size)
        square = Image.new("RGB", (side, side), (128, 128, 128))
        square.paste(image, (0, 0))
        x = torch.from_numpy(np.array(square.resize((self.size, self.size), Image.BICUBIC)))
        x = x.permute(2, 0, 1).float() / 255
        x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        return x[None]

    @torch.no_grad()
    def __call__(self, image, phrases: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not phrases:
            return []
        device = next(self.model.parameters()).device
        text = self.tokenizer(
            list(phrases), padding="max_length", max_length=self.max_text, truncation=True, return_tensors="pt"
        )
        out = self.model(
            input_ids=text["input_ids"].to(device),
            attention_mask=text["attention_mask"].to(device),
            pixel_values=self.pixel_values(image).to(device),
        )
        scores = out.logits[0].float().sigmoid().cpu()  # (patches, phrases)
        cx, cy, w, h = out.pred_boxes[0].float().cpu().unbind(-1)  # normalised to the padded square
        width, height = image.size
        side = max(width, height)
        sx, sy = side / width, side / height
        boxes = torch.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], -1)
        boxes = boxes.clamp(0, 1)
        # NOTE: a patch may predict a box in the padding below or right of the image; clamped, it has no area.
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        result = []
        for q in range(len(phrases)):
            s = scores[:, q].masked_fill(~inside, -1.0)
            top = s.topk(min(self.max_boxes, len(s))).indices
            top = top[s[top] >= self.min_score]
            result.append((boxes[top], s[top]))
        return result


# ------------------------------------------------------------------------------------------ rows


def _row_entries(spans_boxes) -> list[list[float]]:
    return [
        [start, end, *(round(float(v), 6) for v in box), round(float(score), 6)]
        for start, end, boxes, scores in spans_boxes
        for box, score in zip(boxes.tolist(), scores.tolist(), strict=True)
    ]


def ground_doc(
    doc,
    image,
    grounder: Grounder,
    *,
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = NMS_IOU,
    abstract_nouns: Iterable[str] | None = None,
    problems: Problems | None = None,
) -> tuple[list, list]:
    """(noun_chunks, ref_exps) of one caption in GrIT's layout: ``[start, end, x0, y0, x1, y1, score]`` rows,
    character offsets into ``doc.text``, boxes normalised. Both are empty when no chunk keeps a box. Proposed boxes
    that are not finite, leave [0, 1] or have no area are dropped and counted in ``problems``
    (``box_out_of_range``)."""
    chunks = noun_chunks(doc, abstract_nouns)
    if not chunks:
        return [], []
    proposals = grounder(image, [c.text for c in chunks])
    if len(proposals) != len(chunks):
        raise ValueError(f"the grounder returned {len(proposals)} results for {len(chunks)} phrases")
    checked = []
    for chunk, (boxes, scores) in zip(chunks, proposals, strict=True):
        boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"the grounder returned {len(boxes)} boxes and {len(scores)} scores for {chunk.text!r}")
        ok = torch.isfinite(boxes).all(1) & torch.isfinite(scores) & ((boxes >= 0) & (boxes <= 1)).all(1)
        ok &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if problems is not None and not bool(ok.all()):
            problems.note("box_out_of_range", f"{chunk.text!r}: {boxes[~ok][0].tolist()}", count=int((~ok).sum()))
        checked.append((boxes[ok], scores[ok]))
    selected = select_boxes(checked, score_threshold=score_threshold, iou_threshold=iou_threshold)
    grounded = [(c, bs) for c, bs in zip(chunks, selected, strict=True) if len(bs[1])]
    if not grounded:
        return [], []
    boxes_of = {(c.start, c.end): bs for c, bs in grounded}
    chunk_rows = _row_entries((c.start_char, c.end_char, *bs) for c, bs in grounded)
    pairs = referring_expressions(doc, [c for c, _ in grounded])
    expr_rows = _row_entries((e.start_char, e.end_char, *boxes_of[(c.start, c.end)]) for e, c in pairs)
    return chunk_rows, expr_rows


def load_spacy(name: str):
    """``spacy.load(name)`` (an installed pipeline package or a pipeline folder) with errors that say what to do."""
    try:
        import spacy
    except ImportError:
        raise ImportError("mmcore grit needs spaCy: pip install 'mmcore[data]'") from None
    try:
        return spacy.load(name)
    except OSError as e:
        raise ValueError(
            f"spaCy pipeline {name!r} is not installed (or not a pipeline folder): install one with a dependency "
            f"parser, e.g. `python -m spacy download en_core_web_sm`, then pass --spacy-model en_core_web_sm "
            f"({str(e).splitlines()[0]})"
        ) from None


def read_captions(path: Path, problems: Problems) -> Iterator[dict]:
    """Rows ``{"image": path, "caption": text, ...}`` of a JSONL file; malformed lines are counted and skipped."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                problems.note("malformed_row", f"{path}:{n}: not JSON")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("caption"), str) or not row["caption"].strip():
                problems.note("malformed_row", f"{path}:{n}: no caption")
                continue
            if not isinstance(row.get("image"), str) or not row["image"]:
                problems.note("malformed_row", f"{path}:{n}: no image path")
                continue
            row.setdefault("key", f"{n - 1:09d}")
            yield row


def build_grit(
    rows: Iterable[dict],
    nlp,
    grounder: Grounder,
    *,
    image_root: Path | None = None,
    batch_size: int = 64,
    problems: Problems | None = None,
    progress: Callable[[int], None] | None = None,
    **options,
) -> Iterator[dict]:
    """GrIT rows for caption rows (``image``, ``caption``, optional ``key``/``url``): captions parsed by ``nlp`` in
    batches of ``batch_size``, images opened with PIL, ``ground_doc`` per caption. Rows whose image cannot be read
    (``missing_image``) or that keep no box (``no_box``) are counted in ``problems`` and skipped."""
    from PIL import Image

    problems = problems if problems is not None else Problems()
    batch: list[dict] = []

    def flush() -> Iterator[dict]:
        for row, doc in zip(batch, nlp.pipe([r["caption"] for r in batch]), strict=True):
            path = Path(row["image"]) if image_root is None else image_root / row["image"]
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as e:
                problems.note("missing_image", f"{path}: {e}")
                continue
            chunks, exps = ground_doc(doc, image, grounder, problems=problems, **options)
            if not chunks:
                problems.note("no_box", row["key"])
                continue
            out = {k: row[k] for k in ("key", "id", "url") if k in row}
            out.update(caption=row["caption"], width=image.width, height=image.height, noun_chunks=chunks,
                       ref_exps=exps)  # fmt: skip
            yield out
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


def run_cli(args) -> int:
    """``mmcore grit``: captions JSONL + images -> GrIT JSONL; a summary of skipped input on stderr."""
    problems = Problems()
    captions = Path(args.captions)
    if not captions.is_file():
        raise FileNotFoundError(f"no such captions file: {captions}")
    nlp = load_spacy(args.spacy_model)
    grounder = OwlV2Grounder.from_pretrained(args.detector, device=args.device)
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(unit="caption", file=sys.stderr, desc="grit")
    written = 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # renamed to ``out`` when the run completes
    try:
        with open(partial, "w", encoding="utf-8") as f:
            rows = build_grit(
                read_captions(captions, problems),
                nlp,
                grounder,
                image_root=Path(args.images) if args.images else None,
                batch_size=args.batch_size,
                problems=problems,
                progress=bar.update if bar is not None else None,
                score_threshold=args.score_threshold,
                iou_threshold=args.nms_iou,
            )
            for row in rows:
                f.write(json.dumps(row) + "\n")
                written += 1
        partial.replace(out)
    finally:
        if bar is not None:
            bar.close()
    print(f"mmcore grit: wrote {written} rows to {out}; skipped: {problems.line()}", file=sys.stderr)
    return 0
