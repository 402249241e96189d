"""COSA configuration (shared/research/cosa.md section 1): the BERT text encoder, the vision encoder, the heads and
the pretraining objectives. Defaults are COSA-L's released pretraining setup: BERT-base with cross-attention in all
12 layers, CLIP ViT-L/14 at 224, 4 concatenated samples, tasks ``ret_cret_ccap_cmlm`` (cosa.md 2.1, 2.3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from mmcore.models.layers.vit import ACTIVATIONS, ViTConfig

VISION_TYPES = ("clip", "swin")
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
class COSAConfig:
    """text: BERT; vision: the CLIP ViT (``vision_type="clip"``; "swin" needs timm); frame_slots: learned temporal
    embeddings (``train_video_sample_num``: 4 = one per concatenated sample); contra_dim: ITC feature size (512);
    temperature: ITC's initial temperature (logits are divided by it, learnable); concat: samples per
    concatenated pseudo video-paragraph (4); max_concat_tokens: a paragraph's token budget, [CLS] and [SEP] included
    (40 * ceil(concat / 2) = 80 in the original); origin_tasks / concat_tasks: objectives of the single-sample and
    the concatenated passes (``ret_cret_ccap_cmlm``); caption_mode: "masked" (the official 60%-masked causal LM) or
    "next_token"; itm_ratio: ITM loss weight (1.0 pretraining, 0.1 retrieval fine-tuning); gather_with_grad: under
    torch.distributed, other ranks' gathered features carry gradients back to them, which makes DDP's update equal
    one process's on the global batch (default off, as the original's ``ddp_allgather``)."""

    text: COSATextConfig = field(default_factory=COSATextConfig)
    vision: ViTConfig = field(default_factory=ViTConfig)
    vision_type: str = "clip"
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

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = COSATextConfig(**self.text)
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        _positive(self, "frame_slots", "contra_dim", "concat", "max_concat_tokens")
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

    @property
    def vision_dim(self) -> int:
        return self.vision.hidden_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> COSAConfig:
        return cls(**d)
