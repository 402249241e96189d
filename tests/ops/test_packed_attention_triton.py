"""The Triton packed-attention launchers (kernels/packed_attention.py), called directly: forward and backward
against the float64 reference and its autograd, dropout masks, the tile schedule (torch builder == C++ op) and
tiles visited == the minimum.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), float32 and float16
only (the interpreter's bfloat16 is wrong), with 16/32-wide tiles so that tiny layouts still span several tiles,
partial tiles and both the masked and the unmasked loops. Every returned tensor is allocated NaN-filled, so a row
a kernel forgets to write fails. Tests marked gpu run on a GPU machine (benchmarks/gpu_check.sh) with the real
block sizes, bfloat16 and larger shapes.
"""

import math
import random

import pytest
import torch

pa = pytest.importorskip("mmcore.kernels.packed_attention")

from mmcore import _extension  # noqa: E402
from mmcore.ops._philox import dropout_keep_mask  # noqa: E402
from mmcore.ops.attention import packed_attention_ref, visible_mask  # noqa: E402
from mmcore.testing import assert_close_to_ref  # noqa: E402

MODES = {"full": 0, "causal": 1, "prefix": 2}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (query lengths, key lengths, prefix lengths) per segment.
LAYOUTS = {
    # empty segments (no queries; no keys: rows that see nothing), length 1, Lq != Lk both ways, 3 tiles of 16
    "mixed": ([5, 0, 33, 1, 20], [7, 3, 33, 1, 0], [3, 1, 20, 0, 2]),
    # Lq > Lk: causal rows before Lq - Lk see no key (a whole query tile of them); Lq << Lk; prefix > Lk
    "cross": ([40, 3], [17, 50], [5, 60]),
    "self": ([17, 40], [17, 40], [16, 0]),
}

SMALL = pa._Tiles(16, 16, 4, 1)
TILES = {
    "16x16": (SMALL, SMALL, SMALL),
    # fwd/dQ tiles taller than wide, dK/dV tiles wider than tall (and the reverse), as on the GPU
    "32x16": (pa._Tiles(32, 16, 4, 1), pa._Tiles(16, 32, 4, 1), pa._Tiles(32, 16, 4, 1)),
    "16x32": (pa._Tiles(16, 32, 4, 1), pa._Tiles(32, 16, 4, 1), pa._Tiles(16, 32, 4, 1)),
}


def cu(lens, device="cpu"):
    return torch.tensor(
        [0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every tensor the launchers return starts as NaN."""
    monkeypatch.setattr(
        pa, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)
    )


def use_tiles(monkeypatch, name):
    fwd, dkdv, dq = TILES[name]
    monkeypatch.setattr(pa, "_fwd_tiles", lambda head_dim, dtype: fwd)
    monkeypatch.setattr(pa, "_dkdv_tiles", lambda head_dim, dtype: dkdv)
    monkeypatch.setattr(pa, "_dq_tiles", lambda head_dim, dtype: dq)


def make_case(layout, heads, heads_kv, d, dtype, device="cpu", strided=False):
    lq, lk, plen = LAYOUTS[layout] if isinstance(layout, str) else layout
    tq, tk = sum(lq), sum(lk)
    if strided:  # q, k, v as views of one fused projection (token stride 3 * heads * d), as models produce them
        qkv = torch.randn(max(tq, tk), 3, heads, d, dtype=dtype, device=device)
        q, k, v = qkv[:tq, 0], qkv[:tk, 1, :heads_kv], qkv[:tk, 2, :heads_kv]
    else:
        q = torch.randn(tq, heads, d, dtype=dtype, device=device)
        k = torch.randn(tk, heads_kv, d, dtype=dtype, device=device)
        v = torch.randn(tk, heads_kv, d, dtype=dtype, device=device)
    prefix = torch.tensor(plen, dtype=torch.int32, device=device)
    return q, k, v, cu(lq, device), cu(lk, device), max(lq, default=0), max(lk, default=0), prefix


def check(q, k, v, cq, ck, mq, mk, mode, prefix, *, dropout_p=0.0, seed=0, offset=0, strided_dout=False):
    """Forward and backward of the launchers against packed_attention_ref (float64, autograd) with the tolerance
    rule, PyTorch in the inputs' dtype as the baseline."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    m = MODES[mode]
    out, lse = pa._packed_attention_fwd(q, k, v, cq, ck, mq, mk, m, prefix, scale, dropout_p, seed, offset)
    dout = torch.randn_like(out)
    if strided_dout:
        dout = torch.randn(out.shape[1], out.shape[0], out.shape[2], dtype=out.dtype, device=out.device).transpose(0, 1)
    dq, dk, dv = pa._packed_attention_bwd(
        dout, q, k, v, out, lse, cq, ck, mq, mk, m, prefix, scale, dropout_p, seed, offset
    )

    kw = dict(mode=mode, prefix_lens=prefix, softmax_scale=scale, dropout_p=dropout_p, seed=seed, offset=offset)
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = packed_attention_ref(*inputs64, cq, ck, mq, mk, upcast=True, return_lse=True, **kw)
    ref_grads = torch.autograd.grad(ref, inputs64, dout.double())
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    base, base_lse = packed_attention_ref(*inputs, cq, ck, mq, mk, upcast=False, return_lse=True, **kw)
    base_grads = torch.autograd.grad(base, inputs, dout)

    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    assert_close_to_ref(out, ref, base, name="out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: +inf rows differ"
    assert not lse.isnan().any()
    assert torch.equal(out[lse.transpose(0, 1).isinf()], torch.zeros_like(out[lse.transpose(0, 1).isinf()]))
    fin = torch.isfinite(ref_lse)
    assert_close_to_ref(lse[fin], ref_lse[fin].double(), base_lse[fin], name="lse")
    for name, g, x, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), (q, k, v), ref_grads, base_grads, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_to_ref(g, r, b, grad=True, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["mixed", "cross"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference(monkeypatch, mode, layout, dtype):
    use_tiles(monkeypatch, "16x16")
    q, k, v, cq, ck, mq, mk, prefix = make_case(layout, 2, 1, 80, dtype)
    check(q, k, v, cq, ck, mq, mk, mode, prefix if mode == "prefix" else None)


def test_override_tiles_for_tuning():
    """override_tiles swaps the half-precision tiles while active (the results still match the reference), leaves
    float32 alone, restores the tables after, and names an unknown kernel."""
    default = pa._fwd_tiles(64, torch.float16), pa._dkdv_tiles(64, torch.float16), pa._dq_tiles(64, torch.float16)
    q, k, v, cq, ck, mq, mk, prefix = make_case("mixed", 2, 1, 64, torch.float16)
    with pa.override_tiles(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1)):
        assert pa._fwd_tiles(64, torch.float16) == pa._Tiles(32, 16, 4, 1)
        assert pa._dkdv_tiles(64, torch.bfloat16) == pa._Tiles(16, 32, 4, 1)
        assert pa._dq_tiles(64, torch.float32) == pa._Tiles(32, 32, 4, 2)  # float32 keeps its table
        check(q, k, v, cq, ck, mq, mk, "prefix", prefix)
    assert (
        pa._fwd_tiles(64, torch.float16),
        pa._dkdv_tiles(64, torch.float16),
        pa._dq_tiles(64, torch.float16),
    ) == default
    with pytest.raises(ValueError, match="unknown kernel"), pa.override_tiles(bwd=(16, 16, 4, 1)):
        pass


@pytest.mark.parametrize(
    "d, heads, heads_kv, tiles, mode, layout, dtype",
    [
        (32, 3, 1, "32x16", "causal", "self", torch.float16),  # one chunk, GQA group of 3
        (64, 2, 2, "16x32", "prefix", "mixed", torch.float32),  # no GQA
        (96, 2, 1, "16x32", "full", "cross", torch.float16),  # 64 + 32
        (112, 2, 1, "32x16", "prefix", "self", torch.float32),  # 64 + 32 + 16
        (128, 2, 1, "16x16", "causal", "cross", torch.float16),
        (40, 2, 1, "16x16", "causal", "mixed", torch.float32),  # 32 + 16 with 8 columns masked
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_head_dims_gqa_tiles(monkeypatch, d, heads, heads_kv, tiles, mode, layout, dtype):
    use_tiles(monkeypatch, tiles)
    q, k, v, cq, ck, mq, mk, prefix = make_case(layout, heads, heads_kv, d, dtype)
    check(q, k, v, cq, ck, mq, mk, mode, prefix if mode == "prefix" else None)


@pytest.mark.parametrize("mode", list(MODES))
def test_vit_length_among_short_segments(monkeypatch, mode):
    """A 257-token segment (ViT-L/14 at 224) among segments of 1-3 tokens: 257 = 16 * 16 + 1 leaves a one-row last
    query tile and a one-column last key tile."""
    use_tiles(monkeypatch, "32x16")
    layout = ([2, 257, 1, 3], [2, 257, 1, 3], [1, 128, 0, 3])
    q, k, v, cq, ck, mq, mk, prefix = make_case(layout, 2, 1, 32, torch.float32)
    check(q, k, v, cq, ck, mq, mk, mode, prefix if mode == "prefix" else None)


def test_real_block_sizes_and_strided_inputs():
    """The H100 block table (fwd 128 x 64, dK/dV 32 x 128, dQ 128 x 32 in float16), strided q/k/v/dout."""
    q, k, v, cq, ck, mq, mk, prefix = make_case(([130, 7], [140, 7], [9, 2]), 2, 1, 64, torch.float16, strided=True)
    assert q.stride(0) == 3 * 2 * 64
    check(q, k, v, cq, ck, mq, mk, "prefix", prefix, strided_dout=True)


@pytest.mark.parametrize(
    "mode, layout, dtype", [("prefix", "mixed", torch.float32), ("causal", "cross", torch.float16)], ids=str
)
def test_dropout_matches_reference(monkeypatch, mode, layout, dtype):
    use_tiles(monkeypatch, "16x32")
    q, k, v, cq, ck, mq, mk, prefix = make_case(layout, 2, 1, 32, dtype)
    check(q, k, v, cq, ck, mq, mk, mode, prefix, dropout_p=0.3, seed=2**40 + 17, offset=12345)


def test_dropout_mask_is_the_references(monkeypatch):
    """With v_j = e_j (one-hot per key) the output row is the dropped, rescaled probability row itself, so its
    zeros are exactly the dropped (or invisible) elements: they must be mmcore.ops._philox's mask."""
    use_tiles(monkeypatch, "16x16")
    lq, lk, heads, p, seed, offset = [20, 3, 0, 9], [19, 32, 4, 1], 2, 0.4, 123456789, 77
    cq, ck = cu(lq), cu(lk)
    d = 32
    q = torch.randn(sum(lq), heads, d)
    k = torch.randn(sum(lk), 1, d)
    v = torch.zeros(sum(lk), 1, d)
    for s in range(len(lk)):
        v[ck[s] : ck[s + 1], 0] = torch.eye(lk[s], d)
    out, _ = pa._packed_attention_fwd(q, k, v, cq, ck, max(lq), max(lk), 1, None, 0.1, p, seed, offset)
    kept = visible = 0
    for s in range(len(lq)):
        rows = torch.arange(cq[s], cq[s + 1])[:, None]
        cols = torch.arange(lk[s])[None, :]
        for h in range(heads):
            keep = dropout_keep_mask(seed, offset, h, rows, cols, sum(lq), max(lk), p)
            vis = visible_mask(lq[s], lk[s], "causal")
            assert torch.equal(out[cq[s] : cq[s + 1], h, : lk[s]] != 0, keep & vis), (s, h)
            kept, visible = kept + int((keep & vis).sum()), visible + int(vis.sum())
    assert 0.4 < kept / visible < 0.8  # p = 0.4 over ~700 elements


def test_all_rows_without_keys():
    """Every segment without keys: out is exactly 0, lse +inf; dq 0, and dk/dv 0 for keys nobody sees."""
    q, k, v, cq, ck, mq, mk, _ = make_case(([3, 4], [0, 2], [0, 0]), 2, 1, 32, torch.float32)
    out, lse = pa._packed_attention_fwd(q, k, v, cq, ck, mq, mk, 1, None, 0.2, 0.0, 0, 0)
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and bool(lse[:, :3].isinf().all())
    # causal with Lq = 4 > Lk = 2: rows 0 and 1 see nothing
    assert torch.equal(out[3:5], torch.zeros_like(out[3:5])) and bool(lse[:, 3:5].isinf().all())
    dq, dk, dv = pa._packed_attention_bwd(
        torch.randn_like(out), q, k, v, out, lse, cq, ck, mq, mk, 1, None, 0.2, 0.0, 0, 0
    )
    assert torch.equal(dq[:5], torch.zeros_like(dq[:5]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


# ------------------------------------------------------------------------------------------------------------
# Schedule and tile accounting
# ------------------------------------------------------------------------------------------------------------


def random_layout(rng, max_segments=7, max_len=70):
    n = rng.randint(1, max_segments)
    lens = [rng.choice([0, 1, rng.randint(0, max_len), 16, 32, 33]) for _ in range(n)]
    return lens


def naive_schedule(lens, total, block):
    items = [(s, start) for s, n in enumerate(lens) for start in range(0, n, block)]
    cap = len(lens) + total // block
    assert len(items) <= cap
    return items + [(-1, -1)] * (cap - len(items))


def test_schedule_torch_builder():
    rng = random.Random(0)
    for _ in range(200):
        lens = random_layout(rng)
        total = sum(lens) + rng.choice([0, 0, 5, 40])
        block = rng.choice([16, 32, 64, 128])
        got = pa.build_schedule(cu(lens), total, block)
        assert got.dtype == torch.int32
        assert got.tolist() == [list(t) for t in naive_schedule(lens, total, block)], (lens, total, block)
    assert pa.build_schedule(torch.zeros(1, dtype=torch.int32), 40, 16).tolist() == [[-1, -1]] * 2


@pytest.mark.skipif(_extension.C_ERROR is not None, reason="mmcore._C not built")
def test_schedule_cpp_op_equals_torch_builder():
    rng = random.Random(1)
    op = torch.ops.mmcore.packed_attention_schedule
    for _ in range(300):
        lens = random_layout(rng)
        total = sum(lens) + rng.choice([0, 0, 3, 100])
        block = rng.choice([16, 32, 64, 128])
        c = cu(lens)
        assert torch.equal(op(c, total, block), pa.build_schedule(c, total, block)), (lens, total, block)
    assert op(torch.zeros(1, dtype=torch.int32), 0, 16).shape == (0, 2)
    with pytest.raises(ValueError, match="non-decreasing"):
        op(torch.tensor([0, 5, 3], dtype=torch.int32), 10, 16)
    with pytest.raises(ValueError, match="more than total"):
        op(torch.tensor([0, 17, 40], dtype=torch.int32), 16, 16)
    with pytest.raises(TypeError, match="int32"):
        op(torch.tensor([0, 5]), 5, 16)


@pytest.mark.parametrize("tiles", ["16x16", "32x16", "16x32"])
def test_tiles_visited_is_the_minimum(monkeypatch, tiles):
    use_tiles(monkeypatch, tiles)
    rng = random.Random(2)
    layouts = [LAYOUTS[name] for name in LAYOUTS]
    for _ in range(3):
        lq = random_layout(rng)
        lk = [rng.choice([n, rng.randint(0, 70)]) for n in lq]
        layouts.append((lq, lk, [rng.randint(0, 80) for _ in lq]))
    for lq, lk, plen in layouts:
        for mode in (0, 1, 2):
            counts = pa.tile_counts(cu(lq), cu(lk), mode, torch.tensor(plen, dtype=torch.int32))
            for kernel in ("fwd", "dkdv", "dq"):
                assert counts[f"{kernel}_visited"] == counts[f"{kernel}_minimum"], (kernel, lq, lk, plen, mode, counts)
                assert counts[f"{kernel}_masked"] <= counts[f"{kernel}_visited"]


def test_tile_counts_skip_work(monkeypatch):
    """Full mode over one 64-token segment in 16-tiles visits 16 tiles, causal 10 (the diagonal ones masked)."""
    use_tiles(monkeypatch, "16x16")
    c = cu([64])
    full = pa.tile_counts(c, c, 0)
    causal = pa.tile_counts(c, c, 1)
    assert (full["fwd_visited"], full["fwd_masked"]) == (16, 0)
    assert (causal["fwd_visited"], causal["fwd_masked"]) == (10, 4)
    assert (causal["dkdv_visited"], causal["dkdv_masked"]) == (10, 4)


def test_schedule_cache():
    """Launchers reuse a schedule for the same cu_seqlens object; an in-place change (version bump) rebuilds it."""
    c = cu([40, 3])
    first = pa._schedule(c, 43, 16)
    assert pa._schedule(c, 43, 16) is first
    assert pa._schedule(cu([40, 3]), 43, 16) is not first
    c[1] = 20
    again = pa._schedule(c, 43, 16)
    assert again is not first and again.tolist() == pa.build_schedule(c, 43, 16).tolist()
    with torch.inference_mode():
        ci = cu([40, 3])
        assert pa._schedule(ci, 43, 16) is not pa._schedule(ci, 43, 16)  # no version counter: not cached


SM90_COMPILE = r"""
import torch
import mmcore.kernels.packed_attention as pa
from mmcore.testing import compile_for_sm90

d = 80
d0, d1, d2 = pa.head_dim_chunks(d)
for fn, tiles in [(pa._packed_attention_fwd_kernel, pa._fwd_tiles(d, torch.float16)),
                  (pa._packed_attention_bwd_dkdv_kernel, pa._dkdv_tiles(d, torch.float16)),
                  (pa._packed_attention_bwd_dq_kernel, pa._dq_tiles(d, torch.float16))]:
    sig, aligned = {}, []
    for n in fn.arg_names:
        if n.endswith("_ptr"):
            sig[n] = "*fp32" if n in ("lse_ptr", "delta_ptr") else "*fp16"
            if n.startswith(("cu_", "prefix", "schedule")):
                sig[n] = "*i32"
            aligned.append(n)
        elif n.startswith("stride_"):
            sig[n] = "i32"
            aligned.append(n)
        elif n in ("total_q", "max_seqlen_k"):
            sig[n] = "i32"
        elif n in ("dropout_thr", "seed", "offset"):
            sig[n] = "i64"
        elif n in ("softmax_scale", "dropout_scale"):
            sig[n] = "fp32"
    consts = dict(GROUP=2, MODE=2, DROPOUT=True, HEAD_DIM=d, D0=d0, D1=d1, D2=d2, BLOCK_M=tiles.BLOCK_M,
                  BLOCK_N=tiles.BLOCK_N, DOT_PRECISION="tf32")
    k = compile_for_sm90(fn, sig, consts, divisible_by_16=aligned, num_warps=tiles.num_warps,
                         num_stages=tiles.num_stages)
    ttgir = k.asm["ttgir"]
    print(fn.__name__, "shared", k.metadata.shared, "wgmma", ttgir.count("warp_group_dot"),
          "cp.async", ttgir.count("async_copy_global_to_local"))
    assert k.metadata.shared <= 227 * 1024, "over the H100's shared memory per block"
    assert "warp_group_dot" in ttgir and "async_copy_global_to_local" in ttgir, "no wgmma or no pipelined loads"

# the small kernels: delta = rowsum(dout * out) and the tile counter
compile_for_sm90(pa._bwd_preprocess_kernel, {n: "*fp16" for n in ("out_ptr", "dout_ptr")} | {"delta_ptr": "*fp32"}
                 | {n: "i32" for n in ("stride_out_t", "stride_out_h", "stride_dout_t", "stride_dout_h", "total_q")},
                 dict(HEAD_DIM=d, BLOCK_T=64, BLOCK_D=128), num_warps=4)
for key_tiles in (False, True):
    compile_for_sm90(pa._count_tiles_kernel, {n: "*i32" for n in pa._count_tiles_kernel.arg_names[:5]},
                     dict(MODE=2, KEY_TILES=key_tiles, BLOCK_M=128, BLOCK_N=64))
"""


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="the gpu tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    """The real-tile kernels (d = 80 as 64 + 16, prefix mode, dropout) and the small ones compile for sm90 on this
    GPU-less machine: catches what the interpreter accepts and the GPU compiler does not (dot shapes, types, shared
    memory), and checks K/V loads are pipelined into wgmma."""
    from mmcore.testing import assert_runs_without_triton_interpreter

    pytest.importorskip("triton.backends.nvidia")
    assert_runs_without_triton_interpreter(SM90_COMPILE, {"TRITON_DEFAULT_FP_FUSION": "1"})


def test_head_dim_chunks():
    assert pa.head_dim_chunks(80) == (64, 16, 0)
    assert pa.head_dim_chunks(96) == (64, 32, 0)
    assert pa.head_dim_chunks(112) == (64, 32, 16)
    assert pa.head_dim_chunks(128) == (128, 0, 0)
    assert pa.head_dim_chunks(32) == (32, 0, 0)
    assert pa.head_dim_chunks(40) == (32, 16, 0)  # the only padded kind: 8 masked columns
    for d in range(16, 129, 16):
        assert sum(pa.head_dim_chunks(d)) == d  # multiples of 16: no padding


# ------------------------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh): real block sizes, bfloat16, larger shapes, no host sync, speed sanity
# ------------------------------------------------------------------------------------------------------------

GPU_CASES = {
    # 4 ViT-L/14 images at 224 (257 tokens, 16 heads)
    "vit": (([257] * 4, [257] * 4, [0] * 4), 16, 16, "full"),
    # packed decoder samples, causal, GQA 4:1
    "decoder": (([700, 1, 0, 1300, 45], [700, 1, 0, 1300, 45], [0] * 5), 16, 4, "causal"),
    # COSA-like: 64 image tokens bidirectional, then causal text; a resampler-style Lq < Lk segment
    "prefix": (([96, 200, 64], [96, 200, 300], [64, 64, 300]), 8, 8, "prefix"),
}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case, d, dtype",
    [
        ("vit", 64, torch.bfloat16),
        ("vit", 80, torch.float16),
        ("decoder", 128, torch.bfloat16),
        ("decoder", 96, torch.float16),
        ("prefix", 80, torch.bfloat16),
        ("prefix", 112, torch.float16),
    ],
    ids=str,
)
def test_gpu_matches_reference(case, d, dtype):
    layout, heads, heads_kv, mode = GPU_CASES[case]
    q, k, v, cq, ck, mq, mk, prefix = make_case(layout, heads, heads_kv, d, dtype, device="cuda")
    check(q, k, v, cq, ck, mq, mk, mode, prefix if mode == "prefix" else None)


@pytest.mark.gpu
def test_gpu_dropout_and_float32():
    q, k, v, cq, ck, mq, mk, prefix = make_case(GPU_CASES["prefix"][0], 4, 2, 80, torch.bfloat16, device="cuda")
    check(q, k, v, cq, ck, mq, mk, "prefix", prefix, dropout_p=0.1, seed=3, offset=2**33)
    q, k, v, cq, ck, mq, mk, prefix = make_case("mixed", 2, 1, 112, torch.float32, device="cuda")
    check(q, k, v, cq, ck, mq, mk, "causal", None)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_schedule():
    q, k, v, cq, ck, mq, mk, prefix = make_case(GPU_CASES["decoder"][0], 16, 4, 128, torch.bfloat16, device="cuda")
    args = (cq, ck, mq, mk, 2, prefix, 0.1, 0.1, 5, 0)
    out, lse = pa._packed_attention_fwd(q, k, v, *args)  # compiles
    pa._packed_attention_bwd(out, q, k, v, out, lse, *args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = pa._packed_attention_fwd(q, k, v, *args)
        pa._packed_attention_bwd(out, q, k, v, out, lse, *args)
        schedule = pa.build_schedule(cq, q.shape[0], 64)  # the launchers above reused cached schedules
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(schedule, pa.build_schedule(cq.cpu(), q.shape[0], 64).cuda())
    if _extension.C_ERROR is None:
        for block in (32, 64, 128):
            cpp = torch.ops.mmcore.packed_attention_schedule(cq.cpu(), q.shape[0], block)
            assert torch.equal(pa.build_schedule(cq, q.shape[0], block).cpu(), cpp)
    for mode in (0, 1, 2):
        counts = pa.tile_counts(cq, ck, mode, prefix, head_dim=128, dtype=torch.bfloat16)
        for kernel in ("fwd", "dkdv", "dq"):
            assert counts[f"{kernel}_visited"] == counts[f"{kernel}_minimum"], counts


@pytest.mark.gpu
def test_gpu_speed_sanity():
    """Forward of 4 ViT-L images (4 x 257 tokens, 16 heads, d 64) within 4x of PyTorch's SDPA on the padded
    batch, and the causal decoder layout faster than the same layout in full mode (skipped tiles)."""
    from triton.testing import do_bench

    q, k, v, cq, ck, mq, mk, _ = make_case(GPU_CASES["vit"][0], 16, 16, 64, torch.bfloat16, device="cuda")
    ours = do_bench(lambda: pa._packed_attention_fwd(q, k, v, cq, ck, mq, mk, 0, None, 0.125, 0.0, 0, 0))
    qb, kb, vb = (t.view(4, 257, 16, 64).transpose(1, 2) for t in (q, k, v))
    sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb))
    print(f"vit fwd: triton {ours * 1e3:.1f} us, sdpa {sdpa * 1e3:.1f} us")
    assert ours < 4 * sdpa
    q, k, v, cq, ck, mq, mk, _ = make_case(([4096] * 2, [4096] * 2, [0, 0]), 16, 16, 128, torch.bfloat16, "cuda")
    full = do_bench(lambda: pa._packed_attention_fwd(q, k, v, cq, ck, mq, mk, 0, None, 0.1, 0.0, 0, 0))
    causal = do_bench(lambda: pa._packed_attention_fwd(q, k, v, cq, ck, mq, mk, 1, None, 0.1, 0.0, 0, 0))
    print(f"2 x 4096 d128 fwd: full {full:.3f} ms, causal {causal:.3f} ms")
    assert causal < 0.75 * full
