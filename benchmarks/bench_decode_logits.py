"""Decoding-step logits benchmark: mmcore.ops.decode_logits (C++ kernel) against F.linear on the CPU.

One generation step's output head: hidden (B, D) @ weight (V, D).T with Kosmos-2's vocabulary V = 65,037, at
D = 512 (the ~50M test configuration) and D = 2048 (the released model), batch 1 and 8, on 1 and 2 threads; and the
location-token range only (1,024 rows, what the box grammar allows after ``<object>``), against F.linear on that
slice of the weight. In a real step those rows come from memory (the decoder's weights pass through the cache
between steps), so the range case moves a 1,024-row range over 32 places spread across the vocabulary, one per
call, rather than re-reading one 2-8 MB slice from the L3 cache.

At these batches the product is bound by reading the weight, so the work is counted in float32 weight bytes,
``R * D * 4`` (R = rows computed), and throughput is in bytes/s. For the whole vocabulary a further row times the
bfloat16 form (hidden states and weights in bfloat16, float32 sums: AVX512-BF16 dot products where the CPU has them),
what greedy generation's screened head (``ops.ScreenedHead``) reads each step on CPUs without AVX512-VNNI, and a
row for the int8 screen's whole pass (``ScreenedHead(weight, "int8").bounds``: quantising the hidden states, the
8-bit product, both bounds), what it reads where the CPU has VNNI; they stand in for the same float32 bytes, so
their bytes/s are the float32 product's equivalent. A third row, ``weight.sum()`` over the same rows,
is the machine's read bandwidth for reference: ``x vs weight.sum`` near 1 means the kernel streams the weight as
fast as a plain reduction does.

Before timing, every case's C++ result is compared with the float64 reference (max error relative to the largest
|logit| below 1e-5).

With ``--device cuda`` only GPU cases run (the CPU ones are the CPU machine's run). The kernels are C++, CPU-only, so on
CUDA tensors ``decode_logits`` is its ``torch`` backend (``F.linear`` in float32; a bfloat16 weight is upcast, a copy of
the rows per call); it is timed against ``F.linear`` in the weight's dtype and ``weight.sum`` at D = 2048, batch 1 and
8, in float32 and bfloat16, the work counted in the weight's own bytes.

    python benchmarks/bench_decode_logits.py [--quick] [--device {cpu,cuda}] [--no-save]
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from _harness import Case, Impl, parse_args, report, run_cases

from mmcore.ops import GroundingTokens, ScreenedHead, available_backends, decode_logits, decode_logits_ref

VOCAB, VOCAB_QUICK = 65037, 8192
WIDTHS = (512, 2048)
BATCHES = (1, 8)
THREADS = (1, 2)
TOKENS = GroundingTokens.kosmos2()
LOC_ROWS = TOKENS.loc_end - TOKENS.first_loc  # 1,024 location tokens
RANGE_PLACES = 32
GPU_WIDTH = 2048  # the released model's head: the GPU cases' only width
SEED = 0


def problem(batch: int, width: int, vocab: int, seed: int = SEED, device: str = "cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(batch, width, generator=g, device=device)
    weight = torch.randn(vocab, width, generator=g, device=device).div_(width**0.5)
    return hidden, weight


def check(hidden, weight, rows, backend="cpp"):
    out = decode_logits(hidden, weight, rows=rows, backend=backend)
    ref = decode_logits_ref(hidden, weight, rows=rows)
    err = float((out.double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, f"decode_logits ({backend or 'dispatched'}) differs from the float64 reference by {err:.2e}"


def cycling(fn, arg_sets):
    """A call of ``fn(*args)`` for the next of ``arg_sets`` each time."""
    it = itertools.cycle(arg_sets)
    return lambda: fn(*next(it))


def peers(hidden, slices, work, **where) -> list[Impl]:
    """The peers of every case: ``F.linear`` on each weight slice in turn, and ``weight.sum`` over it (the read
    bandwidth); ``where``: Impl's ``threads`` or ``device``."""
    return [
        Impl("F.linear", cycling(F.linear, [(hidden, w) for w in slices]), work, peer=True, **where),
        Impl("weight.sum", cycling(torch.sum, [(w,) for w in slices]), work, peer=True,
             note="read-bandwidth reference, not the op", **where),
    ]  # fmt: skip


def loc_places(vocab: int) -> list[int]:
    # (clamped so that the last ranges fit the --quick vocabulary; the full one never needs it)
    return [min(i * (vocab // RANGE_PLACES), vocab - LOC_ROWS) for i in range(RANGE_PLACES)]


def cpu_cases(vocab: int) -> list[Case]:
    if "cpp" not in available_backends("decode_logits", "cpu"):
        raise SystemExit("mmcore._C has no decode_logits kernel: pip install --no-build-isolation -e .")
    places = loc_places(vocab)
    cases = []
    for width in WIDTHS:
        _, weight = problem(1, width, vocab)
        for batch in BATCHES:
            hidden, _ = problem(batch, width, 1)
            for rows_name in ("all", "loc"):
                if rows_name == "loc" and batch != 1 and width != 2048:
                    continue  # the location range is timed at batch 1 for both widths, and at batch 8 for D = 2048
                ranges = [(0, vocab)] if rows_name == "all" else [(p, p + LOC_ROWS) for p in places]
                for rows in ranges:
                    check(hidden, weight, rows)
                slices = [weight[start:end] for start, end in ranges]
                work = (ranges[0][1] - ranges[0][0]) * width * 4
                for threads in THREADS:
                    impls = [
                        Impl(
                            "decode_logits cpp",
                            cycling(
                                lambda h, w, r: decode_logits(h, w, rows=r, backend="cpp"),
                                [(hidden, weight, r) for r in ranges],
                            ),
                            work,
                            threads=threads,
                        ),
                    ]
                    if rows_name == "all":
                        low_hidden, low_weight = hidden.bfloat16(), weight.bfloat16()
                        check(low_hidden, low_weight, None)
                        impls.append(
                            Impl(
                                "decode_logits cpp bfloat16",
                                lambda h=low_hidden, w=low_weight: decode_logits(h, w, backend="cpp"),
                                work,
                                threads=threads,
                                note="bfloat16 copies (the screened head's read); work: the float32 bytes",
                            )
                        )
                        screen = ScreenedHead(weight, "int8")
                        impls.append(
                            Impl(
                                "ScreenedHead int8 bounds",
                                lambda h=hidden, s=screen: s.bounds(h),
                                work,
                                threads=threads,
                                note="8-bit copies, lower and upper bounds of every logit (the screened head's "
                                "pass on AVX512-VNNI CPUs); work: the float32 bytes",
                            )
                        )
                    impls += peers(hidden, slices, work, threads=threads)
                    label = f"V={vocab} rows={rows_name}({work // (width * 4)}) D={width} B={batch} threads={threads}"
                    cases.append(Case(label, "B", "R * D * 4 weight bytes", impls))
    return cases


def gpu_cases(vocab: int, device: str = "cuda") -> list[Case]:
    """The GPU cases (module docstring). ``device`` is an argument so that this path can be tried on the CPU."""
    cases = []
    _, weight32 = problem(1, GPU_WIDTH, vocab, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        weight = weight32.to(dtype)
        for batch in BATCHES:
            hidden = problem(batch, GPU_WIDTH, 1, device=device)[0].to(dtype)
            for rows_name in ("all", "loc"):
                ranges = [(0, vocab)] if rows_name == "all" else [(p, p + LOC_ROWS) for p in loc_places(vocab)]
                for rows in ranges:
                    check(hidden, weight, rows, backend=None)
                slices = [weight[start:end] for start, end in ranges]
                n_rows = ranges[0][1] - ranges[0][0]
                work = n_rows * GPU_WIDTH * weight.element_size()
                impls = [
                    Impl(
                        "decode_logits",
                        cycling(lambda h, w, r: decode_logits(h, w, rows=r), [(hidden, weight, r) for r in ranges]),
                        work,
                        device=device,
                        note="dispatched: on CUDA the torch backend (float32 product)",
                    ),
                    *peers(hidden, slices, work, device=device),
                ]
                dtype_name = str(dtype).replace("torch.", "")
                label = f"{device} V={vocab} rows={rows_name}({n_rows}) D={GPU_WIDTH} B={batch} {dtype_name}"
                cases.append(Case(label, "B", f"R * D * {weight.element_size()} weight bytes", impls))
    return cases


def main(argv=None):
    args = parse_args(__doc__.split("\n")[0], argv)
    vocab = VOCAB_QUICK if args.quick else VOCAB
    torch.set_grad_enabled(False)
    cases = gpu_cases(vocab) if args.device == "cuda" else cpu_cases(vocab)
    results = run_cases(cases, quick=args.quick)
    widths = [GPU_WIDTH] if args.device == "cuda" else list(WIDTHS)
    report(
        "decode_logits",
        cases,
        results,
        device=args.device,
        quick=args.quick,
        save=not args.no_save,
        extra={"vocab": vocab, "widths": widths, "batches": list(BATCHES), "seed": SEED},
    )


if __name__ == "__main__":
    main()
