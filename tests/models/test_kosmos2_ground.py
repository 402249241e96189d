"""``mmcore ground`` end to end on a tiny random checkpoint saved by the test (model + processor)."""

from __future__ import annotations

import json

import pytest
import torch

from mmcore import cli
from mmcore.models.kosmos2 import Kosmos2ForConditionalGeneration, Kosmos2Processor
from mmcore.testing import make_kosmos2_tokenizer

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kosmos2_tiny")
    processor = Kosmos2Processor(make_kosmos2_tokenizer(), image_size=32, num_image_tokens=3)
    vocab = len(processor.tokenizer)
    text = dict(vocab_size=vocab, embed_dim=32, layers=2, attention_heads=4, ffn_dim=37, max_position_embeddings=256)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37)  # fmt: skip
    torch.manual_seed(0)
    config = transformers.Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=3)
    transformers.Kosmos2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _image(path, color):
    PIL.new("RGB", (48, 40), color).save(path)
    return path


def test_single_image(checkpoint, tmp_path, capsys):
    img = _image(tmp_path / "red.png", (200, 30, 30))
    out = tmp_path / "annotated.png"
    argv = ["ground", "--checkpoint", str(checkpoint), "--image", str(img), "--out", str(out)]
    assert cli.main([*argv, "--max-new-tokens", "12"]) == 0
    caption = capsys.readouterr().out.strip()
    assert caption, "a caption is printed"
    assert PIL.open(out).size == (48, 40)


def test_folder_batched_matches_one_by_one(checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        _image(folder / f"im{i}.png", color)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = ["ground", "--checkpoint", str(checkpoint), "--image", str(folder), "--out", str(out)]
    assert cli.main([*argv, "--batch-size", "2", "--max-new-tokens", "10"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["im0.png", "im1.png", "im2.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["im0.png", "im1.png", "im2.png"]
    from mmcore.models.kosmos2.ground import ground_images, image_paths

    model = Kosmos2ForConditionalGeneration.from_pretrained(checkpoint)
    processor = Kosmos2Processor.from_pretrained(checkpoint)
    alone = [g for p in image_paths(folder) for g, _ in ground_images(model, processor, [p], max_new_tokens=10,
                                                                     progress=False)]  # fmt: skip
    assert [g.markdown for g in alone] == [r["markdown"] for r in rows], "batching does not change the output"


def test_errors(checkpoint, tmp_path, capsys):
    assert cli.main(["ground", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "missing.png")]) == 2
    assert "no such image or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["ground", "--checkpoint", str(checkpoint), "--image", str(empty)]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_unreadable_images_and_bad_arguments(checkpoint, tmp_path, capsys):
    ground = ["ground", "--checkpoint", str(checkpoint), "--max-new-tokens", "4"]
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    assert cli.main([*ground, "--image", str(fake)]) == 2
    assert f"{fake} is not an image PIL can read" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    assert cli.main([*ground, "--image", str(bad), "--out", str(tmp_path / "bad_out")]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err
    # some readable: they are written, the others named, exit status 1
    _image(bad / "y.png", (10, 20, 30))
    assert cli.main([*ground, "--image", str(bad), "--out", str(tmp_path / "some_out")]) == 1
    assert "1 of 2 images could not be read" in capsys.readouterr().err
    assert len((tmp_path / "some_out" / "results.jsonl").read_text().splitlines()) == 1
    # arguments checked before the model loads
    img = _image(tmp_path / "ok.png", (30, 200, 30))
    assert cli.main([*ground, "--image", str(img), "--out", str(tmp_path / "noext")]) == 2
    assert "give an image file name PIL can write" in capsys.readouterr().err
    assert cli.main([*ground, "--image", str(bad), "--out", str(img)]) == 2
    assert "is a file; for a folder of images give an output folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main([*ground, "--image", str(img), "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    assert cli.main([*ground, "--image", str(img), "--device", "gpu0"]) == 2
    assert "is not a device" in capsys.readouterr().err
    missing = ["ground", "--checkpoint", str(tmp_path / "no_checkpoint"), "--image", str(img)]
    assert cli.main(missing) == 2
    assert "no Kosmos-2 checkpoint folder at" in capsys.readouterr().err


def test_same_stem_images_keep_their_own_annotations(checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _image(folder / "a.png", (200, 30, 30))
    _image(folder / "a.jpg", (30, 200, 30))
    _image(folder / "b.png", (30, 30, 200))
    out = tmp_path / "out"
    argv = ["ground", "--checkpoint", str(checkpoint), "--image", str(folder), "--out", str(out)]
    assert cli.main([*argv, "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["annotated"] for r in rows] == ["a_jpg.png", "a_png.png", "b.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["a_jpg.png", "a_png.png", "b.png"]


def test_grounding_leaves_the_tokenizer_padding_side(checkpoint, tmp_path):
    from mmcore.models.kosmos2.ground import ground_images

    model = Kosmos2ForConditionalGeneration.from_pretrained(checkpoint, dtype="float32")
    processor = Kosmos2Processor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "right"
    img = _image(tmp_path / "c.png", (1, 2, 3))
    assert len(list(ground_images(model, processor, [img], max_new_tokens=3, progress=False))) == 1
    assert processor.tokenizer.padding_side == "right"
    with pytest.raises(ValueError, match="names no torch dtype"):
        Kosmos2ForConditionalGeneration.from_pretrained(checkpoint, dtype="half_float")


def test_beam_search_from_the_command_line(checkpoint, tmp_path, capsys):
    img = _image(tmp_path / "green.png", (30, 200, 30))
    argv = ["ground", "--checkpoint", str(checkpoint), "--image", str(img), "--max-new-tokens", "8"]
    assert cli.main([*argv, "--num-beams", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main([*argv, "--num-beams", "0"]) == 2
    assert "num_beams" in capsys.readouterr().err
