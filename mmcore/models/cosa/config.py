"""COSA configuration (shared/research/cosa.md section 1): the BERT text encoder, the vision encoder, the heads and
the pretraining objectives. Defaults are COSA-L's released pretraining setup: BERT-base with cross-attention in all
12 layers, CLIP ViT-L/14 at 224, 4 concatenated samples, tasks ``ret_cret_ccap_cmlm`` (cosa.md 2.1, 2.3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from mmcore.models.layers.vit import ACTIVATIONS, ViTConfig

VISION_TYPES = ("clip", "swin")
SWIN_ARCH = ("img_size", "patch_size", "window_size", "embed_dim", "depths", "num_heads")
# timm's Swin (v1) entry points (timm/models/swin_transformer.py): what a TimmSwinConfig field left None becomes.
SWIN_PRESETS = {
    "swin_tiny_patch4_window7_224": (224, 4, 7, 96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_small_patch4_window7_224": (224, 4, 7, 96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_base_patch4_window7_224": (224, 4, 7, 128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_base_patch4_window12_384": (384, 4, 12, 128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_large_patch4_window7_224": (224, 4, 7, 192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "swin_large_patch4_window12_384": (384, 4, 12, 192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
CAPTION_MODES = ("masked", "next_token")
TASKS = ("itc", "itm", "mlm", "cap")


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _probability(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a float in [0, 1), got {value!r}")


@dataclass
class COSATextConfig:
    """BERT (post-LN) with cross-attention in every layer; transformers' ``BertConfig`` names where they exist.
    Token ids are bert-base-uncased's: [PAD] 0, [CLS] 101, [SEP] 102, [MASK] 103; MLM's random replacements are
    drawn from ``[random_token_start, vocab_size)`` (106: past the special tokens, as the original masker)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    random_token_start: int = 106

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        _positive(self, "max_position_embeddings", "type_vocab_size")
        _probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"COSATextConfig.hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"COSATextConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "random_token_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"COSATextConfig.{name} must be an id in [0, {self.vocab_size}), got {value!r}")

    @classmethod
    def from_hf(cls, hf_config, **ids) -> COSATextConfig:
        """From a transformers ``BertConfig`` (or its dict); ``ids`` override the special-token ids (a tokenizer's)."""
        hf = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in names and v is not None}
        kw.update(ids)
        if kw.get("pad_token_id") is None:
            kw.pop("pad_token_id", None)
        return cls(**kw)

    def to_hf(self):
        """A transformers ``BertConfig`` for the same text encoder, as COSA's ``bert-base-uncased-crossattn``:
        cross-attention on, which transformers allows only with ``is_decoder=True`` (its self-attention is then
        causal unless given a mask; COSA always passes one)."""
        from transformers import BertConfig

        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "random_token_start"):
            kw.pop(name)
        return BertConfig(**kw, add_cross_attention=True, is_decoder=True)


@dataclass
class TimmSwinConfig:
    """A timm Swin Transformer (v1, ``timm.models.swin_transformer.SwinTransformer``), built as
    ``timm.create_model(model_name, num_classes=0, img_size=..., patch_size=..., window_size=..., embed_dim=...,
    depths=..., num_heads=...)``. A field left None takes the value of ``model_name``'s entry in SWIN_PRESETS; a name
    outside the presets needs all six. The default is Swin-B at 224, COSA-B's encoder (cosa.md 1.1): 1024 channels,
    7 x 7 = 49 tokens per frame. Stage i has ``embed_dim * 2**i`` channels and ``num_heads[i]`` heads; each stage
    after the first halves the token grid."""

    model_name: str = "swin_base_patch4_window7_224"
    img_size: int | None = None
    patch_size: int | None = None
    window_size: int | None = None
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name.startswith("swin_"):
            raise ValueError(
                f"TimmSwinConfig.model_name must name a timm Swin (v1) model, 'swin_...' (swinv2 is not supported), "
                f"got {self.model_name!r}"
            )
        preset = SWIN_PRESETS.get(self.model_name)
        for name, default in zip(SWIN_ARCH, preset or [None] * len(SWIN_ARCH), strict=True):
            if getattr(self, name) is None:
                if default is None:
                    raise ValueError(
                        f"TimmSwinConfig.{name} must be given: {self.model_name!r} is not one of the presets "
                        f"{sorted(SWIN_PRESETS)}"
                    )
                setattr(self, name, default)
        _positive(self, "img_size", "patch_size", "window_size", "embed_dim")
        for name in ("depths", "num_heads"):
            value = getattr(self, name)
            ok = isinstance(value, (tuple, list)) and len(value) > 0
            if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"TimmSwinConfig.{name} must be a non-empty tuple of positive ints, got {value!r}")
            setattr(self, name, tuple(value))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"TimmSwinConfig.depths {self.depths} and num_heads {self.num_heads} must have one entry per stage"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"TimmSwinConfig.img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        shrink = 2 ** (len(self.depths) - 1)
        if (self.img_size // self.patch_size) % shrink:
            raise ValueError(
                f"TimmSwinConfig: the {self.img_size // self.patch_size}-patch grid (img_size / patch_size) must be "
                f"divisible by {shrink}: each of the {len(self.depths)} stages after the first halves it"
            )
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(
                    f"TimmSwinConfig: stage {i} has {self.embed_dim * 2**i} channels (embed_dim * 2**{i}), not "
                    f"divisible by num_heads[{i}] = {heads}"
                )

    @property
    def num_features(self) -> int:
        """Channels of the output tokens (the last stage's)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        """Output tokens per image: the last stage's grid, flattened."""
        return (self.img_size // self.patch_size // 2 ** (len(self.depths) - 1)) ** 2

    def timm_kwargs(self) -> dict:
        """The keyword arguments for ``timm.create_model(model_name, ...)``, besides ``num_classes=0``."""
        return {name: getattr(self, name) for name in SWIN_ARCH}


@dataclass
class COSAConfig:
    """text: BERT; vision: the CLIP ViT (``vision_type="clip"``); swin: the timm Swin (``vision_type="swin"``, needs
    timm; the config of the encoder not chosen is kept but unused); frame_slots: learned temporal embeddings
    (``train_video_sample_num``: 4 = one per concatenated sample); contra_dim: ITC feature size (512); temperature:
    ITC's initial temperature (logits are divided by it, learnable); concat: samples per concatenated pseudo
    video-paragraph (4); max_concat_tokens: a paragraph's token budget, [CLS] and [SEP] included
    (40 * ceil(concat / 2) = 80 in the original); origin_tasks / concat_tasks: objectives of the single-sample and
    the concatenated passes (``ret_cret_ccap_cmlm``); caption_mode: "masked" (the official 60%-masked causal LM) or
    "next_token"; itm_ratio: ITM loss weight (1.0 pretraining, 0.1 retrieval fine-tuning); gather_with_grad: under
    torch.distributed, other ranks' gathered features carry gradients back to them, which makes DDP's update equal
    one process's on the global batch (default off, as the original's ``ddp_allgather``); concat_itm_divisor: the
    concatenated pass's ITM pairs only the first batch // divisor samples of each rank (3: the original's ``cret``,
    to save memory; 1: every sample)."""

    text: COSATextConfig = field(default_factory=COSATextConfig)
    vision: ViTConfig = field(default_factory=ViTConfig)
    vision_type: str = "clip"
    swin: TimmSwinConfig = field(default_factory=TimmSwinConfig)
    frame_slots: int = 4
    contra_dim: int = 512
    temperature: float = 0.07
    label_smoothing: float = 0.1
    concat: int = 4
    max_concat_tokens: int = 80
    origin_tasks: tuple[str, ...] = ("itc", "itm")
    concat_tasks: tuple[str, ...] = ("itc", "itm", "mlm", "cap")
    mlm_probability: float = 0.15
    caption_probability: float = 0.6
    qa_probability: float = 0.99
    caption_mode: str = "masked"
    itm_ratio: float = 1.0
    gather_with_grad: bool = False
    concat_itm_divisor: int = 3

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = COSATextConfig(**self.text)
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.swin, dict):
            self.swin = TimmSwinConfig(**self.swin)
        _positive(self, "frame_slots", "contra_dim", "concat", "max_concat_tokens", "concat_itm_divisor")
        _probability(self, "label_smoothing")
        for name in ("mlm_probability", "caption_probability", "qa_probability"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"COSAConfig.{name} must be a float in (0, 1], got {value!r}")
        if self.vision_type not in VISION_TYPES:
            raise ValueError(f"COSAConfig.vision_type must be one of {VISION_TYPES}, got {self.vision_type!r}")
        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(f"COSAConfig.caption_mode must be one of {CAPTION_MODES}, got {self.caption_mode!r}")
        if not isinstance(self.gather_with_grad, bool):
            raise ValueError(f"COSAConfig.gather_with_grad must be a bool, got {self.gather_with_grad!r}")
        if not self.temperature > 0:
            raise ValueError(f"COSAConfig.temperature must be positive, got {self.temperature!r}")
        self.origin_tasks, self.concat_tasks = tuple(self.origin_tasks), tuple(self.concat_tasks)
        for name in ("origin_tasks", "concat_tasks"):
            bad = [t for t in getattr(self, name) if t not in TASKS]
            if bad:
                raise ValueError(f"COSAConfig.{name} has unknown tasks {bad}; known: {TASKS}")
        if self.max_concat_tokens < 3:
            raise ValueError(
                f"COSAConfig.max_concat_tokens must leave room for [CLS], [SEP] and a token, got "
                f"{self.max_concat_tokens}"
            )
        if self.max_concat_tokens > self.text.max_position_embeddings:
            raise ValueError(
                f"COSAConfig.max_concat_tokens ({self.max_concat_tokens}) exceeds the text encoder's "
                f"max_position_embeddings ({self.text.max_position_embeddings}): a paragraph that long has no positions"
            )

    @property
    def vision_dim(self) -> int:
        """Channels of the vision encoder's tokens: the ViT's hidden size, or the Swin's last stage."""
        return self.swin.num_features if self.vision_type == "swin" else self.vision.hidden_size

    @property
    def image_size(self) -> int:
        """The side of the square frames the vision encoder takes."""
        return self.swin.img_size if self.vision_type == "swin" else self.vision.image_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> COSAConfig:
        return cls(**d)
