"""The ``mmcore`` command.

mmcore info      version, torch/Triton/CUDA, whether mmcore._C loaded, and each op's backends
mmcore ground    grounded captions (markdown links + annotated images) from a Kosmos-2 checkpoint
mmcore grit      captions + images -> GrIT-format JSONL (spaCy noun chunks, referring expressions, OWLv2 boxes)
mmcore eval      REC accuracy, Flickr30k Entities ANY-BOX recall (Kosmos-2), retrieval R@k; a JSON report
mmcore demo      a small Kosmos-2 learns grounding from scratch on the CPU (--model cosa: COSA, concat 4 vs 1)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys


def _info(args) -> int:
    import torch

    import mmcore
    from mmcore import _extension
    from mmcore.ops import _dispatch

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "mmcore": mmcore.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "extension": "loaded" if _extension.C_ERROR is None else _extension.C_ERROR,
        "extension_cuda": _extension.cuda_built(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton_version,
        "triton_interpret": _dispatch.triton_interpret(),
        "backends": {name: {d: op.available(d) for d in devices} for name, op in sorted(_dispatch.ops().items())},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"mmcore {report['mmcore']}  (python {report['python']}, torch {report['torch']})")
    print(f"  C++ extension mmcore._C : {report['extension']}")
    print(f"  CUDA kernels built      : {'yes' if report['extension_cuda'] else 'no'}")
    print(f"  CUDA device             : {report['cuda_device'] or 'none'}")
    triton_line = report["triton"] or "not installed"
    if report["triton"] and report["triton_interpret"]:
        triton_line += " (TRITON_INTERPRET=1: CPU interpreter)"
    print(f"  Triton                  : {triton_line}")
    print("  backends that can run here, in default order:")
    width = max(len(n) for n in report["backends"])
    for name, per_device in report["backends"].items():
        cols = "   ".join(f"{d}: {', '.join(b) or '-'}" for d, b in per_device.items())
        print(f"    {name:<{width}}  {cols}")
    return 0


def _ground(args) -> int:
    from mmcore.models.kosmos2.ground import run_cli

    try:
        return run_cli(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmcore ground: {e}", file=sys.stderr)
        return 2


def _eval(args) -> int:
    from mmcore.eval.cli import run_cli

    try:
        return run_cli(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmcore eval {args.eval_task}: {e}", file=sys.stderr)
        return 2


def _grit(args) -> int:
    from mmcore.data.grit import run_cli

    try:
        return run_cli(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"mmcore grit: {e}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    if args.model == "cosa" and args.blind_steps is not None:
        print("mmcore demo: --blind-steps is for the Kosmos-2 demo (the COSA demo has no blind baseline)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.out is None:
        args.out = "mmcore_demo" if args.model == "kosmos2" else f"mmcore_demo_{args.model}"
    try:
        if args.model == "cosa":
            from mmcore.demo.cosa import run_cli
        else:
            from mmcore.demo.kosmos2 import run_cli
    except ImportError as e:
        print(f"mmcore demo: {e} (install the demo's dependencies: pip install -e '.[demo]')", file=sys.stderr)
        return 2
    try:
        return run_cli(args)
    except ValueError as e:  # a bad --steps / --seed / --threads, named by the config's check
        print(f"mmcore demo: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmcore", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the version and which backends can run here")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    ground = sub.add_parser(
        "ground",
        help="caption images with Kosmos-2, boxes as markdown links; draw them",
        description="One image: print the grounded caption (and draw it with --out FILE.png). A folder: caption "
        "every image in batches, write OUT/results.jsonl and one annotated PNG per image (OUT defaults to "
        "./mmcore_ground).",
    )
    ground.add_argument("--checkpoint", required=True, help="local Hugging Face Kosmos-2 folder or hub id")
    ground.add_argument("--image", required=True, help="an image file or a folder of images")
    ground.add_argument("--prompt", default="<grounding> An image of")
    ground.add_argument("--out", help="annotated PNG (one image) or output folder (a folder of images)")
    ground.add_argument("--batch-size", type=int, default=8)
    ground.add_argument("--max-new-tokens", type=int, default=64)
    ground.add_argument("--device", default="cpu")
    ground.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ground.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    ground.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (default 1: greedy)")
    ground.add_argument("--seed", type=int, default=None)
    ground.set_defaults(func=_ground)
    grit = sub.add_parser(
        "grit",
        help="captions + images -> GrIT-format JSONL (noun chunks, referring expressions, detector boxes)",
        description="Each JSONL row {image, caption[, key, url]}: spaCy noun chunks and referring expressions, boxes "
        "from a local OWLv2 checkpoint, cross-chunk NMS and the score threshold; rows without a box are dropped.",
    )
    grit.add_argument("--captions", required=True, help="JSONL with one {image, caption} object per line")
    grit.add_argument("--images", help="folder the image paths are relative to (default: as written)")
    grit.add_argument("--detector", required=True, help="local OWLv2 folder (Owlv2ForObjectDetection + tokenizer)")
    grit.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline with a parser (name or folder)")
    grit.add_argument("--out", default="grit.jsonl")
    grit.add_argument("--batch-size", type=int, default=64, help="captions parsed per spaCy batch")
    grit.add_argument("--score-threshold", type=float, default=0.65, help="keep boxes scoring above this")
    grit.add_argument("--nms-iou", type=float, default=0.5, help="cross-chunk NMS overlap threshold")
    grit.add_argument("--device", default="cpu")
    grit.add_argument("--quiet", action="store_true", help="no progress bar")
    grit.set_defaults(func=_grit)
    evaluate = sub.add_parser("eval", help="evaluate: rec, flickr (Kosmos-2 grounding), retrieval (scores)")
    tasks = evaluate.add_subparsers(dest="eval_task", required=True)
    for name, text in (
        ("rec", "RefCOCO/RefCOCO+/RefCOCOg (MDETR JSON): accuracy at IoU >= 0.5 of the first generated box"),
        ("flickr", "Flickr30k Entities (MDETR JSON): ANY-BOX R@1/5/10 of the generated boxes"),
    ):
        task = tasks.add_parser(name, help=text, description=text)
        task.add_argument("--checkpoint", required=True, help="local Hugging Face Kosmos-2 folder or hub id")
        task.add_argument("--annotations", required=True, help="MDETR preprocessed annotation JSON")
        task.add_argument("--images", required=True, help="folder of the images named by file_name")
        task.add_argument("--batch-size", type=int, default=16)
        task.add_argument("--max-new-tokens", type=int, default=32 if name == "rec" else 64)
        task.add_argument("--device", default="cpu")
        task.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
        task.add_argument("--constrain-boxes", action="store_true", help="box grammar (off: the original protocol)")
        task.add_argument("--no-repeat-ngram-size", type=int, default=None, help="default: the checkpoint's (3)")
        task.add_argument("--limit", type=int, default=None, help="evaluate the first N entries only")
        task.add_argument("--predictions", help="also write per-query predictions to this JSONL file")
    task = tasks.add_parser("retrieval", help="R@1/5/10, median/mean rank of a (texts, videos) score matrix")
    task.add_argument("--scores", help=".npy/.pt (texts, videos) scores, higher first")
    task.add_argument("--text-features", help=".npy/.pt (texts, dim) features (cosine with --video-features)")
    task.add_argument("--video-features", help=".npy/.pt (videos, dim) features")
    task.add_argument("--video-of-text", help="JSON list: the video column of each text row (default: i -> i)")
    task.add_argument("--batch-size", type=int, default=1024, help="text rows per similarity batch")
    for task in tasks.choices.values():
        task.add_argument("--out", help="JSON report (default: ./mmcore_eval_<task>.json)")
        task.add_argument("--quiet", action="store_true", help="no progress bar")
        task.set_defaults(func=_eval)
    demo = sub.add_parser(
        "demo",
        help="train a small Kosmos-2 (or COSA) from scratch on coloured shapes (CPU, minutes); metrics and pictures",
        description="Kosmos-2 (default): train a small Kosmos-2 from scratch to ground referring expressions and "
        "captions of synthetic shapes, and an image-blind baseline; write OUT/metrics.json, annotated PNGs and "
        "learning_curve.png. --model cosa: train a small COSA on single shape scenes with concat = 4 and with "
        "concat = 1, compare paragraph -> video retrieval on held-out 4-scene videos; write OUT/metrics.json, "
        "retrieval_curve.png and examples.png.",
    )
    demo.add_argument("--model", choices=("kosmos2", "cosa"), default="kosmos2", help="which demo (default: kosmos2)")
    demo.add_argument("--out", help="output folder (default: ./mmcore_demo, ./mmcore_demo_cosa for --model cosa)")
    demo.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    demo.add_argument("--blind-steps", type=int, help="steps of the image-blind baseline (default: steps / 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, help="torch threads (default: the cores idle when it starts)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
