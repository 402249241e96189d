"""Kosmos-2 end to end: mmcore's model against transformers' with the same weights, side by side.

Two workloads, each on the CPU (a ~50M-parameter configuration) and, with ``--device cuda``, on a GPU (the released
1.6B architecture, transformers' ``Kosmos2Config`` defaults, random weights):

- **Generation** (captioning): prompt ``<s> <image> [latent_query_num image slots] </image> <grounding>`` and three word
  ids ("An image of"; any ids do, the weights are random), one random image per row, greedy, no_repeat_ngram_size=3,
  ``min_new_tokens = max_new_tokens`` so that every row makes exactly that many tokens. The time covers the whole
  ``generate`` call, image encoding included (not the processor: tokenising and resizing are the same for both).
  mmcore runs with ``constrain_boxes=True`` (its default: the box grammar) and, as a second row, ``False``; before
  timing, mmcore with ``constrain_boxes=False`` must produce exactly transformers' tokens (on the GPU, in bfloat16,
  the two round differently, so the agreement is printed, not required). CPU work unit: generated tokens (batch x
  new tokens); GPU work unit: images (one caption of 64 tokens each).
- **Packed training**: grounded samples (``<s> <image> slots </image> <grounding>`` then words with
  ``<phrase> .. </phrase><object><loc><loc></object>`` spans, then ``</s>``), lengths drawn uniformly in a range, each
  with its image, labels from ``</image>`` on. mmcore: ``forward_packed`` on the samples concatenated (no padding) +
  backward. transformers: forward + backward on the same samples right-padded into one batch (labels -100 on the
  pads). Train mode, dropout 0, so both compute the same loss; it must agree to 1e-4 relative (float32) or 2e-2
  (bfloat16 autocast) before timing. Work unit: real (non-pad) tokens.

The weights are transformers' random initialisation, copied into mmcore with ``from_hf``. ``--device cuda`` runs the
GPU cases only (the CPU cases are the CPU run's; together they would not fit the benchmark's slot in gpu_check.sh). On
the GPU, each timed call captions one batch (transformers at batch 1: one image) and the time for 1,000 images is
extrapolated as 1,000 / (images per second); mmcore runs at batch 8, 32 and 64, transformers at 1, 8, 32 and 64, and
the best of each is compared; then mmcore captions 1,000 images for real at its best batch (a loop of generate
calls, as a user's), timed end to end. GPU training runs under bfloat16 autocast on float32 weights.

    python benchmarks/bench_kosmos2.py [--quick] [--device {cpu,cuda}] [--no-save]
"""

from __future__ import annotations

import sys
import time

import torch
import transformers
from _harness import Case, Impl, parse_args, report, run_cases

from mmcore.models.kosmos2 import Kosmos2ForConditionalGeneration
from mmcore.ops import GroundingTokens

BOS, EOS, PAD = 0, 2, 1
IMAGE_OPEN, IMAGE_CLOSE, GROUNDING = 64003, 64004, 64012  # the released vocabulary's tag ids (65,037 tokens)
WORDS = [1125, 1209, 111]  # "An image of": three word ids (the weights are random, any ids do)
TOKENS = GroundingTokens.kosmos2()
NGRAM = 3
SEED = 0

# Model sizes. text/vision: transformers' Kosmos2TextConfig / Kosmos2VisionConfig fields; every dropout 0.
DROPOUT0 = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
CONFIGS = {
    # ~50M parameters (33M of them the 65,037 x 512 tied embedding)
    "50M": dict(
        text=dict(vocab_size=65037, embed_dim=512, layers=4, attention_heads=8, ffn_dim=2048, **DROPOUT0),
        vision=dict(
            image_size=224,
            patch_size=14,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            attention_dropout=0.0,
        ),
        latent_query_num=64,
    ),
    # --quick: a smoke run
    "tiny": dict(
        text=dict(vocab_size=65037, embed_dim=64, layers=2, attention_heads=4, ffn_dim=256, **DROPOUT0),
        vision=dict(
            image_size=56,
            patch_size=14,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            attention_dropout=0.0,
        ),
        latent_query_num=16,
    ),
    # the released architecture: transformers' defaults (24 x 2048 decoder, ViT-L/14 at 224), 1.66B parameters
    "1.6B": dict(text=dict(**DROPOUT0), vision=dict(attention_dropout=0.0), latent_query_num=64),
}

# Workloads. CPU generation: batches and new tokens; training: samples, their length range, config.
CPU_GEN = dict(config="50M", batches=(1, 8), new_tokens=32)
CPU_GEN_QUICK = dict(config="tiny", batches=(1,), new_tokens=8)
# NOTE: the training case keeps the generation's 50M configuration. Its step (8 samples, ~1,050 tokens) took
# 10.5 s (mmcore) and 10.2 s (transformers) on 1 thread, and 14.7 s / 19.5 s on 2 threads, both while other work used
# ~1.5 of the 2 cores; with the 2 cores to itself it should take well under 10 s (not measured yet).
CPU_TRAIN = dict(config="50M", samples=8, lengths=(80, 200))
CPU_TRAIN_QUICK = dict(config="tiny", samples=3, lengths=(24, 48))
GPU_GEN = dict(config="1.6B", mmcore_batches=(8, 32, 64), hf_batches=(1, 8, 32, 64), new_tokens=64)
GPU_GEN_QUICK = dict(config="tiny", mmcore_batches=(8,), hf_batches=(1, 8), new_tokens=8)
GPU_TRAIN = dict(config="1.6B", samples=16, lengths=(80, 200))
GPU_TRAIN_QUICK = dict(config="tiny", samples=3, lengths=(24, 48))

# Targets (issue 5): mmcore / transformers throughput.
TARGETS = {
    "cpu generate batch 1": 1.8,
    "cpu generate batch 8": 3.0,
    "cpu train": 1.3,
    "gpu caption vs transformers batch 1": 20.0,
    "gpu caption vs transformers best batch": 2.0,
    "gpu train": 1.5,
}
IMAGES_PROJECTED = 1000


# ------------------------------------------------------------------------------------------ models and inputs


def hf_config(name: str) -> transformers.Kosmos2Config:
    c = CONFIGS[name]
    return transformers.Kosmos2Config(
        text_config=c["text"], vision_config=c["vision"], latent_query_num=c["latent_query_num"]
    )


def build_models(name: str, device: str):
    """transformers' model with its random initialisation (float32, on ``device``) and mmcore's copy of it."""
    torch.manual_seed(SEED)
    with torch.device(device):
        hf = transformers.Kosmos2ForConditionalGeneration(hf_config(name))
    mm = Kosmos2ForConditionalGeneration.from_hf(hf).to(device)  # from_hf builds its position table on the host
    return hf.eval(), mm.eval()


def n_params(model) -> float:
    return sum(p.numel() for p in model.parameters())


def napkin(mm, tokens: int, images: int) -> tuple[float, float]:
    """(bytes of weights one decoding step reads: the decoder and the tied head, FLOP of one training step: 6 per
    parameter per token for the decoder and head and for the ViT on its 257-token images; attention scores left
    out)."""
    text, vit, res = (n_params(m) for m in (mm.text_model, mm.vision_model, mm.image_to_text_projection))
    size = mm.lm_head_weight.element_size()
    vit_tokens = (mm.config.vision.image_size // mm.config.vision.patch_size) ** 2 + 1
    return text * size, 6 * text * tokens + 6 * (vit * vit_tokens + res * mm.config.latent_query_num) * images


def images(n: int, size: int, device: str, dtype=torch.float32, seed: int = SEED) -> torch.Tensor:
    """(n, 3, size, size) normalised-looking pixels: standard normal."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(device=device, dtype=dtype)


def caption_prompt(batch: int, latents: int, device: str):
    """``<s> <image> slots </image> <grounding> An image of`` for every row: ids, image mask, attention mask."""
    row = [BOS, IMAGE_OPEN, *range(4, 4 + latents), IMAGE_CLOSE, GROUNDING, *WORDS]
    ids = torch.tensor([row] * batch, device=device)
    img = torch.zeros_like(ids)
    img[:, 2 : 2 + latents] = 1
    return ids, img, torch.ones_like(ids)


def grounded_samples(n: int, lengths: tuple[int, int], latents: int, seed: int = SEED) -> list[dict]:
    """n samples of ``<s> <image> slots </image> <grounding>`` + grounded words + ``</s>``, lengths uniform in
    ``lengths`` (inclusive); labels from ``</image>`` on (-100 before). Each: input_ids, image_mask, labels (L,)."""
    g = torch.Generator().manual_seed(seed)
    t = TOKENS
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        head = [BOS, IMAGE_OPEN, *range(4, 4 + latents), IMAGE_CLOSE, GROUNDING]
        body = []
        while len(head) + len(body) < length - 1:
            words = torch.randint(100, 60000, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            tl = int(torch.randint(0, 31, (1,), generator=g)) * 32 + int(torch.randint(0, 16, (1,), generator=g))
            body += [*words[:1], t.phrase_open, *words[1:3], t.phrase_close, t.object_open, t.first_loc + tl]
            body += [t.first_loc + tl + 33, t.object_close, *words[3:]]
        ids = torch.tensor(head + body[: length - 1 - len(head)] + [EOS])
        img = torch.zeros_like(ids)
        img[2 : 2 + latents] = 1
        labels = ids.clone()
        labels[: 2 + latents] = -100  # everything before </image>
        out.append(dict(input_ids=ids, image_mask=img, labels=labels))
    return out


def packed(samples, pixels, device):
    """The samples concatenated: mmcore's ``forward_packed`` arguments."""
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    cat = {k: torch.cat([s[k] for s in samples]).to(device) for k in ("input_ids", "image_mask", "labels")}
    return dict(pixel_values=pixels, input_ids=cat["input_ids"], image_embeds_position_mask=cat["image_mask"],
                cu_seqlens=cu.to(device), max_seqlen=int(lengths.max()), labels=cat["labels"])  # fmt: skip


def padded(samples, pixels, device):
    """The samples right-padded into one batch: transformers' forward arguments (labels -100 on the pads)."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), PAD)
    mask, img = torch.zeros_like(ids), torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[r, :n], mask[r, :n], img[r, :n], labels[r, :n] = s["input_ids"], 1, s["image_mask"], s["labels"]
    return dict(pixel_values=pixels, input_ids=ids.to(device), attention_mask=mask.to(device),
                image_embeds_position_mask=img.to(device), labels=labels.to(device))  # fmt: skip


# ------------------------------------------------------------------------------------------ the timed calls


# Each timed call sets its model's mode itself: the generation and training cases share the models, and the cases
# are built (training's sets train mode) before any is timed. (Before this, the CPU generation cases were timed in
# train mode: with every dropout 0 the tokens were the same, but mmcore's fused decoder step, eval only, was off.)


def hf_generate(hf, pixels, ids, img, mask, new_tokens: int):
    def run():
        hf.eval()
        with torch.no_grad():
            return hf.generate(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=img, attention_mask=mask,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               no_repeat_ngram_size=NGRAM)  # fmt: skip

    return run


def mm_generate(mm, pixels, ids, img, mask, new_tokens: int, constrain_boxes: bool):
    def run():
        mm.eval()
        with torch.no_grad():
            return mm.generate(pixels, ids, img, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               no_repeat_ngram_size=NGRAM, constrain_boxes=constrain_boxes)  # fmt: skip

    return run


def train_step(model, inputs: dict, packed_input: bool, autocast_dtype=None):
    """Zero the gradients, forward with labels, backward; returns the loss."""
    device_type = inputs["input_ids"].device.type

    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = model.forward_packed(**inputs).loss if packed_input else model(**inputs).loss
        loss.backward()
        return loss.detach()

    return run


# ------------------------------------------------------------------------------------------ cases


def check_generation(hf_run, mm_run, strict: bool, what: str) -> str:
    """mmcore (constrain_boxes=False) against transformers, token for token. strict: raise on any difference."""
    want, got = hf_run(), mm_run()
    if want.shape != got.shape:
        raise AssertionError(f"{what}: mmcore made {tuple(got.shape)} ids, transformers {tuple(want.shape)}")
    if strict:
        if not torch.equal(want, got):
            r, c = (want != got).nonzero()[0].tolist()
            raise AssertionError(f"{what}: row {r} differs from transformers at position {c}: "
                                 f"{got[r, c].item()} vs {want[r, c].item()}")  # fmt: skip
        return f"{what}: mmcore (constrain_boxes=False) tokens equal transformers' ({tuple(got.shape)})"
    same = (want == got).float().mean().item()
    rows = sum(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    return f"{what}: {same:.1%} of ids and {rows}/{len(want)} rows equal to transformers' (bfloat16: not required)"


def cpu_generation_cases(spec: dict, hf, mm) -> tuple[list[Case], dict]:
    cfg = mm.config
    print(f"CPU generation: config {spec['config']} ({n_params(hf) / 1e6:.1f}M parameters), "
          f"{spec['new_tokens']} new tokens, batches {spec['batches']}")  # fmt: skip
    cases, facts = [], {}
    for batch in spec["batches"]:
        ids, img, mask = caption_prompt(batch, cfg.latent_query_num, "cpu")
        pixels = images(batch, cfg.vision.image_size, "cpu", seed=batch)
        new = spec["new_tokens"]
        hf_run = hf_generate(hf, pixels, ids, img, mask, new)
        boxes = mm_generate(mm, pixels, ids, img, mask, new, constrain_boxes=True)
        no_boxes = mm_generate(mm, pixels, ids, img, mask, new, constrain_boxes=False)
        print("  " + check_generation(hf_run, no_boxes, strict=True, what=f"batch {batch}"), flush=True)
        differ = int((boxes() != no_boxes()).sum())
        facts[f"batch {batch}: ids changed by the box grammar"] = differ
        print(f"  batch {batch}: the box grammar changes {differ} of {batch * new} generated ids", flush=True)
        work = batch * new
        cases.append(
            Case(
                f"cpu generate batch {batch}",
                "tokens",
                f"batch {batch} x {new} new tokens (prompt {ids.shape[1]}, {spec['config']} config; a step reads "
                f"{napkin(mm, 0, 0)[0] / 1e6:.0f} MB of decoder and head weights)",
                [
                    Impl("mmcore", boxes, work, note="generate, constrain_boxes=True (default)"),
                    Impl("mmcore, no box grammar", no_boxes, work, note="constrain_boxes=False"),
                    Impl("transformers", hf_run, work, peer=True, note="generate, greedy"),
                ],
            )
        )
    return cases, facts


def train_case(spec: dict, device: str, hf, mm, autocast_dtype, tag: str) -> Case:
    """One packed-training case; the losses are compared first."""
    cfg = mm.config
    samples = grounded_samples(spec["samples"], spec["lengths"], cfg.latent_query_num)
    dtype = torch.float32
    pixels = images(len(samples), cfg.vision.image_size, device, dtype, seed=1)
    mm_in, hf_in = packed(samples, pixels, device), padded(samples, pixels, device)
    hf.train()
    mm.train()
    mm_run = train_step(mm, mm_in, True, autocast_dtype)
    hf_run = train_step(hf, hf_in, False, autocast_dtype)
    a, b = float(mm_run()), float(hf_run())
    rel = abs(a - b) / abs(b)
    tol = 1e-4 if autocast_dtype is None else 2e-2
    wrong = "" if rel <= tol else f"WRONG: loss mmcore {a:.6f}, transformers {b:.6f}: relative {rel:.2e} > {tol}"
    if wrong and tag == "cpu":
        raise AssertionError(f"{tag} training: {wrong}")
    if wrong:  # the GPU machine's time is short: report and go on timing
        print(f"  {tag} training: {wrong}", flush=True)
    tokens = sum(len(s["input_ids"]) for s in samples)
    slots = hf_in["input_ids"].numel()
    lengths = [len(s["input_ids"]) for s in samples]
    print(f"  {tag} training: {len(samples)} samples, lengths {lengths}, {tokens} tokens "
          f"(padded batch {tuple(hf_in['input_ids'].shape)}: {slots} slots); loss mmcore {a:.6f}, transformers "
          f"{b:.6f}, relative difference {rel:.1e} (tolerance {tol:g})", flush=True)  # fmt: skip
    amp = "" if autocast_dtype is None else ", bf16 autocast"
    return Case(
        f"{tag} train {spec['config']}",
        "tokens",
        f"{tokens} real tokens ({len(samples)} samples of {spec['lengths'][0]}-{spec['lengths'][1]} tokens with an "
        f"image each{amp}; ~{napkin(mm, tokens, len(samples))[1] / 1e9:.3g} GFLOP a step without padding)",
        [
            Impl("mmcore", mm_run, tokens, device=device, note="forward_packed + backward (no padding)" +
                 (f"; {wrong}" if wrong else "")),
            Impl("transformers", hf_run, tokens, peer=True, device=device,
                 note=f"forward + backward, right-padded to {tuple(hf_in['input_ids'].shape)}"),
        ],
    )  # fmt: skip


def gpu_caption_case(spec: dict, hf, mm, dtype, device: str) -> tuple[Case, str]:
    cfg = mm.config
    new = spec["new_tokens"]
    largest = max(spec["mmcore_batches"] + spec["hf_batches"])
    ids, img, mask = caption_prompt(largest, cfg.latent_query_num, device)
    pixels = images(largest, cfg.vision.image_size, device, dtype, seed=2)

    def inputs(b):
        return pixels[:b], ids[:b], img[:b], mask[:b]

    check = check_generation(
        hf_generate(hf, *inputs(8), new), mm_generate(mm, *inputs(8), new, False), strict=False, what="GPU batch 8"
    )
    impls = [
        Impl(f"mmcore b{b}", mm_generate(mm, *inputs(b), new, True), b, device=device,
             note=f"generate at batch {b}, constrain_boxes=True")
        for b in spec["mmcore_batches"]
    ] + [
        Impl(f"transformers b{b}", hf_generate(hf, *inputs(b), new), b, peer=True, device=device,
             note=f"generate at batch {b}, greedy")
        for b in spec["hf_batches"]
    ]  # fmt: skip
    case = Case(
        f"gpu caption {spec['config']} bf16",
        "images",
        f"batch images x 1 caption of {new} new tokens (prompt {ids.shape[1]}; a step reads "
        f"{napkin(mm, 0, 0)[0] / 1e9:.2f} GB of decoder and head weights); one batch per timed call",
        impls,
    )
    return case, check


def caption_all(mm, spec: dict, batch: int, total: int, dtype, device: str) -> float:
    """Seconds for mmcore to caption ``total`` images end to end at ``batch`` (the last batch partial), as a user's
    loop would: each batch's generate call, image encoding included; the benchmark's random images are reused
    batch after batch (with min_new_tokens = max_new_tokens every batch does the same work whatever the images)."""
    cfg = mm.config
    ids, img, mask = caption_prompt(batch, cfg.latent_query_num, device)
    pixels = images(batch, cfg.vision.image_size, device, dtype, seed=3)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, total, batch):
        b = min(batch, total - first)
        mm_generate(mm, pixels[:b], ids[:b], img[:b], mask[:b], spec["new_tokens"], True)()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ verdicts


def verdict(what: str, ratio: float) -> str:
    target = TARGETS[what]
    return f"{what}: {ratio:.2f}x (target >= {target:g}x: {'met' if ratio >= target else 'NOT met'})"


def cpu_verdicts(results) -> list[str]:
    lines = []
    for r in results:
        if r.impl == "mmcore" and r.case in TARGETS:
            lines.append(verdict(r.case, r.speedup["transformers"]))
        if r.impl == "mmcore" and r.case.startswith("cpu train"):
            lines.append(verdict("cpu train", r.speedup["transformers"]))
    return lines


def gpu_caption_verdicts(results) -> tuple[list[str], dict]:
    rows = [r for r in results if r.case.startswith("gpu caption")]
    projected = {r.impl: IMAGES_PROJECTED / r.throughput for r in rows}
    lines = [f"{r.impl}: {r.throughput:.2f} images/s, {IMAGES_PROJECTED:,} images in {projected[r.impl] / 60:.1f} min"
             f" ({projected[r.impl] / 3600:.2f} h), extrapolated from one batch" for r in rows]  # fmt: skip
    mm = max((r for r in rows if not r.peer), key=lambda r: r.throughput)
    hf1 = next(r for r in rows if r.impl == "transformers b1")
    hf_best = max((r for r in rows if r.peer), key=lambda r: r.throughput)
    lines.append(f"best mmcore: {mm.impl}; best transformers: {hf_best.impl}")
    lines.append(verdict("gpu caption vs transformers batch 1", mm.throughput / hf1.throughput))
    lines.append(verdict("gpu caption vs transformers best batch", mm.throughput / hf_best.throughput))
    lines.append("(users report 3.5 h per 1,000 images with transformers at batch 1 on an A100)")
    return lines, {k: round(v, 1) for k, v in projected.items()}


# ------------------------------------------------------------------------------------------ main


def run_cpu(args) -> list[str]:
    gen = CPU_GEN_QUICK if args.quick else CPU_GEN
    train = CPU_TRAIN_QUICK if args.quick else CPU_TRAIN
    t0 = time.perf_counter()
    models = {name: build_models(name, "cpu") for name in dict.fromkeys((gen["config"], train["config"]))}
    cases, facts = cpu_generation_cases(gen, *models[gen["config"]])
    cases.append(train_case(train, "cpu", *models[train["config"]], None, "cpu"))
    print(f"checks done in {time.perf_counter() - t0:.0f} s; timing", flush=True)
    results = run_cases(cases, quick=args.quick)
    report("kosmos2", cases, results, device="cpu", quick=args.quick, save=not args.no_save,
           extra={"seed": SEED, "generation": gen, "training": train, "configs": {k: CONFIGS[k] for k in
                  {gen["config"], train["config"]}}, "ngram": NGRAM, "checks": facts})  # fmt: skip
    return cpu_verdicts(results)


def run_gpu(args, device: str = "cuda") -> list[str]:
    """Captioning in bfloat16 weights, then training under bfloat16 autocast on float32 weights. Each is reported
    on its own, so a timeout in the second keeps the first's results. ``device``: "cpu" only to try this code
    path on a machine without a GPU (``--quick --no-save``)."""
    gen = GPU_GEN_QUICK if args.quick else GPU_GEN
    train = GPU_TRAIN_QUICK if args.quick else GPU_TRAIN
    extra = {"seed": SEED, "generation": gen, "training": train, "config": CONFIGS[gen["config"]], "ngram": NGRAM}
    t0 = time.perf_counter()
    hf, mm = build_models(gen["config"], device)
    print(f"GPU: config {gen['config']} ({n_params(hf) / 1e9:.2f}B parameters) built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    lines = []

    hf.to(torch.bfloat16)
    mm.to(torch.bfloat16)
    case, check = gpu_caption_case(gen, hf, mm, torch.bfloat16, device)
    print("  " + check, flush=True)
    results = run_cases([case], quick=args.quick)
    verdicts, projected = gpu_caption_verdicts(results)
    # the 1,000 images captioned for real by mmcore at its best batch (transformers at batch 1 would take hours)
    best = max((r for r in results if not r.peer), key=lambda r: r.throughput)
    best_batch = int(best.work)
    total = IMAGES_PROJECTED if not args.quick else 2 * best_batch + 1
    seconds = caption_all(mm, gen, best_batch, total, torch.bfloat16, device)
    verdicts.append(f"mmcore b{best_batch}: {total:,} images captioned end to end in {seconds:.1f} s "
                    f"({seconds / 60:.2f} min; measured, {total / seconds:.1f} images/s)")  # fmt: skip
    projected[f"mmcore b{best_batch}, {total} images measured"] = round(seconds, 1)
    report("kosmos2", [case], results, device=device, quick=args.quick, save=not args.no_save,
           extra={**extra, "check": check, "projected_seconds_per_1000_images": projected})  # fmt: skip
    print("\n".join(verdicts), flush=True)
    lines += verdicts

    # the same bfloat16-rounded weights in both, as float32 masters for autocast
    hf.float()
    mm.float()
    case = train_case(train, device, hf, mm, torch.bfloat16, "gpu")
    results = run_cases([case], quick=args.quick)
    report("kosmos2", [case], results, device=device, quick=args.quick, save=not args.no_save, extra=extra)
    lines.append(verdict("gpu train", results[0].speedup["transformers"]))
    print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    transformers.logging.set_verbosity_error()  # generate's notes on pad ids and generation config
    lines = run_gpu(args) if args.device == "cuda" else run_cpu(args)
    print()
    if args.quick:
        print("QUICK: a smoke run; the ratios below are not results")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
