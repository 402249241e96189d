"""Sample packing for Kosmos-2 training: first-fit-decreasing bins, a batch sampler and a packing collator.

Packing puts several samples into one row of at most ``token_budget`` tokens, without padding: the samples of
a bin are concatenated and told apart by ``cu_seqlens`` (the varlen layout of DESIGN.md, "Data layout"), so
attention never crosses samples.

- ``first_fit_decreasing(lengths, budget)``: the bins, as lists of sample indices (C++ ``csrc/data/packing.cpp``,
  O(n log n); ``first_fit_decreasing_ref`` is the plain-Python reference).
- ``PackedBatchSampler``: a ``torch.utils.data.Sampler`` yielding one bin of dataset indices per step.
- ``kosmos2_labels``, ``collate_kosmos2_packed``, ``Kosmos2PackingCollator``: a bin's samples -> one packed
  Kosmos-2 batch (``input_ids``, ``image_embeds_position_mask``, ``labels``, ``cu_seqlens``, ``max_seqlen``,
  ``pixel_values``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from mmcore import _extension
from mmcore.ops._dispatch import Backend, Op
from mmcore.ops.grounding import first_true

IGNORE_INDEX = -100
# The id of `</image>` in the released Kosmos-2 vocabulary (shared/research/kosmos2.md section 1.7).
KOSMOS2_IMAGE_END_ID = 64004
_INT32_MAX = 2**31 - 1

# ------------------------------------------------------------------------------------------ checks


def _check_int(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _int_vector(x, name: str) -> torch.Tensor:
    """``x`` (a 1-D tensor, list, tuple or numpy array of integers) as a 1-D int64 CPU tensor."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a 1-D sequence of ints ({exc})") from exc
        if t.numel() == 0:  # torch.as_tensor([]) is float32
            t = t.long()
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(device="cpu", dtype=torch.int64)


def _check_lengths(lengths: torch.Tensor, budget: int, name: str) -> None:
    for bad, why in ((lengths < 0, "is negative"), (lengths > budget, f"exceeds the budget {budget}")):
        if bool(bad.any()):
            (i,) = first_true(bad)
            raise ValueError(f"{name}[{i}] = {int(lengths[i])} {why}")


# ------------------------------------------------------------------------------ first fit decreasing


def first_fit_decreasing_ref(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Reference first-fit-decreasing packing, written for clarity (O(n * bins)); expects valid input.

    Samples are taken by length descending, ties by index ascending; each goes into the first bin, in
    creation order, with room for it, or opens a new bin. A bin lists its samples in the order placed.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b in range(len(bins)):
            if room[b] >= lengths[i]:
                break
        else:
            b = len(bins)
            bins.append([])
            room.append(budget)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def _ffd_cpp(lengths: torch.Tensor, budget: int) -> list[list[int]]:
    return _extension.extension().first_fit_decreasing(lengths, budget)


def _ffd_ref(lengths: torch.Tensor, budget: int) -> list[list[int]]:
    return first_fit_decreasing_ref(lengths.tolist(), budget)


FIRST_FIT_DECREASING = Op(
    "first_fit_decreasing",
    [
        Backend("cpp", _ffd_cpp, ("cpu",)),
        Backend("torch", _ffd_ref, ("cpu",)),
    ],
)


def first_fit_decreasing(lengths, budget: int, *, backend: str | None = None) -> list[list[int]]:
    """Pack samples of the given lengths into bins of at most ``budget`` tokens, first fit decreasing.

    lengths: (n,) non-negative ints (tensor, list or numpy array), each at most ``budget``. Returns the bins
    as lists of indices into ``lengths``, in creation order; every index appears exactly once (zero-length
    samples go into the first bin). Deterministic: see ``first_fit_decreasing_ref``. backend: None (C++ when
    ``mmcore._C`` is loaded), ``"cpp"`` or ``"torch"`` (the reference).

    >>> first_fit_decreasing([3, 5, 2, 5, 0, 8], budget=8)
    [[5, 4], [1, 0], [3, 2]]
    """
    budget = _check_int(budget, "budget", minimum=1)
    t = _int_vector(lengths, "lengths")
    _check_lengths(t, budget, "lengths")
    return FIRST_FIT_DECREASING("cpu", None, t, budget, backend=backend)


# ---------------------------------------------------------------------------------------- sampler


class PackedBatchSampler(Sampler[list[int]]):
    """Yields bins of dataset indices, each holding at most ``token_budget`` tokens, for
    ``DataLoader(batch_sampler=...)``.

    Each epoch: the indices are shuffled with a generator seeded by ``seed + epoch`` (``shuffle=True``), cut
    into windows of ``window`` consecutive indices (default: one window of all), and each window is packed by
    ``first_fit_decreasing``. With ``shuffle=True`` the bins of a window are then shuffled too, since first
    fit decreasing creates them longest samples first. ``drop_last`` drops the final window when it holds
    fewer than ``window`` samples, as ``BatchSampler`` drops a short last batch (no effect without
    ``window``). Every other index is yielded exactly once per epoch. ``len()`` is the exact number of bins of
    the current epoch; the bins are computed once per epoch.

    A small ``window`` follows the shuffle more closely (less length sorting across the epoch); a large one
    packs tighter.
    """

    def __init__(
        self,
        lengths,
        token_budget: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        window: int | None = None,
        drop_last: bool = False,
    ):
        self.token_budget = _check_int(token_budget, "token_budget", minimum=1)
        self.lengths = _int_vector(lengths, "lengths")
        _check_lengths(self.lengths, self.token_budget, "lengths")
        self.window = None if window is None else _check_int(window, "window", minimum=1)
        self.shuffle = bool(shuffle)
        self.seed = _check_int(seed, "seed")
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        self.epoch = _check_int(epoch, "epoch")

    def _bins(self) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        n = len(self.lengths)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        size = n if self.window is None else self.window
        bins: list[list[int]] = []
        for start in range(0, n, max(size, 1)):
            indices = order[start : start + size]
            if self.drop_last and len(indices) < size:
                break
            window_bins = first_fit_decreasing(self.lengths[indices], self.token_budget)
            if self.shuffle:
                window_bins = [window_bins[b] for b in torch.randperm(len(window_bins), generator=generator).tolist()]
            dataset_index = indices.tolist()
            bins.extend([dataset_index[p] for p in b] for b in window_bins)
        self._cached = (self.epoch, bins)
        return bins

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._bins():
            yield list(b)

    def __len__(self) -> int:
        return len(self._bins())


# ------------------------------------------------------------------------------------------ labels


def kosmos2_labels(input_ids, image_end_id: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Language-modelling labels of one Kosmos-2 sample, (L,) int64, aligned with ``input_ids`` (L,).

    Hugging Face convention: the model shifts, so ``labels[j]`` is the target of the prediction made at
    position ``j - 1``. As in the original training (loss from ``</image>`` on), the targets are the tokens
    after the first ``</image>`` (``labels[j] = input_ids[j]`` for ``j > e``, e its index; the prediction made
    at ``</image>`` is the first counted); bos, ``<image>``, the image slots and ``</image>`` itself are
    ``ignore_index``. Without ``</image>``, every token but the first is a target.
    """
    image_end_id = _check_int(image_end_id, "image_end_id")
    ignore_index = _check_int(ignore_index, "ignore_index")
    ids = _int_vector(input_ids, "input_ids")
    hits = (ids == image_end_id).nonzero()
    end = int(hits[0, 0]) if len(hits) else 0
    labels = ids.clone()
    labels[: end + 1] = ignore_index
    return labels


# ---------------------------------------------------------------------------------------- collator


def _binary_vector(x, name: str, length: int) -> torch.Tensor:
    """A 0/1 mask of ``length`` entries (bool, integer or float tensor, list or numpy array) as int64."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if len(t) != length:
        raise ValueError(f"{name} has length {len(t)}, but input_ids has length {length}")
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        (i,) = first_true(bad)
        raise ValueError(f"{name}[{i}] = {t[i].item()}; expected 0 or 1")
    return t.to(device="cpu", dtype=torch.int64)


def _sample_parts(
    sample: Mapping[str, Any], s: int, image_end_id: int, latent_query_num: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, image mask, labels, pixel_values or None) of ``samples[s]``, checked and trimmed."""
    where = f"samples[{s}]"
    if not isinstance(sample, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(sample).__name__}")
    for key in ("input_ids", "image_embeds_position_mask"):
        if key not in sample:
            raise ValueError(f"{where} has no {key!r}")
    ids = _int_vector(sample["input_ids"], f"{where}['input_ids']")
    n = len(ids)
    mask = _binary_vector(sample["image_embeds_position_mask"], f"{where}['image_embeds_position_mask']", n)
    labels = sample.get("labels")
    if labels is not None:
        labels = _int_vector(labels, f"{where}['labels']")
        if len(labels) != n:
            raise ValueError(f"{where}['labels'] has length {len(labels)}, but input_ids has length {n}")
    attention = sample.get("attention_mask")
    if attention is not None:
        keep = _binary_vector(attention, f"{where}['attention_mask']", n).nonzero()[:, 0]
        first, count = (int(keep[0]), len(keep)) if len(keep) else (0, 0)
        if count and int(keep[-1]) - first + 1 != count:
            raise ValueError(f"{where}['attention_mask'] must mark one contiguous run of tokens (padding on the sides)")
        ids, mask = ids[first : first + count], mask[first : first + count]
        labels = None if labels is None else labels[first : first + count]

    if labels is None:
        labels = kosmos2_labels(ids, image_end_id, ignore_index)
    elif len(labels):
        # NOTE: unpacked, nothing predicts labels[0]. Kosmos2ForConditionalGeneration.forward_packed shifts within
        # each sample, but a loss that shifts the packed stream as one row (transformers') would have the previous
        # sample's last position predict it; ignoring it keeps the batch right for both.
        labels = labels.clone()
        labels[0] = ignore_index

    slots = int(mask.sum())
    if slots not in (0, latent_query_num):
        raise ValueError(
            f"{where} has {slots} image slots in image_embeds_position_mask; expected 0 or latent_query_num = "
            f"{latent_query_num}"
        )
    pixels = sample.get("pixel_values")
    if slots and pixels is None:
        raise ValueError(f"{where} has {slots} image slots but no pixel_values")
    if not slots and pixels is not None:
        raise ValueError(f"{where} has pixel_values but no image slots in image_embeds_position_mask")
    if pixels is not None and not isinstance(pixels, torch.Tensor):
        raise TypeError(f"{where}['pixel_values'] must be a tensor, got {type(pixels).__name__}")
    if pixels is not None and (not pixels.is_floating_point() or pixels.dim() != 3):
        raise ValueError(
            f"{where}['pixel_values'] must be a float tensor of shape (3, H, W), got {pixels.dtype} "
            f"{tuple(pixels.shape)}"
        )
    return ids, mask, labels, pixels


def collate_kosmos2_packed(
    samples: Sequence[Mapping[str, Any]],
    *,
    image_end_id: int,
    latent_query_num: int = 64,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """Concatenate Kosmos-2 samples into one packed batch, without padding.

    Each sample is a dict with ``input_ids`` (L,) ints, ``image_embeds_position_mask`` (L,) 0/1, and
    optionally ``labels`` (L,) (default ``kosmos2_labels(input_ids, image_end_id)``), ``pixel_values``
    (3, H, W) float (required exactly when the mask has slots, of which there must be 0 or
    ``latent_query_num``) and ``attention_mask`` (L,) 0/1: only the positions where it is 1 are kept, and
    they must be contiguous (left or right padding is dropped; holes are an error). The first label of every
    sample is set to ``ignore_index``, so no prediction crosses from one sample into the next.

    Returns ``input_ids`` (total,) int64, ``image_embeds_position_mask`` (total,) bool, ``labels`` (total,)
    int64, ``cu_seqlens`` (num_samples + 1,) int32, ``max_seqlen`` (int), and ``pixel_values``
    (num_images, 3, H, W), one image per sample with image slots, in sample order (the order in which
    ``image_embeds_position_mask`` consumes them), or None when no sample has one.
    """
    image_end_id = _check_int(image_end_id, "image_end_id")
    latent_query_num = _check_int(latent_query_num, "latent_query_num", minimum=1)
    ignore_index = _check_int(ignore_index, "ignore_index")
    if isinstance(samples, Mapping) or not isinstance(samples, Sequence):
        raise TypeError(f"samples must be a list of dicts, got {type(samples).__name__}")
    if not samples:
        raise ValueError("samples must not be empty")
    parts = [_sample_parts(x, s, image_end_id, latent_query_num, ignore_index) for s, x in enumerate(samples)]

    images = [(s, p[3]) for s, p in enumerate(parts) if p[3] is not None]
    pixel_values = None
    if images:
        s0, first = images[0]
        for s, img in images[1:]:
            if img.shape != first.shape or img.dtype != first.dtype:
                raise ValueError(
                    f"samples[{s}]['pixel_values'] is {img.dtype} {tuple(img.shape)}, but "
                    f"samples[{s0}]['pixel_values'] is {first.dtype} {tuple(first.shape)}; images must match"
                )
        pixel_values = torch.stack([img for _, img in images])

    seqlens = [len(p[0]) for p in parts]
    total = sum(seqlens)
    if total > _INT32_MAX:
        raise ValueError(f"the samples hold {total} tokens in all; cu_seqlens (int32) allows at most {_INT32_MAX}")
    cu_seqlens = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
    return {
        "input_ids": torch.cat([p[0] for p in parts]),
        "image_embeds_position_mask": torch.cat([p[1] for p in parts]).bool(),
        "labels": torch.cat([p[2] for p in parts]),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max(seqlens),
        "pixel_values": pixel_values,
    }


@dataclass(frozen=True)
class Kosmos2PackingCollator:
    """``collate_kosmos2_packed`` with its settings, for ``DataLoader(collate_fn=...)``: pair it with
    ``PackedBatchSampler`` as the ``batch_sampler``, so each batch is one bin.

    ``image_end_id`` is 64004 (``KOSMOS2_IMAGE_END_ID``) in the released vocabulary; pass
    ``tokenizer.convert_tokens_to_ids("</image>")`` when yours differs.
    """

    image_end_id: int
    latent_query_num: int = 64
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        _check_int(self.image_end_id, "image_end_id")
        _check_int(self.latent_query_num, "latent_query_num", minimum=1)
        _check_int(self.ignore_index, "ignore_index")

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return collate_kosmos2_packed(
            samples,
            image_end_id=self.image_end_id,
            latent_query_num=self.latent_query_num,
            ignore_index=self.ignore_index,
        )
