"""Packed attention vs the peers: PyTorch SDPA per segment and with a materialised block-diagonal mask on the
CPU; on a GPU also SDPA's flash / efficient / cuDNN / math backends, FlexAttention (compiled, document mask,
or_masks for prefix) and, where xformers can run, its memory-efficient attention with block-diagonal biases (full
and causal; it has no prefix mask) next to mmcore's "xformers" backend.

FLOP are counted per segment from the visible (query, key) pairs: forward 4 * D * H * pairs (Q K^T and P V),
backward 2.5x the forward (FlashAttention's convention), so masked work is never counted.
"""

from __future__ import annotations

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
    """One SDPA call per segment, (1, H, L, D): PyTorch's own fused paths, no padding. ``sdpa_backend``: a
    ``torch.nn.attention.SDPBackend`` to force (default: SDPA's own choice)."""
    if sdpa_backend is not None:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_backend):
            return sdpa_per_segment(q, k, v, cq, ck, lens_q, lens_k, mode, prefix)
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


def sdpa_padded(q, k, v, cq, ck, lens_q, lens_k, mode, prefix):
    """SDPA over the segments right-padded into one (segments, H, max L, D) batch, padding and unpadding included
    (differentiable): causal self-attention by ``is_causal`` (padding keys come after every real query's keys),
    other layouts with a boolean (segments, 1, max Lq, max Lk) mask; padding query rows see key 0 (no NaN)."""
    dev, b, lq_max, lk_max = q.device, len(lens_q), max(lens_q), max(lens_k)
    pos_q = torch.cat([torch.arange(n, device=dev) + s * lq_max for s, n in enumerate(lens_q)])
    pos_k = torch.cat([torch.arange(n, device=dev) + s * lk_max for s, n in enumerate(lens_k)])

    def pad(x, pos, width):
        out = x.new_zeros(b * width, *x.shape[1:]).index_copy(0, pos, x)
        return out.view(b, width, *x.shape[1:]).transpose(1, 2)

    qp, kp, vp = pad(q, pos_q, lq_max), pad(k, pos_k, lk_max), pad(v, pos_k, lk_max)
    if mode == "causal" and list(lens_q) == list(lens_k):
        o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
    else:
        mask = torch.zeros(b, 1, lq_max, lk_max, dtype=torch.bool, device=dev)
        mask[:, :, :, 0] = True
        for s, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
            mask[s, 0, :lq, :lk] = sdpa_mask(lq, lk, mode, prefix[s], dev)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2).reshape(b * lq_max, *o.shape[1:2], o.shape[-1]).index_select(0, pos_q)


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


_FLEX = None


def flex_attention_compiled():  # pragma: no cover - GPU only
    """torch.compile(flex_attention), made once, with room for the recompilations of every case's shapes and
    mask (dynamo falls back to the unfused eager path, which materialises the scores, past its recompile limit)."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        _FLEX = torch.compile(flex_attention)
    return _FLEX


def flex_block_mask(cq, lens_q, mode, prefix, device):  # pragma: no cover - GPU only
    """FlexAttention's block mask of the packed layout as one sequence: document mask, causal within a segment,
    and for prefix mode or_masks(causal, the segment's first prefix keys)."""
    from torch.nn.attention.flex_attention import create_block_mask, or_masks

    doc = torch.repeat_interleave(torch.arange(len(lens_q), device=device), torch.tensor(lens_q, device=device))
    start = cq[:-1].long()[doc]
    plen = torch.tensor(prefix, device=device)[doc]

    def same_doc(b, h, i, j):
        return doc[i] == doc[j]

    def causal(b, h, i, j):
        return (doc[i] == doc[j]) & (j <= i)

    def in_prefix(b, h, i, j):
        return (doc[i] == doc[j]) & (j - start[j] < plen[j])

    mask_mod = {"full": same_doc, "causal": causal, "prefix": or_masks(causal, in_prefix)}[mode]
    n = int(sum(lens_q))
    return create_block_mask(mask_mod, None, None, n, n, device=device)


def flex_packed_fn(cq, lens_q, mode, prefix, device):  # pragma: no cover - GPU only
    """A FlexAttention implementation with its block mask built once, here (as a trainer that reuses a packing
    would; building it takes longer than the attention itself), so only the compiled kernel is timed."""
    block = flex_block_mask(cq, lens_q, mode, prefix, device)
    flex = flex_attention_compiled()

    def flex_packed(q, k, v, cq, ck, lens_q, lens_k, mode, prefix):
        o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block)
        return o[0].transpose(0, 1)

    return flex_packed


def xformers_packed(q, k, v, cq, ck, lens_q, lens_k, mode, prefix):  # pragma: no cover - GPU only
    """xformers' memory_efficient_attention over the packed tokens as one batch-1 row, with the block-diagonal bias
    (bottom-right causal for causal) built from the lengths on every call, as a caller with changing batches does."""
    from xformers.ops import fmha

    bias = _xformers_bias(list(lens_q), list(lens_k), mode == "causal", q.device)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


# ------------------------------------------------------------------------------------------------ cases


def flop_formula(base: str, bwd: bool) -> str:
    """How a case's FLOP are counted: ``base`` for the forward, x 3.5 with the backward (2.5x the forward)."""
    return base + (" * 3.5 (fwd + 2.5x bwd)" if bwd else "")


def result_note(what: str, err: float, dtype, device: str, keep_if_wrong: bool) -> str | None:
    """The note of a row whose output is ``err`` (max abs) from the reference (tolerance 1e-4 in float32, 5e-2 in
    half precision), or None to leave the row out. On the CPU a wrong result stops the run; on a GPU machine,
    whose time is short, it is reported: a wrong mmcore row (``keep_if_wrong``) is still timed and marked, a wrong
    peer or tile candidate left out."""
    tol = 5e-2 if dtype != torch.float32 else 1e-4
    if err < tol:
        return f"max |error| {err:.1e}"
    if device == "cpu":
        raise AssertionError(f"{what}: max error {err:.2e}")
    print(f"  WRONG: {what}: max error {err:.2e} (tolerance {tol:g})", flush=True)
    return f"WRONG RESULT: max |error| {err:.1e} > {tol:g}" if keep_if_wrong else None


def left_out(what: str, e: Exception) -> None:
    print(f"  {what}: left out ({type(e).__name__}: {str(e).splitlines()[0][:160]})", flush=True)


def forward_backward(fn, grad, inputs):
    """A call of ``fn()``, and when ``grad`` is given its backward from that output gradient (the ``inputs``' .grad
    cleared first)."""

    def run():
        out = fn()
        if grad is not None:
            for t in inputs:
                t.grad = None
            out.backward(grad)
        return out

    return run


def packed_case(name, lens, heads, d, dtype, device, mode, with_backward, impls_spec, prefix=None):
    prefix = prefix or [n // 4 for n in lens]
    pairs = visible_pairs(lens, lens, mode, prefix)
    flop = 4 * d * heads * pairs * (3.5 if with_backward else 1.0)
    q, k, v, cq, ck = layout(lens, lens, heads, heads, d, dtype, device)
    if not with_backward:  # a forward-only case runs as inference: no autograd inputs, nothing saved
        q, k, v = q.detach(), k.detach(), v.detach()
    with torch.no_grad():
        ref = packed_attention_ref(
            q, k, v, cq, ck, mode=mode, prefix_lens=torch.tensor(prefix) if mode == "prefix" else None
        )
    grad = torch.randn_like(q) if with_backward else None
    impls = []
    for label, fn, peer in impls_spec:
        try:
            out = fn(q, k, v, cq, ck, lens, lens, mode, prefix)
        except (RuntimeError, NotImplementedError) as e:
            if not peer:  # mmcore failing is the case failing (gpu_cases reports it and goes on to the next)
                raise
            left_out(f"{name} / {label}", e)  # a forced SDPA backend that does not take this case
            continue
        err = (out.detach().double() - ref.double()).abs().max().item()
        note = result_note(f"{name} / {label}", err, dtype, device, keep_if_wrong=not peer)
        if note is not None:
            call = forward_backward(lambda fn=fn: fn(q, k, v, cq, ck, lens, lens, mode, prefix), grad, (q, k, v))
            impls.append(Impl(label, call, flop, peer=peer, device=device, note=note))
    return Case(name, "FLOP", flop_formula("4 * D * H * visible pairs", with_backward), impls)


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


def gpu_cases(quick, device="cuda", dt=torch.bfloat16, layout_scale=1):
    """The issue's GPU workloads, few enough to fit gpu_check.sh's slot (each FlexAttention case compiles for tens
    of seconds): packed causal decoder attention (16k tokens, segment lengths drawn in [64, 2048]) at head dims 128
    and 64, prefix mode on the same packing, and 16 segments of 1,024 tokens (the forward-efficiency target).
    A generator of cases. ``device``, ``dt``, ``layout_scale`` (segment lengths divided by it): only to try this code
    path on a machine without a GPU (float32, TRITON_INTERPRET=1, a small layout)."""
    from torch.nn.attention import SDPBackend

    lens, prefix = gpu_layout(quick)
    lens, prefix = [max(1, n // layout_scale) for n in lens], [n // layout_scale for n in prefix]
    long_lens = [1024 // layout_scale] * (16 if not quick else 2)
    xformers_runs = "xformers" in available_backends("packed_attention", device)

    def spec(lens, mode, prefix, flex=True):
        impls = [("mmcore (triton)", lambda *a: mmcore_packed(*a, backend="triton"), False)]
        if xformers_runs and mode != "prefix":  # xformers has no prefix mask
            impls.append(("mmcore (xformers)", lambda *a: mmcore_packed(*a, backend="xformers"), False))
        impls.append(("SDPA per segment", sdpa_per_segment, True))
        impls.append(("SDPA padded", sdpa_padded, True))
        for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            impls.append((f"SDPA {b.name.lower()} per segment", lambda *a, b=b: sdpa_per_segment(*a, b), True))
        if flex:
            impls.append(("FlexAttention", flex_packed_fn(cu_of(lens, device), lens, mode, prefix, device), True))
        if xformers_runs and mode != "prefix":
            impls.append(("xformers", xformers_packed, True))
        return impls

    def build(name, *args):  # a case that fails to build is reported and left out; the others still run
        try:
            return packed_case(name, *args)
        except Exception as e:  # noqa: BLE001 - any failure: the GPU machine's time is short
            print(f"  FAILED to build {name}: {type(e).__name__}: {e}", flush=True)
            return None

    # Yielded one at a time, so each case is timed before the next one compiles (a run stopped at its time limit
    # has printed the timings of the cases before). FlexAttention (a compilation each, forward and backward) runs
    # where its targets are: causal and prefix at head dim 128.
    tag, dname = f"{len(lens)} segs ({sum(lens)} tok)", str(dt).removeprefix("torch.")
    for d, mode, bwd in ((128, "causal", False), (128, "causal", True), (128, "prefix", True), (64, "causal", True)):
        name = f"{device} packed {tag} {mode} H{2048 // d}xD{d} {dname} {'fwd+bwd' if bwd else 'fwd'}"
        case = build(name, lens, 2048 // d, d, dt, device, mode, bwd, spec(lens, mode, prefix, flex=d == 128), prefix)
        if case is not None:
            yield case
    case = build(f"{device} packed {len(long_lens)}x{long_lens[0]} causal H16xD128 {dname} fwd", long_lens, 16, 128,
                 dt, device, "causal", False, spec(long_lens, "causal", [0] * len(long_lens), flex=False))  # fmt: skip
    if case is not None:
        yield case


# Alternative half-precision tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) timed beside the tables' on a GPU; each
# compiles for sm_90 within its shared memory at head dims 64 and 128 (checked on the CPU machine with
# mmcore.testing.compile_for_sm90).
SWEEP_TILES = {
    "fwd": [(128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3)],
}


def tile_sweep_cases(quick, device="cuda", dt=torch.bfloat16, layout_scale=1, sweep=None):
    """The Triton kernels on the causal packing at head dim 128 with each alternative tile of ``sweep`` (default
    SWEEP_TILES) against the tables' tiles (the peer): forward alternatives on the forward, dK/dV and dQ ones on
    forward + backward. Each alternative's output (and gradients) are compared with the tables' first; a wrong or
    failing one is reported and left out. For tuning the tables; ``device``, ``dt``, ``layout_scale`` as in
    gpu_cases."""
    from mmcore.kernels import packed_attention as pa

    sweep = SWEEP_TILES if sweep is None else sweep
    lens, _ = gpu_layout(quick)
    lens = [max(1, n // layout_scale) for n in lens]
    d, heads, none = 128, 16, [0] * len(lens)
    q, k, v, cq, ck = layout(lens, lens, heads, heads, d, dt, device)
    grad = torch.randn_like(q)
    flop = 4 * d * heads * visible_pairs(lens, lens, "causal", none)

    def run_with(tiles, bwd):
        inputs = (q, k, v) if bwd else (q.detach(), k.detach(), v.detach())
        call = forward_backward(
            lambda: mmcore_packed(*inputs, cq, ck, lens, lens, "causal", none, backend="triton"),
            grad if bwd else None,
            inputs,
        )

        def run():  # the output, and with the backward the gradients too
            with pa.override_tiles(**tiles):
                out = call()
            return (out.detach(), q.grad, k.grad, v.grad) if bwd else (out,)

        return run

    cases = []
    for bwd, kernels in ((False, ("fwd",)), (True, ("dkdv", "dq"))):
        default = run_with({}, bwd)
        want = default()
        tables = ", ".join(f"{n} {tuple(getattr(pa, f'_{n}_tiles')(d, dt).__dict__.values())}" for n in kernels)
        impls = [Impl(f"tables: {tables}", default, flop * (3.5 if bwd else 1.0), peer=True, device=device)]
        for name in kernels:
            for tiles in sweep[name]:
                label = f"tile sweep / {name} {tiles}"
                fn = run_with({name: tiles}, bwd)
                try:
                    got = fn()
                except Exception as e:  # noqa: BLE001 - a tile that does not compile or launch is left out
                    left_out(label, e)
                    continue
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want, strict=True))
                note = result_note(f"{label} (against the tables')", err, dt, device, keep_if_wrong=False)
                if note is not None:
                    impls.append(Impl(f"{name} {tiles}", fn, flop * (3.5 if bwd else 1.0), device=device, note=note))
        what = "fwd+bwd" if bwd else "fwd"
        cases.append(Case(f"{device} tile sweep causal H{heads}xD{d} {str(dt)[6:]} {what}", "FLOP",
                          flop_formula("4 * D * H * visible pairs", bwd), impls))  # fmt: skip
    return cases


def gpu_layout(quick):
    """The GPU benchmark's packing: segment lengths drawn in [64, 2048] up to 16k tokens; prefixes a quarter."""
    rng = random.Random(0)
    lens = []
    while sum(lens) < (16384 if not quick else 2048):
        lens.append(rng.randint(64, 2048))
    return lens, [n // 4 for n in lens]


def tiles(lens, prefix, device):
    """Tiles the Triton kernels visit on a packing, per head, against the minimum, with the bf16 (H100) tile sizes,
    in every mode. On the CPU this needs TRITON_INTERPRET=1 set before Triton loads (see tiles_interpreted)."""
    from mmcore.kernels.packed_attention import tile_counts

    cu = cu_of(lens, device)
    pl = torch.tensor(prefix, dtype=torch.int32, device=device)
    return {
        name: tile_counts(cu, cu, mode, pl if name == "prefix" else None, head_dim=128, dtype=torch.bfloat16)
        for mode, name in ((0, "full"), (1, "causal"), (2, "prefix"))
    }


def tiles_interpreted(quick):
    """tiles() of the GPU benchmark's packing, counted on the CPU by the Triton interpreter in a fresh process (the
    schedule and counting kernels are the ones the GPU runs; the count does not depend on the device)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from bench_packed_attention import gpu_layout, tiles\n"
        f"print(json.dumps(tiles(*gpu_layout({quick}), 'cpu')))"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"tile count subprocess failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def print_tiles(counts):
    for name, c in counts.items():
        per_kernel = (f"{k} {c[k + '_visited']} / {c[k + '_minimum']} ({c[k + '_masked']} masked)"
                      for k in ("fwd", "dkdv", "dq"))  # fmt: skip
        print(f"tiles visited / minimum, {name}: " + ", ".join(per_kernel))


def dense_cases(device, quick):
    """ViT-L/14 image-patch attention (257 tokens x 16 heads x 64; forward, and forward + backward) and the
    Kosmos-2 resampler (64 latent queries over 257 + 64 keys x 32 heads x 64; forward), batched, through
    mmcore.ops.attention vs batched SDPA (on a GPU also each of its flash / efficient / cuDNN backends)."""
    images = (256 if device == "cuda" else 8) if not quick else 2
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    cases = []
    for label, lq, lk, heads, bwd in (
        ("ViT-L/14 patch attention", 257, 257, 16, False),
        ("ViT-L/14 patch attention", 257, 257, 16, True),
        ("Kosmos-2 resampler", 64, 321, 32, False),
    ):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(images, lq, heads, 64, generator=g).to(dt).to(device).requires_grad_(bwd)
        k = torch.randn(images, lk, heads, 64, generator=g).to(dt).to(device).requires_grad_(bwd)
        v = torch.randn(images, lk, heads, 64, generator=g).to(dt).to(device).requires_grad_(bwd)
        grad = torch.randn_like(q) if bwd else None
        flop = 4 * 64 * heads * lq * lk * images * (3.5 if bwd else 1.0)

        def sdpa(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
                1, 2
            )

        with torch.no_grad():
            err = (attention(q, k, v).float() - sdpa().float()).abs().max().item()
        note = result_note(f"{label} / mmcore attention", err, dt, device, keep_if_wrong=True)
        impls = [
            Impl("mmcore attention", forward_backward(lambda q=q, k=k, v=v: attention(q, k, v), grad, (q, k, v)), flop,
                 device=device, note=note),
            Impl("SDPA (default)", forward_backward(sdpa, grad, (q, k, v)), flop, peer=True, device=device),
        ]  # fmt: skip
        if device == "cuda":  # pragma: no cover - GPU only
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):

                def forced(b=b, sdpa=sdpa):
                    with sdpa_kernel(b):
                        return sdpa()

                call = forward_backward(forced, grad, (q, k, v))
                try:
                    call()
                except RuntimeError:
                    continue
                impls.append(Impl(f"SDPA {b.name.lower()}", call, flop, peer=True, device=device))
        direction = "fwd+bwd" if bwd else "fwd"
        formula = flop_formula("4 * D * H * Lq * Lk * images", bwd)
        cases.append(Case(f"{device} {label} {images} images {str(dt)[6:]} {direction}", "FLOP", formula, impls))
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
        cases, results = [], []
        for case in gpu_cases(args.quick):  # each timed as soon as it is built
            cases.append(case)
            results += run_cases([case], quick=args.quick)
        dense = dense_cases("cuda", args.quick)
        cases += dense
        results += run_cases(dense, quick=args.quick)
        try:  # last: alternatives to the tile tables, for tuning them (a failure here loses nothing above)
            sweep = tile_sweep_cases(args.quick)
            cases += sweep
            results += run_cases(sweep, quick=args.quick)
        except Exception as e:  # noqa: BLE001
            print(f"tile sweep FAILED: {type(e).__name__}: {e}", flush=True)
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
    lens, prefix = gpu_layout(args.quick)
    print(f"\nTiles on the GPU packing ({len(lens)} segments, {sum(lens)} tokens, bf16 tile sizes):")
    try:
        extra["tiles"] = tiles(lens, prefix, "cuda") if args.device == "cuda" else tiles_interpreted(args.quick)
        print_tiles(extra["tiles"])
    except Exception as e:  # noqa: BLE001 - the timings above are still reported
        extra["tiles_error"] = f"{type(e).__name__}: {e}"
        print(f"tile count FAILED: {extra['tiles_error']}")
    report("packed_attention", cases, results, device=args.device, quick=args.quick, save=not args.no_save, extra=extra)


if __name__ == "__main__":
    main()
