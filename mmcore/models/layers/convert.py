"""Name maps between mmcore modules and transformers checkpoints, shared by the models' converters.

A name map is a list of ``(mmcore parameter, [transformers parameters])``: one name maps to one, and mmcore's fused
projections (q/k/v in one Linear) map to several transformers tensors concatenated along dim 0.
"""

from __future__ import annotations

import torch

from mmcore.models.layers.vit import ViTConfig

NameMap = list[tuple[str, list[str]]]


def linear(pairs: NameMap, ours: str, theirs: str) -> None:
    """A Linear or LayerNorm: ``weight`` and ``bias``."""
    for kind in ("weight", "bias"):
        pairs.append((f"{ours}.{kind}", [f"{theirs}.{kind}"]))


def fused(pairs: NameMap, ours: str, prefix: str, parts: list[str]) -> None:
    """One mmcore Linear made of several transformers Linears ``{prefix}{part}.weight/bias``, stacked in order."""
    for kind in ("weight", "bias"):
        pairs.append((f"{ours}.{kind}", [f"{prefix}{p}.{kind}" for p in parts]))


def clip_vit_name_map(config: ViTConfig, ours: str, theirs: str) -> NameMap:
    """``mmcore.models.layers.vit.VisionTransformer`` under prefix ``ours`` <-> transformers' CLIP vision transformer
    under prefix ``theirs`` (``"vision_model."`` in a CLIPVisionModel of transformers 4, ``""`` in 5,
    ``"vision_model.model."`` in Kosmos-2)."""
    pairs: NameMap = [(f"{ours}patch_embed.weight", [f"{theirs}embeddings.patch_embedding.weight"])]
    pairs.append((f"{ours}class_embedding", [f"{theirs}embeddings.class_embedding"]))
    if config.position_embedding == "learned":
        pairs.append((f"{ours}position_embedding", [f"{theirs}embeddings.position_embedding.weight"]))
    linear(pairs, f"{ours}pre_norm", f"{theirs}pre_layrnorm")
    for i in range(config.num_layers):
        o, t = f"{ours}blocks.{i}.", f"{theirs}encoder.layers.{i}."
        linear(pairs, o + "norm1", t + "layer_norm1")
        fused(pairs, o + "attn.qkv", t + "self_attn.", ["q_proj", "k_proj", "v_proj"])
        linear(pairs, o + "attn.out_proj", t + "self_attn.out_proj")
        linear(pairs, o + "norm2", t + "layer_norm2")
        linear(pairs, o + "fc1", t + "mlp.fc1")
        linear(pairs, o + "fc2", t + "mlp.fc2")
    linear(pairs, f"{ours}post_norm", f"{theirs}post_layernorm")
    return pairs


def import_state(pairs: NameMap, theirs: dict, *, optional: tuple[str, ...] = ()) -> dict:
    """transformers tensors -> mmcore's state dict. Raises KeyError naming the first missing tensor, except for
    mmcore names starting with one of ``optional`` (left out of the result: the caller initialises them)."""
    out = {}
    for ours, names in pairs:
        missing = [t for t in names if t not in theirs]
        if missing:
            if ours.startswith(optional) and optional:
                continue
            raise KeyError(f"checkpoint has no tensor {missing[0]!r} (needed for {ours})")
        out[ours] = torch.cat([theirs[t] for t in names]) if len(names) > 1 else theirs[names[0]]
    return out


def export_state(pairs: NameMap, state: dict) -> dict:
    """mmcore's state dict -> transformers tensors (fused projections split in equal parts, tensors cloned)."""
    out = {}
    for ours, names in pairs:
        parts = state[ours].chunk(len(names)) if len(names) > 1 else [state[ours]]
        for name, t in zip(names, parts, strict=True):
            out[name] = t.clone()
    return out


# transformers' CLIPVisionConfig field -> ViTConfig field
HF_CLIP_VISION_FIELDS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "num_channels",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
    "attention_dropout": "attention_dropout",
}


def vit_config_from_hf(hf_config) -> ViTConfig:
    """A ViTConfig from transformers' ``CLIPVisionConfig`` (or its dict)."""
    hf = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    return ViTConfig(**{ours: hf[theirs] for theirs, ours in HF_CLIP_VISION_FIELDS.items() if theirs in hf})


def vit_config_to_hf(config: ViTConfig):
    """transformers' ``CLIPVisionConfig`` for the same ViT (learned position embeddings only)."""
    from transformers import CLIPVisionConfig

    if config.position_embedding != "learned":
        raise ValueError("transformers' CLIP vision model has learned position embeddings only, not sincos2d")
    return CLIPVisionConfig(**{theirs: getattr(config, ours) for theirs, ours in HF_CLIP_VISION_FIELDS.items()})
