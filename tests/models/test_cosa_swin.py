"""COSA with a timm Swin vision encoder (``vision_type="swin"``) on a tiny random Swin: the encoder against timm's own
``forward_features``, loading from a timm model and from a safetensors file (pickles refused), a full pretraining
step with concatenation, the config round trip, the presets against timm, and the errors (no timm, bad config,
bad pixels)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from cosa_tiny import bert_config, captions, clip_model, cosa_from_hf  # noqa: E402

from mmcore.models.cosa import COSAConfig, COSAModel  # noqa: E402
from mmcore.models.cosa.config import SWIN_PRESETS, TimmSwinConfig  # noqa: E402
from mmcore.models.cosa.convert import swin_config_from_timm  # noqa: E402
from mmcore.testing import error_report  # noqa: E402

# 64 px, 4 px patches: a 16 x 16 grid, windows of 4 (the second block of each stage shifted), then 8 x 8 tokens of 32
SWIN = dict(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4))
TOKENS, CHANNELS = 64, 32


def assert_close(out, ref, name, tol=1e-6):
    err, mean, where = error_report(out, ref)
    assert err <= tol, f"{name}: max error {err:.3e} at {list(where)}, mean {mean:.3e}, tolerance {tol:g}"


def tiny_swin(seed=0, num_classes=0):
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=num_classes, **SWIN).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(bert_config(is_decoder=True, add_cross_attention=True)).eval()


def pixels(batch, frames=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, SWIN["img_size"], SWIN["img_size"], generator=g)


@pytest.fixture(scope="module")
def swin():
    return tiny_swin()


@pytest.fixture(scope="module")
def model(swin):
    return cosa_from_hf(tiny_bert(), swin)


def assert_same_swin_weights(model, swin):
    ours, theirs = model.vision_model.swin.state_dict(), swin.state_dict()
    learned = [k for k in theirs if not k.startswith("head.")]
    assert len(learned) > 20 and set(learned) <= set(ours)
    for k in learned:
        assert torch.equal(ours[k], theirs[k]), k


def test_config_from_the_timm_model(model, swin):
    cfg = model.config
    assert cfg.vision_type == "swin"
    assert cfg.swin == TimmSwinConfig(model_name="swin_tiny_patch4_window7_224", **SWIN)
    assert cfg.vision_dim == CHANNELS == swin.num_features and cfg.swin.num_tokens == TOKENS
    assert model.bridge.in_features == model.contra_head_v.in_features == CHANNELS


@pytest.mark.parametrize("frames", [1, 3])
def test_encoder_equals_timm_forward_features(model, swin, frames):
    px = pixels(2, frames, seed=frames)
    with torch.no_grad():
        ours = model.encode_vision(px)
        ref = swin.forward_features(px.flatten(0, 1))  # (batch * frames, 8, 8, C)
    assert ref.shape == (2 * frames, 8, 8, CHANNELS)
    assert ours.shape == (2, frames, TOKENS, CHANNELS)
    assert_close(ours, ref.reshape(2, frames, TOKENS, CHANNELS), "Swin tokens")
    assert_close(model.pool_vision(ours), ref.reshape(2, frames, TOKENS, CHANNELS).mean((1, 2)), "pooled tokens")


def test_from_hf_loads_the_timm_weights(model, swin):
    assert_same_swin_weights(model, swin)
    exported = model.to_hf()["vision"]
    assert isinstance(exported, timm.models.swin_transformer.SwinTransformer)
    assert_same_swin_weights(model, exported)


def test_from_a_swin_built_without_create_model():
    """A SwinTransformer made directly has no architecture name: it is described under Swin-B's (the default)."""
    torch.manual_seed(2)
    direct = timm.models.swin_transformer.SwinTransformer(num_classes=0, **SWIN).eval()
    m = cosa_from_hf(tiny_bert(), direct)
    assert m.config.swin == TimmSwinConfig(**SWIN)
    assert_same_swin_weights(m, direct)
    px = pixels(1, 2, seed=4)
    with torch.no_grad():
        assert_close(m.encode_vision(px).flatten(0, 1), direct.forward_features(px[0]).flatten(1, 2), "tokens")


def test_from_a_safetensors_file(tmp_path, model):
    """A timm state dict in safetensors (a classifier head, as in timm's checkpoints, is dropped); a folder holding
    model.safetensors (timm's hub layout) when vision_type says swin."""
    from safetensors.torch import save_file

    theirs = tiny_swin(seed=1, num_classes=10)
    save_file(theirs.state_dict(), tmp_path / "swin.safetensors")
    loaded = cosa_from_hf(tiny_bert(), str(tmp_path / "swin.safetensors"), swin=SWIN)
    assert loaded.config.swin == TimmSwinConfig(**SWIN)  # Swin-B's name (the default), the numbers given
    assert loaded.config.swin.timm_kwargs() == model.config.swin.timm_kwargs()
    assert_same_swin_weights(loaded, theirs)
    folder = tmp_path / "timm-hub"
    folder.mkdir()
    save_file(theirs.state_dict(), folder / "model.safetensors")
    again = cosa_from_hf(tiny_bert(), folder, vision_type="swin", swin=TimmSwinConfig(**SWIN))
    assert_same_swin_weights(again, theirs)


def test_pickled_swin_checkpoints_are_refused(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for name in ("swin_base_patch4_window7_224_22k.pth", "pytorch_model.bin"):
        (tmp_path / name).write_bytes(b"never read")
        with pytest.raises(ValueError, match="safetensors only"):
            cosa_from_hf(tiny_bert(), tmp_path / name, vision_type="swin", swin=SWIN)
        with pytest.raises(ValueError, match="safetensors only"):  # a file is taken for a Swin's weights
            cosa_from_hf(tiny_bert(), str(tmp_path / name), swin=SWIN)


def test_loading_errors(tmp_path, swin):
    from safetensors.torch import save_file

    with pytest.raises(TypeError, match="timm SwinTransformer or a safetensors file"):
        cosa_from_hf(tiny_bert(), clip_model(), vision_type="swin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cosa_from_hf(tiny_bert(), tmp_path / "missing.safetensors", swin=SWIN)
    save_file(swin.state_dict(), tmp_path / "swin.safetensors")
    with pytest.raises(RuntimeError, match="do not fit config.swin"):
        cosa_from_hf(tiny_bert(), tmp_path / "swin.safetensors", swin=dict(SWIN, embed_dim=32))
    with pytest.raises(RuntimeError, match="conversion mismatch: missing"):
        cosa_from_hf(tiny_bert(), tmp_path / "swin.safetensors", swin=dict(SWIN, depths=(2, 3)))


def test_pretraining_step_with_concatenation_reaches_the_swin(model):
    m = COSAModel(model.config)
    m.load_state_dict(model.state_dict())
    m.train()
    ids, mask = captions([5, 7, 4, 6], seed=1)
    losses = m(pixels(4, seed=2), ids, mask, concat=2, generator=torch.Generator().manual_seed(0))
    names = {"itc_origin", "itm_origin", "itc_concatenated", "itm_concatenated", "mlm_concatenated"}
    assert names | {"cap_concatenated", "loss"} == set(losses)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["loss"].backward()
    grads = [p.grad for p in m.vision_model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.vision_model.swin.patch_embed.proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_switches_timm_on(model):
    m = COSAModel(model.config)
    m.load_state_dict(model.state_dict())
    assert not m.vision_model.gradient_checkpointing
    m.gradient_checkpointing_enable()
    assert m.vision_model.gradient_checkpointing
    assert all(stage.grad_checkpointing for stage in m.vision_model.swin.layers)
    px = pixels(2, seed=3).requires_grad_()
    out = m.eval().encode_vision(px)  # eval: no drop path, so comparable; timm checkpoints whenever grads are on
    out.sum().backward()
    assert px.grad is not None and px.grad.abs().sum() > 0
    with torch.no_grad():
        assert_close(out, model.encode_vision(px), "tokens with checkpointing")


def test_config_round_trip(model):
    cfg = model.config
    assert COSAConfig.from_dict(cfg.to_dict()) == cfg
    as_json = COSAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # tuples come back as lists
    assert as_json == cfg and as_json.swin.depths == (2, 2)
    again = COSAModel(as_json)
    again.load_state_dict(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_presets_match_timm():
    """Each preset is what timm's entry point builds (on the meta device: no weights); Swin-B at 224 is the default,
    COSA-B's encoder with 1024 channels and 49 tokens."""
    default = TimmSwinConfig()
    assert default.model_name == "swin_base_patch4_window7_224"
    assert (default.num_features, default.num_tokens) == (1024, 49)
    assert COSAConfig(vision_type="swin").vision_dim == 1024 and COSAConfig().vision_dim == 1024  # CLIP ViT-L
    for name in SWIN_PRESETS:
        with torch.device("meta"):
            built = timm.create_model(name, pretrained=False, num_classes=0)
        assert swin_config_from_timm(built) == TimmSwinConfig(model_name=name), name
        assert built.num_features == TimmSwinConfig(model_name=name).num_features, name


def test_missing_timm_says_how_to_install(monkeypatch):
    cfg = COSAConfig(vision_type="swin", swin=SWIN)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install timm .*mmcore\[swin\]"):
        COSAModel(cfg)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model_name="vit_base_patch16_224"), "model_name must name a timm Swin"),
        (dict(model_name="swinv2_tiny_window8_256"), "model_name must name a timm Swin"),
        (dict(model_name="swin_mine", **{k: v for k, v in SWIN.items() if k != "depths"}), "depths must be given"),
        (dict(SWIN, embed_dim=0), "embed_dim must be a positive int"),
        (dict(SWIN, window_size=True), "window_size must be a positive int"),
        (dict(SWIN, depths=()), "depths must be a non-empty tuple"),
        (dict(SWIN, num_heads=(2, 0)), "num_heads must be a non-empty tuple"),
        (dict(SWIN, num_heads=(2, 4, 8)), "one entry per stage"),
        (dict(SWIN, num_heads=(3, 4)), r"stage 0 has 16 channels .* num_heads\[0\] = 3"),
        (dict(SWIN, img_size=62), "not a multiple of patch_size"),
        (dict(SWIN, img_size=20), "5-patch grid .* must be divisible by 2"),
    ],
    ids=["not-swin", "swinv2", "unknown-name-missing", "zero", "bool", "no-stages", "zero-heads", "stage-count",
         "heads-divide", "patch-divide", "grid-halving"],
)  # fmt: skip
def test_bad_swin_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TimmSwinConfig(**kw)
    with pytest.raises(ValueError, match=match):
        COSAConfig(vision_type="swin", swin=kw)


def test_bad_pixels(model):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 64, 64\)"):
        model.encode_vision(torch.randn(1, 1, 3, 32, 32))
    with pytest.raises(TypeError, match="floating point"):
        model.encode_vision(torch.zeros(1, 1, 3, 64, 64, dtype=torch.uint8))
