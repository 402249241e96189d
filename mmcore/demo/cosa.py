"""``mmcore demo --model cosa``: COSA's claim in miniature, on a CPU, in minutes.

COSA (shared/research/cosa.md) trains on image-text pairs only, but joins several of them on the fly into a pseudo
video-paragraph pair (the frames in order, the captions joined into one paragraph); the paper reports that this
helps text-to-video retrieval, where a query is a paragraph about a sequence of scenes. Here the image-text pairs
are single coloured-shape scenes of ``mmcore.demo.data`` with their plain captions ("a red circle above a blue
square"), and the held-out "videos" are ``frames`` held-out scenes in a row, described by their captions joined in
order.

The same small ``COSAModel`` (CLIP ViT + BERT with cross-attention, every attention ``mmcore.ops.packed_attention``)
is trained twice from the same initial weights on the same batches for the same number of steps: with
``concat=frames`` (the single-sample and the concatenated pass, COSA's recipe) and with ``concat=1`` (single samples
only: the same objectives, ITC, ITM, MLM and captioning, on the single pairs). Both are then evaluated on the held-out
videos by paragraph-to-video retrieval as COSA evaluates it: ITC ranking, then the top ``rerank_k`` re-ranked by ITM
(``mmcore.models.cosa.retrieval``). The output folder gets ``metrics.json``, ``retrieval_curve.png`` (R@1 against
the step, and the final figures) and ``examples.png`` (queries with the videos each model ranks first).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmcore.demo import data
from mmcore.demo.common import check_positive_ints, check_threads, default_threads, lr_at, make_optimizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, the words follow


@dataclass
class CosaDemoConfig:
    """Everything a COSA demo run depends on.

    Model: a ViT of ``vision_layers`` x ``width`` on ``image_size`` pixels in ``patch_size`` patches; a BERT of
    ``text_layers`` x ``width`` with cross-attention; ``frames`` temporal slots. Training: ``steps`` AdamW steps of
    ``batch_size`` single scenes (at most ``max_shapes`` shapes each) with their captions, learning rate ``lr``
    after ``warmup_steps`` of linear warmup, cosine decay to ``lr / 10``; once with ``concat = frames``, once with
    ``concat = 1``. Evaluation: ``videos`` held-out videos of ``frames`` scenes, ITC ranking re-ranked by ITM over
    the top ``rerank_k``; the learning curve (ITC R@1 on the first ``curve_videos``) every ``eval_every`` steps."""

    steps: int = 800
    seed: int = 0
    batch_size: int = 32
    frames: int = 4
    image_size: int = 64
    patch_size: int = 16
    width: int = 128
    heads: int = 4
    vision_layers: int = 2
    text_layers: int = 2
    max_shapes: int = 2
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    videos: int = 200
    rerank_k: int = 16
    curve_videos: int = 100
    eval_every: int = 100
    threads: int | None = None

    def __post_init__(self):
        positive = ("steps", "batch_size", "frames", "image_size", "patch_size", "width", "heads", "vision_layers",
                    "text_layers", "max_shapes", "videos", "curve_videos", "eval_every")  # fmt: skip
        check_positive_ints(self, positive)
        if self.frames < 2:
            raise ValueError(f"CosaDemoConfig.frames must be at least 2 (concat = frames vs 1), got {self.frames}")
        if self.batch_size < self.frames - 1:
            raise ValueError(
                f"CosaDemoConfig.batch_size {self.batch_size} is too small for {self.frames - 1} partners per sample"
            )
        if isinstance(self.rerank_k, bool) or not isinstance(self.rerank_k, int) or self.rerank_k < 0:
            raise ValueError(f"CosaDemoConfig.rerank_k must be an int >= 0, got {self.rerank_k!r}")
        if self.curve_videos > self.videos:
            raise ValueError(f"CosaDemoConfig.curve_videos {self.curve_videos} exceeds videos {self.videos}")
        check_threads(self)
        if not self.lr > 0:
            raise ValueError(f"CosaDemoConfig.lr must be positive, got {self.lr!r}")


# ------------------------------------------------------------------------------------------ tokenizer and model


def build_tokenizer():
    """A word-level BERT-style tokenizer: ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4, then the
    words of ``data.words()``; a text becomes ``[CLS] words [SEP]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *data.words()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def model_config(config: CosaDemoConfig, vocab_size: int):
    """The small ``COSAConfig``: no dropout, a ViT with fixed 2D sin-cos position embeddings (the Kosmos-2 demo's
    finding: learned ones are slow to discover position), ``frames`` temporal slots, COSA's objectives."""
    from mmcore.models.cosa import COSAConfig, COSATextConfig
    from mmcore.models.layers.vit import ViTConfig

    w = config.width
    special = {name: i for i, name in enumerate(("pad", "unk", "cls", "sep", "mask"))}
    text = COSATextConfig(
        vocab_size=vocab_size,
        hidden_size=w,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.heads,
        intermediate_size=4 * w,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=128,
        pad_token_id=special["pad"],
        cls_token_id=special["cls"],
        sep_token_id=special["sep"],
        mask_token_id=special["mask"],
        random_token_start=len(SPECIAL_TOKENS),
    )
    vision = ViTConfig(
        hidden_size=w,
        intermediate_size=4 * w,
        num_layers=config.vision_layers,
        num_heads=config.heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        position_embedding="sincos2d",
    )
    return COSAConfig(text=text, vision=vision, frame_slots=config.frames, contra_dim=w, concat=config.frames)


def build_model(config: CosaDemoConfig, vocab_size: int):
    """A freshly initialised ``COSAModel`` (the same weights for the same ``config.seed``)."""
    from mmcore.models.cosa import COSAModel

    torch.manual_seed(config.seed)
    return COSAModel(model_config(config, vocab_size)).init_weights()


# ------------------------------------------------------------------------------------------ data


def pixel_values(scenes: Sequence[data.Scene]) -> torch.Tensor:
    """(n, 3, H, W) float32: the scenes' images scaled to [0, 1] and normalised with CLIP's mean and std."""
    from mmcore.models.kosmos2.processing import CLIP_MEAN, CLIP_STD

    x = np.stack([np.asarray(s.image(), dtype=np.float32) for s in scenes]) / 255.0
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def train_batch(config: CosaDemoConfig, tokenizer, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch, the same in both runs: ``batch_size`` train-split scenes as one-frame videos
    (batch, 1, 3, H, W), their captions' ids and attention mask (right-padded)."""
    first = step * config.batch_size
    scenes = [data.scene("train", config.seed, first + i, max_shapes=config.max_shapes, image_size=config.image_size)
              for i in range(config.batch_size)]  # fmt: skip
    enc = tokenizer([s.text() for s in scenes], padding=True, return_tensors="pt")
    return pixel_values(scenes)[:, None], enc["input_ids"], enc["attention_mask"]


@dataclass
class Videos:
    """Held-out videos: ``scenes[v]`` the ``frames`` scenes of video v in order, ``paragraphs[v]`` their captions
    joined in order, ``pixels`` (videos, frames, 3, H, W)."""

    scenes: list[list[data.Scene]]
    paragraphs: list[str]
    pixels: torch.Tensor

    def __len__(self) -> int:
        return len(self.paragraphs)

    def head(self, count: int) -> Videos:
        return Videos(self.scenes[:count], self.paragraphs[:count], self.pixels[:count])


def heldout_videos(config: CosaDemoConfig) -> Videos:
    """``config.videos`` videos; video v holds held-out scenes ``v * frames`` ... ``v * frames + frames - 1``."""
    f = config.frames
    scenes = [[data.scene("heldout", config.seed, v * f + j, max_shapes=config.max_shapes, image_size=config.image_size)
               for j in range(f)] for v in range(config.videos)]  # fmt: skip
    paragraphs = [" ".join(s.text() for s in video) for video in scenes]
    pixels = pixel_values([s for video in scenes for s in video])
    return Videos(scenes, paragraphs, pixels.view(len(scenes), f, *pixels.shape[1:]))


# ------------------------------------------------------------------------------------------ training and evaluation


@torch.no_grad()
def retrieval(model, tokenizer, videos: Videos, *, rerank_k: int) -> dict:
    """Paragraph <-> video retrieval of ``videos`` (``evaluate_retrieval``: ITC, and ITM over the top ``rerank_k``
    when > 0), with ``scores`` (``return_scores``)."""
    from mmcore.models.cosa import evaluate_retrieval

    model.eval()
    enc = tokenizer(videos.paragraphs, padding=True, truncation=True, max_length=model.config.max_concat_tokens,
                    return_tensors="pt")  # fmt: skip
    features = model.encode_vision(videos.pixels)
    return evaluate_retrieval(model, enc["input_ids"], enc["attention_mask"], features=features, rerank_k=rerank_k,
                              return_scores=True)  # fmt: skip


def train(model, tokenizer, config: CosaDemoConfig, *, concat: int, curve_videos: Videos, desc: str) -> list[dict]:
    """Train ``model`` in place for ``config.steps`` steps with ``concat``; a progress bar shows the loss and the
    last curve R@1. Returns one dict per step: step, loss, seconds, the named losses, and ``R@1`` (paragraph to
    video, ITC, in percent) at the evaluated steps."""
    from tqdm.auto import tqdm

    opt = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)  # masks, hard negatives, partners
    history, smooth, r1 = [], None, None
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        model.train()
        pixels, ids, mask = train_batch(config, tokenizer, step)
        for group in opt.param_groups:
            group["lr"] = lr_at(config, step, config.steps)
        losses = model(pixels, ids, mask, concat=concat, generator=generator)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = {"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}}
        smooth = record["loss"] if smooth is None else 0.95 * smooth + 0.05 * record["loss"]
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            r1 = record["R@1"] = retrieval(model, tokenizer, curve_videos, rerank_k=0)["itc"]["t2v"]["R@1"]
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        postfix = {"loss": f"{smooth:.3f}"}
        if r1 is not None:
            postfix["heldout_R@1"] = f"{r1:.1f}"
        bar.set_postfix(postfix, refresh=False)
    bar.close()
    model.eval()
    return history


# ------------------------------------------------------------------------------------------ pictures


def save_curve(path: Path, runs: dict, chance: float) -> None:
    """Left: paragraph-to-video ITC R@1 on the curve videos against the step, per run. Right: the final R@1 of each
    run, ITC and ITC + ITM re-ranking, on all held-out videos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        evals = [h for h in run["history"] if "R@1" in h]
        ax_curve.plot([h["step"] for h in evals], [h["R@1"] for h in evals], marker="o", markersize=3, label=name)
    ax_curve.axhline(100 * chance, color="grey", linestyle=":", label="chance")
    ax_curve.set(xlabel="step", ylabel="R@1 (%), ITC", title="paragraph -> video, held-out curve videos", ylim=(0, 100))
    ax_curve.legend(fontsize=8)
    names = list(runs)
    kinds = [("itc", "ITC"), ("itm", f"ITC + ITM top-{runs[names[0]]['rerank_k']}")]
    width = 0.8 / len(kinds)
    for j, (key, label) in enumerate(kinds):
        values = [runs[n]["metrics"][key]["t2v"]["R@1"] if key in runs[n]["metrics"] else 0.0 for n in names]
        bars = ax_bar.bar([i + j * width for i in range(len(names))], values, width, label=label)
        ax_bar.bar_label(bars, fmt="%.1f", fontsize=8)
    ax_bar.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(names))], names)
    ax_bar.set(ylabel="R@1 (%)", title="paragraph -> video, all held-out videos", ylim=(0, 100))
    ax_bar.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_examples(path: Path, videos: Videos, runs: dict, queries: Sequence[int], *, scale: int = 2) -> None:
    """For each query paragraph: the true video, then the video each run ranks first (ITC + ITM when re-ranked),
    framed green when right, red when wrong."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image, ImageOps

    def strip(video: int, color) -> Image.Image:
        frames = [s.image() for s in videos.scenes[video]]
        w, h = frames[0].size
        row = Image.new("RGB", (w * len(frames) + 2 * (len(frames) - 1), h), (255, 255, 255))
        for i, frame in enumerate(frames):
            framed = ImageOps.expand(frame.crop((1, 1, w - 1, h - 1)), border=1, fill=(180, 180, 180))
            row.paste(framed, (i * (w + 2), 0))
        row = ImageOps.expand(row, border=2, fill=color)
        return row.resize((row.width * scale, row.height * scale), Image.Resampling.NEAREST)

    names = list(runs)
    fig, axes = plt.subplots(len(queries), 1 + len(names), figsize=(3.6 * (1 + len(names)), 1.9 * len(queries)),
                             squeeze=False)  # fmt: skip
    for r, q in enumerate(queries):
        panels = [("query's video", strip(q, (120, 120, 120)))]
        for name in names:
            top = runs[name]["top1"][q]
            panels.append((f"{name}: first", strip(top, (40, 160, 60) if top == q else (220, 40, 40))))
        for c, (title, pic) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(pic)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
        axes[r][0].set_ylabel("\n".join(textwrap.wrap(videos.paragraphs[q], 30)), fontsize=5, rotation=0,
                              ha="right", va="center")  # fmt: skip
    fig.suptitle("paragraph -> video retrieval on held-out videos (green: right video ranked first)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the run


def run(config: CosaDemoConfig, out: Path, *, log=print) -> dict:
    """Train with ``concat = frames`` and with ``concat = 1``, evaluate both, write ``out``; returns the metrics."""
    begin = time.perf_counter()
    torch.set_num_threads(config.threads or default_threads())
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    videos = heldout_videos(config)
    curve_videos = videos.head(config.curve_videos)
    params = sum(p.numel() for p in build_model(config, len(tokenizer)).parameters())
    log(f"mmcore demo --model cosa: a COSA of {params / 1e6:.2f}M parameters trains twice from the same weights on "
        f"the same {config.steps} batches of {config.batch_size} single scenes, with concat = {config.frames} and "
        f"with concat = 1; {torch.get_num_threads()} threads")  # fmt: skip
    runs = {}
    for concat in (config.frames, 1):
        name = f"concat={concat}"
        model = build_model(config, len(tokenizer))
        t0 = time.perf_counter()
        history = train(model, tokenizer, config, concat=concat, curve_videos=curve_videos, desc=name)
        seconds = time.perf_counter() - t0
        result = retrieval(model, tokenizer, videos, rerank_k=config.rerank_k)
        scores = result.pop("scores")
        # the picture shows the ranking the headline figure measures
        top1 = scores["itm" if config.rerank_k else "itc"].argmax(1).tolist()
        runs[name] = {"history": history, "metrics": result, "seconds": seconds, "rerank_k": config.rerank_k,
                      "top1": top1}  # fmt: skip
        log(f"{name}: paragraph -> video R@1 {result['itc']['t2v']['R@1']:.1f}% (ITC)"
            + (f", {result['itm']['t2v']['R@1']:.1f}% (ITC + ITM)" if "itm" in result else "")
            + f" in {seconds:.0f} s")  # fmt: skip

    chance = 1.0 / len(videos)
    save_curve(out / "retrieval_curve.png", runs, chance)
    mine, single = runs[f"concat={config.frames}"], runs["concat=1"]
    queries = [q for q in range(len(videos)) if mine["top1"][q] == q and single["top1"][q] != q][:2]
    queries += [q for q in range(len(videos)) if q not in queries][: 3 - len(queries)]
    save_examples(out / "examples.png", videos, runs, queries)

    key = "itm" if config.rerank_k else "itc"
    metrics = {
        "paragraph_to_video_R@1": {name: r["metrics"][key]["t2v"]["R@1"] for name, r in runs.items()},
        "ranking": "ITC, top-k re-ranked by ITM" if config.rerank_k else "ITC",
        "chance_R@1": 100 * chance,
        "videos": len(videos),
        "frames": config.frames,
        "steps": config.steps,
        "seconds": time.perf_counter() - begin,
        "parameters": params,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": asdict(config),
        "runs": {
            name: {
                "retrieval": r["metrics"],
                "train_seconds": r["seconds"],
                "curve": [{k: h[k] for k in ("step", "seconds", "R@1")} for h in r["history"] if "R@1" in h],
                "final_losses": {k: v for k, v in r["history"][-1].items() if k not in ("step", "seconds", "R@1")},
            }
            for name, r in runs.items()
        },
        "files": ["metrics.json", "retrieval_curve.png", "examples.png"],
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return metrics


def run_cli(args) -> int:
    """``mmcore demo --model cosa``: run with the defaults (``--steps``, ``--seed``, ``--threads`` override them)
    and print a summary."""
    overrides = {"steps": args.steps, "seed": args.seed, "threads": args.threads}
    config = CosaDemoConfig(**{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out)
    metrics = run(config, out)
    r1 = metrics["paragraph_to_video_R@1"]
    print(f"paragraph -> video retrieval over {metrics['videos']} held-out videos of {metrics['frames']} scenes "
          f"({metrics['ranking']}), R@1: " + ", ".join(f"{k} {v:.1f}%" for k, v in r1.items())
          + f" (chance {metrics['chance_R@1']:.1f}%)")  # fmt: skip
    print(f"{metrics['steps']} steps per run, {metrics['seconds']:.0f} s in all; wrote {out}/ "
          f"({', '.join(metrics['files'])})")  # fmt: skip
    return 0
