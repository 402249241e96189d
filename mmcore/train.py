"""Training for Kosmos-2 and COSA on PyTorch's own distributed engine: one process, or ``torchrun`` with DDP or FSDP2.

    python -m mmcore.train --model kosmos2 --preset tiny --data synthetic --steps 20
    torchrun --nproc_per_node=8 -m mmcore.train --model cosa --preset base --data synthetic --steps 1000 --fsdp \\
        --grad-accum 4 --activation-checkpointing --checkpoint-every 500 --out runs/cosa

Rank 0 prints one JSON line per logging step: ``step`` (completed optimizer steps), ``loss`` (the global batch's
loss before that update), ``lr``, ``grad_norm`` (before clipping), ``tokens`` and ``tokens_per_s`` (the global batch's
packed tokens, image slots included, for Kosmos-2; its caption tokens for COSA), ``step_time_s``, and for COSA the
named objectives (``itc_origin``, ...). AdamW (betas 0.9/0.98, eps 1e-6), linear warm-up then cosine decay.

Batches. ``--batch-size`` is per rank and micro-step; a step runs ``--grad-accum`` micro-steps on every rank, so the
global batch is world x batch-size x grad-accum samples. Synthetic samples are functions of (seed, step, micro-step,
index in the global micro-batch) alone: rank r takes indices ``[r * batch, (r + 1) * batch)``, so one process with
``--batch-size world * batch`` sees exactly the samples of ``world`` ranks, and a resumed run sees the samples of
an uninterrupted one. Kosmos-2 samples of a micro-step are packed into one stream (``collate_kosmos2_packed``, no
padding); ``grit:PATH`` streams GrIT shards (``mmcore.data.grit_reader.GritDataset``, split over ranks by shard).

Loss normalisation. Kosmos-2: every micro-step's summed token loss is divided by the target-token count of the whole
global batch (one all-reduce of the counts per step), so DDP/FSDP gradients equal one process's on the same global
batch, whatever the per-rank token counts. COSA: the mean of the ranks' and micro-steps' losses; its contrastive
negatives, ITM hard negatives and concatenation partners come from all ranks' samples of the micro-step
(``mmcore.models.cosa.concat``), drawn with a generator seeded per (seed, step, micro-step, rank).

Wrapping. DDP (default with several processes) wraps the model; ``--fsdp`` applies FSDP2 ``fully_shard`` to every
ViT block and decoder/BERT layer, then to the root (the tied embedding, the heads and the fused cross-entropy stay in
the root, so the loss runs inside the wrapped forward; 0-dim parameters, which fully_shard refuses, stay replicated
with their gradients averaged by hand). ``--activation-checkpointing`` recomputes every block in the backward pass;
``--compile`` compiles every block with ``torch.compile(fullgraph=True, dynamic=True)`` (per block, so it composes with
DDP, FSDP2 and checkpointing, and the generator that seeds COSA's draws stays outside the graphs; Kosmos-2's
``forward_packed`` and COSA's whole ``forward`` also trace as one graph each, COSA's with the global generator, see
tests/models/test_cosa_compile.py). On a GPU: NCCL, bf16 autocast; on the CPU: gloo, float32.

Checkpoints (``--checkpoint-every M --out DIR``): ``DIR/step_00000010/`` with ``state.json`` (step, arguments,
model config, optimizer hyperparameters), ``rng/rank_<r>.safetensors`` (each rank's CPU/CUDA generator state and its
data position), and either ``model.safetensors`` + ``optimizer.safetensors`` (full tensors, rank 0; one process or
DDP) or, under FSDP2, ``dcp/shard-*.safetensors``: every rank's shards of model and optimizer state written by
``torch.distributed.checkpoint`` (``HuggingFaceStorageWriter``; read back with resharding). Either kind resumes in
either mode, and on another world size when world x batch-size x grad-accum is unchanged. No pickle anywhere.
``DIR/latest`` names the newest complete checkpoint; ``--resume DIR`` (or a checkpoint folder) continues from it:
same data, RNG, optimizer state and step, so the losses continue exactly.

Failure: any exception on a rank ends that process with a non-zero code; torchrun then stops the other ranks and
exits non-zero (a rank blocked in a collective is terminated, not left hanging). Collectives time out after
``--dist-timeout`` minutes. ``MMCORE_TRAIN_FAIL=<rank>:<step>`` makes that rank raise at that step (to test this).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

MODELS = ("kosmos2", "cosa")
PRESET_NAMES = ("tiny", "small", "base")
CHECKPOINT_FORMAT = 1

# ------------------------------------------------------------------------------------------ presets

# Kosmos-2. tiny: for tests (8 x 8 location grid, no dropout); small: a 224M model on the released vocabulary and
# location grid (ViT-B/16 + a 12-layer 768-wide decoder); base: the released 1.6B configuration.
_KOSMOS2_PRESETS = {
    "tiny": dict(
        text=dict(
            vocab_size=256,
            embed_dim=32,
            layers=2,
            attention_heads=4,
            ffn_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
            max_position_embeddings=256,
        ),
        vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=8),
        latent_query_num=8,
        num_bins=8,
    ),
    "small": dict(
        text=dict(embed_dim=768, layers=12, attention_heads=12, ffn_dim=3072),
        vision=dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=16),
    ),
    "base": {},
}

# COSA (ids of the tiny vocabulary: [PAD] 0, [CLS] 1, [SEP] 2, [MASK] 3, ordinary tokens from 5). tiny: for tests;
# small: BERT-medium (8 x 512) + ViT-B/16, 137M; base: COSA-L (BERT-base + ViT-L/14), 443M.
_COSA_PRESETS = {
    "tiny": dict(
        text=dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=64,
            cls_token_id=1,
            sep_token_id=2,
            mask_token_id=3,
            random_token_start=5,
        ),
        vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=8),
        contra_dim=16,
        max_concat_tokens=48,
    ),
    "small": dict(
        text=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
        vision=dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, patch_size=16),
    ),
    "base": {},
}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        if not isinstance(d.get(key), dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a config section")
        d = d[key]
    if keys[-1] not in d:
        raise ValueError(f"--set {dotted}: the config has no field {keys[-1]!r} (fields: {sorted(d)})")
    d[keys[-1]] = value


def build_config(model: str, preset: str, overrides=(), processor=None):
    """The model config of a preset, with ``--set key=value`` overrides (dotted keys, JSON values) applied; a
    Kosmos-2 processor (``--data grit:...``) fixes the vocabulary, image size, latents and location grid."""
    if model == "kosmos2":
        from mmcore.models.kosmos2 import Kosmos2Config as Config

        presets = _KOSMOS2_PRESETS
    else:
        from mmcore.models.cosa import COSAConfig as Config

        presets = _COSA_PRESETS
    d = _merge(Config().to_dict(), presets[preset])
    if processor is not None:
        d["text"]["vocab_size"] = len(processor.tokenizer)
        d["vision"]["image_size"] = processor.image_size
        d["latent_query_num"], d["num_bins"] = processor.num_image_tokens, processor.num_bins
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        _set_path(d, key.strip(), value)
    return Config.from_dict(d)


def build_model(model: str, config) -> nn.Module:
    if model == "kosmos2":
        from mmcore.models.kosmos2 import Kosmos2ForConditionalGeneration

        return Kosmos2ForConditionalGeneration(config).init_weights()
    from mmcore.models.cosa import COSAModel

    return COSAModel(config).init_weights()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (ViT blocks, then decoder / BERT layers): the units of FSDP2 sharding and compilation."""
    return [*model.vision_model.blocks, *model.text_model.layers]


# ------------------------------------------------------------------------------------------ data


def sample_seed(*parts) -> int:
    """A 63-bit seed from (seed, step, micro-step, index): the same in every process (no Python hash salt)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SyntheticKosmos2:
    """Grounded captions of random images, learnable: each image holds one bright rectangle on noise, and the caption
    ``<grounding> w w+1 ... <phrase> p </phrase><object> loc_ul loc_lr </object> ... </s>`` runs through consecutive
    word ids and grounds one word to the rectangle's box (its location tokens follow from the image).

    Layout of a sample (as ``Kosmos2Processor`` writes it): ``<s> <image> [latents] </image> <grounding> text </s>``;
    the image slots hold ids ``unk + 1 ...`` (3 + 1, ...), replaced by the image embeddings."""

    def __init__(self, config, seed: int, min_words: int = 6, max_words: int = 24):
        from mmcore.grounding.tokens import TAG_TOKENS
        from mmcore.ops import GroundingTokens

        self.config, self.seed = config, seed
        t = GroundingTokens.from_config(config.text, config.num_bins)
        tag = {name: t.first_loc - len(TAG_TOKENS) + i for i, name in enumerate(TAG_TOKENS)}
        self.tokens, self.tag = t, tag
        self.first_word, self.words = 4 + config.latent_query_num, tag[TAG_TOKENS[0]] - 4 - config.latent_query_num
        if self.words < 8:
            raise ValueError(f"vocab_size {config.text.vocab_size} leaves {self.words} word ids; need at least 8")
        self.min_words, self.max_words = min_words, max_words
        self.image_end_id = tag["</image>"]

    def sample(self, seed: int) -> dict:
        from mmcore.grounding import boxes_to_loc_indices

        cfg, t = self.config, self.tokens
        g = torch.Generator().manual_seed(seed)
        size = cfg.vision.image_size
        # the rectangle: corners on a pixel grid, at least 1/4 of the side
        x1, y1 = (int(v) for v in torch.randint(0, 3 * size // 4, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(size // 4, size + 1, (2,), generator=g))
        x2, y2 = min(size, x1 + w), min(size, y1 + h)
        pixels = 0.3 * torch.randn(3, size, size, generator=g)
        pixels[:, y1:y2, x1:x2] += 2.0
        box = torch.tensor([[x1 / size, y1 / size, x2 / size, y2 / size]])
        ul, lr = (t.first_loc + int(i) for i in boxes_to_loc_indices(box, cfg.num_bins)[0])
        n = int(torch.randint(self.min_words, self.max_words + 1, (1,), generator=g))
        start = int(torch.randint(0, self.words, (1,), generator=g))
        words = [self.first_word + (start + i) % self.words for i in range(n)]
        at = int(torch.randint(0, n, (1,), generator=g))
        grounded = [self.tag["<phrase>"], words[at], self.tag["</phrase>"], self.tag["<object>"], ul, lr]
        text = [self.tag["<grounding>"], *words[:at], *grounded, self.tag["</object>"], *words[at + 1 :], t.eos]
        q = cfg.latent_query_num
        ids = [cfg.text.bos_token_id, self.tag["<image>"], *range(4, 4 + q), self.image_end_id, *text]
        mask = torch.zeros(len(ids), dtype=torch.long)
        mask[2 : 2 + q] = 1
        return {"input_ids": torch.tensor(ids), "image_embeds_position_mask": mask, "pixel_values": pixels}

    def batch(self, step: int, micro: int, indices) -> dict:
        from mmcore.data.packing import collate_kosmos2_packed

        samples = [self.sample(sample_seed(self.seed, step, micro, i)) for i in indices]
        return collate_kosmos2_packed(
            samples, image_end_id=self.image_end_id, latent_query_num=self.config.latent_query_num
        )


class SyntheticCOSA:
    """Image-caption pairs with a learnable link: sample class c (of 16) sets the image's pattern (a bright band at
    one of 16 positions, plus noise) and the caption's first body tokens; the rest of the caption is random."""

    CLASSES = 16

    def __init__(self, config, seed: int, frames: int = 1, min_tokens: int = 5, max_tokens: int = 14):
        self.config, self.seed, self.frames = config, seed, frames
        t = config.text
        self.first, self.vocab = t.random_token_start, t.vocab_size
        self.min_tokens, self.max_tokens = min_tokens, min(max_tokens, t.max_position_embeddings)

    def sample(self, seed: int) -> tuple[torch.Tensor, list[int]]:
        g = torch.Generator().manual_seed(seed)
        size, t = self.config.image_size, self.config.text
        c = int(torch.randint(0, self.CLASSES, (1,), generator=g))
        pixels = 0.3 * torch.randn(self.frames, 3, size, size, generator=g)
        band = max(1, size // self.CLASSES)
        row = c * size // self.CLASSES
        pixels[:, c % 3, row : row + band] += 2.0
        n = int(torch.randint(self.min_tokens, self.max_tokens + 1, (1,), generator=g))
        span = self.vocab - self.first
        body = [self.first + (3 * c) % span, self.first + (3 * c + 1) % span]
        body += [int(v) for v in torch.randint(self.first, self.vocab, (n - 4,), generator=g)]
        return pixels, [t.cls_token_id, *body, t.sep_token_id]

    def batch(self, step: int, micro: int, indices) -> dict:
        pairs = [self.sample(sample_seed(self.seed, step, micro, i)) for i in indices]
        width = max(len(ids) for _, ids in pairs)
        input_ids = torch.full((len(pairs), width), self.config.text.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for r, (_, ids) in enumerate(pairs):
            input_ids[r, : len(ids)], attention_mask[r, : len(ids)] = torch.tensor(ids), 1
        return {
            "pixel_values": torch.stack([p for p, _ in pairs]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }


class GritStream:
    """This rank's GrIT samples in order, ``batch`` of them per micro-step (the indices are ignored: the shards are
    split over ranks), packed; epochs follow each other. ``state`` / ``restore``: the position (epoch, samples read
    in that epoch); restoring re-reads the epoch up to it, so the next samples and their grounded/plain draws are an
    uninterrupted run's."""

    def __init__(self, spec: str, processor, config, *, seed: int, rank: int, world_size: int):
        from mmcore.data.grit_reader import GritDataset

        root = Path(spec)
        if root.is_dir():
            shards = sorted(p for p in root.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        else:
            shards = sorted(Path(p) for p in glob.glob(spec))
        if not shards:
            raise FileNotFoundError(f"--data grit:{spec}: no .jsonl/.json/.parquet shards there")
        self.dataset = GritDataset(shards, processor, seed=seed, rank=rank, world_size=world_size)
        self.image_end_id = processor.tokenizer.convert_tokens_to_ids("</image>")
        self.latents = config.latent_query_num
        self.epoch, self.consumed = 0, 0
        self._iter = None

    def _next(self) -> dict:
        if self._iter is None:
            self.dataset.set_epoch(self.epoch)
            self._iter = iter(self.dataset)
        for _ in range(2):
            try:
                sample = next(self._iter)
                self.consumed += 1
                return sample
            except StopIteration:
                if self.consumed == 0:
                    break
                self.epoch, self.consumed = self.epoch + 1, 0
                self.dataset.set_epoch(self.epoch)
                self._iter = iter(self.dataset)
        raise RuntimeError("the GrIT shards of this rank yield no sample (see the summary line above)")

    def batch(self, step: int, micro: int, indices) -> dict:
        from mmcore.data.packing import collate_kosmos2_packed

        samples = [self._next() for _ in indices]
        samples = [{k: s[k] for k in ("input_ids", "image_embeds_position_mask", "pixel_values")} for s in samples]
        return collate_kosmos2_packed(samples, image_end_id=self.image_end_id, latent_query_num=self.latents)

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def restore(self, state: dict) -> None:
        self.epoch, self.consumed, self._iter = int(state["epoch"]), 0, None
        for _ in range(int(state["consumed"])):
            self._next()


# ------------------------------------------------------------------------------------------ distributed


@dataclasses.dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    created_group: bool

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(timeout_min: float) -> Env:
    """Join torchrun's process group (env://) when WORLD_SIZE is set: NCCL on GPUs, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    created = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min), **kw)
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Env(rank, world, local_rank, device, created)


def all_reduce_sum(t: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t)
    return t


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


class _PackedForward(nn.Module):
    """Kosmos-2's packed training forward as ``forward`` (what DDP calls): returns the mean target-token loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return _kosmos2_loss(self.model, batch)


def _kosmos2_loss(model, batch: dict) -> torch.Tensor:
    out = model.forward_packed(
        batch["pixel_values"],
        batch["input_ids"],
        batch["image_embeds_position_mask"],
        batch["cu_seqlens"],
        batch["max_seqlen"],
        batch["labels"],
    )
    return out.loss


def wrap(model: nn.Module, name: str, args, env: Env):
    """(the module to call for a loss, the model whose parameters and state dict are trained). DDP wraps the
    model (Kosmos-2: its packed forward); FSDP2 shards every block, then the root, in place."""
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(env.device.type, (env.world,))
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        # NOTE: fully_shard cannot shard 0-dim parameters (COSA's contra_temp): they stay replicated, outside FSDP,
        # and their gradients are averaged by sync_replicated_grads.
        scalars = replicated_params(model)
        for p in scalars:
            p.data = p.data.to(env.device)
        fully_shard(model, mesh=mesh, ignored_params=set(scalars))
        if name == "kosmos2":
            register_fsdp_forward_method(model, "forward_packed")  # unshard the root around forward_packed too
            return _PackedForward(model), model
        return model, model
    model.to(env.device)
    if name == "kosmos2":
        call = _PackedForward(model)
        if env.distributed:
            call = nn.parallel.DistributedDataParallel(call, device_ids=_device_ids(env))
        return call, model
    if env.distributed:
        tasks = set(model.config.origin_tasks) | set(model.config.concat_tasks)
        unused = not {"itm", "mlm", "cap"} <= tasks  # heads of objectives that do not run get no gradient
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=_device_ids(env), find_unused_parameters=unused)
        return ddp, model
    return model, model


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP2 leaves replicated (0-dim ones)."""
    return [p for p in model.parameters() if p.dim() == 0]


def sync_replicated_grads(model: nn.Module, args, env: Env) -> None:
    """Average the gradients of the parameters FSDP2 does not manage over the ranks (DDP and FSDP do the others)."""
    if not (args.fsdp and env.distributed):
        return
    for p in replicated_params(model):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= env.world


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm (clipped to max_norm when positive) over plain and FSDP2 (DTensor) gradients."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    groups = [sharded, [p for p in params if not isinstance(p.grad, DTensor)]]
    norms = []
    for group in groups:
        if group:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if max_norm > 0:
        for group in groups:
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _device_ids(env: Env):
    return [env.device.index] if env.device.type == "cuda" else None


@contextlib.contextmanager
def gradient_sync(call: nn.Module, model: nn.Module, args, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on the micro-steps before the last of a step."""
    if args.fsdp:
        model.set_requires_gradient_sync(sync)
        yield
    elif isinstance(call, nn.parallel.DistributedDataParallel) and not sync:
        with call.no_sync():
            yield
    else:
        yield


# ------------------------------------------------------------------------------------------ checkpoints


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, **kw)


def _flat_state(model, optimizer):
    """(model state, flat optimizer state ``state.<fqn>.<name>`` / ``param_groups.<fqn>.<key>``): DTensor shards
    under FSDP2, full tensors otherwise. Initialises the optimizer state first (a zero-lr step on zero gradients)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model), get_optimizer_state_dict(model, optimizer, options=_state_dict_options())


def _split(flat: dict) -> tuple[dict, dict]:
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in flat.items() if k not in tensors}


def _rng_state(env: Env) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def save_checkpoint(out: Path, step: int, model, optimizer, args, env: Env, data_state: dict | None) -> Path:
    """Write ``out/step_<step>`` (see the module docstring) through a temporary folder, then point ``latest`` to it."""
    from safetensors.torch import save_file

    final, tmp = out / f"step_{step:08d}", out / f".step_{step:08d}.tmp"
    if env.rank == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier(env)
    model_state, optim_state = _flat_state(model, optimizer)
    optim_tensors, optim_other = _split(optim_state)
    if args.fsdp:
        import torch.distributed.checkpoint as dcp

        tensors = {f"model.{k}": v for k, v in model_state.items()}
        tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
    elif env.rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in optim_tensors.items()}, tmp / "optimizer.safetensors")
    meta = {"data": json.dumps(data_state)} if data_state is not None else None
    save_file(_rng_state(env), tmp / "rng" / f"rank_{env.rank}.safetensors", metadata=meta)
    barrier(env)
    if env.rank == 0:
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "world_size": env.world,
            "global_batch": env.world * args.batch_size * args.grad_accum,
            "sharded": bool(args.fsdp),
            "model": args.model,
            "config": model.config.to_dict(),
            "args": vars(args),
            "optimizer_param_groups": optim_other,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        import shutil

        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (out / "latest.tmp").write_text(final.name + "\n")
        (out / "latest.tmp").rename(out / "latest")
    barrier(env)
    return final


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: no checkpoint there (no state.json, no 'latest')")
    return p


def _like(full: dict, template: dict) -> dict:
    """Full tensors laid out as the template's: each DTensor entry becomes this rank's shard of the full tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    missing = sorted(set(template) - set(full))
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} entries, e.g. {missing[:3]}")
    return {
        k: distribute_tensor(full[k], t.device_mesh, t.placements) if isinstance(t, DTensor) else full[k]
        for k, t in template.items()
    }


def load_checkpoint(ckpt: Path, model, optimizer, args, env: Env) -> tuple[int, dict | None]:
    """Restore model, optimizer, this rank's RNG and data position; returns (step, data state)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("format") != CHECKPOINT_FORMAT or state.get("model") != args.model:
        raise ValueError(f"{ckpt} holds a {state.get('model')} checkpoint (format {state.get('format')})")
    global_batch = env.world * args.batch_size * args.grad_accum
    if state["global_batch"] != global_batch:
        raise ValueError(
            f"{ckpt} was written with a global batch of {state['global_batch']} samples; this run has {global_batch} "
            f"(world x --batch-size x --grad-accum): the data order would differ"
        )
    model_state, optim_state = _flat_state(model, optimizer)
    optim_tensors, _ = _split(optim_state)
    if state["sharded"]:
        import torch.distributed.checkpoint as dcp

        tensors = {f"model.{k}": v for k, v in model_state.items()}
        tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt / "dcp")))
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        optim_tensors = {k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")}
    else:  # full tensors; into a sharded model, every rank keeps its shard of each
        model_state = _like(load_file(ckpt / "model.safetensors", device=str(env.device)), model_state)
        optim_tensors = _like(load_file(ckpt / "optimizer.safetensors", device=str(env.device)), optim_tensors)
    options = _state_dict_options()
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, {**optim_tensors, **state["optimizer_param_groups"]}, options=options)
    data_state = None
    rng_file = ckpt / "rng" / f"rank_{env.rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if env.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], env.device)
        with safe_open(rng_file, framework="pt") as f:
            meta = f.metadata() or {}
        if "data" in meta:
            data_state = json.loads(meta["data"])
    else:
        print(f"mmcore.train: {rng_file} is missing (a different world size): fresh RNG on rank {env.rank}",
              file=sys.stderr)  # fmt: skip
    return int(state["step"]), data_state


# ------------------------------------------------------------------------------------------ training


def lr_at(step: int, args) -> float:
    """Linear warm-up over ``--warmup`` steps, then cosine decay to ``--min-lr-ratio`` x lr at ``--steps``."""
    if args.warmup and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(1, args.steps - args.warmup)
    progress = min(1.0, (step - args.warmup) / span)
    ratio = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * ratio


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _fail_here(env: Env, step: int) -> None:
    spec = os.environ.get("MMCORE_TRAIN_FAIL")
    if spec:
        rank, _, at = spec.partition(":")
        if int(rank) == env.rank and int(at) == step:
            raise RuntimeError(f"MMCORE_TRAIN_FAIL={spec}: rank {env.rank} fails at step {step}")


def compile_blocks(model: nn.Module, backend: str) -> None:
    """``torch.compile(fullgraph=True, dynamic=True)`` every block in place (the state-dict names do not change).

    Dynamic shapes: packed token counts and segment lengths change every step. One graph per block kind and call
    variant (COSA's BERT layer runs text-only, cross-attending full and causal, and prefix for QA; with and without
    activation checkpointing), hence a recompile limit above the default 8."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for block in blocks(model):
        block.compile(fullgraph=True, dynamic=True, backend=backend)


def train(args, env: Env) -> list[dict]:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    processor = None
    if args.data.startswith("grit:"):
        if args.model != "kosmos2":
            raise ValueError("--data grit:PATH trains Kosmos-2 (GrIT is grounded image-text data)")
        from mmcore.models.kosmos2 import Kosmos2Processor

        processor = Kosmos2Processor.from_pretrained(args.processor)
    config = build_config(args.model, args.preset, args.set, processor)
    model = build_model(args.model, config)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if args.compile:
        compile_blocks(model, args.compile_backend)
    call, model = wrap(model, args.model, args, env)
    fused = {"fused": True} if env.device.type == "cuda" and not args.fsdp else {}
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=args.weight_decay, **fused
    )
    torch.manual_seed(sample_seed(args.seed, "rank", env.rank))  # dropout differs between ranks

    if processor is not None:
        data = GritStream(args.data[5:], processor, config, seed=args.seed, rank=env.rank, world_size=env.world)
    elif args.data == "synthetic":
        data = SyntheticKosmos2(config, args.seed) if args.model == "kosmos2" else SyntheticCOSA(config, args.seed)
    else:
        raise ValueError(f"--data must be synthetic or grit:PATH, got {args.data!r}")

    start = 0
    if args.resume:
        start, data_state = load_checkpoint(resolve_checkpoint(args.resume), model, optimizer, args, env)
        if data_state is not None and hasattr(data, "restore"):
            data.restore(data_state)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" else contextlib.nullcontext()
    records = []
    out = Path(args.out) if args.out else None
    local = range(env.rank * args.batch_size, (env.rank + 1) * args.batch_size)
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        _fail_here(env, step + 1)
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [_to_device(data.batch(step, m, local), env.device) for m in range(args.grad_accum)]
        if args.model == "kosmos2":
            from mmcore.models.kosmos2.modeling import shift_targets

            counts = [int((shift_targets(b["labels"], b["cu_seqlens"]) != -100).sum()) for b in batches]
            total = int(all_reduce_sum(torch.tensor([float(sum(counts))], device=env.device), env))
            tokens = sum(int(b["input_ids"].numel()) for b in batches)
        else:
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        parts: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(batches):
            with gradient_sync(call, model, args, m == len(batches) - 1), autocast:
                if args.model == "kosmos2":
                    loss = call(batch)
                    # the global batch's mean: this micro-step's token sum over all ranks' target count (x world,
                    # since DDP and FSDP average the ranks' gradients)
                    if not counts[m]:  # no target here: the mean is NaN, its gradient zero
                        loss = loss.nan_to_num(0.0)
                    scaled = loss * (counts[m] * env.world / max(total, 1))
                    part = {"loss": scaled.detach().float()}
                else:
                    g = torch.Generator(env.device).manual_seed(sample_seed(args.seed, step, m, "rank", env.rank))
                    out_m = call(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                 concat=args.concat, generator=g)  # fmt: skip
                    scaled = out_m["loss"] / args.grad_accum
                    part = {k: v.detach().float() / args.grad_accum for k, v in out_m.items()}
            scaled.backward()
            for k, v in part.items():
                parts[k] = parts.get(k, 0.0) + v
        sync_replicated_grads(model, args, env)
        norm = clip_grad_norm(model, args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        names = sorted(parts)
        stats = torch.stack([parts[k].reshape(()).to(torch.float64) for k in names])
        stats = torch.cat([stats, torch.tensor([float(tokens)], dtype=torch.float64, device=stats.device)])
        stats = all_reduce_sum(stats, env) / torch.tensor([env.world] * len(names) + [1], device=stats.device)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        dt = time.perf_counter() - t0
        values = dict(zip(names, stats[:-1].tolist(), strict=True))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            record = {"step": step + 1, "loss": values.pop("loss"), "lr": lr, "grad_norm": float(norm)}
            record.update(tokens=int(stats[-1]), tokens_per_s=round(float(stats[-1]) / dt, 1), step_time_s=round(dt, 4))
            record.update(values)
            records.append(record)
            if env.rank == 0:
                line = json.dumps(record)
                print(line, flush=True)
                if args.log_file:
                    with open(args.log_file, "a") as f:
                        f.write(line + "\n")
        if out is not None and args.checkpoint_every and ((step + 1) % args.checkpoint_every == 0):
            data_state = data.state() if hasattr(data, "state") else None
            save_checkpoint(out, step + 1, model, optimizer, args, env, data_state)
    return records


# ------------------------------------------------------------------------------------------ command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmcore.train",
        description="Train Kosmos-2 or COSA (one process, or torchrun with DDP / FSDP2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted, JSON value), e.g. text.dropout=0.0")  # fmt: skip
    p.add_argument("--data", default="synthetic", help="synthetic, or grit:PATH (a folder, file or glob of shards)")
    p.add_argument("--processor", default="microsoft/kosmos-2-patch14-224", help="Kosmos2Processor for grit data")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8, help="samples per rank and micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--concat", type=int, default=None, help="COSA: samples per concatenated pair (config default)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block, then the root)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) every block")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="M")
    p.add_argument("--out", default=None, help="checkpoint folder")
    p.add_argument("--resume", default=None, help="a checkpoint folder, or --out of an earlier run (its latest)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--log-file", default=None, help="also append the JSON lines here (rank 0)")
    p.add_argument("--dist-timeout", type=float, default=10.0, help="minutes before a stuck collective fails")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint_every and not args.out:
        p.error("--checkpoint-every needs --out")
    return args


def main(argv=None) -> list[dict]:
    """Run training; returns rank 0's (every rank's) logged records. Joins torchrun's process group when launched
    by it (and leaves a group that already exists, as in tests, to its owner)."""
    args = parse_args(argv)
    env = init_distributed(args.dist_timeout)
    try:
        return train(args, env)
    finally:
        if env.created_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
