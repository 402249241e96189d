"""Weights from and to transformers' ``Kosmos2ForConditionalGeneration``: in memory or through a checkpoint folder.

Checkpoints are read as safetensors only (``model.safetensors`` or a sharded ``model.safetensors.index.json``);
pickled ``.bin`` files are refused, never unpickled. mmcore fuses q/k/v (and the resampler's k/v) into one
projection, so conversion concatenates and splits them; everything else maps name to name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mmcore.models.kosmos2.config import Kosmos2Config
from mmcore.models.layers.convert import clip_vit_name_map

_V, _T, _P = "vision_model.model.", "text_model.model.", "image_to_text_projection."


def _name_map(config: Kosmos2Config) -> list[tuple[str, list[str]]]:
    """(mmcore parameter, [transformers parameters concatenated along dim 0]) for every weight."""
    pairs: list[tuple[str, list[str]]] = []

    def one(ours: str, theirs: str) -> None:
        pairs.append((ours, [theirs]))

    def norm(ours: str, theirs: str) -> None:
        one(f"{ours}.weight", f"{theirs}.weight")
        one(f"{ours}.bias", f"{theirs}.bias")

    def fused(ours: str, prefix: str, parts: str) -> None:
        for kind in ("weight", "bias"):
            pairs.append((f"{ours}.{kind}", [f"{prefix}{p}_proj.{kind}" for p in parts]))

    pairs += clip_vit_name_map(config.vision, "vision_model.", _V)
    one("image_to_text_projection.latent_query", _P + "latent_query")
    norm("image_to_text_projection.dense", _P + "dense")
    norm("image_to_text_projection.q_proj", _P + "x_attn.q_proj")
    fused("image_to_text_projection.kv", _P + "x_attn.", "kv")
    norm("image_to_text_projection.out_proj", _P + "x_attn.out_proj")
    one("text_model.embed_tokens.weight", _T + "embed_tokens.weight")
    for i in range(config.text.layers):
        ours, theirs = f"text_model.layers.{i}.", f"{_T}layers.{i}."
        norm(ours + "self_attn_layer_norm", theirs + "self_attn_layer_norm")
        fused(ours + "self_attn.qkv", theirs + "self_attn.", "qkv")
        norm(ours + "self_attn.inner_attn_ln", theirs + "self_attn.inner_attn_ln")
        norm(ours + "self_attn.out_proj", theirs + "self_attn.out_proj")
        norm(ours + "final_layer_norm", theirs + "final_layer_norm")
        norm(ours + "fc1", theirs + "ffn.fc1")
        norm(ours + "ffn_layernorm", theirs + "ffn.ffn_layernorm")
        norm(ours + "fc2", theirs + "ffn.fc2")
    norm("text_model.layer_norm", _T + "layer_norm")
    return pairs


def hf_to_mmcore_state_dict(hf_state: dict, config: Kosmos2Config) -> dict:
    """transformers' state dict -> mmcore's. Raises KeyError naming the first missing tensor; refuses an lm_head that
    is not the token embedding (Kosmos-2 ties them)."""
    out = {}
    for ours, theirs in _name_map(config):
        missing = [t for t in theirs if t not in hf_state]
        if missing:
            raise KeyError(f"checkpoint has no tensor {missing[0]!r} (needed for {ours})")
        out[ours] = torch.cat([hf_state[t] for t in theirs]) if len(theirs) > 1 else hf_state[theirs[0]]
    head = hf_state.get("text_model.lm_head.weight")
    if head is not None and not torch.equal(head, hf_state[_T + "embed_tokens.weight"]):
        raise ValueError("text_model.lm_head.weight differs from the token embedding; mmcore's Kosmos-2 ties them")
    return out


def mmcore_to_hf_state_dict(state: dict, config: Kosmos2Config) -> dict:
    """mmcore's state dict -> transformers' (with the tied lm_head)."""
    out = {}
    for ours, theirs in _name_map(config):
        parts = state[ours].chunk(len(theirs)) if len(theirs) > 1 else [state[ours]]
        for name, t in zip(theirs, parts, strict=True):
            out[name] = t.clone()
    out["text_model.lm_head.weight"] = out[_T + "embed_tokens.weight"]
    return out


def load_safetensors_folder(path: Path) -> dict:
    """Every tensor of a Hugging Face checkpoint folder (single file or sharded), from safetensors only."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = ""
        if pickled:
            hint = f" (found {', '.join(pickled)}: pickled weights are not loaded; convert them to safetensors)"
        raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json{hint}")
    state = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    return state


def from_hf(cls, model_or_path, *, num_bins: int = 32, dtype=None):
    """A transformers Kosmos2ForConditionalGeneration (in memory) or a local checkpoint folder -> mmcore model."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a checkpoint folder (use from_pretrained for a hub id)")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        hf_config = json.loads(config_file.read_text())
        if hf_config.get("model_type") not in ("kosmos-2", None):
            raise ValueError(f"{path} holds a {hf_config.get('model_type')!r} model, not kosmos-2")
        hf_state = load_safetensors_folder(path)
    else:
        if not hasattr(model_or_path, "state_dict") or not hasattr(model_or_path, "config"):
            raise TypeError(f"expected a transformers Kosmos-2 model or a folder, got {type(model_or_path).__name__}")
        hf_config, hf_state = model_or_path.config, model_or_path.state_dict()
    config = Kosmos2Config.from_hf(hf_config, num_bins=num_bins)
    state = hf_to_mmcore_state_dict(hf_state, config)
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state, strict=True, assign=True)
    _rebuild_buffers(model)
    if dtype is not None:
        model = model.to(_as_dtype(dtype))
    return model.eval()


def _as_dtype(dtype) -> torch.dtype:
    """A floating torch.dtype, or its name ("bfloat16", "torch.float16")."""
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"dtype {dtype!r} names no torch dtype (e.g. 'float32', 'bfloat16', 'float16')")
        dtype = named
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    return dtype


def _rebuild_buffers(model) -> None:
    """Non-persistent buffers made on the meta device are computed again on the CPU."""
    pos = model.text_model.embed_positions
    pos.table = pos.build(pos.table.shape[0])
    vit = model.vision_model
    if not isinstance(vit.position_embedding, torch.nn.Parameter):
        from mmcore.models.layers.vit import sincos_2d

        vit.position_embedding = sincos_2d(vit.config.grid, vit.config.hidden_size)


def from_pretrained(cls, name_or_path, *, num_bins: int = 32, dtype=None, revision=None):
    """A local folder, or a hub id downloaded with huggingface_hub (safetensors and JSON files only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return from_hf(cls, name_or_path, num_bins=num_bins, dtype=dtype)
    text = str(name_or_path)
    if path.exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        # a local path (a hub id is "name" or "owner/name"), not a folder: say so instead of asking the hub
        raise FileNotFoundError(f"no Kosmos-2 checkpoint folder at {text}")
    from huggingface_hub import snapshot_download

    folder = snapshot_download(str(name_or_path), revision=revision, allow_patterns=["*.json", "*.safetensors"])
    return from_hf(cls, folder, num_bins=num_bins, dtype=dtype)


def to_hf(model):
    """The same weights in a transformers Kosmos2ForConditionalGeneration (float32, eval mode)."""
    from transformers import Kosmos2ForConditionalGeneration as HFModel

    hf = HFModel(model.config.to_hf())
    state = mmcore_to_hf_state_dict(model.state_dict(), model.config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "text_model.lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.to(model.lm_head_weight.dtype).eval()
