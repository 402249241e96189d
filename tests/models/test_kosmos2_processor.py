"""mmcore's Kosmos2Processor against transformers' Kosmos2Processor on a small local tokenizer (no network).

Ids, masks and pixel values must be equal, not close: same text construction, same tokenizer calls, same PIL resize.
"""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from mmcore.grounding import TAG_TOKENS  # noqa: E402
from mmcore.models.kosmos2.processing import Kosmos2Processor  # noqa: E402
from mmcore.testing import make_kosmos2_tokenizer  # noqa: E402

# NOTE: without torchvision, transformers' CLIPImageProcessor falls back to exactly this PIL backend (the case in
# mmcore's test environment). With torchvision installed it resizes with torch instead, whose bicubic filter differs
# from PIL's, so transformers' own two backends disagree there; mmcore follows the PIL one.
CLIPImageProcessorPil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip").CLIPImageProcessorPil

# microsoft/kosmos-2-patch14-224's preprocessor_config.json (shared/research/kosmos2.md section 1.8).
HUB_IMAGE_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Kosmos2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
    "use_square_size": True,
}
HF_CALL_SETTINGS = ("num_image_tokens", "first_image_token_id", "add_eos_token")  # per call in transformers

_rng = np.random.RandomState(0)


def _rgb(h, w):
    return _rng.randint(0, 256, (h, w, 3), dtype=np.uint8)


def _palette_with_transparency():
    image = Image.fromarray(_rgb(33, 47)).quantize(16)
    image.info["transparency"] = 3
    return image


IMAGES = {
    "rgb_upscale": Image.fromarray(_rgb(50, 70)),
    "rgb_downscale": Image.fromarray(_rgb(480, 300)),
    "rgb_224": Image.fromarray(_rgb(224, 224)),
    "rgb_1x1": Image.fromarray(_rgb(1, 1)),
    "rgba": Image.fromarray(_rng.randint(0, 256, (40, 60, 4), dtype=np.uint8)),
    "gray_L": Image.fromarray(_rgb(64, 48)[..., 0]),
    "gray_alpha_LA": Image.fromarray(_rng.randint(0, 256, (40, 60, 4), dtype=np.uint8)).convert("LA"),
    "palette_transparency": _palette_with_transparency(),
    "cmyk": Image.fromarray(_rgb(50, 70)).convert("CMYK"),
    "numpy_hwc": _rgb(50, 70),
    "numpy_rgba": _rng.randint(0, 256, (40, 60, 4), dtype=np.uint8),
    "numpy_hw1": _rgb(50, 70)[..., :1],
}
IMG_A, IMG_B = IMAGES["rgb_upscale"], IMAGES["rgb_downscale"]

GROUNDED = "<grounding> An image of<phrase> a dog</phrase> on the grass"
TWO_PHRASES = "  <grounding><phrase>Two people</phrase> riding<phrase> bicycles</phrase> at sunset.  "
SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming "
    "himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)


def make_pair(padding_side="right", **settings):
    """(mmcore processor, transformers processor) on two identical fresh tokenizers."""
    ours_tok, hf_tok = make_kosmos2_tokenizer(), make_kosmos2_tokenizer()
    ours_tok.padding_side = hf_tok.padding_side = padding_side
    hf = transformers.Kosmos2Processor(
        CLIPImageProcessorPil(**HUB_IMAGE_CONFIG),
        hf_tok,
        num_patch_index_tokens=settings.get("num_patch_index_tokens", 1024),
    )
    return Kosmos2Processor(ours_tok, **settings), hf


@pytest.fixture(scope="module")
def pairs():
    return {side: make_pair(side) for side in ("right", "left")}


def _rows(x):
    """Nested Python lists of a list, tensor or (possibly ragged, dtype=object) array."""
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.dtype == object):
        return [_rows(r) for r in x]
    return x.tolist() if isinstance(x, (np.ndarray, torch.Tensor)) else x


def assert_same(ours, theirs, where=""):
    """Equal keys, types, dtypes and values; the message names the key and the first differing position."""
    assert isinstance(ours, transformers.BatchFeature), f"{where}: {type(ours)}"
    assert list(ours.keys()) == list(theirs.keys()), f"{where}: keys {list(ours)} vs {list(theirs)}"
    for key in ours:
        a, b = ours[key], theirs[key]
        if isinstance(b, list) and b and isinstance(b[0], np.ndarray):  # pixel_values with return_tensors=None
            assert isinstance(a, list) and len(a) == len(b), f"{where}: {key}"
            a, b = np.stack(a), np.stack(b)
        assert type(a) is type(b), f"{where}: {key} is {type(a).__name__}, transformers gives {type(b).__name__}"
        if isinstance(b, list) or b.dtype == object:  # lists, or ragged rows tokenized with return_tensors="np"
            assert _rows(a) == _rows(b), f"{where}: {key}: {a} vs {b}"
            continue
        assert a.dtype == b.dtype, f"{where}: {key} dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{where}: {key} shape {tuple(a.shape)} vs {tuple(b.shape)}"
        diff = np.argwhere(np.asarray(a != b))
        assert diff.size == 0, f"{where}: {key} differs at {diff[0].tolist()} ({len(diff)} positions): {a} vs {b}"


def call_both(ours, hf, settings=None, **kwargs):
    """Both processors' outputs for the same inputs; when transformers raises, mmcore must raise the same type."""
    hf_kwargs = {k: v for k, v in (settings or {}).items() if k in HF_CALL_SETTINGS}
    kwargs.setdefault("return_tensors", "pt")
    try:
        theirs = hf(**kwargs, **hf_kwargs)
    except Exception as error:  # noqa: BLE001 - any error transformers raises, mmcore raises too
        with pytest.raises(type(error)):
            ours(**kwargs)
        return None, None
    return ours(**kwargs), theirs


# ------------------------------------------------------------------------------------------ text and ids

CASES = {
    "text": dict(text=GROUNDED),
    "text_image": dict(images=IMG_A, text=GROUNDED),
    "text_image_in_list": dict(images=[IMG_A], text=GROUNDED),
    "images_only": dict(images=[IMG_A, IMG_B]),
    "batch": dict(text=[GROUNDED, "a"]),
    "batch_padding": dict(text=[GROUNDED, "a", TWO_PHRASES], padding=True),
    "batch_images": dict(images=[IMG_A, IMG_B], text=[GROUNDED, "a cat"]),
    "batch_images_same_length": dict(images=[IMG_A, IMG_B], text=["a", "a"]),
    "batch_images_padding": dict(images=[IMG_A, IMG_B], text=["a cat", TWO_PHRASES], padding=True),
    "batch_images_max_length": dict(images=[IMG_A, IMG_B], text=["a", GROUNDED], padding="max_length", max_length=90),
    "batch_images_truncation": dict(images=[IMG_A, IMG_B], text=[GROUNDED, "a"], truncation=True, max_length=70),
    "single_image_max_length": dict(images=IMG_A, text=GROUNDED, padding="max_length", max_length=90),
    "text_truncation": dict(text=[GROUNDED, "a"], truncation=True, max_length=4, padding=True),
    "no_special_tokens": dict(text=GROUNDED, add_special_tokens=False),
    "no_special_tokens_images": dict(images=[IMG_A, IMG_B], text=[GROUNDED, "a"], add_special_tokens=False),
    "box_pair": dict(images=IMG_A, text=GROUNDED, bboxes=[(44, 863)]),
    "box_float": dict(images=IMG_A, text=GROUNDED, bboxes=[(0.1, 0.2, 0.5, 0.75)]),
    "box_float_exact_cells": dict(text=GROUNDED, bboxes=[(0.25, 0.25, 0.5, 0.5)]),
    "box_whole_image": dict(text=GROUNDED, bboxes=[(0.0, 0.0, 1.0, 1.0)]),
    "boxes_list_mixed": dict(images=IMG_A, text=GROUNDED, bboxes=[[(3, 100), (0.25, 0.25, 0.5, 0.5), (7, 7)]]),
    "boxes_none_and_empty": dict(text=TWO_PHRASES, bboxes=[None, []]),
    "boxes_empty_list": dict(text=TWO_PHRASES, bboxes=[]),
    "boxes_batch": dict(
        images=[IMG_A, IMG_B],
        text=[GROUNDED, TWO_PHRASES],
        bboxes=[[(0.1, 0.2, 0.5, 0.75)], [[(3, 100), (0.5, 0.5, 0.9, 0.9)], None]],
    ),
    "boxes_batch_none_per_text": dict(text=[GROUNDED, TWO_PHRASES], bboxes=[None, [(1, 2), None]], padding=True),
    "phrase_across_newline": dict(text="<phrase>a\ndog</phrase> and<phrase> a cat</phrase>", bboxes=[(5, 6)]),
    "empty_text_image": dict(images=IMG_A, text=""),
}


@pytest.mark.parametrize("return_tensors", ["pt", None, "np"], ids=lambda r: f"return_{r}")
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_transformers(pairs, case, side, return_tensors):
    ours, hf = pairs[side]
    out, ref = call_both(ours, hf, **CASES[case], return_tensors=return_tensors)
    if ref is not None:
        assert_same(out, ref, f"{case}/{side}/{return_tensors}")


SETTINGS = {
    "add_eos_token": dict(add_eos_token=True),
    "first_image_token_id": dict(first_image_token_id=100),
    "num_image_tokens_16": dict(num_image_tokens=16),
    "grid_16x16": dict(num_patch_index_tokens=256),
}
SETTINGS_CASES = ("text", "text_image", "batch_images", "batch_padding", "no_special_tokens_images", "boxes_batch")


@pytest.mark.parametrize("case", SETTINGS_CASES)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_settings_match_transformers(name, case):
    settings = SETTINGS[name]
    ours, hf = make_pair("left", **settings)
    out, ref = call_both(ours, hf, settings, **CASES[case])
    assert ref is not None
    assert_same(out, ref, f"{name}/{case}")


def test_layout_of_an_image_prompt(pairs):
    ours, _ = pairs["left"]
    tok = ours.tokenizer
    out = ours(images=[IMG_A, IMG_B], text=["<grounding> An image of", "a"])
    ids, mask, image_mask = out["input_ids"], out["attention_mask"], out["image_embeds_position_mask"]
    boi, eoi, grounding = tok.convert_tokens_to_ids(["<image>", "</image>", "<grounding>"])
    row = ids[0].tolist()
    assert row[:2] == [0, boi] and row[2:66] == list(range(4, 68)) and row[66:68] == [eoi, grounding]
    assert ours.image_token_ids == list(range(4, 68))
    assert image_mask[0].tolist() == [0, 0] + [1] * 64 + [0] * (len(row) - 66)
    pad = ids.shape[1] - int(mask[1].sum())  # the short row is left padded: pads, then the same layout
    assert pad > 0 and ids[1, :pad].eq(tok.pad_token_id).all() and mask[1, :pad].eq(0).all()
    assert image_mask[1, pad + 2 : pad + 66].eq(1).all() and int(image_mask[1].sum()) == 64


def test_added_tokens_equal_transformers(pairs):
    ours, hf = pairs["right"]
    assert ours.tokenizer.get_vocab() == hf.tokenizer.get_vocab()
    assert len(ours.tokenizer) == 200 + len(TAG_TOKENS) + 1024
    ours_added = {i: repr(t) for i, t in ours.tokenizer.added_tokens_decoder.items()}
    assert ours_added == {i: repr(t) for i, t in hf.tokenizer.added_tokens_decoder.items()}
    again = Kosmos2Processor(ours.tokenizer)  # adding to a tokenizer that has the tokens changes nothing
    assert len(again.tokenizer) == len(hf.tokenizer)


@pytest.mark.parametrize("num_patch_index_tokens", [1024, 256])
def test_grounding_tokens(num_patch_index_tokens):
    proc = Kosmos2Processor(make_kosmos2_tokenizer(), num_patch_index_tokens=num_patch_index_tokens)
    tok, tokens = proc.tokenizer, proc.grounding_tokens()
    assert tokens.num_bins == proc.num_bins == int(num_patch_index_tokens**0.5)
    assert tokens.first_loc == tok.convert_tokens_to_ids("<patch_index_0000>") == 200 + len(TAG_TOKENS)
    assert tokens.loc_end == len(tok)
    assert tokens.phrase_open == tok.convert_tokens_to_ids("<phrase>")
    assert tokens.delimiter == tok.convert_tokens_to_ids("</delimiter_of_multi_objects/>")
    assert (tokens.eos, tokens.pad) == (2, 1)


# ------------------------------------------------------------------------------------------ pixel values


@pytest.mark.parametrize("kind", list(IMAGES))
def test_pixel_values_equal_transformers(pairs, kind):
    ours, _ = pairs["right"]
    ref = torch.from_numpy(CLIPImageProcessorPil(**HUB_IMAGE_CONFIG)(IMAGES[kind], return_tensors="np")["pixel_values"])
    out = ours.preprocess_images(IMAGES[kind])
    assert out.shape == ref.shape == (1, 3, 224, 224) and out.dtype == torch.float32 and out.is_contiguous()
    max_diff = float((out - ref).abs().max())
    assert max_diff == 0.0, f"{kind}: max |mmcore - transformers| = {max_diff:.3e}"


def test_pixel_values_batch_and_forms(pairs):
    ours, _ = pairs["right"]
    gray = _rgb(50, 70)[..., 0]
    batch = np.stack([_rgb(30, 40), _rgb(30, 40)])
    assert torch.equal(ours.preprocess_images(gray), ours.preprocess_images(Image.fromarray(gray)))
    assert torch.equal(ours.preprocess_images(batch), ours.preprocess_images([batch[0], batch[1]]))
    small = Kosmos2Processor(make_kosmos2_tokenizer(), image_size=32, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    out = small.preprocess_images([IMG_A, IMG_B])
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1


# ------------------------------------------------------------------------------------------ post-processing


@pytest.mark.parametrize("cleanup", [True, False])
@pytest.mark.parametrize(
    "text",
    [SNOWMAN, "<image>. the, to and of, </image>" + SNOWMAN, "no tags", "<object><patch_index_0005><patch_index_0911>"],
)
def test_post_process_generation(pairs, text, cleanup):
    ours, hf = pairs["right"]
    assert ours.post_process_generation(text, cleanup) == hf.post_process_generation(text, cleanup)


def test_post_process_image_text_to_text(pairs):
    ours, hf = pairs["left"]
    ids = ours(images=[IMG_A, IMG_B], text=[SNOWMAN, "a cat"])["input_ids"]
    assert ours.post_process_image_text_to_text(ids) == hf.post_process_image_text_to_text(ids)
    assert ours.batch_decode(ids) == hf.batch_decode(ids)
    assert ours.decode(ids[0], skip_special_tokens=True) == hf.decode(ids[0], skip_special_tokens=True)
    generated = ours.post_process_image_text_to_text(ids)[0]
    clean, entities = ours.post_process_generation(generated)
    assert (clean, entities) == hf.post_process_generation(generated)
    assert [(name, boxes) for name, _, boxes in entities] == [
        ("a snowman", [(0.390625, 0.046875, 0.984375, 0.828125)]),
        ("a fire", [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]


# ------------------------------------------------------------------------------------------ files


def test_save_and_load_round_trip(tmp_path):
    settings = dict(image_size=32, num_image_tokens=8, first_image_token_id=10, add_eos_token=True)
    proc = Kosmos2Processor(
        make_kosmos2_tokenizer(), num_patch_index_tokens=256, image_mean=(0.5, 0.4, 0.3), **settings
    )
    proc.save_pretrained(tmp_path)
    assert all(f.suffix == ".json" for f in tmp_path.iterdir()), sorted(f.name for f in tmp_path.iterdir())
    loaded = Kosmos2Processor.from_pretrained(tmp_path)
    assert loaded.to_dict() == proc.to_dict()
    assert loaded.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    kwargs = dict(images=[IMG_A, IMG_B], text=[GROUNDED, "a"], bboxes=[[(0.1, 0.2, 0.5, 0.75)], None])
    assert_same(loaded(**kwargs), proc(**kwargs), "round trip")
    assert Kosmos2Processor.from_pretrained(tmp_path, add_eos_token=False).add_eos_token is False


def test_folders_are_shared_with_transformers(tmp_path, pairs):
    ours, hf = pairs["right"]
    kwargs = dict(images=[IMG_A, IMG_B], text=[GROUNDED, "a"], bboxes=[[(0.1, 0.2, 0.5, 0.75)], None])
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    hf_from_ours = transformers.Kosmos2Processor.from_pretrained(tmp_path / "ours")
    ours_from_hf = Kosmos2Processor.from_pretrained(tmp_path / "hf")
    assert_same(hf_from_ours(**kwargs, return_tensors="pt"), ours(**kwargs), "transformers reads mmcore's folder")
    assert_same(ours_from_hf(**kwargs), ours(**kwargs), "mmcore reads transformers' folder")


def test_load_hub_style_folder(tmp_path):
    """A hub checkpoint keeps its image settings in preprocessor_config.json (size shortest_edge + use_square_size)."""
    make_kosmos2_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**HUB_IMAGE_CONFIG, "size": {"shortest_edge": 64}, "crop_size": 64})
    )
    proc = Kosmos2Processor.from_pretrained(tmp_path)
    assert (proc.image_size, proc.num_bins, proc.num_image_tokens) == (64, 32, 64)
    assert proc.image_mean == tuple(HUB_IMAGE_CONFIG["image_mean"])
    assert proc(images=IMG_A)["pixel_values"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"resample": 2}, "resample=2"),
        ({"use_square_size": False}, "shortest edge"),
        ({"crop_size": {"height": 200, "width": 200}}, "crop_size"),
        ({"do_normalize": False}, "do_normalize"),
        ({"size": {"height": 224, "width": 200}}, "not a square"),
    ],
    ids=["resample", "shortest_edge", "crop", "no_normalize", "not_square"],
)
def test_load_refuses_other_image_pipelines(tmp_path, change, match):
    make_kosmos2_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**HUB_IMAGE_CONFIG, **change}))
    with pytest.raises(ValueError, match=match):
        Kosmos2Processor.from_pretrained(tmp_path)


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Kosmos2Processor.from_pretrained(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ errors

ERRORS = {
    "nothing": (dict(), ValueError, "images, text or both"),
    "return_tensors": (dict(text="a", return_tensors="tf"), ValueError, "return_tensors"),
    "text_type": (dict(text=3), TypeError, "text must be"),
    "text_item_type": (dict(text=["a", 3]), TypeError, r"text\[1\]"),
    "texts_vs_images": (dict(text=["a", "b"], images=[IMG_A]), ValueError, "2 texts and 1 images"),
    "image_type": (dict(images=["x.png"]), TypeError, r"images\[0\] must be a PIL image"),
    "image_float": (dict(images=np.zeros((4, 4, 3), np.float32)), TypeError, "uint8"),
    "image_channels": (dict(images=np.zeros((4, 4, 2), np.uint8)), ValueError, r"\(H, W, C\)"),
    "image_empty_list": (dict(images=[]), ValueError, "images is empty"),
    "bboxes_not_list": (dict(text=GROUNDED, bboxes=(0.1, 0.2, 0.3, 0.4)), ValueError, "bboxes must be None or a list"),
    "bbox_3_floats": (dict(text=GROUNDED, bboxes=[(0.1, 0.2, 0.3)]), ValueError, r"bboxes\[0\] must be a tuple of 2"),
    "bbox_4_ints": (dict(text=GROUNDED, bboxes=[(0, 0, 1, 1)]), ValueError, "4 floats"),
    "bbox_bools": (dict(text=GROUNDED, bboxes=[(True, False)]), ValueError, "2 ints"),
    "bbox_x2_le_x1": (dict(text=GROUNDED, bboxes=[(0.5, 0.1, 0.5, 0.9)]), ValueError, r"bboxes\[0\] .*x2 > x1"),
    "bbox_outside": (dict(text=GROUNDED, bboxes=[(0.1, 0.1, 1.5, 0.9)]), ValueError, r"in \[0, 1\]"),
    "bbox_nan": (dict(text=GROUNDED, bboxes=[(0.1, 0.1, float("nan"), 0.9)]), ValueError, "finite"),
    "pair_outside": (dict(text=GROUNDED, bboxes=[(0, 1024)]), ValueError, r"\[0, 1024\)"),
    "pair_reversed": (dict(text=GROUNDED, bboxes=[(100, 3)]), ValueError, "below or right"),
    "box_as_list": (
        dict(text=GROUNDED, bboxes=[[0.1, 0.2, 0.3, 0.4]]),
        ValueError,
        r"bboxes\[0\]\[0\] must be a tuple",
    ),
    "none_in_box_list": (dict(text=GROUNDED, bboxes=[[(1, 2), None]]), ValueError, r"bboxes\[0\]\[1\] is None"),
    "phrases_vs_boxes": (dict(text=TWO_PHRASES, bboxes=[(1, 2)]), ValueError, "2 <phrase>...</phrase> pairs"),
    "batch_phrases_vs_boxes": (dict(text=["a", GROUNDED], bboxes=[None, [None, None]]), ValueError, r"text\[1\] has 1"),
    "batch_bboxes_count": (dict(text=["a", "b"], bboxes=[None]), ValueError, "2 texts and 1 entries"),
    "batch_bboxes_type": (dict(text=["a", "b"], bboxes=(None, None)), ValueError, "one entry per text"),
    "batch_bbox_position": (
        dict(text=["a", GROUNDED], bboxes=[None, [(0.2, 0.2, 0.1, 0.3)]]),
        ValueError,
        r"\[1\]\[0\]",
    ),
    "truncated_image": (dict(images=IMG_A, text="a", truncation=True, max_length=20), ValueError, "room"),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=str)
def test_errors(pairs, case):
    kwargs, error, match = ERRORS[case]
    ours, _ = pairs["right"]
    with pytest.raises(error, match=match):
        ours(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_patch_index_tokens=1000), "perfect square"),
        (dict(num_patch_index_tokens=0), "num_patch_index_tokens"),
        (dict(num_image_tokens=0), "num_image_tokens"),
        (dict(image_size=224.0), "image_size"),
        (dict(first_image_token_id=1200), "outside the tokenizer"),
        (dict(image_mean=(0.5, 0.5)), "image_mean must be 3"),
        (dict(image_std=(0.5, 0.0, 0.5)), "image_std must be positive"),
    ],
    ids=["not_square", "zero_locations", "zero_image_tokens", "float_size", "image_ids", "mean", "std"],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Kosmos2Processor(make_kosmos2_tokenizer(), **kwargs)


def test_constructor_rejects_non_tokenizer():
    with pytest.raises(TypeError, match="transformers tokenizer"):
        Kosmos2Processor(object())
