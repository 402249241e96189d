"""Kosmos-2 grounding on the host: mmcore vs transformers.

(a) Grounded string -> clean text + entities with boxes, on 10,000 generated model outputs:
    mmcore's C++ batch parser (all threads and one thread), its single-string API and its pure-Python reference,
    each in a loop, vs transformers' ``clean_text_and_extract_entities_with_bboxes`` in a loop.
(b) The box <-> location-index codec on 100,000 boxes: mmcore's ``cpp`` and ``torch`` backends on tensors (and
    ``triton`` / ``torch`` on CUDA tensors with ``--device cuda``) vs transformers' ``coordinate_to_patch_index``
    / ``patch_index_to_coordinate`` per box in a Python loop, timed on the first 10,000 boxes.

Every implementation's output is checked equal to transformers' on every input before anything is timed.

``--device cuda`` times only the GPU rows, the codec's ``triton`` and ``torch`` backends on CUDA tensors, against the
same transformers loop on the CPU; (a) and the CPU backends are the CPU machine's run.

    python benchmarks/bench_grounding.py [--quick] [--device {cpu,cuda}] [--no-save]
"""

from __future__ import annotations

import random
import sys

import torch
from _harness import Case, Impl, parse_args, report, run_cases

NUM_BINS = 32  # Kosmos-2: a 32 x 32 grid, 1024 location tokens
SEED = 0
N_STRINGS, N_STRINGS_QUICK = 10_000, 1_000
N_BOXES, N_BOXES_QUICK = 100_000, 10_000
N_LOOP_BOXES, N_LOOP_BOXES_QUICK = 10_000, 2_000  # the per-box Python loop is timed on this prefix
# mmcore codec rows: (backend, device, threads; None: torch's setting)
CPU_RUNS = [("cpp", "cpu", None), ("cpp", "cpu", 1), ("torch", "cpu", None)]
GPU_RUNS = [("triton", "cuda", None), ("torch", "cuda", None)]

# Caption vocabulary, ASCII; one caption in ten also gets a non-ASCII word, which keeps the span arithmetic
# (code points, not bytes) honest.
_VOCAB = (
    "a an the of in on at by with and near under over behind next to two three is are there shows",
    "small large red blue green white black wooden old young",
    "man woman boy girl child dog cat horse bird car bus bicycle tree house street table chair plate cup fire",
    "snowman beach river mountain sky field park window door sign umbrella image picture photo",
    "sitting standing walking running holding wearing looking riding eating playing",
)
_WORDS = [w for line in _VOCAB for w in line.split()]
_NON_ASCII = ["café", "naïve", "Zürich", "piñata", "façade", "東京", "crème", "brûlée"]
_PUNCT = (".", ".", ".", "!", "")
DELIMITER = "</delimiter_of_multi_objects/>"


def _loc_pair(rng: random.Random) -> str:
    # A box's top-left cell is above and left of (or equal to) its bottom-right cell.
    x1, x2 = sorted((rng.randrange(NUM_BINS), rng.randrange(NUM_BINS)))
    y1, y2 = sorted((rng.randrange(NUM_BINS), rng.randrange(NUM_BINS)))
    return f"<patch_index_{y1 * NUM_BINS + x1:04d}><patch_index_{y2 * NUM_BINS + x2:04d}>"


def _object(rng: random.Random) -> str:
    n_boxes = 1 if rng.random() < 0.75 else rng.randint(2, 4)
    return "<object>" + DELIMITER.join(_loc_pair(rng) for _ in range(n_boxes)) + "</object>"


def grounded_strings(n: int, seed: int = SEED) -> list[str]:
    """``n`` Kosmos-2-style grounded outputs: ``<grounding>``, a caption of 10-40 words, 1-4 entities written
    as ``of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>`` (a quarter with
    several boxes joined by the multi-object delimiter; one in six a phrase-less ``<object>`` after a word); one
    caption in ten has a non-ASCII word."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(10, 40))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.1:
            words[rng.randrange(len(words))] = rng.choice(_NON_ASCII)
        starts = sorted(rng.sample(range(len(words)), rng.randint(1, 4)))
        bounds = dict(zip(starts, [*starts[1:], len(words)], strict=True))
        parts, i = ["<grounding>"], 0
        while i < len(words):
            if i not in bounds:
                parts.append(" " + words[i] + ("," if rng.random() < 0.03 else ""))
                i += 1
            elif rng.random() < 1 / 6:
                parts.append(" " + words[i] + _object(rng))
                i += 1
            else:
                span = rng.randint(1, min(3, bounds[i] - i))
                parts.append("<phrase> " + " ".join(words[i : i + span]) + "</phrase>" + _object(rng))
                i += span
        parts.append(rng.choice(_PUNCT))
        out.append("".join(parts))
    return out


def random_boxes(n: int, seed: int = SEED) -> torch.Tensor:
    """(n, 4) float64 valid boxes (x1 < x2, y1 < y2 in [0, 1]); one in ten snapped to cell edges, where the
    ceil(x2 * P - 1) rounding is exact."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, 2, generator=g, dtype=torch.float64), torch.rand(n, 2, generator=g, dtype=torch.float64)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    snap = torch.rand(n, 1, generator=g) < 0.1
    lo = torch.where(snap, torch.floor(lo * NUM_BINS) / NUM_BINS, lo)
    hi = torch.where(snap, torch.ceil(hi * NUM_BINS) / NUM_BINS, hi)
    hi = torch.where(hi > lo, hi, torch.clamp(lo + 1 / NUM_BINS, max=1.0))
    boxes = torch.cat([lo, hi], dim=1)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    assert bool(ok.all()), "random_boxes made an invalid box"
    return boxes


def random_indices(n: int, seed: int = SEED) -> torch.Tensor:
    """(n, 2) int64 (top-left, bottom-right) cell pairs with top-left above and left of bottom-right."""
    g = torch.Generator().manual_seed(seed + 1)
    xy = torch.randint(0, NUM_BINS, (n, 2, 2), generator=g)  # (box, x/y, two draws)
    lo, hi = xy.min(-1).values, xy.max(-1).values
    return torch.stack([lo[:, 1] * NUM_BINS + lo[:, 0], hi[:, 1] * NUM_BINS + hi[:, 0]], dim=1)


# ------------------------------------------------------------------------------------------ correctness


def assert_same(what: str, got: list, want: list, inputs: list) -> None:
    """Raise AssertionError naming the first input where ``got`` differs from transformers' ``want``."""
    if len(got) != len(want):
        raise AssertionError(f"{what} returned {len(got)} results for {len(want)} inputs")
    bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    if bad:
        i = bad[0]
        raise AssertionError(
            f"{what} differs from transformers on {len(bad)} of {len(want)} inputs; first at [{i}]:\n"
            f"  input       : {inputs[i]!r}\n  mmcore      : {got[i]!r}\n  transformers: {want[i]!r}"
        )


def _hf():
    from transformers.models.kosmos2 import processing_kosmos2 as hf

    return hf


def extraction_case(texts: list[str]) -> Case:
    import mmcore.grounding as g

    hf = _hf()
    want = [hf.clean_text_and_extract_entities_with_bboxes(t, NUM_BINS) for t in texts]
    assert_same("extract_entities_batch (cpp)", g.extract_entities_batch(texts, NUM_BINS, backend="cpp"), want, texts)
    assert_same("extract_entities", [g.extract_entities(t, NUM_BINS) for t in texts], want, texts)
    assert_same("extract_entities_ref", [g.extract_entities_ref(t, NUM_BINS) for t in texts], want, texts)

    n = len(texts)
    return Case(
        name=f"extract {n} strings",
        unit="strings",
        formula=f"{n} strings",
        impls=[
            Impl(
                "mmcore extract_entities_batch (C++)",
                lambda: g.extract_entities_batch(texts, NUM_BINS, backend="cpp"),
                n,
            ),
            Impl(
                "mmcore extract_entities_batch (C++, 1 thread)",
                lambda: g.extract_entities_batch(texts, NUM_BINS, backend="cpp"),
                n,
                threads=1,
            ),
            Impl(
                "mmcore extract_entities loop",
                lambda: [g.extract_entities(t, NUM_BINS) for t in texts],
                n,
                note="single-string API, one call per string",
            ),
            Impl(
                "mmcore extract_entities_ref loop",
                lambda: [g.extract_entities_ref(t, NUM_BINS) for t in texts],
                n,
                note="pure-Python reference",
            ),
            Impl(
                "transformers",
                lambda: [hf.clean_text_and_extract_entities_with_bboxes(t, NUM_BINS) for t in texts],
                n,
                peer=True,
                note="clean_text_and_extract_entities_with_bboxes, Python loop",
            ),
        ],
    )


def codec_cases(
    boxes: torch.Tensor, indices: torch.Tensor, n_loop: int, runs: list[tuple[str, str, int | None]]
) -> list[Case]:
    """The encoder and decoder cases: the mmcore ``runs`` and transformers' per-box loop (on the CPU)."""
    import mmcore.grounding as g

    hf = _hf()
    box_list = [tuple(b) for b in boxes.tolist()]
    pair_list = [tuple(p) for p in indices.tolist()]
    want_enc = [hf.coordinate_to_patch_index(b, NUM_BINS) for b in box_list]
    want_dec = [hf.patch_index_to_coordinate(ul, lr, NUM_BINS) for ul, lr in pair_list]

    enc_impls, dec_impls = [], []
    for backend, dev, threads in runs:
        b, ix = boxes.to(dev), indices.to(dev)
        label = f"mmcore {backend} ({dev}{', 1 thread' if threads == 1 else ''})"
        got_enc = g.boxes_to_loc_indices(b, NUM_BINS, backend=backend)
        got_dec = g.loc_indices_to_boxes(ix, NUM_BINS, backend=backend)
        assert_same(f"boxes_to_loc_indices({label})", [tuple(p) for p in got_enc.tolist()], want_enc, box_list)
        assert_same(f"loc_indices_to_boxes({label})", [tuple(q) for q in got_dec.tolist()], want_dec, pair_list)
        enc_impls.append(
            Impl(
                label,
                lambda b=b, backend=backend: g.boxes_to_loc_indices(b, NUM_BINS, backend=backend),
                len(b),
                device=dev,
                threads=threads,
            )
        )
        dec_impls.append(
            Impl(
                label,
                lambda ix=ix, backend=backend: g.loc_indices_to_boxes(ix, NUM_BINS, backend=backend),
                len(ix),
                device=dev,
                threads=threads,
            )
        )

    loop_boxes, loop_pairs = box_list[:n_loop], pair_list[:n_loop]
    note = f"Python loop, one call per box, timed on the first {n_loop}"
    enc_impls.append(
        Impl(
            "transformers",
            lambda: [hf.coordinate_to_patch_index(b, NUM_BINS) for b in loop_boxes],
            n_loop,
            peer=True,
            note=note,
        )
    )
    dec_impls.append(
        Impl(
            "transformers",
            lambda: [hf.patch_index_to_coordinate(ul, lr, NUM_BINS) for ul, lr in loop_pairs],
            n_loop,
            peer=True,
            note=note,
        )
    )
    n = len(boxes)
    per_box = (
        f"boxes per call (mmcore: {n} tensor rows in one call; transformers: {n_loop} tuples, one call each, "
        "tuple conversion not timed)"
    )
    return [
        Case(f"boxes_to_loc_indices {n} boxes", "boxes", per_box, enc_impls),
        Case(f"loc_indices_to_boxes {n} boxes", "boxes", per_box, dec_impls),
    ]


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    n_strings = N_STRINGS_QUICK if args.quick else N_STRINGS
    n_boxes = N_BOXES_QUICK if args.quick else N_BOXES
    n_loop = N_LOOP_BOXES_QUICK if args.quick else N_LOOP_BOXES
    if args.device == "cuda":
        print("grounded-string extraction is CPU-only (it returns Python objects): the CPU machine's run times it")
        n_strings, cases, runs = 0, [], GPU_RUNS
    else:
        cases, runs = [extraction_case(grounded_strings(n_strings))], CPU_RUNS
    cases += codec_cases(random_boxes(n_boxes), random_indices(n_boxes), n_loop, runs)
    print(f"outputs equal to transformers on all {n_strings} strings and {n_boxes} boxes / index pairs; timing")
    results = run_cases(cases, quick=args.quick)
    report(
        "grounding",
        cases,
        results,
        device=args.device,
        quick=args.quick,
        save=not args.no_save,
        extra={"seed": SEED, "num_bins": NUM_BINS, "n_strings": n_strings, "n_boxes": n_boxes, "n_loop_boxes": n_loop},
    )

    if args.device == "cuda":
        return 0
    batch = next(r for r in results if r.impl == "mmcore extract_entities_batch (C++)")
    ratio = batch.speedup["transformers"]
    print(
        f"\nC++ batch extraction vs transformers on {n_strings} strings: {ratio:.1f}x "
        f"(target >= 10x: {'met' if ratio >= 10 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
