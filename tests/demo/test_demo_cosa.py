"""mmcore demo --model cosa: its tokenizer, pixels and held-out videos, the config's checks, and a shortened run
end to end through the command line."""

import functools
import json

import numpy as np
import pytest
import torch

from mmcore.demo import data

pytest.importorskip("PIL")
pytest.importorskip("transformers")
cosa = pytest.importorskip("mmcore.demo.cosa")


def test_tokenizer_layout_and_round_trip():
    tok = cosa.build_tokenizer()
    assert tok.convert_ids_to_tokens(list(range(5))) == list(cosa.SPECIAL_TOKENS)
    for i in range(40):
        text = data.scene("train", 0, i).text()
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.cls_token_id == 2 and ids[-1] == tok.sep_token_id == 3
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    config = cosa.model_config(cosa.CosaDemoConfig(), len(tok)).text
    assert (config.cls_token_id, config.sep_token_id, config.mask_token_id, config.pad_token_id) == (
        tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id)  # fmt: skip
    assert tok.convert_ids_to_tokens(config.random_token_start) == data.words()[0]


def test_pixels_are_clip_normalised():
    from mmcore.models.kosmos2.processing import CLIP_MEAN, CLIP_STD

    scenes = [data.scene("train", 0, i) for i in range(3)]
    x = cosa.pixel_values(scenes)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    raw = np.asarray(scenes[1].image())[10, 20] / 255.0
    want = (raw - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[1, :, 10, 20].numpy(), want, rtol=1e-5)


def test_heldout_videos_and_batches():
    config = cosa.CosaDemoConfig(videos=5, curve_videos=2, max_shapes=2)
    videos = cosa.heldout_videos(config)
    assert len(videos) == 5 and videos.pixels.shape == (5, 4, 3, 64, 64)
    for v in range(5):
        frames = [data.scene("heldout", 0, 4 * v + j, max_shapes=2) for j in range(4)]
        assert videos.scenes[v] == frames
        assert videos.paragraphs[v] == " ".join(s.text() for s in frames)
        torch.testing.assert_close(videos.pixels[v], cosa.pixel_values(frames))
    assert videos.head(2).paragraphs == videos.paragraphs[:2]
    tok = cosa.build_tokenizer()
    pixels, ids, mask = cosa.train_batch(config, tok, 3)
    assert pixels.shape == (32, 1, 3, 64, 64) and ids.shape[0] == 32 and mask.shape == ids.shape
    first = data.scene("train", 0, 3 * 32, max_shapes=2)
    assert tok.decode(ids[0], skip_special_tokens=True) == first.text()
    # both runs see the same batches
    again = cosa.train_batch(config, tok, 3)
    assert torch.equal(again[0], pixels) and torch.equal(again[1], ids)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"frames": 1}, "frames"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 2}, "batch_size"),
        ({"rerank_k": -1}, "rerank_k"),
        ({"videos": 10, "curve_videos": 20}, "curve_videos"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosa.CosaDemoConfig(**kwargs)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["demo", "--steps", "0"], "DemoConfig.steps"),
        (["demo", "--threads", "0"], "DemoConfig.threads"),
        (["demo", "--model", "cosa", "--steps", "-3"], "CosaDemoConfig.steps"),
        (["demo", "--model", "cosa", "--threads", "0"], "CosaDemoConfig.threads"),
    ],
)
def test_bad_demo_arguments_exit_with_a_message(argv, match, capsys, tmp_path):
    from mmcore import cli

    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_blind_steps_is_refused_for_cosa(capsys):
    from mmcore import cli

    assert cli.main(["demo", "--model", "cosa", "--blind-steps", "3"]) == 2
    assert "--blind-steps" in capsys.readouterr().err


def test_cosa_demo_end_to_end(tmp_path, monkeypatch):
    """``mmcore demo --model cosa`` through the command line on a tiny model: both runs, metrics and pictures."""
    pytest.importorskip("matplotlib")
    from mmcore import cli

    tiny = functools.partial(
        cosa.CosaDemoConfig,
        batch_size=8,
        width=32,
        heads=2,
        vision_layers=1,
        text_layers=1,
        patch_size=16,
        warmup_steps=2,
        videos=12,
        curve_videos=6,
        rerank_k=4,
        eval_every=3,
    )
    monkeypatch.setattr(cosa, "CosaDemoConfig", tiny)
    out = tmp_path / "cosa"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["demo", "--model", "cosa", "--out", str(out), "--steps", "6", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["paragraph_to_video_R@1"]) == {"concat=4", "concat=1"}
    assert metrics["videos"] == 12 and metrics["steps"] == 6 and metrics["chance_R@1"] == pytest.approx(100 / 12)
    for name, run in metrics["runs"].items():
        assert 0.0 <= metrics["paragraph_to_video_R@1"][name] <= 100.0
        assert metrics["paragraph_to_video_R@1"][name] == run["retrieval"]["itm"]["t2v"]["R@1"]
        assert [c["step"] for c in run["curve"]] == [3, 6]
        assert "loss" in run["final_losses"]
    assert any("concatenated" in k for k in metrics["runs"]["concat=4"]["final_losses"])
    assert not any("concatenated" in k for k in metrics["runs"]["concat=1"]["final_losses"])
    for name in metrics["files"]:
        assert (out / name).stat().st_size > 0
