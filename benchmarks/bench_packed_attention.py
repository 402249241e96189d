"""Packed attention vs the peers: PyTorch SDPA per segment and with a materialised block-diagonal mask on the
CPU; on a GPU also SDPA's flash / efficient / cuDNN / math backends, FlexAttention (compiled, document mask,
or_masks for prefix) and, where xformers can run, its memory-efficient attention with block-diagonal biases (full
and causal; it has no prefix mask) next to mmcore's "xformers" backend.

FLOP are counted per segment from the visible (query, key) pairs: forward 4 * D * H * pairs (Q K^T and P V),
backward 2.5x the forward (FlashAttention's convention), so masked work is never counted.
"""

from __future__ import annotations

import importlib.util
import random

import torch
import torch.nn.functional as F
from _harness import Case, Impl, parse_args, peak_rss_growth, report, run_cases

from mmcore.ops import attention, available_backends, packed_attention, packed_attention_ref
from mmcore.ops.attention import _xformers_bias, visible_mask


def cu_of(lens, device):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def visible_pairs(lens_q, lens_k, mode, prefix):
    return sum(int(visible_mask(lq, lk, mode, p).sum()) for lq, lk, p in zip(lens_q, lens_k, prefix, strict=True))


def layout(lens_q, lens_k, heads, heads_kv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads, d, generator=g).to(dtype=dtype, device=device).requires_grad_()
    k = torch.randn(sum(lens_k), heads_kv, d, generator=g).to(dtype=dtype, device=device).requires_grad_()
    v = torch.randn(sum(lens_k), heads_kv, d, generator=g).to(dtype=dtype, device=device).requires_grad_()
    return q, k, v, cu_of(lens_q, device), cu_of(lens_k, device)


def sdpa_mask(lq, lk, mode, prefix, device):
    return visible_mask(lq, lk, mode, prefix, device=device)


# ---------------------------------------------------------------------------------------- implementations


def mmcore_packed(q, k, v, cq, ck, lens_q, lens_k, mode, prefix, backend=None):
    pl = torch.tensor(prefix, dtype=torch.int32, device=q.device) if mode == "prefix" else None
    return packed_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), mode=mode, prefix_lens=pl, backend=backend)


def sdpa_per_segment(q, k, v, cq, ck, lens_q, lens_k, mode, prefix, sdpa_backend=None):
    """One SDPA call per segment, (1, H, L, D): PyTorch's own fused paths, no padding."""
    outs = []
    cq_l, ck_l = cq.tolist(), ck.tolist()
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        qs = q[cq_l[s] : cq_l[s] + lq].transpose(0, 1)[None]
        ks = k[ck_l[s] : ck_l[s] + lk].transpose(0, 1)[None]
        vs = v[ck_l[s] : ck_l[s] + lk].transpose(0, 1)[None]
        if mode == "full" or (mode == "causal" and lq == lk):
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=mode == "causal", enable_gqa=True)
        else:
            mask = sdpa_mask(lq, lk, mode, prefix[s], q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def sdpa_materialised(q, k, v, cq, ck, lens_q, lens_k, mode, prefix):
    """One SDPA call over all tokens with a (total_q, total_k) block-diagonal boolean mask."""
    mask = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
    cq_l, ck_l = cq.tolist(), ck.tolist()
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        mask[cq_l[s] : cq_l[s] + lq, ck_l[s] : ck_l[s] + lk] = sdpa_mask(lq, lk, mode, prefix[s], q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True
    )
    return o[0].transpose(0, 1)


def flex_packed(q, k, v, cq, ck, lens_q, lens_k, mode, prefix):  # pragma: no cover - GPU only
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention, or_masks

    doc = torch.repeat_interleave(torch.arange(len(lens_q), device=q.device), torch.tensor(lens_q, device=q.device))
    start = cq[:-1].long()[doc]
    plen = torch.tensor(prefix, device=q.device)[doc]

    def same_doc(b, h, i, j):
        return doc[i] == doc[j]

    def causal(b, h, i, j):
        return (doc[i] == doc[j]) & (j <= i)

    def in_prefix(b, h, i, j):
        return (doc[i] == doc[j]) & (j - start[j] < plen[j])

    mask_mod = {"full": same_doc, "causal": causal, "prefix": or_masks(causal, in_prefix)}[mode]
    n = q.shape[0]
    block = create_block_mask(mask_mod, None, None, n, n, device=q.device)
    fn = torch.compile(flex_attention)
    o = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block, enable_gqa=True)
    return o[0].transpose(0, 1)


def xformers_packed(q, k, v, cq, ck, lens_q, lens_k, mode, prefix):  # pragma: no cover - GPU only
    """xformers' memory_efficient_attention over the packed tokens as one batch-1 row, with the block-diagonal bias
    (bottom-right causal for causal) built from the lengths on every call, as a caller with changing batches does."""
    from xformers.ops import fmha

    bias = _xformers_bias(list(lens_q), list(lens_k), mode == "causal", q.device)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


# ------------------------------------------------------------------------------------------------ cases


def packed_case(name, lens, heads, d, dtype, device, mode, with_backward, impls_spec, prefix=None):
    prefix = prefix or [n // 4 for n in lens]
    pairs = visible_pairs(lens, lens, mode, prefix)
    flop = 4 * d * heads * pairs * (3.5 if with_backward else 1.0)
    inputs = layout(lens, lens, heads, heads, d, dtype, device)
    q, k, v, cq, ck = inputs
    ref = packed_attention_ref(
        q, k, v, cq, ck, mode=mode, prefix_lens=torch.tensor(prefix) if mode == "prefix" else None
    ).detach()
    impls = []
    for label, fn, peer in impls_spec:
        out = fn(q, k, v, cq, ck, lens, lens, mode, prefix)
        err = (out.detach().double() - ref.double()).abs().max().item()
        assert err < (5e-2 if dtype != torch.float32 else 1e-4), f"{name} / {label}: max error {err:.2e}"

        def run(fn=fn):
            out = fn(q, k, v, cq, ck, lens, lens, mode, prefix)
            if with_backward:
                q.grad = k.grad = v.grad = None
                out.backward(grad)
            return out

        impls.append(Impl(label, run, flop, peer=peer, device=device))
    grad = torch.randn_like(q)
    return Case(name, "FLOP", "4 * D * H * visible pairs" + (" * 3.5 (fwd + 2.5x bwd)" if with_backward else ""), impls)


def cpu_cases(quick):
    seg = 512 if not quick else 128
    lens = [seg] * 8
    spec = [
        ("mmcore (cpp)", lambda *a: mmcore_packed(*a, backend="cpp"), False),
        ("SDPA per segment", sdpa_per_segment, True),
        ("SDPA materialised mask", sdpa_materialised, True),
    ]
    cases = []
    for mode in ("causal", "full", "prefix"):  # the target holds for every mode, forward and forward + backward
        for bwd in (False, True):
            name = f"cpu {len(lens)}x{seg} {mode} 8x64 fp32 {'fwd+bwd' if bwd else 'fwd'}"
            cases.append(packed_case(name, lens, 8, 64, torch.float32, "cpu", mode, bwd, spec))
    rng = random.Random(0)
    mixed = [rng.randint(16, seg) for _ in range(12)]
    cases.append(
        packed_case(
            f"cpu mixed {len(mixed)} segs ({sum(mixed)} tok) causal 8x64 fp32 fwd",
            mixed,
            8,
            64,
            torch.float32,
            "cpu",
            "causal",
            False,
            spec,
        )
    )
    return cases


def gpu_cases(quick):  # pragma: no cover - GPU only
    dt = torch.bfloat16
    rng = random.Random(0)
    lens = []
    while sum(lens) < (16384 if not quick else 2048):
        lens.append(rng.randint(64, 2048))
    cases = []
    spec = [
        ("mmcore (triton)", lambda *a: mmcore_packed(*a, backend="triton"), False),
        ("SDPA per segment", sdpa_per_segment, True),
        ("FlexAttention", flex_packed, True),
    ]
    with_xformers = [
        ("mmcore (xformers)", lambda *a: mmcore_packed(*a, backend="xformers"), False),
        ("xformers", xformers_packed, True),
    ]
    xformers_runs = "xformers" in available_backends("packed_attention", "cuda")
    for d in (64, 128):
        for mode in ("causal", "prefix"):
            for bwd in (False, True):
                name = (
                    f"cuda packed {len(lens)} segs ({sum(lens)} tok) {mode} H{2048 // d}xD{d} bf16 "
                    f"{'fwd+bwd' if bwd else 'fwd'}"
                )
                impls = spec + with_xformers if xformers_runs and mode != "prefix" else spec
                cases.append(packed_case(name, lens, 2048 // d, d, dt, "cuda", mode, bwd, impls))
    return cases


def dense_cases(device, quick):
    """ViT-L/14 image-patch attention (257 tokens x 16 heads x 64) and the Kosmos-2 resampler (64 latent queries
    over 257 + 64 keys x 32 heads x 64), batched, through mmcore.ops.attention vs batched SDPA."""
    images = (256 if device == "cuda" else 8) if not quick else 2
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    cases = []
    for label, lq, lk, heads in (("ViT-L/14 patch attention", 257, 257, 16), ("Kosmos-2 resampler", 64, 321, 32)):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(images, lq, heads, 64, generator=g).to(dt).to(device)
        k = torch.randn(images, lk, heads, 64, generator=g).to(dt).to(device)
        v = torch.randn(images, lk, heads, 64, generator=g).to(dt).to(device)
        flop = 4 * 64 * heads * lq * lk * images
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        out = attention(q, k, v)
        assert (out.float() - ref.float()).abs().max() < (5e-2 if dt != torch.float32 else 1e-4)
        impls = [
            Impl("mmcore attention", lambda q=q, k=k, v=v: attention(q, k, v), flop, device=device),
            Impl(
                "SDPA (default)",
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                ),
                flop,
                peer=True,
                device=device,
            ),
        ]
        if device == "cuda":  # pragma: no cover - GPU only
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):

                def fn(q=q, k=k, v=v, b=b):
                    with sdpa_kernel(b):
                        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

                try:
                    fn()
                except RuntimeError:
                    continue
                impls.append(Impl(f"SDPA {b.name.lower()}", fn, flop, peer=True, device=device))
        cases.append(
            Case(f"{device} {label} {images} images {str(dt)[6:]} fwd", "FLOP", "4 * D * H * Lq * Lk * images", impls)
        )
    return cases


def memory_rows(quick):
    """CPU peak memory of the causal forward + backward on 8 segments x 2048 (16k tokens): mmcore vs SDPA per
    segment vs materialised mask (fresh processes). Larger than the timed layout on purpose: a process's
    resident-set high-water mark after importing torch hides footprints of a few tens of MiB."""
    seg = 2048 if not quick else 128
    setup = (
        f"lens = [{seg}] * 8\nq, k, v, cq, ck = layout(lens, lens, 8, 8, 64, torch.float32, 'cpu')\n"
        "g = torch.randn_like(q)\npre = [0] * 8"
    )
    rows = {}
    for label, call in (
        ("mmcore (cpp)", "mmcore_packed(q, k, v, cq, ck, lens, lens, 'causal', pre, backend='cpp')"),
        ("SDPA per segment", "sdpa_per_segment(q, k, v, cq, ck, lens, lens, 'causal', pre)"),
        ("SDPA materialised mask", "sdpa_materialised(q, k, v, cq, ck, lens, lens, 'causal', pre)"),
    ):
        rows[label] = peak_rss_growth("bench_packed_attention", setup, f"{call}.backward(g)")
    return rows


def main(argv=None):
    args = parse_args(__doc__.split("\n")[0], argv)
    # --device cuda times the GPU cases only: the CPU cases and memory rows are this machine's (a run on the CPU
    # machine), and on the GPU machine they would spend its short, shared time budget (gpu_check.sh)
    if args.device == "cuda":  # pragma: no cover - GPU only
        cases = gpu_cases(args.quick) + dense_cases("cuda", args.quick)
    else:
        cases = cpu_cases(args.quick) + dense_cases("cpu", args.quick)
    results = run_cases(cases, quick=args.quick)
    extra = {}
    if args.device == "cpu":
        memory = memory_rows(args.quick)
        print("\nCPU extra peak memory, causal fwd+bwd, 8 segments x 2048, 8 heads x 64 (fresh process each):")
        for label, b in memory.items():
            print(f"  {label}: {b / 2**20:.0f} MiB")
        extra["cpu_peak_memory_bytes"] = memory
    if args.device == "cuda" and importlib.util.find_spec("triton"):  # pragma: no cover - GPU only
        from mmcore.kernels.packed_attention import tile_counts

        rng = random.Random(0)
        lens = [rng.randint(64, 2048) for _ in range(12)]
        extra["tiles"] = {
            mode: tile_counts(cu_of(lens, "cuda"), cu_of(lens, "cuda"), mode=mode) for mode in ("causal",)
        }
        print("tiles visited vs minimum:", extra["tiles"])
    report("packed_attention", cases, results, device=args.device, quick=args.quick, save=not args.no_save, extra=extra)


if __name__ == "__main__":
    main()
