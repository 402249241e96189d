"""COSA weights from and to transformers: the text encoder from a ``BertModel`` / ``BertForMaskedLM`` (with or without
cross-attention), the vision encoder from a ``CLIPVisionModel`` or (``vision_type="swin"``) a timm ``SwinTransformer``,
kept as timm builds it, so its state dict loads name for name. mmcore fuses BERT's query/key/value (and the
cross-attention's key/value) into one projection; everything else maps name to name. Cross-attention and the MLM
head missing from the checkpoint keep their fresh initialisation (a plain ``bert-base-uncased`` has neither)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from mmcore.models.cosa.config import COSAConfig, COSATextConfig, TimmSwinConfig
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
_SWIN = "vision_model.swin."
_DERIVED = ("relative_position_index", "attn_mask")  # Swin buffers computed from the window and the grid
_FILES = (".safetensors", ".pth", ".pt", ".bin")  # weight files: a Swin state dict (only safetensors is read)
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


def _is_timm_swin(obj) -> bool:
    swin = sys.modules.get("timm.models.swin_transformer")  # a timm model in hand means timm is imported
    return swin is not None and isinstance(obj, swin.SwinTransformer)


def swin_config_from_timm(model) -> TimmSwinConfig:
    """The TimmSwinConfig of a timm SwinTransformer as built (a model made without ``timm.create_model`` has no
    architecture name; it is described under Swin-B's, whose entry point sets only the six numbers given)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "swin_base_patch4_window7_224"
    (h, w), (p, _) = model.patch_embed.img_size, model.patch_embed.patch_size
    if h != w:
        raise ValueError(f"the timm Swin takes {h} x {w} images; COSA's Swin config describes square ones")
    return TimmSwinConfig(
        model_name=name,
        img_size=h,
        patch_size=p,
        window_size=model.layers[0].blocks[0].window_size[0],  # clipped to the grid only where that is smaller
        embed_dim=model.patch_embed.proj.out_channels,
        depths=tuple(len(stage.blocks) for stage in model.layers),
        num_heads=tuple(stage.blocks[0].attn.num_heads for stage in model.layers),
    )


def _swin_state(vision) -> tuple[TimmSwinConfig | None, dict]:
    """A timm SwinTransformer -> (its config, state dict); a safetensors file, or a folder holding
    ``model.safetensors`` (timm's hub layout) -> (None, its tensors). Pickled checkpoints are refused."""
    if _is_timm_swin(vision):
        return swin_config_from_timm(vision), vision.state_dict()
    if not isinstance(vision, (str, os.PathLike)):
        raise TypeError(
            f"vision_type='swin' loads a timm SwinTransformer or a safetensors file, got {type(vision).__name__}"
        )
    path = Path(vision)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: Swin weights are read from safetensors only; pickled checkpoints (.pth, .bin, .pt) are not "
            "loaded (torch.load can run code): convert it to a .safetensors file of the timm state dict"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    from safetensors.torch import load_file

    return None, load_file(str(path))


def timm_swin_state(theirs: dict) -> dict:
    """A timm SwinTransformer state dict -> the COSA vision encoder's entries. The classifier (``head.*``) is dropped,
    as are the buffers timm derives from the window and the grid (``relative_position_index``, ``attn_mask``; older
    timm saved them), which the built encoder has already."""
    return {_SWIN + k: v for k, v in theirs.items() if not k.startswith("head.") and not k.endswith(_DERIVED)}


def from_hf(cls, *, text, vision, config: COSAConfig | None = None, **config_kw):
    """transformers text (BertModel / BertForMaskedLM, in memory or a path) and vision models -> a COSAModel. vision:
    a CLIPVisionModel (in memory or a path), or for ``vision_type="swin"`` a timm SwinTransformer or a local
    safetensors file of one's state dict (or a folder holding ``model.safetensors``). The vision type is taken from
    ``config`` or ``config_kw``, else guessed: a timm Swin or a file is "swin". A Swin given as a file is described
    by ``config_kw["swin"]`` (a TimmSwinConfig or its dict; default Swin-B at 224). ``config_kw`` set the other
    COSAConfig fields (``frame_slots``, ``concat``, ...) and the text ids (``cls_token_id`` ... go to
    COSATextConfig)."""
    import transformers

    text_config, text_state = _model_state(text, transformers.BertForMaskedLM.from_pretrained)
    vision_type = config.vision_type if config is not None else config_kw.get("vision_type")
    if vision_type is None:  # a CLIPVisionModel path is a folder or a hub id, never a file
        is_file = isinstance(vision, (str, os.PathLike)) and (Path(vision).is_file() or Path(vision).suffix in _FILES)
        vision_type = "swin" if _is_timm_swin(vision) or is_file else "clip"
    if vision_type == "swin":
        swin_config, vision_state = _swin_state(vision)
        vision_kw = {"vision_type": "swin", "swin": config_kw.pop("swin", None) or swin_config or TimmSwinConfig()}
    else:
        vision_config, vision_state = _model_state(vision, transformers.CLIPVisionModel.from_pretrained)
        vision_kw = {"vision": vit_config_from_hf(vision_config)}
    if config is None:
        id_names = ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "random_token_start")
        ids = {k: config_kw.pop(k) for k in id_names if k in config_kw}
        config_kw.pop("vision_type", None)
        config = COSAConfig(text=COSATextConfig.from_hf(text_config, **ids), **vision_kw, **config_kw)
    bert_prefix = "bert." if "bert.embeddings.word_embeddings.weight" in text_state else ""
    pairs = bert_name_map(config.text, bert_prefix)
    state = import_state(pairs, text_state, optional=OPTIONAL)
    not_fresh = [ours for ours, _ in pairs if ours not in state and not _fresh(ours)]
    if not_fresh:
        raise KeyError(f"text checkpoint lacks the tensors for {not_fresh[0]!r}")
    if config.vision_type == "swin":
        state.update(timm_swin_state(vision_state))
    else:
        vit_prefix = "vision_model." if "vision_model.post_layernorm.weight" in vision_state else ""
        state.update(import_state(clip_vit_name_map(config.vision, "vision_model.", vit_prefix), vision_state))
    model = cls(config).init_weights()
    derived = [k for k in model.state_dict() if k.startswith(_SWIN) and k.endswith(_DERIVED)]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        if config.vision_type != "swin":
            raise
        raise RuntimeError(f"the Swin weights do not fit config.swin = {config.swin} (pass swin=...): {e}") from e
    expected_missing = {
        "bridge.weight", "bridge.bias", "bridge_norm.weight", "bridge_norm.bias", "frame_embedding.weight",
        "contra_head_t.weight", "contra_head_v.weight", "contra_temp", *derived,
    }  # fmt: skip
    bad = [m for m in missing if m not in expected_missing and not _fresh(m) and not m.startswith("itm_head.")]
    if bad or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {bad[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def to_hf(model) -> dict:
    """{"text": BertForMaskedLM with cross-attention, "vision": CLIPVisionModel (a copy of the timm SwinTransformer for
    ``vision_type="swin"``)} holding the same weights (float32, eval mode). The bridge, frame embeddings and ITC/ITM
    heads have no transformers counterpart."""
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
    if config.vision_type == "swin":
        return {"text": text.float().eval(), "vision": copy.deepcopy(model.vision_model.swin).float().eval()}
    vision = transformers.CLIPVisionModel(vit_config_to_hf(config.vision))
    prefix = "vision_model." if "vision_model.post_layernorm.weight" in vision.state_dict() else ""
    vision_state = export_state(clip_vit_name_map(config.vision, "vision_model.", prefix), state)
    vision_state = {k: v.float() for k, v in vision_state.items()}
    missing, unexpected = vision.load_state_dict(vision_state, strict=False)
    if [m for m in missing if "position_ids" not in m] or unexpected:
        raise RuntimeError(f"vision conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return {"text": text.float().eval(), "vision": vision.eval()}
