"""``mmcore demo``: a small Kosmos-2 learns to link words to boxes from scratch, on a CPU, in minutes.

The pieces are mmcore's own: a word-level tokenizer built with the ``tokenizers`` library, to which
``Kosmos2Processor`` adds Kosmos-2's tag and location tokens; ``Kosmos2ForConditionalGeneration`` built from a
small ``Kosmos2Config``; packed batches (``mmcore.data``: first-fit-decreasing bins of a token budget,
``collate_kosmos2_packed``) through ``forward_packed`` and its fused cross-entropy; batched generation with the
box grammar. The data are the coloured shapes of ``mmcore.demo.data``.

A run trains the model twice: on the images, and on blank images (the image-blind baseline: what the text alone
allows, i.e. chance). Both are evaluated on held-out scenes by referring-expression comprehension (REC):
``<grounding><phrase> the red circle</phrase>`` -> ``<object><patch_index_a><patch_index_b></object>``, a hit when
the decoded box has IoU >= 0.5 with the drawn one. The model then captions held-out scenes with the box grammar on.
The output folder gets ``metrics.json``, annotated pictures and the learning curves.

How the recipe (``DemoConfig``'s defaults) was found, by REC accuracy on 400 held-out expressions (2 cores):

- Kosmos-2 as released, scaled down (learned ViT positions, 64 latent queries, init std 0.02): 0.02-0.03 after 8
  minutes, what predicting the usual box places gets (the issue that asked for this demo measured it).
- Initial values sized for width 128 (``build_model``: init std ``width**-0.5``, location tokens on a 2D sin-cos
  code, resampler input gain ``sqrt(width)``) and a fixed 2D sin-cos position embedding in the ViT: scenes of one
  shape reach 0.84 in 400 steps, but scenes of one to three shapes from the start stay at 0.03 after 800.
- A curriculum (one shape first, up to three over the first 60% of the steps), 16 latent queries and 1,024-token
  batches: 0.52 after 1,500 steps at learning rate 2e-3, 0.58 at 1e-3; 0.02 with 64 latent queries, 0.04 at 4e-3.
- Learning rate 1e-3, the curriculum over the first 40%, 3,000 steps: 0.95 (seed 0); seed 1 reached 0.68 after
  2,000 steps where seed 0 had 0.89, so runs vary by seed. With these defaults ``mmcore demo`` measured 0.973
  (blind baseline 0.005) in 485 s on 2 idle cores, ``--seed 2`` 0.922 and ``--seed 1`` 0.690 (still rising).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmcore.demo import data
from mmcore.demo.common import check_positive_ints, check_threads, default_threads, lr_at, make_optimizer
from mmcore.eval.kosmos2 import phrase_boxes
from mmcore.eval.refexp import rec_correct
from mmcore.grounding import extract_entities, to_markdown

LOCATION_INITS = ("sincos2d", "normal")
# A caption's first word, as Kosmos-2 is prompted with "<grounding> An image of": after "<grounding><phrase>" the
# training data continue with " the" (a referring expression, 3 samples in 4) or " a" (a caption), and greedy
# decoding from "<grounding>" alone writes an expression
CAPTION_PROMPT = "<grounding><phrase> a"
WINDOW = 256  # scenes generated and packed together (first fit decreasing over this many samples)


@dataclass
class DemoConfig:
    """Everything a demo run depends on (the defaults are the measured recipe, see the module docstring).

    Model: a ViT of ``vision_layers`` x ``width`` on ``image_size`` pixels cut in ``patch_size`` patches, with
    ``position_embedding`` ("sincos2d" or "learned"); ``latent_query_num`` resampler queries; a decoder of
    ``text_layers`` x ``width``; a ``num_bins`` x ``num_bins`` location grid. Training: ``steps`` AdamW steps on
    packed batches of at most ``token_budget`` tokens; learning rate ``lr`` after ``warmup_steps`` of linear warmup,
    cosine decay to ``lr / 10``; a share ``caption_fraction`` of the samples are grounded captions, the others
    referring expressions; over the first ``curriculum`` share of the steps the scenes hold at most one shape, then
    two, ... up to ``max_shapes``. The blind baseline trains ``blind_steps`` steps (default a quarter of ``steps``:
    with nothing to see it settles on the text prior long before). Evaluation: the learning curve's REC accuracy on
    ``curve_expressions`` held-out expressions every ``eval_every`` steps, the final one on ``eval_expressions``;
    ``pictures`` annotated held-out scenes."""

    steps: int = 3000
    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    heads: int = 4
    vision_layers: int = 3
    text_layers: int = 3
    latent_query_num: int = 16
    num_bins: int = 16
    position_embedding: str = "sincos2d"
    location_init: str = "sincos2d"
    resampler_input_gain: float | None = None
    token_budget: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    caption_fraction: float = 0.25
    max_shapes: int = 3
    curriculum: float = 0.4
    blind_steps: int | None = None
    eval_every: int = 100
    curve_expressions: int = 96
    eval_expressions: int = 400
    pictures: int = 6
    threads: int | None = None

    def __post_init__(self):
        positive = ("steps", "image_size", "patch_size", "width", "heads", "vision_layers", "text_layers",
                    "latent_query_num", "num_bins", "token_budget", "max_shapes", "eval_every", "curve_expressions",
                    "eval_expressions")  # fmt: skip
        check_positive_ints(self, positive)
        if self.blind_steps is not None and (not isinstance(self.blind_steps, int) or self.blind_steps < 0):
            raise ValueError(f"DemoConfig.blind_steps must be None or an int >= 0, got {self.blind_steps!r}")
        if not 0.0 <= self.caption_fraction <= 1.0:
            raise ValueError(f"DemoConfig.caption_fraction must be in [0, 1], got {self.caption_fraction}")
        if self.location_init not in LOCATION_INITS:
            raise ValueError(f"DemoConfig.location_init must be one of {LOCATION_INITS}, got {self.location_init!r}")
        check_threads(self)
        if not 0.0 <= self.curriculum < 1.0:
            raise ValueError(f"DemoConfig.curriculum must be in [0, 1), got {self.curriculum}")

    @property
    def blind(self) -> int:
        """Steps of the blind baseline."""
        return max(1, self.steps // 4) if self.blind_steps is None else self.blind_steps


# ------------------------------------------------------------------------------------------ tokenizer and model


def build_processor(config: DemoConfig):
    """A ``Kosmos2Processor`` over a word-level tokenizer laid out as Kosmos-2's: ``<s>`` 0, ``<pad>`` 1, ``</s>``
    2, ``<unk>`` 3; then ``latent_query_num`` pieces that only ever fill the image slots (ids 4, 5, ...: the
    processor's default ``first_image_token_id``, as in the released vocabulary, where they are ordinary pieces);
    the words as sentencepiece-style ``▁word`` pieces; then the 11 tags and ``num_bins**2`` location tokens the
    processor appends, so ``GroundingTokens.from_config`` finds them at the end of the vocabulary.

    NOTE: the image slots must not reuse the ids of tags or location tokens: ``kosmos2_labels`` starts the targets
    after the first ``</image>`` id, and the box grammar reads the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmcore.models.kosmos2 import Kosmos2Processor

    slots = [f"<image_slot_{k}>" for k in range(config.latent_query_num)]
    pieces = ["<s>", "<pad>", "</s>", "<unk>", *slots, *(f"▁{w}" for w in data.words()), "▁"]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    return Kosmos2Processor(
        tokenizer,
        image_size=config.image_size,
        num_image_tokens=config.latent_query_num,
        num_patch_index_tokens=config.num_bins**2,
    )


def model_config(config: DemoConfig, vocab_size: int):
    """The small ``Kosmos2Config``: no dropout (a model this small underfits; dropout only slows it down) and
    ``init_std = width**-0.5``, the scale that keeps activations O(1) through a linear layer of this width (the
    released model's 0.02 suits widths near 2,500; at width 128 it starts every signal several times too small)."""
    from mmcore.models.kosmos2 import Kosmos2Config, Kosmos2TextConfig, ViTConfig

    w = config.width
    vision = ViTConfig(
        hidden_size=w,
        intermediate_size=4 * w,
        num_layers=config.vision_layers,
        num_heads=config.heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        position_embedding=config.position_embedding,
    )
    text = Kosmos2TextConfig(
        vocab_size=vocab_size,
        embed_dim=w,
        layers=config.text_layers,
        attention_heads=config.heads,
        ffn_dim=4 * w,
        dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=256,
        no_repeat_ngram_size=0,
        init_std=w**-0.5,
    )
    return Kosmos2Config(text=text, vision=vision, latent_query_num=config.latent_query_num, num_bins=config.num_bins)


def location_code(num_bins: int, dim: int) -> torch.Tensor:
    """(num_bins**2, dim) float32: for the cell (row, col) of location token ``row * num_bins + col``, the sines and
    cosines of row (first half) and of col (second half) at dim / 4 frequencies whose periods run geometrically
    from 2.5 cells to 4 x num_bins cells, so neighbouring cells get similar codes and every frequency varies over
    the grid (unlike the ViT's 10000**(-k/d) frequencies, most of which are flat over 16 cells)."""
    if dim % 4:
        raise ValueError(f"location_code needs dim % 4 == 0, got {dim}")
    periods = torch.logspace(math.log10(2.5), math.log10(4.0 * num_bins), dim // 4, dtype=torch.float64)
    freq = 2 * math.pi / periods
    rows, cols = torch.meshgrid(torch.arange(num_bins), torch.arange(num_bins), indexing="ij")

    def encode(pos):
        angle = pos.reshape(-1, 1).to(torch.float64) * freq
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def build_model(config: DemoConfig, vocab_size: int):
    """A freshly initialised model (the same weights for the same ``config.seed``): ``init_weights`` with
    ``init_std = width**-0.5``, then two changes of the initial values, not of the model, that let a model this
    small learn positions within minutes (measured, see the module docstring):

    - the location-token embeddings (also the output head's rows, the head is tied) start as ``location_code``,
      scaled to the std of the other embeddings: a box corner is then a point in a smooth 2D code, and what the
      model learns about one cell carries over to its neighbours, instead of 256 unrelated classes;
    - the resampler's input projection (``image_to_text_projection.dense``) starts ``sqrt(width)`` times larger:
      it reads L2-normalised ViT features (entries ~ width**-0.5), and at the common scale the image part of the
      resampler's keys and values starts ~10x below its latent queries' own.
    """
    from mmcore.models.kosmos2 import Kosmos2ForConditionalGeneration
    from mmcore.ops import GroundingTokens

    torch.manual_seed(config.seed)
    model = Kosmos2ForConditionalGeneration(model_config(config, vocab_size)).init_weights()
    std = model.config.text.init_std
    tokens = GroundingTokens.from_config(model.config.text, config.num_bins)
    with torch.no_grad():
        if config.location_init == "sincos2d":
            code = location_code(config.num_bins, config.width) * (std * math.sqrt(2))  # sin/cos have RMS 1/sqrt(2)
            model.text_model.embed_tokens.weight[tokens.first_loc : tokens.loc_end] = code
        gain = config.width**0.5 if config.resampler_input_gain is None else config.resampler_input_gain
        model.image_to_text_projection.dense.weight.mul_(gain)
    return model


# ------------------------------------------------------------------------------------------ training data


class Encoder:
    """Training samples from scenes, as ``collate_kosmos2_packed`` takes them: the processor's ids for the image
    and the grounded text, with ``</s>`` appended. Only the text goes through the processor per sample; the image
    prefix ``<s><image> <image> x latent_query_num </image>`` is the same in every sample."""

    def __init__(self, processor):
        self.processor = processor
        tok = processor.tokenizer
        boi, eoi = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("</image>")
        self.image_end_id, self.eos = eoi, tok.eos_token_id
        self.prefix = [tok.bos_token_id, boi, *processor.image_token_ids, eoi]
        self.image_mask = [0, 0] + [1] * len(processor.image_token_ids) + [0]

    def ids(self, texts: Sequence[str], boxes: Sequence[list]) -> list[list[int]]:
        """Token ids per (text, boxes): ``<s><image> ... </image>``, the text with its boxes, ``</s>``."""
        enc = self.processor(text=list(texts), bboxes=list(boxes), return_tensors=None)
        return [self.prefix + row[1:] + [self.eos] for row in enc["input_ids"]]

    def samples(self, scenes: Sequence[data.Scene], rng: random.Random, caption_fraction: float) -> list[dict]:
        """One sample per scene: its grounded caption (probability ``caption_fraction``) or one of its referring
        expressions, chosen by ``rng``."""
        texts, boxes = [], []
        for s in scenes:
            if rng.random() < caption_fraction:
                text, bxs = s.caption()
            else:
                text, box = rng.choice(s.expressions())
                bxs = [box]
            texts.append(text)
            boxes.append(bxs)
        pixels = self.processor.preprocess_images([s.image() for s in scenes])
        out = []
        for ids, px in zip(self.ids(texts, boxes), pixels, strict=True):
            mask = self.image_mask + [0] * (len(ids) - len(self.image_mask))
            out.append({"input_ids": torch.tensor(ids), "image_embeds_position_mask": torch.tensor(mask),
                        "pixel_values": px})  # fmt: skip
        return out


def max_shapes_at(config: DemoConfig, step: int, steps: int) -> int:
    """The curriculum: the most shapes a training scene may hold at ``step`` of a run of ``steps`` (the model's and
    the blind baseline's runs ramp over the same share of their own steps)."""
    ramp = config.curriculum * steps
    if ramp <= 0:
        return config.max_shapes
    return min(config.max_shapes, 1 + int(step * config.max_shapes / ramp))


def packed_batches(config: DemoConfig, encoder: Encoder, steps: int) -> Iterator[dict]:
    """Packed training batches for a run of ``steps`` (the curriculum's length), without end. Train-split scenes,
    ``WINDOW`` at a time, become samples that first fit decreasing puts into bins of ``token_budget`` tokens, one bin
    per step; the last bin of a window (the least full) is carried into the next window."""
    from mmcore.data import collate_kosmos2_packed, first_fit_decreasing

    rng = random.Random(f"mmcore-demo/{config.seed}")
    index, step, carry = 0, 0, []
    while True:
        shapes = max_shapes_at(config, step, steps)
        window = [data.scene("train", config.seed, index + i, max_shapes=shapes, image_size=config.image_size)
                  for i in range(WINDOW)]  # fmt: skip
        index += WINDOW
        samples = carry + encoder.samples(window, rng, config.caption_fraction)
        bins = first_fit_decreasing([len(s["input_ids"]) for s in samples], config.token_budget)
        carry = [samples[i] for i in bins[-1]]
        for b in bins[:-1]:
            yield collate_kosmos2_packed(
                [samples[i] for i in b], image_end_id=encoder.image_end_id, latent_query_num=config.latent_query_num
            )
            step += 1


# ------------------------------------------------------------------------------------------ training


def blank_pixels(processor, n: int) -> torch.Tensor:
    """(n, 3, H, W): the processor's pixels of an empty (white) scene, what the blind baseline sees."""
    from PIL import Image

    white = Image.new("RGB", (processor.image_size, processor.image_size), data.BACKGROUND)
    return processor.preprocess_images([white]).expand(n, -1, -1, -1)


def train(model, processor, config: DemoConfig, *, steps: int, blind: bool = False, heldout=None, desc="train"):
    """Train ``model`` in place for ``steps`` packed batches, with a progress bar (loss and location-token accuracy,
    smoothed). blind: every sample sees the blank scene, encoded once per step and shared (the same gradients as a
    batch of blank images). heldout: ``RecItem``s for the learning curve, evaluated every ``eval_every`` steps.
    Returns one dict per step: step, loss, loc_accuracy, seconds, and rec_accuracy at the evaluated steps."""
    from tqdm.auto import tqdm

    opt = make_optimizer(model, config)
    blank = blank_pixels(processor, 1) if blind else None
    batches = packed_batches(config, Encoder(processor), steps)
    history, smooth, rec = [], None, None
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(config, step, steps)
        pixels, embeds = batch["pixel_values"], None
        if blind:
            embeds = model.encode_images(blank).expand(pixels.shape[0], -1, -1)
            pixels = None
        out = model.forward_packed(
            pixels,
            batch["input_ids"],
            batch["image_embeds_position_mask"],
            batch["cu_seqlens"],
            batch["max_seqlen"],
            labels=batch["labels"],
            image_embeds=embeds,
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss, loc = float(out.loss.detach()), float(out.stats["loc_accuracy"])
        smooth = (loss, loc) if smooth is None else (0.95 * smooth[0] + 0.05 * loss, 0.95 * smooth[1] + 0.05 * loc)
        record = {"step": step + 1, "loss": loss, "loc_accuracy": loc}
        if heldout is not None and ((step + 1) % config.eval_every == 0 or step + 1 == steps):
            rec = record["rec_accuracy"] = rec_accuracy(model, processor, heldout, blind=blind)[0]
            model.train()
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        postfix = {"loss": f"{smooth[0]:.3f}", "loc_acc": f"{smooth[1]:.3f}"}
        if rec is not None:
            postfix["heldout_rec"] = f"{rec:.2f}"
        bar.set_postfix(postfix, refresh=False)
    bar.close()
    model.eval()
    return history


# ------------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class RecItem:
    """One held-out referring expression: a shape of a scene."""

    scene: data.Scene
    shape: data.Shape

    @property
    def prompt(self) -> str:
        return f"<grounding><phrase> the {self.shape.name}</phrase>"

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.scene.box(self.shape)


def heldout_items(config: DemoConfig, count: int) -> list[RecItem]:
    """The first ``count`` expressions of the held-out scenes (every shape of scene 0, then of scene 1, ...)."""
    items: list[RecItem] = []
    for s in data.scenes("heldout", config.seed, max_shapes=config.max_shapes, image_size=config.image_size):
        items.extend(RecItem(s, shape) for shape in s.shapes)
        if len(items) >= count:
            return items[:count]
    raise AssertionError("unreachable: data.scenes never ends")


@torch.no_grad()
def generate(model, processor, images, prompts: Sequence[str], *, blind: bool, max_new_tokens: int, batch: int = 128):
    """Greedy generation with the box grammar, prompts left-padded -> the generated strings after ``</image>``."""
    processor.tokenizer.padding_side = "left"
    model.eval()
    texts = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        inputs = processor(images=images[i : i + batch], text=chunk, padding=True, return_tensors="pt")
        pixels = blank_pixels(processor, len(chunk)) if blind else inputs["pixel_values"]
        ids = model.generate(
            pixels,
            inputs["input_ids"],
            inputs["image_embeds_position_mask"],
            inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            constrain_boxes=True,
            no_repeat_ngram_size=0,
        )
        texts.extend(processor.post_process_image_text_to_text(ids))
    return texts


def rec_hits(items: Sequence[RecItem], boxes: Sequence) -> list[bool]:
    """Per item: is its predicted box (None: no box) a hit, IoU >= 0.5 with the true box (``mmcore eval rec``'s
    criterion)."""
    return [rec_correct([b] if b is not None else None, it.box) for it, b in zip(items, boxes, strict=True)]


def rec_accuracy(model, processor, items: Sequence[RecItem], *, blind: bool = False):
    """(the share of items whose predicted box is a hit, the predicted boxes: the expression's first generated box,
    None where the generation holds none)."""
    images = [it.scene.image() for it in items]
    # the grammar puts <object> after </phrase>, so <object> a b </object> are 4 new tokens
    texts = generate(model, processor, images, [it.prompt for it in items], blind=blind, max_new_tokens=4)
    boxes = []
    for it, text in zip(items, texts, strict=True):
        found = phrase_boxes(extract_entities(text, processor.num_bins)[1], f"the {it.shape.name}")
        boxes.append(found[0] if found else None)
    hits = rec_hits(items, boxes)
    return sum(hits) / max(1, len(hits)), boxes


def caption_scenes(model, processor, scenes: Sequence[data.Scene]) -> list[dict]:
    """Grounded captions (prompt ``CAPTION_PROMPT``, box grammar on). Per scene: ``text`` (no tags), ``entities``,
    ``markdown`` (phrases linked to their boxes), ``true_text`` and ``true_entities`` ((phrase, box) pairs)."""
    images = [s.image() for s in scenes]
    texts = generate(model, processor, images, [CAPTION_PROMPT] * len(scenes), blind=False, max_new_tokens=48)
    out = []
    for s, text in zip(scenes, texts, strict=True):
        clean, entities = extract_entities(text, processor.num_bins)
        # NOTE: a box generated without a phrase before it comes out as an entity named after its location tokens
        # with an empty span (transformers' convention); only phrases get links
        entities = [e for e in entities if 0 <= e[1][0] < e[1][1]]
        true_boxes = s.caption()[1]
        out.append(
            {
                "text": clean,
                "entities": entities,
                "markdown": to_markdown(clean, entities),
                "true_text": s.text(),
                "true_entities": [(f"a {shape.name}", box) for shape, box in zip(s.ordered(), true_boxes, strict=True)],
            }
        )
    return out


def caption_scores(captions: Sequence[dict]) -> dict:
    """caption_exact: the share of captions whose text equals the true caption; caption_box_accuracy: the share of
    true phrases that the caption names with a box of IoU >= 0.5."""
    exact = sum(c["text"] == c["true_text"] for c in captions)
    hits = total = 0
    for c in captions:
        for name, box in c["true_entities"]:
            total += 1
            hits += rec_correct(phrase_boxes(c["entities"], name), box)
    return {"caption_exact": exact / max(1, len(captions)), "caption_box_accuracy": hits / max(1, total)}


# ------------------------------------------------------------------------------------------ pictures


def draw_example(scene: data.Scene, entities, true_boxes, *, scale: int = 4):
    """The scene enlarged ``scale`` times (nearest neighbour), the predicted entities in colour with their names and
    the true boxes in grey."""
    from PIL import Image

    from mmcore.models.kosmos2.annotate import draw_entities

    image = scene.image()
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    truth = [("", box, (150, 150, 150)) for box in true_boxes]
    return draw_entities(big, entities, line_width=2, extra_boxes=truth)


def save_pictures(out: Path, captions: Sequence[dict], scenes, items: Sequence[RecItem], boxes) -> list[str]:
    """Per scene ``caption_{i}.png`` (the generated grounded caption) and ``rec_{i}.png`` (the predicted box of each
    of its referring expressions), and ``examples.png``: all of them in a grid with the markdown captions. Returns
    the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, pictures = [], []
    for i, (s, c) in enumerate(zip(scenes, captions, strict=True)):
        caption_pic = draw_example(s, c["entities"], [box for _, box in c["true_entities"]])
        mine = [(it, b) for it, b in zip(items, boxes, strict=True) if it.scene == s]
        rec_pic = draw_example(
            s, [(f"the {it.shape.name}", (0, 0), [b]) for it, b in mine if b is not None], [it.box for it, _ in mine]
        )
        caption_pic.save(out / f"caption_{i}.png")
        rec_pic.save(out / f"rec_{i}.png")
        names += [f"caption_{i}.png", f"rec_{i}.png"]
        pictures.append((caption_pic, rec_pic, c["markdown"]))

    fig, axes = plt.subplots(2, len(pictures), figsize=(2.7 * len(pictures), 6.4), squeeze=False)
    for i, (caption_pic, rec_pic, markdown) in enumerate(pictures):
        for row, (pic, title) in enumerate(((caption_pic, markdown), (rec_pic, "one prompt per shape"))):
            ax = axes[row][i]
            ax.imshow(pic)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("\n".join(textwrap.wrap(title, 34)) or "(empty caption)", fontsize=6)
    axes[0][0].set_ylabel("grounded caption", fontsize=8)
    axes[1][0].set_ylabel("referring expressions", fontsize=8)
    fig.suptitle("held-out scenes: generated boxes in colour, true boxes in grey", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "examples.png", dpi=120)
    plt.close(fig)
    return [*names, "examples.png"]


def save_curve(path: Path, history: Sequence[dict], blind_history: Sequence[dict]) -> None:
    """Left: training loss (smoothed). Right: location-token accuracy on the training batches (smoothed) and REC
    accuracy on held-out expressions, each for the model and the blind baseline, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, k=25):
        out, acc = [], None
        for v in values:
            acc = v if acc is None else acc + (v - acc) / k
            out.append(acc)
        return out

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for hist, label, style in ((history, "images", "-"), (blind_history, "blind: blank images", "--")):
        if not hist:
            continue
        steps = [h["step"] for h in hist]
        ax_loss.plot(steps, smooth([h["loss"] for h in hist]), style, label=label)
        ax_acc.plot(steps, smooth([h["loc_accuracy"] for h in hist]), style, alpha=0.5,
                    label=f"location tokens, training batches ({label})")  # fmt: skip
        evals = [h for h in hist if "rec_accuracy" in h]
        ax_acc.plot([h["step"] for h in evals], [h["rec_accuracy"] for h in evals], style, marker="o", markersize=3,
                    label=f"held-out REC, IoU >= 0.5 ({label})")  # fmt: skip
    ax_loss.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log")
    ax_loss.legend(fontsize=8)
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1))
    ax_acc.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the run


def run(config: DemoConfig, out: Path, *, log=print) -> dict:
    """Train the model and the blind baseline, evaluate both, write ``out``; returns the metrics."""
    begin = time.perf_counter()
    torch.set_num_threads(config.threads or default_threads())
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(config)
    vocab = len(processor.tokenizer)
    curve_items = heldout_items(config, config.curve_expressions)
    items = heldout_items(config, config.eval_expressions)

    model = build_model(config, vocab)
    params = sum(p.numel() for p in model.parameters())
    log(f"mmcore demo: a Kosmos-2 of {params / 1e6:.2f}M parameters (vocabulary {vocab}) learns the shapes from "
        f"scratch: {config.steps} steps, then {config.blind} steps of the blind baseline, "
        f"{torch.get_num_threads()} threads")  # fmt: skip
    t0 = time.perf_counter()
    history = train(model, processor, config, steps=config.steps, heldout=curve_items)
    train_seconds = time.perf_counter() - t0
    rec, boxes = rec_accuracy(model, processor, items)

    blind_model = build_model(config, vocab)
    t0 = time.perf_counter()
    blind_history = []
    if config.blind:
        blind_history = train(blind_model, processor, config, steps=config.blind, blind=True, heldout=curve_items,
                              desc="blind")  # fmt: skip
    blind_seconds = time.perf_counter() - t0
    blind, _ = rec_accuracy(blind_model, processor, items, blind=True)

    scenes = list(dict.fromkeys(it.scene for it in items))[: config.pictures]
    captions = caption_scenes(model, processor, scenes)
    by_shapes = {}
    for k, hit in zip((len(it.scene.shapes) for it in items), rec_hits(items, boxes), strict=True):
        by_shapes.setdefault(str(k), []).append(hit)
    by_shapes = {k: sum(v) / len(v) for k, v in sorted(by_shapes.items())}
    pictures = save_pictures(out, captions, scenes, items, boxes)
    save_curve(out / "learning_curve.png", history, blind_history)

    def curve(hist):
        return [{k: h[k] for k in ("step", "seconds", "rec_accuracy")} for h in hist if "rec_accuracy" in h]

    metrics = {
        "rec_accuracy": rec,
        "blind_accuracy": blind,
        "rec_accuracy_by_shapes": by_shapes,
        "rec_expressions": len(items),
        **caption_scores(captions),
        "steps": config.steps,
        "blind_steps": config.blind,
        "seconds": time.perf_counter() - begin,
        "train_seconds": train_seconds,
        "blind_seconds": blind_seconds,
        "parameters": params,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "config": asdict(config),
        "curve": curve(history),
        "blind_curve": curve(blind_history),
        "captions": [{"markdown": c["markdown"], "true": c["true_text"]} for c in captions],
        "files": ["metrics.json", "learning_curve.png", *pictures],
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return metrics


def run_cli(args) -> int:
    """``mmcore demo``: run with the defaults (``--steps``, ``--blind-steps``, ``--seed`` override them) and print a
    summary."""
    overrides = {"steps": args.steps, "blind_steps": args.blind_steps, "seed": args.seed, "threads": args.threads}
    config = DemoConfig(**{k: v for k, v in overrides.items() if v is not None})
    out = Path(args.out)
    metrics = run(config, out)
    print(f"referring expressions, {metrics['rec_expressions']} held out: accuracy {metrics['rec_accuracy']:.3f} "
          f"(IoU >= 0.5); image-blind baseline {metrics['blind_accuracy']:.3f}")  # fmt: skip
    print(f"grounded captions: {metrics['caption_exact']:.2f} exact, {metrics['caption_box_accuracy']:.2f} of the "
          f"phrases boxed at IoU >= 0.5, e.g.")  # fmt: skip
    for c in metrics["captions"][:3]:
        print(f"  {c['markdown']}")
    print(f"{metrics['steps']} + {metrics['blind_steps']} steps in {metrics['seconds']:.0f} s; wrote {out}/ "
          f"({', '.join(metrics['files'][:3])}, ...)")  # fmt: skip
    return 0
