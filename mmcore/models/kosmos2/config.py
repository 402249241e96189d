"""Kosmos-2 configuration: the text decoder, the vision encoder (``ViTConfig``) and the resampler.

Defaults are the released 1.6B model (shared/research/kosmos2.md section 1.2). ``from_hf`` / ``to_hf`` convert
from and to transformers' ``Kosmos2Config``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from mmcore.models.layers.vit import ACTIVATIONS, ViTConfig


@dataclass
class Kosmos2TextConfig:
    """The Magneto (sub-LN) causal decoder."""

    vocab_size: int = 65037
    embed_dim: int = 2048
    layers: int = 24
    attention_heads: int = 32
    ffn_dim: int = 8192
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    scale_embedding: bool = True
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    no_repeat_ngram_size: int = 3

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "layers", "attention_heads", "ffn_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Kosmos2TextConfig.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.attention_heads:
            raise ValueError(
                f"Kosmos2TextConfig.embed_dim {self.embed_dim} is not divisible by attention_heads "
                f"{self.attention_heads}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Kosmos2TextConfig.activation_function must be one of {sorted(ACTIVATIONS)}, got "
                f"{self.activation_function!r}"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"Kosmos2TextConfig.{name} must be an id in [0, {self.vocab_size}), got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.embed_dim) if self.scale_embedding else 1.0


# transformers' Kosmos2VisionConfig field -> ViTConfig field
_HF_VISION = {
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


@dataclass
class Kosmos2Config:
    """text: the decoder; vision: the CLIP ViT; latent_query_num: image embeddings per image (the resampler's
    queries, 64); num_bins: the location grid per side (32 -> 1,024 location tokens at the end of the vocabulary)."""

    text: Kosmos2TextConfig = field(default_factory=Kosmos2TextConfig)
    vision: ViTConfig = field(default_factory=ViTConfig)
    latent_query_num: int = 64
    num_bins: int = 32

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = Kosmos2TextConfig(**self.text)
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.latent_query_num, bool) or not isinstance(self.latent_query_num, int):
            raise ValueError(f"Kosmos2Config.latent_query_num must be a positive int, got {self.latent_query_num!r}")
        if self.latent_query_num < 1:
            raise ValueError(f"Kosmos2Config.latent_query_num must be a positive int, got {self.latent_query_num!r}")
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or self.num_bins < 1:
            raise ValueError(f"Kosmos2Config.num_bins must be a positive int, got {self.num_bins!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Kosmos2Config:
        return cls(**d)

    @classmethod
    def from_hf(cls, hf_config, num_bins: int = 32) -> Kosmos2Config:
        """From a transformers ``Kosmos2Config`` (or its ``to_dict()``)."""
        hf = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        text_hf, vision_hf = hf.get("text_config") or {}, hf.get("vision_config") or {}
        names = {f.name for f in fields(Kosmos2TextConfig)}
        text = {k: v for k, v in text_hf.items() if k in names and v is not None}
        if text_hf.get("no_repeat_ngram_size") is None:
            text.pop("no_repeat_ngram_size", None)
        vision = {ours: vision_hf[theirs] for theirs, ours in _HF_VISION.items() if theirs in vision_hf}
        return cls(
            text=Kosmos2TextConfig(**text),
            vision=ViTConfig(**vision),
            latent_query_num=hf.get("latent_query_num", 64),
            num_bins=num_bins,
        )

    def to_hf(self):
        """A transformers ``Kosmos2Config`` describing the same model (learned position embeddings only)."""
        from transformers import Kosmos2Config as HFKosmos2Config

        if self.vision.position_embedding != "learned":
            raise ValueError("transformers' Kosmos-2 has learned vision position embeddings only, not sincos2d")
        text = asdict(self.text)
        vision = {theirs: getattr(self.vision, ours) for theirs, ours in _HF_VISION.items()}
        return HFKosmos2Config(text_config=text, vision_config=vision, latent_query_num=self.latent_query_num)
