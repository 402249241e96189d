"""Kosmos-2 processor: images and grounded text -> model inputs; generated ids -> text and boxes.

``Kosmos2Processor(tokenizer)(images, text, bboxes)`` returns the ``pixel_values``, ``input_ids``, ``attention_mask``
and ``image_embeds_position_mask`` that transformers' ``Kosmos2Processor`` returns for the same inputs
(shared/research/kosmos2.md sections 1.7, 1.8, 1.10). Per example the text becomes

    <s><image> <image> x 64 </image> text<phrase>a dog</phrase><object> <patch_index_0044> <patch_index_0863> </object>

and the ids of the 64 inner ``<image>`` tokens are overwritten with ``image_token_ids`` (unk + 1 ... unk + 64 by
default), the positions where the model splices in the image embeddings. Images are resized to a square with PIL's
bicubic filter, as transformers' PIL image processor does for the hub config (``use_square_size``), so pixel values
are bit-identical to it.

transformers, tokenizers and PIL are imported when first needed: ``import mmcore`` does not require them.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Sequence

import numpy as np
import torch

from mmcore.grounding import TAG_TOKENS, boxes_to_loc_indices, extract_entities, loc_token, loc_tokens

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "processor_config.json"  # transformers 5 writes the same file, with the image settings nested
HUB_IMAGE_CONFIG_NAME = "preprocessor_config.json"  # the hub checkpoints' image settings (older transformers)
SETTINGS = ("num_patch_index_tokens", "num_image_tokens", "first_image_token_id", "add_eos_token")
RETURN_TENSORS = ("pt", "np", None)

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, transformers' ``resample=3``
_PHRASE = re.compile(r"<phrase>.+?</phrase>")  # as transformers: shortest match, no newline inside
_DELIMITER = " </delimiter_of_multi_objects/> "
_BOX_FORMS = (
    "None, a (top_left, bottom_right) tuple of 2 location indices, a tuple of 4 floats (x1, y1, x2, y2) in [0, 1], "
    "or a list of such tuples"
)


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class Kosmos2Processor:
    """Kosmos-2 inputs from images, text and boxes, equal to transformers' ``Kosmos2Processor``.

    tokenizer: a transformers fast tokenizer (Kosmos-2's XLM-R sentencepiece one for the released checkpoints). The
    11 tag tokens and the ``num_patch_index_tokens`` location tokens are added to it (in place, as transformers
    does, with the same ``AddedToken`` flags), so ids equal transformers' for the same base tokenizer.
    image_size: side of the square the images are resized to. num_image_tokens: placeholders per image (the
    model's ``latent_query_num``). first_image_token_id: id of the first placeholder (None: ``unk_token_id + 1``).
    add_eos_token: let the tokenizer add ``<s> ... </s>`` instead of prepending ``<s>`` only.

    Where transformers' processor accepts input that gives a wrong sample, this one raises ValueError instead: box
    coordinates outside [0, 1] (transformers' ``coordinate_to_patch_index`` turns them into another cell's index or
    one beyond the grid), location indices beyond the grid, and a ``max_length`` truncation that would cut into the
    image placeholders. Input both accept gives transformers' ids.
    """

    def __init__(
        self,
        tokenizer,
        *,
        image_size: int = 224,
        num_image_tokens: int = 64,
        num_patch_index_tokens: int = 1024,
        first_image_token_id: int | None = None,
        add_eos_token: bool = False,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ):
        self.image_size = _check_int(image_size, "image_size", 1)
        self.num_image_tokens = _check_int(num_image_tokens, "num_image_tokens", 1)
        self.num_patch_index_tokens = _check_int(num_patch_index_tokens, "num_patch_index_tokens", 1)
        self.num_bins = math.isqrt(self.num_patch_index_tokens)
        if self.num_bins**2 != self.num_patch_index_tokens:
            raise ValueError(
                f"num_patch_index_tokens must be a perfect square (num_bins x num_bins location tokens), "
                f"got {num_patch_index_tokens}"
            )
        if not isinstance(add_eos_token, bool):
            raise TypeError(f"add_eos_token must be a bool, got {add_eos_token!r}")
        self.add_eos_token = add_eos_token
        self.image_mean = self._check_channels(image_mean, "image_mean")
        self.image_std = self._check_channels(image_std, "image_std")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        for name in ("convert_tokens_to_ids", "add_tokens", "batch_decode"):
            if not callable(getattr(tokenizer, name, None)):
                raise TypeError(f"tokenizer must be a transformers tokenizer (has no {name}), got {type(tokenizer)}")

        from tokenizers import AddedToken

        # The flags transformers' Kosmos2Processor uses: tags and locations swallow the space before them.
        tokenizer.add_tokens(
            [
                AddedToken(t, lstrip=True, rstrip=False, normalized=False)
                for t in (*TAG_TOKENS, *loc_tokens(self.num_bins))
            ]
        )
        self.tokenizer = tokenizer

        if first_image_token_id is None:
            if tokenizer.unk_token_id is None:
                raise ValueError("the tokenizer has no unk token: pass first_image_token_id")
            first_image_token_id = tokenizer.unk_token_id + 1
        self.first_image_token_id = _check_int(first_image_token_id, "first_image_token_id", 0)
        if self.first_image_token_id + self.num_image_tokens > len(tokenizer):
            first, last = self.first_image_token_id, self.first_image_token_id + self.num_image_tokens - 1
            raise ValueError(f"image token ids {first} ... {last} lie outside the tokenizer's {len(tokenizer)} ids")
        self._boi_id, self._eoi_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "</image>"))
        # `<image>`, the num_image_tokens placeholders (also written `<image>`), `</image>`.
        self._image_prefix = " ".join(["<image>"] * (self.num_image_tokens + 1) + ["</image>"])

    @staticmethod
    def _check_channels(values, name: str) -> tuple[float, float, float]:
        values = (
            tuple(values) if isinstance(values, (Sequence, np.ndarray)) and not isinstance(values, str) else (values,)
        )
        if len(values) != 3 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
        return tuple(float(v) for v in values)

    # ------------------------------------------------------------------------------------------ tokens

    @property
    def image_token_ids(self) -> list[int]:
        """The ids written at the image placeholder positions (``image_embeds_position_mask == 1``)."""
        return list(range(self.first_image_token_id, self.first_image_token_id + self.num_image_tokens))

    def grounding_tokens(self):
        """The tag and location ids of ``self.tokenizer`` as ``mmcore.ops.GroundingTokens`` (for grounded decoding)."""
        from mmcore.ops import GroundingTokens

        return GroundingTokens.from_tokenizer(self.tokenizer)

    # ------------------------------------------------------------------------------------------ images

    def preprocess_images(self, images) -> torch.Tensor:
        """PIL images or uint8 arrays (H, W), (H, W, C) with C in 1, 3, 4, or a batch (N, H, W, C)
        -> float32 (n, 3, image_size, image_size).

        RGB (transparency composited onto white), bicubic resize to a square (aspect ratio not kept), x / 255,
        then (x - mean) / std per channel. NOTE: the arithmetic follows transformers' PIL backend step by step
        (rescale in float64 then cast, normalise in float32), which makes the result bit-identical to it.
        """
        from PIL import Image

        size = (self.image_size, self.image_size)
        resized = [
            np.asarray(self._to_rgb(image, f"images[{i}]").resize(size, resample=Image.Resampling.BICUBIC))
            for i, image in enumerate(self._image_list(images))
        ]
        x = (np.stack(resized).astype(np.float64) * (1 / 255)).astype(np.float32)  # (n, size, size, 3)
        x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    @staticmethod
    def _image_list(images) -> list:
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("images is empty")
        return images

    @staticmethod
    def _to_rgb(image, name: str):
        """One image -> an RGB PIL image."""
        from PIL import Image

        if isinstance(image, Image.Image):
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")
        if not isinstance(image, np.ndarray):
            raise TypeError(f"{name} must be a PIL image or a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8 (0 ... 255), got {image.dtype}; convert float images first")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
            raise ValueError(f"{name} must have shape (H, W) or (H, W, C) with C in 1, 3, 4, got {image.shape}")
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        elif image.shape[-1] == 4:
            alpha = image[..., 3:] / 255
            image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(image))

    # ------------------------------------------------------------------------------------------ text

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        bboxes=None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ):
        """Model inputs as a ``transformers.BatchFeature``.

        images: one image or a list (one per text; see ``preprocess_images``). text: a string or a list of strings.
        bboxes: per ``<phrase>...</phrase>`` of a text, in order: None, a ``(top_left, bottom_right)`` pair of
        location indices, a ``(x1, y1, x2, y2)`` tuple of normalised floats, or a list of such tuples; for a list of
        texts, a list of those lists (or None per text).

        Returns ``pixel_values`` (n, 3, image_size, image_size) when images are given, ``input_ids`` and
        ``attention_mask`` (batch, seq) when text is given, and ``image_embeds_position_mask`` (batch, seq) when both
        are. ``return_tensors``: "pt", "np", or None for lists (a single string then gives flat lists, and
        ``pixel_values`` is a list of (3, size, size) arrays). With images, a batch is padded to its longest row
        (or to ``max_length`` with ``padding="max_length"``) on ``tokenizer.padding_side`` even when ``padding`` is
        False, and a single string is never padded, as transformers does; use ``padding_side="left"`` to generate.
        """
        from transformers import BatchFeature

        if images is None and text is None:
            raise ValueError("pass images, text or both")
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {RETURN_TENSORS}, got {return_tensors!r}")
        out = {}
        image_list = None
        if images is not None:
            image_list = self._image_list(images)
            pixel_values = self.preprocess_images(image_list)
            if return_tensors != "pt":  # "np": one array; None: a list of (3, size, size) arrays, as transformers
                pixel_values = pixel_values.numpy() if return_tensors == "np" else list(pixel_values.numpy())
            out["pixel_values"] = pixel_values
        if text is None:
            return BatchFeature(out)

        batched = not isinstance(text, str)
        texts = self._text_list(text)
        if image_list is not None and len(image_list) != len(texts):
            raise ValueError(f"got {len(texts)} texts and {len(image_list)} images: pass one image per text")
        locations = self._location_tokens(self._parse_bboxes(bboxes, batched, len(texts)))
        prompts = [
            self._prompt(t, image_list is not None, loc, f"text[{i}]" if batched else "text")
            for i, (t, loc) in enumerate(zip(texts, locations, strict=True))
        ]
        if add_special_tokens and not self.add_eos_token:
            if self.tokenizer.bos_token is None:
                raise ValueError("the tokenizer has no bos_token: pass add_special_tokens=False or add_eos_token=True")
            prompts = [self.tokenizer.bos_token + p for p in prompts]
        kwargs = {
            "add_special_tokens": add_special_tokens and self.add_eos_token,
            "return_token_type_ids": False,
            "truncation": truncation,
            "max_length": max_length,
        }
        if image_list is None:
            enc = self.tokenizer(
                prompts if batched else prompts[0], padding=padding, return_tensors=return_tensors, **kwargs
            )
            out.update(enc)
            return BatchFeature(out)

        enc = self.tokenizer(prompts, padding=False, return_tensors=None, **kwargs)
        input_ids, attention_mask = [list(r) for r in enc["input_ids"]], [list(r) for r in enc["attention_mask"]]
        start = 1 + int(add_special_tokens)  # the first placeholder, after <s> (if any) and <image>
        stop = start + self.num_image_tokens
        for i, row in enumerate(input_ids):
            if len(row) <= stop or row[start - 1] != self._boi_id or row[stop] != self._eoi_id:
                raise ValueError(
                    f"row {i} does not hold <image> x {self.num_image_tokens + 1} </image> at positions "
                    f"{start - 1} ... {stop}: max_length must leave room for them, and with add_eos_token=True the "
                    f"tokenizer must add exactly one <s> in front"
                )
            row[start:stop] = self.image_token_ids
        image_mask = [[0] * start + [1] * self.num_image_tokens + [0] * (len(r) - stop) for r in input_ids]

        if batched:
            length = max(len(r) for r in input_ids)
            if padding and padding != "do_not_pad":
                # The length the tokenizer pads the longest row to (padding="max_length" can make it longer).
                longest = max(range(len(prompts)), key=lambda i: len(input_ids[i]))
                length = len(self.tokenizer([prompts[longest]], padding=padding, **kwargs)["input_ids"][0])
            if any(len(r) != length for r in input_ids):
                if self.tokenizer.pad_token_id is None:
                    raise ValueError("the texts tokenize to different lengths and the tokenizer has no pad token")
                input_ids = self._pad(input_ids, length, self.tokenizer.pad_token_id)
                attention_mask = self._pad(attention_mask, length, 0)
                image_mask = self._pad(image_mask, length, 0)

        columns = {"input_ids": input_ids, "attention_mask": attention_mask, "image_embeds_position_mask": image_mask}
        for name, rows in columns.items():
            if return_tensors == "pt":
                out[name] = torch.tensor(rows, dtype=torch.long)
            elif return_tensors == "np":
                out[name] = np.array(rows, dtype=np.int64)
            else:
                out[name] = rows if batched else rows[0]
        return BatchFeature(out)

    def _pad(self, rows: list[list[int]], length: int, value: int) -> list[list[int]]:
        if self.tokenizer.padding_side == "left":
            return [[value] * (length - len(r)) + r for r in rows]
        return [r + [value] * (length - len(r)) for r in rows]

    @staticmethod
    def _text_list(text) -> list[str]:
        if isinstance(text, str):
            return [text]
        if not isinstance(text, (list, tuple)) or not text:
            raise TypeError(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
        for i, t in enumerate(text):
            if not isinstance(t, str):
                raise TypeError(f"text[{i}] must be a string, got {type(t).__name__}")
        return list(text)

    def _prompt(self, text: str, with_image: bool, locations: list[list[tuple[str, str]]] | None, name: str) -> str:
        """One example's string: image prefix, then ``<object> ... </object>`` after each phrase that has boxes."""
        text = text.strip()
        if with_image:
            text = f"{self._image_prefix} {text}"
        if not locations:
            return text
        phrases = list(_PHRASE.finditer(text))
        if len(phrases) != len(locations):
            raise ValueError(
                f"{name} has {len(phrases)} <phrase>...</phrase> pairs but its bboxes have {len(locations)} entries: "
                f"give one entry (None for no box) per phrase"
            )
        pieces, pos = [], 0
        for match, pairs in zip(phrases, locations, strict=True):
            pieces.append(text[pos : match.end()])
            pos = match.end()
            if pairs:
                pieces.append(f"<object> {_DELIMITER.join(f'{a} {b}' for a, b in pairs)} </object>")
        pieces.append(text[pos:])
        return "".join(pieces)

    # ------------------------------------------------------------------------------------------ boxes

    def _parse_bboxes(self, bboxes, batched: bool, num_texts: int) -> list[list[list[tuple]] | None]:
        """Checked boxes per text, per phrase: a list of 2-int or 4-float tuples (empty for None)."""
        if bboxes is None:
            return [None] * num_texts
        if not batched:
            return [self._parse_text_bboxes(bboxes, "bboxes")]
        if not isinstance(bboxes, list):
            raise ValueError(f"bboxes must be None or a list with one entry per text, got {type(bboxes).__name__}")
        if len(bboxes) != num_texts:
            raise ValueError(f"got {num_texts} texts and {len(bboxes)} entries in bboxes: pass one entry per text")
        return [self._parse_text_bboxes(b, f"bboxes[{i}]") for i, b in enumerate(bboxes)]

    def _parse_text_bboxes(self, bboxes, name: str) -> list[list[tuple]] | None:
        if bboxes is None:
            return None
        if not isinstance(bboxes, list):
            raise ValueError(
                f"{name} must be None or a list with one entry per <phrase> ({_BOX_FORMS}), got {bboxes!r:.80}"
            )
        parsed = []
        for j, entry in enumerate(bboxes):
            if entry is None:
                parsed.append([])
            elif isinstance(entry, tuple):
                parsed.append([self._parse_box(entry, f"{name}[{j}]")])
            elif isinstance(entry, list):
                for k, box in enumerate(entry):
                    if box is None:
                        raise ValueError(f"{name}[{j}][{k}] is None: a list of boxes for one phrase may not hold None")
                parsed.append([self._parse_box(box, f"{name}[{j}][{k}]") for k, box in enumerate(entry)])
            else:
                raise ValueError(f"{name}[{j}] must be {_BOX_FORMS}; got {entry!r:.80}")
        return parsed

    def _parse_box(self, box, name: str) -> tuple:
        if not isinstance(box, tuple):
            raise ValueError(f"{name} must be a tuple (a list means several boxes for one phrase), got {box!r:.80}")
        if len(box) == 2 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box):
            top_left, bottom_right = (int(v) for v in box)
            cells = self.num_patch_index_tokens
            if not (0 <= top_left < cells and 0 <= bottom_right < cells):
                raise ValueError(f"{name} = {box}: location indices must be in [0, {cells})")
            n = self.num_bins
            if top_left // n > bottom_right // n or top_left % n > bottom_right % n:
                raise ValueError(f"{name} = {box}: the top-left cell lies below or right of the bottom-right cell")
            return top_left, bottom_right
        if len(box) == 4 and all(isinstance(v, (float, np.floating)) for v in box):
            x1, y1, x2, y2 = (float(v) for v in box)
            if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
                raise ValueError(f"{name} = {box}: normalised coordinates must be finite and in [0, 1]")
            if not (x2 > x1 and y2 > y1):
                raise ValueError(f"{name} = {box}: a box (x1, y1, x2, y2) needs x2 > x1 and y2 > y1")
            return x1, y1, x2, y2
        raise ValueError(f"{name} must be a tuple of 2 ints (location indices) or 4 floats (x1, y1, x2, y2), got {box}")

    def _location_tokens(self, parsed: list[list[list[tuple]] | None]) -> list[list[list[tuple[str, str]]] | None]:
        """Parsed boxes -> (top-left, bottom-right) location token strings; all float boxes in one encoder call."""
        floats = [box for text in parsed if text for phrase in text for box in phrase if len(box) == 4]
        pairs = iter(boxes_to_loc_indices(floats, self.num_bins, rounding="hf").tolist() if floats else [])

        def tokens(box: tuple) -> tuple[str, str]:
            top_left, bottom_right = box if len(box) == 2 else next(pairs)
            return loc_token(top_left), loc_token(bottom_right)

        return [None if text is None else [[tokens(box) for box in phrase] for phrase in text] for text in parsed]

    # ------------------------------------------------------------------------------------------ decoding

    def batch_decode(self, *args, **kwargs):
        """``tokenizer.batch_decode``."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """``tokenizer.decode``."""
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_generation(self, text: str, cleanup_and_extract: bool = True):
        """The part of a generated string after ``</image>``; with ``cleanup_and_extract``, ``(clean_text, entities)``
        from ``mmcore.grounding.extract_entities`` (entities: ``[(name, (start, end), [(x1, y1, x2, y2), ...])]``).

        NOTE: boxes are decoded on this processor's ``num_bins`` grid; transformers always uses 32 (the same for the
        default 1024 location tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        caption = text.split("</image>")[-1]
        return extract_entities(caption, self.num_bins) if cleanup_and_extract else caption

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Generated ids (batch, seq) -> one string per row: decoded, then the part after ``</image>``."""
        texts = self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [self.post_process_generation(t, cleanup_and_extract=False) for t in texts]

    # ------------------------------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        """The settings as ``processor_config.json`` holds them (transformers 5's layout plus mmcore's keys)."""
        square = {"height": self.image_size, "width": self.image_size}
        return {
            "processor_class": "Kosmos2Processor",
            "num_patch_index_tokens": self.num_patch_index_tokens,
            "num_image_tokens": self.num_image_tokens,
            "first_image_token_id": self.first_image_token_id,
            "add_eos_token": self.add_eos_token,
            "image_processor": {
                "image_processor_type": "CLIPImageProcessor",
                "do_convert_rgb": True,
                "do_resize": True,
                "size": square,
                "resample": BICUBIC,
                "do_center_crop": True,
                "crop_size": square,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
            },
        }

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write the tokenizer's files and ``processor_config.json`` to the folder ``path``. Returns ``path``.

        transformers' ``Kosmos2Processor.from_pretrained`` reads the folder too (it ignores num_image_tokens,
        first_image_token_id and add_eos_token, which it takes per call)."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Kosmos2Processor:
        """Load a folder written by ``save_pretrained`` or by transformers (``processor_config.json``, or the hub
        checkpoints' ``preprocessor_config.json``), or a hub id, through ``transformers.AutoTokenizer``.

        Keyword arguments named like ``__init__``'s override the stored settings; the others go to
        ``AutoTokenizer.from_pretrained`` and, for a hub id, to the download of the config files."""
        from transformers import AutoTokenizer

        path = os.fspath(path)
        overrides = {k: kwargs.pop(k) for k in (*SETTINGS, "image_size", "image_mean", "image_std") if k in kwargs}
        if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".") or path.count("/") > 1):
            raise FileNotFoundError(f"path {path!r} is not a folder (nor a hub id of the form 'org/name')")
        processor_config = _read_config(path, CONFIG_NAME, kwargs) or {}
        image_config = processor_config.get("image_processor")
        name = f"{CONFIG_NAME}: image_processor"
        if image_config is None:
            image_config, name = _read_config(path, HUB_IMAGE_CONFIG_NAME, kwargs), HUB_IMAGE_CONFIG_NAME
        settings = {k: processor_config[k] for k in SETTINGS if k in processor_config}
        if image_config is not None:
            settings.update(_image_settings(image_config, name))
        settings.update(overrides)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        return cls(tokenizer, **settings)


def _read_config(path: str, filename: str, hub_kwargs: dict) -> dict | None:
    """A JSON file of the folder or hub repo ``path``; None when it has none."""
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            return None
    else:
        from transformers.utils import cached_file

        file = cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if file is None:
            return None
    with open(file) as f:
        return json.load(f)


def _square_side(size, name: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and set(size) == {"height", "width"} and size["height"] == size["width"]:
        return size["height"]
    raise ValueError(f"{name}: {size!r} is not a square; this processor resizes to image_size x image_size")


def _image_settings(config: dict, name: str) -> dict:
    """``image_size``, ``image_mean``, ``image_std`` from a transformers CLIPImageProcessor config; ValueError naming
    the field where the config asks for a pipeline other than this processor's (square bicubic resize, x / 255,
    normalise)."""
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if not config.get(flag, True):
            raise ValueError(f"{name}: {flag}=false is not supported; this processor always does it")
    if config.get("resample", BICUBIC) != BICUBIC:
        raise ValueError(f"{name}: resample={config['resample']} is not supported; this processor resizes bicubic (3)")
    if abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ValueError(f"{name}: rescale_factor={config['rescale_factor']} is not supported, only 1/255")
    size = config.get("size", 224)
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        if not config.get("use_square_size", False):
            raise ValueError(
                f"{name}: size {size} without use_square_size resizes the shortest edge (aspect kept); this processor "
                "resizes to a square"
            )
        size = size["shortest_edge"]
    side = _square_side(size, f"{name}: size")
    if config.get("do_center_crop", True) and _square_side(config.get("crop_size", side), f"{name}: crop_size") != side:
        raise ValueError(f"{name}: crop_size {config['crop_size']} differs from size {side}; cropping is not supported")
    settings = {"image_size": side}
    for key in ("image_mean", "image_std"):
        if key in config:
            settings[key] = config[key]
    return settings
