"""COSA weights from and to transformers: the text encoder from a ``BertModel`` / ``BertForMaskedLM`` (with or without
cross-attention), the vision encoder from a ``CLIPVisionModel``. mmcore fuses BERT's query/key/value (and the
cross-attention's key/value) into one projection; everything else maps name to name. Cross-attention and the MLM
head missing from the checkpoint keep their fresh initialisation (a plain ``bert-base-uncased`` has neither)."""

from __future__ import annotations

from mmcore.models.cosa.config import COSAConfig, COSATextConfig
from mmcore.models.layers.convert import (
    NameMap,
    clip_vit_name_map,
    export_state,
    fused,
    import_state,
    linear,
    vit_config_from_hf,
    vit_config_to_hf,
)

_T = "text_model."
OPTIONAL = (_T + "layers.", "mlm_head.")  # only their cross-attention parts may be missing (checked below)


def bert_name_map(config: COSATextConfig, theirs: str = "bert.") -> NameMap:
    """mmcore's text encoder and MLM head <-> a transformers BertForMaskedLM (``theirs="bert."``) or BertModel
    (``theirs=""``, no MLM head)."""
    pairs: NameMap = []
    e = f"{theirs}embeddings."
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        pairs.append((f"{_T}embeddings.{name}.weight", [f"{e}{name}.weight"]))
    linear(pairs, f"{_T}embeddings.norm", f"{e}LayerNorm")
    for i in range(config.num_hidden_layers):
        o, t = f"{_T}layers.{i}.", f"{theirs}encoder.layer.{i}."
        fused(pairs, o + "self_attn.qkv", t + "attention.self.", ["query", "key", "value"])
        linear(pairs, o + "self_attn.out_proj", t + "attention.output.dense")
        linear(pairs, o + "self_attn_norm", t + "attention.output.LayerNorm")
        linear(pairs, o + "cross_attn.q_proj", t + "crossattention.self.query")
        fused(pairs, o + "cross_attn.kv", t + "crossattention.self.", ["key", "value"])
        linear(pairs, o + "cross_attn.out_proj", t + "crossattention.output.dense")
        linear(pairs, o + "cross_attn_norm", t + "crossattention.output.LayerNorm")
        linear(pairs, o + "fc1", t + "intermediate.dense")
        linear(pairs, o + "fc2", t + "output.dense")
        linear(pairs, o + "ffn_norm", t + "output.LayerNorm")
    if theirs:
        linear(pairs, "mlm_head.dense", "cls.predictions.transform.dense")
        linear(pairs, "mlm_head.norm", "cls.predictions.transform.LayerNorm")
        pairs.append(("mlm_head.bias", ["cls.predictions.bias"]))
    return pairs


def _fresh(name: str) -> bool:
    """Parameters a BERT checkpoint may lack: cross-attention and the MLM head."""
    return ".cross_attn" in name or name.startswith("mlm_head.")


def _model_state(model_or_path, loader):
    if isinstance(model_or_path, (str,)) or hasattr(model_or_path, "__fspath__"):
        model_or_path = loader(str(model_or_path))
    if not hasattr(model_or_path, "state_dict") or not hasattr(model_or_path, "config"):
        raise TypeError(f"expected a transformers model or a path, got {type(model_or_path).__name__}")
    return model_or_path.config, model_or_path.state_dict()


def from_hf(cls, *, text, vision, config: COSAConfig | None = None, **config_kw):
    """transformers text (BertModel / BertForMaskedLM, in memory or a path) and vision (CLIPVisionModel) models ->
    a COSAModel; ``config_kw`` set the other COSAConfig fields (``frame_slots``, ``concat``, ...) and the text ids
    (``cls_token_id`` ... go to COSATextConfig)."""
    import transformers

    text_config, text_state = _model_state(text, transformers.BertForMaskedLM.from_pretrained)
    vision_config, vision_state = _model_state(vision, transformers.CLIPVisionModel.from_pretrained)
    if config is None:
        id_names = ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "random_token_start")
        ids = {k: config_kw.pop(k) for k in id_names if k in config_kw}
        config = COSAConfig(
            text=COSATextConfig.from_hf(text_config, **ids), vision=vit_config_from_hf(vision_config), **config_kw
        )
    if config.vision_type != "clip":
        raise ValueError("from_hf loads a CLIP vision model; vision_type must be 'clip'")
    bert_prefix = "bert." if "bert.embeddings.word_embeddings.weight" in text_state else ""
    pairs = bert_name_map(config.text, bert_prefix)
    state = import_state(pairs, text_state, optional=OPTIONAL)
    not_fresh = [ours for ours, _ in pairs if ours not in state and not _fresh(ours)]
    if not_fresh:
        raise KeyError(f"text checkpoint lacks the tensors for {not_fresh[0]!r}")
    vit_prefix = "vision_model." if "vision_model.post_layernorm.weight" in vision_state else ""
    state.update(import_state(clip_vit_name_map(config.vision, "vision_model.", vit_prefix), vision_state))
    model = cls(config).init_weights()
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {
        "bridge.weight", "bridge.bias", "bridge_norm.weight", "bridge_norm.bias", "frame_embedding.weight",
        "contra_head_t.weight", "contra_head_v.weight", "contra_temp",
    }  # fmt: skip
    bad = [m for m in missing if m not in expected_missing and not _fresh(m) and not m.startswith("itm_head.")]
    if bad or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {bad[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def to_hf(model) -> dict:
    """{"text": BertForMaskedLM with cross-attention, "vision": CLIPVisionModel} holding the same weights (float32,
    eval mode). The bridge, frame embeddings and ITC/ITM heads have no transformers counterpart."""
    import transformers

    config = model.config
    state = model.state_dict()
    text = transformers.BertForMaskedLM(config.text.to_hf())
    text_state = export_state(bert_name_map(config.text, "bert."), state)
    text_state["cls.predictions.decoder.weight"] = text_state["bert.embeddings.word_embeddings.weight"]
    text_state["cls.predictions.decoder.bias"] = text_state["cls.predictions.bias"]
    missing, unexpected = text.load_state_dict(text_state, strict=False)
    if [m for m in missing if "position_ids" not in m] or unexpected:
        raise RuntimeError(f"text conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    vision = transformers.CLIPVisionModel(vit_config_to_hf(config.vision))
    prefix = "vision_model." if "vision_model.post_layernorm.weight" in vision.state_dict() else ""
    vision_state = export_state(clip_vit_name_map(config.vision, "vision_model.", prefix), state)
    vision_state = {k: v.float() for k, v in vision_state.items()}
    missing, unexpected = vision.load_state_dict(vision_state, strict=False)
    if [m for m in missing if "position_ids" not in m] or unexpected:
        raise RuntimeError(f"vision conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return {"text": text.float().eval(), "vision": vision.eval()}
