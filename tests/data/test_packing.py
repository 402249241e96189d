"""Sample packing: first-fit-decreasing (C++ against the reference), the packed batch sampler, Kosmos-2 labels and
the packing collator."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmcore import _extension
from mmcore.data import (
    Kosmos2PackingCollator,
    PackedBatchSampler,
    collate_kosmos2_packed,
    first_fit_decreasing,
    first_fit_decreasing_ref,
    kosmos2_labels,
)
from mmcore.ops import BackendError, available_backends

HAS_CPP = "cpp" in available_backends("first_fit_decreasing", "cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="mmcore._C not built")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "torch"]

IMAGE, IMAGE_END = 64003, 64004
LATENTS = 3  # a small latent_query_num keeps the samples short


# ------------------------------------------------------------------------------ first fit decreasing


def check_bins(bins: list[list[int]], lengths: list[int], budget: int) -> None:
    """Every index exactly once, every bin non-empty and within the budget, placed longest first."""
    seen = sorted(i for b in bins for i in b)
    assert seen == list(range(len(lengths))), "indices missing or repeated"
    for k, b in enumerate(bins):
        assert b, f"bin {k} is empty"
        assert sum(lengths[i] for i in b) <= budget, f"bin {k} holds {sum(lengths[i] for i in b)} > {budget}"
        keys = [(-lengths[i], i) for i in b]
        assert keys == sorted(keys), f"bin {k} is not in placement order: {b}"


def random_case(rng: random.Random) -> tuple[list[int], int]:
    budget = rng.choice([1, 2, 7, 64, 1000, 8192])
    n = rng.choice([0, 1, 2, 5, 50, 300])
    kind = rng.choice(["uniform", "equal", "full", "zeros", "over_half", "small"])
    if kind == "uniform":
        lengths = [rng.randint(0, budget) for _ in range(n)]
    elif kind == "equal":
        lengths = [rng.randint(0, budget)] * n
    elif kind == "full":  # some lengths equal to the budget
        lengths = [rng.choice([budget, rng.randint(0, budget)]) for _ in range(n)]
    elif kind == "zeros":
        lengths = [rng.choice([0, 0, rng.randint(0, budget)]) for _ in range(n)]
    elif kind == "over_half":  # nothing pairs up: one bin per sample, the C++ tree has to grow
        lengths = [rng.randint(budget // 2 + 1, budget) for _ in range(n)]
    else:
        lengths = [rng.randint(0, max(budget // 8, 1)) for _ in range(n)]
    return lengths, budget


def test_ffd_reference_hand_worked():
    # taken as 8 (index 5), 5 (1), 5 (3), 3 (0), 2 (2), 0 (4): ties by index, the zero into the first bin
    assert first_fit_decreasing_ref([3, 5, 2, 5, 0, 8], 8) == [[5, 4], [1, 0], [3, 2]]
    assert first_fit_decreasing_ref([2, 2, 2, 2, 2], 4) == [[0, 1], [2, 3], [4]]
    assert first_fit_decreasing_ref([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert first_fit_decreasing_ref([], 3) == []


@needs_cpp
def test_ffd_cpp_equals_reference_on_random_inputs():
    rng = random.Random(0)
    for case in range(400):
        lengths, budget = random_case(rng)
        want = first_fit_decreasing_ref(lengths, budget)
        got = first_fit_decreasing(lengths, budget, backend="cpp")
        assert got == want, f"case {case}: lengths={lengths} budget={budget}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ffd_invariants(backend):
    rng = random.Random(1)
    for _ in range(100):
        lengths, budget = random_case(rng)
        check_bins(first_fit_decreasing(lengths, budget, backend=backend), lengths, budget)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lengths, budget, bins",
    [
        ([], 5, []),
        ([0], 1, [[0]]),
        ([0, 0, 0], 3, [[0, 1, 2]]),
        ([4, 4, 4], 4, [[0], [1], [2]]),
        ([1, 4, 1, 4], 4, [[1], [3], [0, 2]]),
        ([3, 3, 3, 3], 7, [[0, 1], [2, 3]]),
    ],
    ids=["empty", "one_zero", "zeros", "all_full", "full_and_small", "equal"],
)
def test_ffd_edge_cases(backend, lengths, budget, bins):
    assert first_fit_decreasing(lengths, budget, backend=backend) == bins


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lengths",
    [[5, 3, 9], (5, 3, 9), np.array([5, 3, 9]), torch.tensor([5, 3, 9], dtype=torch.int32), torch.tensor([5, 3, 9])],
    ids=["list", "tuple", "numpy", "int32", "int64"],
)
def test_ffd_input_types(backend, lengths):
    assert first_fit_decreasing(lengths, 12, backend=backend) == [[2, 1], [0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lengths, budget, error, message",
    [
        ([1, 2], 0, ValueError, "budget must be >= 1, got 0"),
        ([1, 2], -3, ValueError, "budget must be >= 1"),
        ([1, 2], 2.5, TypeError, "budget must be an int"),
        ([1, 2], True, TypeError, "budget must be an int"),
        ([1, -2, 3], 5, ValueError, r"lengths\[1\] = -2 is negative"),
        ([1, 2, 9, 10], 8, ValueError, r"lengths\[2\] = 9 exceeds the budget 8"),
        ([[1, 2]], 8, ValueError, r"lengths must be 1-D, got shape \(1, 2\)"),
        ([1.0, 2.0], 8, TypeError, "lengths must hold integers"),
        ([True, False], 8, TypeError, "lengths must hold integers"),
        ("abc", 8, TypeError, "lengths must be a 1-D sequence of ints"),
    ],
    ids=["budget0", "budget_negative", "budget_float", "budget_bool", "negative", "over_budget", "2d", "float",
         "bool", "str"],
)  # fmt: skip
def test_ffd_errors(backend, lengths, budget, error, message):
    with pytest.raises(error, match=message):
        first_fit_decreasing(lengths, budget, backend=backend)


@needs_cpp
def test_ffd_cpp_entry_point_checks():
    """The binding checks its own input too (C++ callers get no Python wrapper)."""
    c = _extension.extension()
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 exceeds the budget 8"):
        c.first_fit_decreasing(torch.tensor([1, 9]), 8)
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1 is negative"):
        c.first_fit_decreasing(torch.tensor([-1]), 8)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        c.first_fit_decreasing(torch.tensor([1]), 0)
    with pytest.raises(TypeError, match="lengths must be int64"):
        c.first_fit_decreasing(torch.tensor([1], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        c.first_fit_decreasing(torch.ones(2, 2, dtype=torch.long), 8)
    # a non-contiguous view packs like its contiguous copy
    x = torch.tensor([5, 0, 3, 0, 9, 0])
    assert c.first_fit_decreasing(x[::2], 12) == c.first_fit_decreasing(x[::2].contiguous(), 12) == [[2, 1], [0]]


def test_ffd_without_the_extension(monkeypatch):
    """A missing mmcore._C makes the default the reference; forcing "cpp" then says why it cannot run."""
    monkeypatch.setattr(_extension, "C_ERROR", "mmcore._C could not be imported (test)")
    assert first_fit_decreasing([3, 5, 2, 5, 0, 8], 8) == [[5, 4], [1, 0], [3, 2]]
    with pytest.raises(BackendError, match=r"backend='cpp' was forced.*could not be imported \(test\)"):
        first_fit_decreasing([1], 8, backend="cpp")


@needs_cpp
def test_ffd_cpp_large_input_invariants():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 2049, (100_000,), generator=g)
    bins = first_fit_decreasing(lengths, 8192, backend="cpp")
    flat = torch.tensor([i for b in bins for i in b])
    assert torch.equal(flat.sort().values, torch.arange(len(lengths)))
    sums = torch.tensor([int(lengths[b].sum()) for b in bins])
    assert int(sums.max()) <= 8192
    # First fit leaves no two bins at most half full, so FFD is within a bin of twice the lower bound.
    assert len(bins) <= 2 * int(lengths.sum()) // 8192 + 1


# ---------------------------------------------------------------------------------------- sampler


def sampler_lengths(n=200, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 100) for _ in range(n)]


def test_sampler_covers_each_index_once_within_budget():
    lengths = sampler_lengths()
    sampler = PackedBatchSampler(lengths, 256, seed=3)
    bins = list(sampler)
    check_bins_cover(bins, lengths, 256)
    assert len(sampler) == len(bins)


def check_bins_cover(bins, lengths, budget, expected=None):
    flat = sorted(i for b in bins for i in b)
    assert flat == (sorted(expected) if expected is not None else list(range(len(lengths))))
    for b in bins:
        assert b and sum(lengths[i] for i in b) <= budget


def test_sampler_deterministic_per_seed_and_epoch():
    lengths = sampler_lengths()
    a = PackedBatchSampler(lengths, 256, seed=5, window=50)
    b = PackedBatchSampler(lengths, 256, seed=5, window=50)
    first = list(a)
    assert first == list(b) == list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    check_bins_cover(second, lengths, 256)
    b.set_epoch(1)
    assert list(b) == second
    a.set_epoch(0)
    assert list(a) == first
    assert list(PackedBatchSampler(lengths, 256, seed=6, window=50)) != first


def test_sampler_without_shuffle_is_ffd():
    lengths = sampler_lengths()
    sampler = PackedBatchSampler(lengths, 256, shuffle=False)
    assert list(sampler) == first_fit_decreasing(lengths, 256)
    sampler.set_epoch(4)
    assert list(sampler) == first_fit_decreasing(lengths, 256)


def test_sampler_windows():
    lengths = sampler_lengths(n=103)
    bins = list(PackedBatchSampler(lengths, 256, shuffle=False, window=25))
    want = []
    for start in range(0, 103, 25):
        want += [[start + i for i in b] for b in first_fit_decreasing(lengths[start : start + 25], 256)]
    assert bins == want

    shuffled = PackedBatchSampler(lengths, 256, seed=1, window=25)
    order = torch.randperm(103, generator=torch.Generator().manual_seed(1)).tolist()
    windows = [set(order[s : s + 25]) for s in range(0, 103, 25)]
    for b in shuffled:
        assert sum(set(b) <= w for w in windows) == 1, f"bin {b} mixes windows"
    check_bins_cover(list(shuffled), lengths, 256)


@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_drop_last(shuffle):
    lengths = sampler_lengths(n=103)
    sampler = PackedBatchSampler(lengths, 256, shuffle=shuffle, seed=2, window=25, drop_last=True)
    order = torch.randperm(103, generator=torch.Generator().manual_seed(2)).tolist() if shuffle else list(range(103))
    check_bins_cover(list(sampler), lengths, 256, expected=order[:100])
    assert len(sampler) == len(list(sampler))
    # windows that divide the dataset, or no window at all: nothing dropped
    for window in (None, 103):
        full = PackedBatchSampler(lengths, 256, shuffle=shuffle, window=window, drop_last=True)
        check_bins_cover(list(full), lengths, 256)


@pytest.mark.parametrize("window", [None, 1, 7, 64, 500])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_len_is_exact(window, drop_last):
    lengths = sampler_lengths(n=150)
    sampler = PackedBatchSampler(lengths, 128, seed=9, window=window, drop_last=drop_last)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert len(sampler) == len(list(sampler))


def test_sampler_edge_cases_and_errors():
    assert list(PackedBatchSampler([], 8)) == [] and len(PackedBatchSampler([], 8)) == 0
    assert list(PackedBatchSampler([8, 8], 8, shuffle=False)) == [[0], [1]]
    with pytest.raises(ValueError, match=r"lengths\[2\] = 300 exceeds the budget 256"):
        PackedBatchSampler([1, 2, 300], 256)
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        PackedBatchSampler([1], 0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        PackedBatchSampler([1], 8, window=0)
    with pytest.raises(TypeError, match="window must be an int"):
        PackedBatchSampler([1], 8, window=2.0)


# ------------------------------------------------------------------------------------------ labels


def kosmos2_ids(text: list[int], latents: int = LATENTS) -> list[int]:
    """bos, <image>, the image slots, </image>, text (the processor's layout, shared/research/kosmos2.md 1.8)."""
    return [0, IMAGE, *range(4, 4 + latents), IMAGE_END, *text]


def test_labels_from_image_end_on():
    ids = kosmos2_ids([64012, 712, 1648, 9, 2], latents=64)
    labels = kosmos2_labels(ids, IMAGE_END)
    end = ids.index(IMAGE_END)
    assert end == 66
    assert labels.dtype == torch.int64 and labels.shape == (len(ids),)
    assert labels[: end + 1].eq(-100).all()
    assert labels[end + 1 :].tolist() == ids[end + 1 :]  # the prediction at </image> is the first counted


def test_labels_edge_cases():
    assert kosmos2_labels([5, 6, 7], IMAGE_END).tolist() == [-100, 6, 7]  # no image: all but the first
    assert kosmos2_labels(torch.tensor([5, 6, 7]), IMAGE_END, ignore_index=-1).tolist() == [-1, 6, 7]
    assert kosmos2_labels([], IMAGE_END).tolist() == []
    assert kosmos2_labels([0, IMAGE_END], IMAGE_END).tolist() == [-100, -100]
    # the first </image> ends the image block
    assert kosmos2_labels([0, IMAGE_END, 8, IMAGE_END, 9], IMAGE_END).tolist() == [-100, -100, 8, IMAGE_END, 9]
    with pytest.raises(ValueError, match="input_ids must be 1-D"):
        kosmos2_labels([[1, 2]], IMAGE_END)


# ---------------------------------------------------------------------------------------- collator


def image_sample(text, seed, **extra):
    ids = kosmos2_ids(text)
    mask = [0, 0] + [1] * LATENTS + [0] * (1 + len(text))
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=ids, image_embeds_position_mask=mask, pixel_values=torch.rand(3, 8, 8, generator=g), **extra)


def text_sample(text, **extra):
    return dict(input_ids=torch.tensor([0, *text]), image_embeds_position_mask=torch.zeros(len(text) + 1), **extra)


def collate(samples, **kw):
    return collate_kosmos2_packed(samples, image_end_id=IMAGE_END, latent_query_num=LATENTS, **kw)


def test_collator_layout():
    samples = [image_sample([10, 11, 2], seed=0), text_sample([20, 21, 22, 23, 2]), image_sample([30, 2], seed=1)]
    out = collate(samples)
    lens = [len(samples[0]["input_ids"]), 6, len(samples[2]["input_ids"])]
    assert out["cu_seqlens"].dtype == torch.int32
    assert out["cu_seqlens"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert out["max_seqlen"] == max(lens) and isinstance(out["max_seqlen"], int)
    assert out["input_ids"].dtype == torch.int64 and out["labels"].dtype == torch.int64
    assert out["image_embeds_position_mask"].dtype == torch.bool
    for k in ("input_ids", "image_embeds_position_mask", "labels"):
        assert out[k].shape == (sum(lens),), k
    cu = out["cu_seqlens"].tolist()
    for s, sample in enumerate(samples):
        seg = slice(cu[s], cu[s + 1])
        ids = torch.as_tensor(sample["input_ids"])
        assert torch.equal(out["input_ids"][seg], ids)
        mask = torch.as_tensor(sample["image_embeds_position_mask"]).bool()
        assert torch.equal(out["image_embeds_position_mask"][seg], mask)
        assert torch.equal(out["labels"][seg], kosmos2_labels(ids, IMAGE_END))
        assert out["labels"][cu[s]] == -100  # nothing predicts across a sample boundary
    # one image per sample with slots, in sample order; slots = images x latent_query_num
    assert torch.equal(out["pixel_values"], torch.stack([samples[0]["pixel_values"], samples[2]["pixel_values"]]))
    assert int(out["image_embeds_position_mask"].sum()) == 2 * LATENTS


def test_collator_text_only_and_given_labels():
    out = collate([text_sample([5, 6], labels=[7, 8, 9]), text_sample([1], labels=torch.tensor([-100, 4]))])
    assert out["pixel_values"] is None
    assert out["labels"].tolist() == [-100, 8, 9, -100, 4]  # given labels kept, the first of each sample ignored
    assert out["cu_seqlens"].tolist() == [0, 3, 5] and out["max_seqlen"] == 3
    assert not out["image_embeds_position_mask"].any()


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_drops_padding_by_attention_mask(side):
    plain = image_sample([10, 11, 2], seed=0)
    n, pad = len(plain["input_ids"]), 4

    def padded(x, value):
        return [value] * pad + list(x) if side == "left" else list(x) + [value] * pad

    sample = dict(
        input_ids=padded(plain["input_ids"], 1),
        image_embeds_position_mask=padded(plain["image_embeds_position_mask"], 0),
        attention_mask=torch.tensor(padded([1] * n, 0)),
        pixel_values=plain["pixel_values"],
    )
    out, want = collate([sample, text_sample([3])]), collate([plain, text_sample([3])])
    for k in ("input_ids", "image_embeds_position_mask", "labels", "cu_seqlens", "pixel_values"):
        assert torch.equal(out[k], want[k]), k
    # given labels are trimmed the same way
    labels = padded(kosmos2_labels(plain["input_ids"], IMAGE_END).tolist(), -100)
    assert torch.equal(collate([dict(sample, labels=labels)])["labels"], want["labels"][:n])


def test_collator_empty_and_all_padding_samples():
    out = collate([text_sample([4]), dict(input_ids=[1, 1], image_embeds_position_mask=[0, 0], attention_mask=[0, 0])])
    assert out["cu_seqlens"].tolist() == [0, 2, 2] and out["input_ids"].tolist() == [0, 4]


def test_collator_class():
    samples = [image_sample([10, 2], seed=0), text_sample([5])]
    fn = Kosmos2PackingCollator(image_end_id=IMAGE_END, latent_query_num=LATENTS)
    out, want = fn(samples), collate(samples)
    assert out.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v
    with pytest.raises(ValueError, match="latent_query_num must be >= 1"):
        Kosmos2PackingCollator(image_end_id=IMAGE_END, latent_query_num=0)
    with pytest.raises(TypeError, match="image_end_id must be an int"):
        Kosmos2PackingCollator(image_end_id="</image>")


def test_sampler_and_collator_in_a_data_loader():
    rng = random.Random(0)
    dataset = [
        image_sample([rng.randint(5, 90) for _ in range(rng.randint(1, 20))], seed=i)
        if i % 3
        else text_sample([rng.randint(5, 90) for _ in range(rng.randint(1, 30))])
        for i in range(40)
    ]
    lengths = [len(x["input_ids"]) for x in dataset]
    sampler = PackedBatchSampler(lengths, 64, seed=0, window=16)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Kosmos2PackingCollator(IMAGE_END, LATENTS))
    batches = list(loader)
    assert len(batches) == len(sampler)
    assert sum(len(b["cu_seqlens"]) - 1 for b in batches) == len(dataset)
    for b in batches:
        assert len(b["input_ids"]) == int(b["cu_seqlens"][-1]) <= 64
        images = 0 if b["pixel_values"] is None else len(b["pixel_values"])
        assert int(b["image_embeds_position_mask"].sum()) == images * LATENTS


@pytest.mark.parametrize(
    "samples, error, message",
    [
        ([], ValueError, "samples must not be empty"),
        ({"input_ids": [1]}, TypeError, "samples must be a list of dicts"),
        ([[1, 2]], TypeError, r"samples\[0\] must be a dict"),
        ([{"input_ids": [1]}], ValueError, r"samples\[0\] has no 'image_embeds_position_mask'"),
        ([{"input_ids": [1, 2], "image_embeds_position_mask": [0]}], ValueError,
         r"samples\[0\]\['image_embeds_position_mask'\] has length 1, but input_ids has length 2"),
        ([{"input_ids": [1, 2], "image_embeds_position_mask": [0, 2]}], ValueError,
         r"image_embeds_position_mask'\]\[1\] = 2; expected 0 or 1"),
        ([{"input_ids": [1, 2], "image_embeds_position_mask": [0, 0], "labels": [1]}], ValueError,
         r"samples\[0\]\['labels'\] has length 1"),
        ([{"input_ids": [1.5], "image_embeds_position_mask": [0]}], TypeError, "must hold integers"),
        ([{"input_ids": [1, 2, 3], "image_embeds_position_mask": [0, 0, 0], "attention_mask": [1, 0, 1]}], ValueError,
         "must mark one contiguous run"),
        ([{"input_ids": [0, 4, 5], "image_embeds_position_mask": [0, 1, 1], "pixel_values": torch.zeros(3, 2, 2)}],
         ValueError, r"samples\[0\] has 2 image slots .* expected 0 or latent_query_num = 3"),
        ([{"input_ids": [0, 4, 5, 6], "image_embeds_position_mask": [0, 1, 1, 1]}], ValueError,
         r"samples\[0\] has 3 image slots but no pixel_values"),
        ([{"input_ids": [0, 4], "image_embeds_position_mask": [0, 0], "pixel_values": torch.zeros(3, 2, 2)}],
         ValueError, r"samples\[0\] has pixel_values but no image slots"),
        ([{"input_ids": [0, 4, 5, 6], "image_embeds_position_mask": [0, 1, 1, 1],
           "pixel_values": torch.zeros(3, 2, 2, dtype=torch.uint8)}], ValueError,
         r"pixel_values'\] must be a float tensor of shape \(3, H, W\), got torch.uint8"),
        ([{"input_ids": [0, 4, 5, 6], "image_embeds_position_mask": [0, 1, 1, 1], "pixel_values": [[[0.0]]]}],
         TypeError, r"pixel_values'\] must be a tensor"),
    ],
    ids=["empty", "dict", "not_dict", "no_mask", "mask_length", "mask_value", "labels_length", "float_ids",
         "attention_holes", "slot_count", "no_pixels", "pixels_without_slots", "pixels_uint8", "pixels_list"],
)  # fmt: skip
def test_collator_errors(samples, error, message):
    with pytest.raises(error, match=message):
        collate(samples)


def test_collator_rejects_mismatched_images():
    a, b = image_sample([1], seed=0), image_sample([2], seed=1)
    b["pixel_values"] = torch.rand(3, 4, 4)
    with pytest.raises(ValueError, match=r"samples\[1\]\['pixel_values'\] is torch.float32 \(3, 4, 4\), but"):
        collate([a, b])


# ----------------------------------------------------------------------------- against transformers


def test_packed_loss_equals_transformers_padded_loss():
    """The collator's batch through mmcore's packed forward gives the loss transformers computes on the same
    samples right-padded, with kosmos2_labels as labels (-100 on the padding)."""
    transformers = pytest.importorskip("transformers")
    from mmcore.models.kosmos2 import Kosmos2ForConditionalGeneration

    t = dict(vocab_size=140, embed_dim=32, layers=2, attention_heads=4, ffn_dim=37, max_position_embeddings=128)
    v = dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    config = transformers.Kosmos2Config(
        text_config=dict(t, dropout=0.0, attention_dropout=0.0),
        vision_config=dict(v, intermediate_size=37),
        latent_query_num=LATENTS,
    )
    torch.manual_seed(0)
    hf = transformers.Kosmos2ForConditionalGeneration(config).eval()
    mm = Kosmos2ForConditionalGeneration.from_hf(hf, num_bins=4).eval()
    image_end, image = 130, 129  # ids inside the tiny vocabulary
    rng = random.Random(0)

    def sample(with_image, n):
        text = [rng.randint(4, 100) for _ in range(n)]
        if not with_image:
            return dict(input_ids=[0, *text], image_embeds_position_mask=[0] * (n + 1))
        ids = [0, image, *range(4, 4 + LATENTS), image_end, *text]
        mask = [0, 0] + [1] * LATENTS + [0] * (n + 1)
        return dict(input_ids=ids, image_embeds_position_mask=mask, pixel_values=torch.randn(3, 16, 16))

    samples = [sample(True, 5), sample(False, 9), sample(True, 2)]
    batch = collate_kosmos2_packed(samples, image_end_id=image_end, latent_query_num=LATENTS)
    with torch.no_grad():
        packed = mm.forward_packed(**batch).loss

    width = max(len(s["input_ids"]) for s in samples)

    def pad(x, value):
        return torch.tensor(list(x) + [value] * (width - len(x)))

    ids = torch.stack([pad(s["input_ids"], 1) for s in samples])
    with torch.no_grad():
        ref = hf(
            pixel_values=torch.stack([s["pixel_values"] for s in samples if "pixel_values" in s]),
            input_ids=ids,
            attention_mask=torch.stack([pad([1] * len(s["input_ids"]), 0) for s in samples]),
            image_embeds_position_mask=torch.stack([pad(s["image_embeds_position_mask"], 0) for s in samples]),
            labels=torch.stack([pad(kosmos2_labels(s["input_ids"], image_end).tolist(), -100) for s in samples]),
        ).loss
    torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-6)
