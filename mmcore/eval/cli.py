"""``mmcore eval {rec,flickr,retrieval}``: run an evaluation, print the headline numbers, write a JSON report.

rec        Kosmos-2 on an MDETR RefCOCO/RefCOCO+/RefCOCOg file: accuracy at IoU >= 0.5 of the first box
flickr     Kosmos-2 on an MDETR Flickr30k Entities file: ANY-BOX R@1/5/10
retrieval  a (texts, videos) score matrix, or text and video features: R@1/5/10, median and mean rank both ways

Bad input (malformed entries, missing images) is skipped, counted, and reported at the end; it never stops a run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mmcore.data.problems import Problems

COCO_SPLIT_DIRS = ("train2014", "val2014")


def resolve_image(root: Path, file_name: str) -> Path:
    """``root/file_name``, or ``root/train2014/file_name`` (``val2014``) when the name says so and only that exists
    (COCO's folder layout, which unilm's RefCOCO script assumes)."""
    direct = root / file_name
    if not direct.exists():
        for split in COCO_SPLIT_DIRS:
            if split in file_name and (root / split / file_name).exists():
                return root / split / file_name
    return direct


def _generation_kwargs(args) -> dict:
    kw = {"constrain_boxes": args.constrain_boxes}
    if args.no_repeat_ngram_size is not None:
        kw["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    return kw


def _predict(args, queries, problems: Problems) -> list:
    from mmcore.eval.kosmos2 import generate_phrase_boxes
    from mmcore.models.kosmos2.ground import load

    model, processor = load(args.checkpoint, device=args.device, dtype=args.dtype)
    boxes = generate_phrase_boxes(
        model,
        processor,
        queries,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        problems=problems,
        progress=not args.quiet,
        **_generation_kwargs(args),
    )
    return list(boxes)


def _write_jsonl(path: str | None, rows) -> None:
    if path is None:
        return
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _rec(args, problems: Problems) -> dict:
    from mmcore.eval.kosmos2 import PhraseQuery, to_pixels
    from mmcore.eval.refexp import load_refexp, rec_accuracy, rec_correct, rec_prompt

    examples = load_refexp(args.annotations, problems)[: args.limit]
    root = Path(args.images)
    queries = [PhraseQuery(resolve_image(root, e.file_name), rec_prompt(e.expression), e.expression) for e in examples]
    predicted = _predict(args, queries, problems)
    kept = [(e, to_pixels(p, e.width, e.height)) for e, p in zip(examples, predicted, strict=True) if p is not None]
    metrics = rec_accuracy([e for e, _ in kept], [p for _, p in kept])
    _write_jsonl(
        args.predictions,
        ({"id": e.id, "expression": e.expression, "boxes": p, "correct": rec_correct(p, e.box)} for e, p in kept),
    )
    return {"metrics": metrics, "examples": len(examples), "evaluated": len(kept)}


def _flickr(args, problems: Problems) -> dict:
    from mmcore.eval.flickr import any_box_recall, flickr_prompt, load_flickr, phrase_hits
    from mmcore.eval.kosmos2 import PhraseQuery, to_pixels

    phrases = load_flickr(args.annotations, problems)[: args.limit]
    root = Path(args.images)
    queries = [PhraseQuery(root / p.file_name, flickr_prompt(p.caption, p.span), p.phrase) for p in phrases]
    predicted = _predict(args, queries, problems)
    kept = [(p, to_pixels(b, p.width, p.height)) for p, b in zip(phrases, predicted, strict=True) if b is not None]
    metrics = any_box_recall([p for p, _ in kept], [b for _, b in kept])
    _write_jsonl(
        args.predictions,
        (
            {
                "image_id": p.image_id,
                "phrase": p.phrase,
                "span": list(p.span),
                "boxes": b,
                "hits": {f"R@{k}": v for k, v in phrase_hits(b, p.boxes).items()},
            }
            for p, b in kept
        ),
    )
    return {"metrics": metrics, "examples": len(phrases), "evaluated": len(kept)}


def _retrieval(args, problems: Problems) -> dict:
    from mmcore.eval.retrieval import cosine_scores, load_matrix, load_video_of_text, retrieval_metrics

    if (args.scores is None) == (args.text_features is None or args.video_features is None):
        raise ValueError("give --scores, or both --text-features and --video-features")
    if args.scores is not None:
        scores = load_matrix(args.scores, "--scores")
    else:
        scores = cosine_scores(
            load_matrix(args.text_features, "--text-features"),
            load_matrix(args.video_features, "--video-features"),
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
    video_of_text = None
    if args.video_of_text is not None:
        video_of_text = load_video_of_text(args.video_of_text, *scores.shape)
    return {"metrics": retrieval_metrics(scores, video_of_text), "texts": scores.shape[0], "videos": scores.shape[1]}


TASKS = {"rec": _rec, "flickr": _flickr, "retrieval": _retrieval}


def _headline(task: str, metrics: dict) -> str:
    if task == "rec":
        return f"accuracy {metrics['accuracy']:.2f} ({metrics['correct']}/{metrics['total']})"
    if task == "flickr":
        return " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("R@")) + f" ({metrics['total']})"
    return "  ".join(
        f"{d}: R@1 {m['R@1']:.2f} R@5 {m['R@5']:.2f} R@10 {m['R@10']:.2f} MdR {m['median_rank']:g}"
        for d, m in metrics.items()
    )


def run_cli(args) -> int:
    """Run ``args.eval_task``, write the report to ``args.out`` (default ``mmcore_eval_<task>.json``)."""
    task = args.eval_task
    problems = Problems()
    start = time.perf_counter()
    result = TASKS[task](args, problems)
    report = {
        "task": task,
        **{k: str(v) for k, v in vars(args).items() if k in ("annotations", "images", "checkpoint") and v},
        **result,
        "problems": problems.summary(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    out = Path(args.out or f"mmcore_eval_{task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{task}: {_headline(task, report['metrics'])}")
    print(problems.line(f"mmcore eval {task}: skipped input") + f"; report: {out}", file=sys.stderr)
    return 0
