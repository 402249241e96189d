"""Triton kernels for packed (varlen) attention: FlashAttention-2 forward and backward over a block-sparse
tile schedule.

Layout and semantics as ``mmcore.ops.attention.packed_attention_ref``: q ``(total_q, heads, head_dim)``, k/v
``(total_k, heads_kv, head_dim)``, int32 ``cu_seqlens`` ``(segments + 1,)``; query head h reads kv head
``h // (heads // heads_kv)``. Every mask mode is a *prefix* of the segment's keys per query row: row i (counted
in its segment, lengths Lq, Lk) sees keys ``[0, end_i)`` with

    full     end_i = Lk
    causal   end_i = clamp(i + (Lk - Lq) + 1, 0, Lk)
    prefix   end_i = clamp(max(i + (Lk - Lq) + 1, prefix_len), 0, Lk)

and ``end_i`` never decreases with i. So a query tile needs exactly the key tiles below ``end`` of its last row,
and those below ``end`` of its first row need no mask; a key tile needs exactly the query tiles from the first
row whose ``end`` passes the tile's first key (``_kv_range``, ``_q_range``). Programs visit only those tiles.

Schedule: one work item per (segment, tile) -- ``(segment, tile start within the segment)``, int32 ``(capacity,
2)`` with ``capacity = segments + total // BLOCK`` (an upper bound of sum(cdiv(L_s, BLOCK)), known on the host
without reading ``cu_seqlens``); rows past the last item are ``(-1, -1)`` and their programs exit. Built by
``build_schedule`` (torch ops, any device, no host sync) or the C++ op ``mmcore::packed_attention_schedule``
(csrc/packed_attention/schedule.cpp, CPU); both give the same tensor. The forward and dQ kernels take a query-tile
schedule of ``cu_seqlens_q``, the dK/dV kernel a key-tile schedule of ``cu_seqlens_k``. Launchers cache schedules
per cu_seqlens tensor (``_schedule``), so the layers of a model share them.

Head dims are split into power-of-two chunks (80 = 64 + 16, 96 = 64 + 32, 112 = 64 + 32 + 16), one ``tl.dot``
each, so no multiply-add is spent on padding; only a head dim that is not a sum of at most three powers of two
>= 16 pads its last chunk (masked loads).

Backward: a preprocess kernel computes ``delta = rowsum(dout * out)``; the dK/dV kernel runs one program per
(key tile, kv head), loops over the group's query heads and their query tiles and accumulates dK, dV in registers
(deterministic, no atomics); a separate dQ kernel runs one program per (query tile, head) over the forward's key
tiles. dQ by atomics from the dK/dV kernel would save recomputing QK^T and dO V^T (5 instead of 7 matmuls per
tile pair) but needs an fp32 dQ buffer, a conversion pass and is not deterministic; a separate kernel is
deterministic, needs no extra memory and keeps each kernel's register budget small.

Dropout: element (head h, packed query row i, key j from its segment's first key) is kept when
``tl.randint(seed, offset + (h * total_q + i) * max_seqlen_k + j) >= floor(p * 2**32)`` (int64 counters; the
same draw as ``mmcore.ops._philox``), and kept probabilities are scaled by 1 / (1 - p). The backward regenerates
the mask from the same counters.
"""

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128  # block sizes below are chosen for head dims up to 128


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _segment(cu_seqlens_q_ptr, cu_seqlens_k_ptr, prefix_lens_ptr, seg, MODE: tl.constexpr):
    """(first query token, Lq, first key token, Lk, prefix length) of segment ``seg``."""
    q_start = tl.load(cu_seqlens_q_ptr + seg)
    len_q = tl.load(cu_seqlens_q_ptr + seg + 1) - q_start
    k_start = tl.load(cu_seqlens_k_ptr + seg)
    len_k = tl.load(cu_seqlens_k_ptr + seg + 1) - k_start
    prefix_len = tl.load(prefix_lens_ptr + seg) if MODE == 2 else len_q * 0
    return q_start, len_q, k_start, len_k, prefix_len


@triton.jit
def _visible_end(i, len_q, len_k, prefix_len, MODE: tl.constexpr):
    """Query row(s) i of a segment see keys [0, end): end per row (same shape as i)."""
    if MODE == 0:
        end = i * 0 + len_k
    else:
        end = tl.maximum(i + (len_k - len_q) + 1, prefix_len)
        end = tl.minimum(tl.maximum(end, 0), len_k)
    return end


@triton.jit
def _kv_range(m0, len_q, len_k, prefix_len, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys of query tile [m0, m0 + BLOCK_M): tiles starting in [0, n_full) are visible to every row of the tile
    (no mask), tiles starting in [n_full, n_end) need the mask; keys from n_end on are visible to no row."""
    last = tl.minimum(m0 + BLOCK_M, len_q) - 1
    n_full = (_visible_end(m0, len_q, len_k, prefix_len, MODE) // BLOCK_N) * BLOCK_N
    n_end = _visible_end(last, len_q, len_k, prefix_len, MODE)
    return n_full, n_end


@triton.jit
def _q_range(n0, len_q, len_k, prefix_len, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Queries of key tile [n0, n0 + BLOCK_N): query tiles starting in [m_lo, m_full) need the mask, those from
    m_full to len_q see the whole key tile; rows before m_lo see none of it."""
    tile_in_segment = n0 + BLOCK_N <= len_k
    if MODE == 0:
        i_start = len_q * 0
        i_full = tl.where(tile_in_segment, 0, len_q)
    else:
        diff = len_k - len_q
        # first row with end > n0, and first row with end >= n0 + BLOCK_N (see _visible_end)
        i_start = tl.where(prefix_len > n0, 0, tl.maximum(n0 - diff, 0))
        i_full = tl.where(prefix_len >= n0 + BLOCK_N, 0, tl.maximum(n0 + BLOCK_N - diff - 1, 0))
        i_full = tl.where(tile_in_segment, i_full, len_q)
    i_start = tl.minimum(i_start, len_q)
    i_full = tl.minimum(i_full, len_q)
    m_lo = (i_start // BLOCK_M) * BLOCK_M
    m_full = tl.cdiv(i_full, BLOCK_M) * BLOCK_M
    return m_lo, m_full


@triton.jit
def _load_chunk(
    ptr,
    tokens,
    token_mask,
    stride_t,
    COL: tl.constexpr,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASK_TOKENS: tl.constexpr,
    TRANSPOSE: tl.constexpr,
):
    """Columns [COL, COL + WIDTH) of rows ``tokens`` (int64) of a (tokens, head_dim) slice with row stride
    stride_t: a (len(tokens), WIDTH) tile, or (WIDTH, len(tokens)) with TRANSPOSE. Masked rows and columns
    past HEAD_DIM read 0."""
    cols = COL + tl.arange(0, WIDTH)
    if TRANSPOSE:
        ptrs = ptr + tokens[None, :] * stride_t + cols[:, None]
        row_mask = token_mask[None, :]
        col_mask = cols[:, None] < HEAD_DIM
    else:
        ptrs = ptr + tokens[:, None] * stride_t + cols[None, :]
        row_mask = token_mask[:, None]
        col_mask = cols[None, :] < HEAD_DIM
    if COL + WIDTH > HEAD_DIM:
        if MASK_TOKENS:
            x = tl.load(ptrs, mask=row_mask & col_mask, other=0.0)
        else:
            x = tl.load(ptrs, mask=col_mask, other=0.0)
    elif MASK_TOKENS:
        x = tl.load(ptrs, mask=row_mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_chunk(ptr, x, tokens, token_mask, stride_t, COL: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Stores the (len(tokens), WIDTH) tile x into columns [COL, COL + WIDTH), rows in token_mask."""
    cols = COL + tl.arange(0, WIDTH)
    ptrs = ptr + tokens[:, None] * stride_t + cols[None, :]
    mask = token_mask[:, None] & (cols[None, :] < HEAD_DIM) if COL + WIDTH > HEAD_DIM else token_mask[:, None]
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc0,
    acc1,
    acc2,
    m_i,
    l_i,
    q0,
    q1,
    q2,
    k_ptr,
    v_ptr,
    stride_k_t,
    stride_v_t,
    k_start,
    len_k,
    n_lo,
    n_hi,
    row_end,
    row_ctr,
    qk_scale,
    seed,
    dropout_thr,
    MASKED: tl.constexpr,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles starting in [n_lo, n_hi); MASKED applies the per-row key bound and
    the segment's end, otherwise every key of every tile is visible. Scores are in base 2 (scaled by qk_scale)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + offs_n
        keys = (k_start + cols).to(tl.int64)
        key_mask = cols < len_k
        kt = _load_chunk(k_ptr, keys, key_mask, stride_k_t, 0, D0, HEAD_DIM, MASKED, True)
        s = tl.dot(q0, kt, input_precision=DOT_PRECISION)
        if D1 > 0:
            kt = _load_chunk(k_ptr, keys, key_mask, stride_k_t, D0, D1, HEAD_DIM, MASKED, True)
            s = tl.dot(q1, kt, s, input_precision=DOT_PRECISION)
        if D2 > 0:
            kt = _load_chunk(k_ptr, keys, key_mask, stride_k_t, D0 + D1, D2, HEAD_DIM, MASKED, True)
            s = tl.dot(q2, kt, s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if MASKED:
            s = tl.where(cols[None, :] < row_end[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # NOTE: a row that has seen no visible key yet has max -inf; subtracting it would give nan.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)  # the lse is of the softmax before dropout
        if DROPOUT:
            keep = tl.randint(seed, row_ctr[:, None] + cols[None, :]) >= dropout_thr
            p = tl.where(keep, p, 0.0)
        p = p.to(q0.dtype)
        acc0 = acc0 * alpha[:, None]
        acc0 = tl.dot(
            p,
            _load_chunk(v_ptr, keys, key_mask, stride_v_t, 0, D0, HEAD_DIM, MASKED, False),
            acc0,
            input_precision=DOT_PRECISION,
        )
        if D1 > 0:
            acc1 = acc1 * alpha[:, None]
            acc1 = tl.dot(
                p,
                _load_chunk(v_ptr, keys, key_mask, stride_v_t, D0, D1, HEAD_DIM, MASKED, False),
                acc1,
                input_precision=DOT_PRECISION,
            )
        if D2 > 0:
            acc2 = acc2 * alpha[:, None]
            acc2 = tl.dot(
                p,
                _load_chunk(v_ptr, keys, key_mask, stride_v_t, D0 + D1, D2, HEAD_DIM, MASKED, False),
                acc2,
                input_precision=DOT_PRECISION,
            )
        m_i = m_new
    return acc0, acc1, acc2, m_i, l_i


@triton.jit(do_not_specialize=["max_seqlen_k", "dropout_thr", "seed", "offset"])
def _packed_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    prefix_lens_ptr,
    schedule_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_out_t,
    stride_out_h,
    total_q,
    max_seqlen_k,
    softmax_scale,
    dropout_scale,
    dropout_thr,
    seed,
    offset,
    GROUP: tl.constexpr,
    MODE: tl.constexpr,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (schedule capacity, heads): one program per (query tile, head). Writes out rows and lse (heads,
    total_q) for the tile's rows in the segment."""
    item = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.load(schedule_ptr + 2 * item)
    if seg < 0:
        return
    m0 = tl.load(schedule_ptr + 2 * item + 1)
    q_start, len_q, k_start, len_k, prefix_len = _segment(
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, prefix_lens_ptr, seg, MODE
    )
    head64 = head.to(tl.int64)
    q_ptr += head64 * stride_q_h
    k_ptr += (head64 // GROUP) * stride_k_h
    v_ptr += (head64 // GROUP) * stride_v_h
    out_ptr += head64 * stride_out_h

    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < len_q
    tokens = (q_start + rows).to(tl.int64)
    row_end = _visible_end(rows, len_q, len_k, prefix_len, MODE)
    q0 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, 0, D0, HEAD_DIM, True, False)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    # Chunks a head dim does not have are never read; they alias chunk 0 so every argument is defined.
    q1, q2, acc1, acc2 = q0, q0, acc0, acc0
    if D1 > 0:
        q1 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, D0, D1, HEAD_DIM, True, False)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    if D2 > 0:
        q2 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, D0 + D1, D2, HEAD_DIM, True, False)
        acc2 = tl.zeros([BLOCK_M, D2], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634
    row_ctr = offset + (head64 * total_q + tokens) * max_seqlen_k  # dropout counter of key 0, int64

    n_full, n_end = _kv_range(m0, len_q, len_k, prefix_len, MODE, BLOCK_M, BLOCK_N)
    acc0, acc1, acc2, m_i, l_i = _fwd_inner(
        acc0, acc1, acc2, m_i, l_i, q0, q1, q2, k_ptr, v_ptr, stride_k_t, stride_v_t, k_start, len_k,
        0, n_full, row_end, row_ctr, qk_scale, seed, dropout_thr,
        False, DROPOUT, HEAD_DIM, D0, D1, D2, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc0, acc1, acc2, m_i, l_i = _fwd_inner(
        acc0, acc1, acc2, m_i, l_i, q0, q1, q2, k_ptr, v_ptr, stride_k_t, stride_v_t, k_start, len_k,
        n_full, n_end, row_end, row_ctr, qk_scale, seed, dropout_thr,
        True, DROPOUT, HEAD_DIM, D0, D1, D2, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    # A row with no visible key has l = 0 and acc = 0: output 0, lse +inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(lse_ptr + head64 * total_q + tokens, lse, mask=row_mask)
    inv = dropout_scale / l_safe
    _store_chunk(out_ptr, acc0 * inv[:, None], tokens, row_mask, stride_out_t, 0, D0, HEAD_DIM)
    if D1 > 0:
        _store_chunk(out_ptr, acc1 * inv[:, None], tokens, row_mask, stride_out_t, D0, D1, HEAD_DIM)
    if D2 > 0:
        _store_chunk(out_ptr, acc2 * inv[:, None], tokens, row_mask, stride_out_t, D0 + D1, D2, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    out_ptr,
    dout_ptr,
    delta_ptr,
    stride_out_t,
    stride_out_h,
    stride_dout_t,
    stride_dout_h,
    total_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta (heads, total_q) float32 = rowsum(dout * out); memory-bound, so the head dim is padded here."""
    head = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (tokens[:, None] < total_q) & (cols[None, :] < HEAD_DIM)
    o = tl.load(out_ptr + head * stride_out_h + tokens[:, None] * stride_out_t + cols[None, :], mask=mask, other=0.0)
    do = tl.load(
        dout_ptr + head * stride_dout_h + tokens[:, None] * stride_dout_t + cols[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + head * total_q + tokens, delta, mask=tokens < total_q)


@triton.jit
def _dkdv_inner(
    dk0,
    dk1,
    dk2,
    dv0,
    dv1,
    dv2,
    k0,
    k1,
    k2,
    v0,
    v1,
    v2,
    q_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    stride_q_t,
    stride_dout_t,
    q_start,
    len_q,
    len_k,
    prefix_len,
    cols,
    m_lo,
    m_hi,
    qk_scale,
    ctr_base,
    max_seqlen_k,
    seed,
    dropout_thr,
    dropout_scale,
    MASKED: tl.constexpr,
    MODE: tl.constexpr,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulates one query head's dK (unscaled) and dV for the key tile ``cols`` over the query tiles
    starting in [m_lo, m_hi), in transposed form (keys x queries). Query rows past the segment read q = 0,
    dout = 0, lse = +inf, so they add exactly 0."""
    offs_m = tl.arange(0, BLOCK_M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + offs_m
        row_mask = rows < len_q
        tokens = (q_start + rows).to(tl.int64)
        qt0 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, 0, D0, HEAD_DIM, True, True)
        do0 = _load_chunk(dout_ptr, tokens, row_mask, stride_dout_t, 0, D0, HEAD_DIM, True, False)
        st = tl.dot(k0, qt0, input_precision=DOT_PRECISION)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)
        qt1, qt2, do1, do2 = qt0, qt0, do0, do0
        if D1 > 0:
            qt1 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, D0, D1, HEAD_DIM, True, True)
            do1 = _load_chunk(dout_ptr, tokens, row_mask, stride_dout_t, D0, D1, HEAD_DIM, True, False)
            st = tl.dot(k1, qt1, st, input_precision=DOT_PRECISION)
            dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=DOT_PRECISION)
        if D2 > 0:
            qt2 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, D0 + D1, D2, HEAD_DIM, True, True)
            do2 = _load_chunk(dout_ptr, tokens, row_mask, stride_dout_t, D0 + D1, D2, HEAD_DIM, True, False)
            st = tl.dot(k2, qt2, st, input_precision=DOT_PRECISION)
            dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=DOT_PRECISION)
        st = st * qk_scale
        if MASKED:
            row_end = _visible_end(rows, len_q, len_k, prefix_len, MODE)
            st = tl.where(cols[:, None] < row_end[None, :], st, float("-inf"))
        lse = tl.load(lse_ptr + tokens, mask=row_mask, other=float("inf"))
        pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
        if DROPOUT:
            keep = tl.randint(seed, ctr_base + tokens[None, :] * max_seqlen_k + cols[:, None]) >= dropout_thr
            pdt = tl.where(keep, pt * dropout_scale, 0.0)
            dpt = tl.where(keep, dpt * dropout_scale, 0.0)
        else:
            pdt = pt
        delta = tl.load(delta_ptr + tokens, mask=row_mask, other=0.0)
        dst = (pt * (dpt - delta[None, :])).to(qt0.dtype)
        pdt = pdt.to(do0.dtype)
        dv0 = tl.dot(pdt, do0, dv0, input_precision=DOT_PRECISION)
        dk0 = tl.dot(dst, tl.trans(qt0), dk0, input_precision=DOT_PRECISION)
        if D1 > 0:
            dv1 = tl.dot(pdt, do1, dv1, input_precision=DOT_PRECISION)
            dk1 = tl.dot(dst, tl.trans(qt1), dk1, input_precision=DOT_PRECISION)
        if D2 > 0:
            dv2 = tl.dot(pdt, do2, dv2, input_precision=DOT_PRECISION)
            dk2 = tl.dot(dst, tl.trans(qt2), dk2, input_precision=DOT_PRECISION)
    return dk0, dk1, dk2, dv0, dv1, dv2


@triton.jit(do_not_specialize=["max_seqlen_k", "dropout_thr", "seed", "offset"])
def _packed_attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    prefix_lens_ptr,
    schedule_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_dout_t,
    stride_dout_h,
    stride_dk_t,
    stride_dk_h,
    stride_dv_t,
    stride_dv_h,
    total_q,
    max_seqlen_k,
    softmax_scale,
    dropout_scale,
    dropout_thr,
    seed,
    offset,
    GROUP: tl.constexpr,
    MODE: tl.constexpr,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (key-tile schedule capacity, heads_kv): one program per (key tile, kv head); dK and dV are summed
    over the GROUP query heads of the kv head inside the program, in a fixed order."""
    item = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    seg = tl.load(schedule_ptr + 2 * item)
    if seg < 0:
        return
    n0 = tl.load(schedule_ptr + 2 * item + 1)
    q_start, len_q, k_start, len_k, prefix_len = _segment(
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, prefix_lens_ptr, seg, MODE
    )
    k_ptr += kv_head * stride_k_h
    v_ptr += kv_head * stride_v_h
    dk_ptr += kv_head * stride_dk_h
    dv_ptr += kv_head * stride_dv_h

    cols = n0 + tl.arange(0, BLOCK_N)
    key_mask = cols < len_k
    keys = (k_start + cols).to(tl.int64)
    k0 = _load_chunk(k_ptr, keys, key_mask, stride_k_t, 0, D0, HEAD_DIM, True, False)
    v0 = _load_chunk(v_ptr, keys, key_mask, stride_v_t, 0, D0, HEAD_DIM, True, False)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    k1, k2, v1, v2, dk1, dk2, dv1, dv2 = k0, k0, v0, v0, dk0, dk0, dv0, dv0
    if D1 > 0:
        k1 = _load_chunk(k_ptr, keys, key_mask, stride_k_t, D0, D1, HEAD_DIM, True, False)
        v1 = _load_chunk(v_ptr, keys, key_mask, stride_v_t, D0, D1, HEAD_DIM, True, False)
        dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
    if D2 > 0:
        k2 = _load_chunk(k_ptr, keys, key_mask, stride_k_t, D0 + D1, D2, HEAD_DIM, True, False)
        v2 = _load_chunk(v_ptr, keys, key_mask, stride_v_t, D0 + D1, D2, HEAD_DIM, True, False)
        dk2 = tl.zeros([BLOCK_N, D2], tl.float32)
        dv2 = tl.zeros([BLOCK_N, D2], tl.float32)
    qk_scale = softmax_scale * 1.4426950408889634
    m_lo, m_full = _q_range(n0, len_q, len_k, prefix_len, MODE, BLOCK_M, BLOCK_N)

    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_head_ptr = q_ptr + head * stride_q_h
        dout_head_ptr = dout_ptr + head * stride_dout_h
        lse_head_ptr = lse_ptr + head * total_q
        delta_head_ptr = delta_ptr + head * total_q
        ctr_base = offset + head * total_q * max_seqlen_k
        dk0, dk1, dk2, dv0, dv1, dv2 = _dkdv_inner(
            dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2,
            q_head_ptr, dout_head_ptr, lse_head_ptr, delta_head_ptr, stride_q_t, stride_dout_t,
            q_start, len_q, len_k, prefix_len, cols, m_lo, m_full, qk_scale,
            ctr_base, max_seqlen_k, seed, dropout_thr, dropout_scale,
            True, MODE, DROPOUT, HEAD_DIM, D0, D1, D2, BLOCK_M, DOT_PRECISION,
        )  # fmt: skip
        dk0, dk1, dk2, dv0, dv1, dv2 = _dkdv_inner(
            dk0, dk1, dk2, dv0, dv1, dv2, k0, k1, k2, v0, v1, v2,
            q_head_ptr, dout_head_ptr, lse_head_ptr, delta_head_ptr, stride_q_t, stride_dout_t,
            q_start, len_q, len_k, prefix_len, cols, m_full, len_q, qk_scale,
            ctr_base, max_seqlen_k, seed, dropout_thr, dropout_scale,
            False, MODE, DROPOUT, HEAD_DIM, D0, D1, D2, BLOCK_M, DOT_PRECISION,
        )  # fmt: skip

    _store_chunk(dk_ptr, dk0 * softmax_scale, keys, key_mask, stride_dk_t, 0, D0, HEAD_DIM)
    _store_chunk(dv_ptr, dv0, keys, key_mask, stride_dv_t, 0, D0, HEAD_DIM)
    if D1 > 0:
        _store_chunk(dk_ptr, dk1 * softmax_scale, keys, key_mask, stride_dk_t, D0, D1, HEAD_DIM)
        _store_chunk(dv_ptr, dv1, keys, key_mask, stride_dv_t, D0, D1, HEAD_DIM)
    if D2 > 0:
        _store_chunk(dk_ptr, dk2 * softmax_scale, keys, key_mask, stride_dk_t, D0 + D1, D2, HEAD_DIM)
        _store_chunk(dv_ptr, dv2, keys, key_mask, stride_dv_t, D0 + D1, D2, HEAD_DIM)


@triton.jit
def _dq_inner(
    dq0,
    dq1,
    dq2,
    q0,
    q1,
    q2,
    do0,
    do1,
    do2,
    k_ptr,
    v_ptr,
    stride_k_t,
    stride_v_t,
    k_start,
    len_k,
    n_lo,
    n_hi,
    row_end,
    row_ctr,
    lse2,
    delta,
    qk_scale,
    seed,
    dropout_thr,
    dropout_scale,
    MASKED: tl.constexpr,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulates dQ (unscaled) of one query tile over the key tiles starting in [n_lo, n_hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + offs_n
        keys = (k_start + cols).to(tl.int64)
        key_mask = cols < len_k
        kt0 = _load_chunk(k_ptr, keys, key_mask, stride_k_t, 0, D0, HEAD_DIM, MASKED, True)
        s = tl.dot(q0, kt0, input_precision=DOT_PRECISION)
        dp = tl.dot(
            do0,
            _load_chunk(v_ptr, keys, key_mask, stride_v_t, 0, D0, HEAD_DIM, MASKED, True),
            input_precision=DOT_PRECISION,
        )
        kt1, kt2 = kt0, kt0
        if D1 > 0:
            kt1 = _load_chunk(k_ptr, keys, key_mask, stride_k_t, D0, D1, HEAD_DIM, MASKED, True)
            s = tl.dot(q1, kt1, s, input_precision=DOT_PRECISION)
            dp = tl.dot(
                do1,
                _load_chunk(v_ptr, keys, key_mask, stride_v_t, D0, D1, HEAD_DIM, MASKED, True),
                dp,
                input_precision=DOT_PRECISION,
            )
        if D2 > 0:
            kt2 = _load_chunk(k_ptr, keys, key_mask, stride_k_t, D0 + D1, D2, HEAD_DIM, MASKED, True)
            s = tl.dot(q2, kt2, s, input_precision=DOT_PRECISION)
            dp = tl.dot(
                do2,
                _load_chunk(v_ptr, keys, key_mask, stride_v_t, D0 + D1, D2, HEAD_DIM, MASKED, True),
                dp,
                input_precision=DOT_PRECISION,
            )
        s = s * qk_scale
        if MASKED:
            s = tl.where(cols[None, :] < row_end[:, None], s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        if DROPOUT:
            keep = tl.randint(seed, row_ctr[:, None] + cols[None, :]) >= dropout_thr
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = (p * (dp - delta[:, None])).to(kt0.dtype)
        dq0 = tl.dot(ds, tl.trans(kt0), dq0, input_precision=DOT_PRECISION)
        if D1 > 0:
            dq1 = tl.dot(ds, tl.trans(kt1), dq1, input_precision=DOT_PRECISION)
        if D2 > 0:
            dq2 = tl.dot(ds, tl.trans(kt2), dq2, input_precision=DOT_PRECISION)
    return dq0, dq1, dq2


@triton.jit(do_not_specialize=["max_seqlen_k", "dropout_thr", "seed", "offset"])
def _packed_attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    prefix_lens_ptr,
    schedule_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_dout_t,
    stride_dout_h,
    stride_dq_t,
    stride_dq_h,
    total_q,
    max_seqlen_k,
    softmax_scale,
    dropout_scale,
    dropout_thr,
    seed,
    offset,
    GROUP: tl.constexpr,
    MODE: tl.constexpr,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (query-tile schedule capacity, heads): one program per (query tile, head), over the same key tiles
    as the forward."""
    item = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.load(schedule_ptr + 2 * item)
    if seg < 0:
        return
    m0 = tl.load(schedule_ptr + 2 * item + 1)
    q_start, len_q, k_start, len_k, prefix_len = _segment(
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, prefix_lens_ptr, seg, MODE
    )
    head64 = head.to(tl.int64)
    q_ptr += head64 * stride_q_h
    dout_ptr += head64 * stride_dout_h
    dq_ptr += head64 * stride_dq_h
    k_ptr += (head64 // GROUP) * stride_k_h
    v_ptr += (head64 // GROUP) * stride_v_h

    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < len_q
    tokens = (q_start + rows).to(tl.int64)
    row_end = _visible_end(rows, len_q, len_k, prefix_len, MODE)
    q0 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, 0, D0, HEAD_DIM, True, False)
    do0 = _load_chunk(dout_ptr, tokens, row_mask, stride_dout_t, 0, D0, HEAD_DIM, True, False)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    q1, q2, do1, do2, dq1, dq2 = q0, q0, do0, do0, dq0, dq0
    if D1 > 0:
        q1 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, D0, D1, HEAD_DIM, True, False)
        do1 = _load_chunk(dout_ptr, tokens, row_mask, stride_dout_t, D0, D1, HEAD_DIM, True, False)
        dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    if D2 > 0:
        q2 = _load_chunk(q_ptr, tokens, row_mask, stride_q_t, D0 + D1, D2, HEAD_DIM, True, False)
        do2 = _load_chunk(dout_ptr, tokens, row_mask, stride_dout_t, D0 + D1, D2, HEAD_DIM, True, False)
        dq2 = tl.zeros([BLOCK_M, D2], tl.float32)
    # Rows past the segment read lse = +inf, so p = 0 there.
    lse2 = tl.load(lse_ptr + head64 * total_q + tokens, mask=row_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + head64 * total_q + tokens, mask=row_mask, other=0.0)
    qk_scale = softmax_scale * 1.4426950408889634
    row_ctr = offset + (head64 * total_q + tokens) * max_seqlen_k

    n_full, n_end = _kv_range(m0, len_q, len_k, prefix_len, MODE, BLOCK_M, BLOCK_N)
    dq0, dq1, dq2 = _dq_inner(
        dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, k_ptr, v_ptr, stride_k_t, stride_v_t, k_start, len_k,
        0, n_full, row_end, row_ctr, lse2, delta, qk_scale, seed, dropout_thr, dropout_scale,
        False, DROPOUT, HEAD_DIM, D0, D1, D2, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq0, dq1, dq2 = _dq_inner(
        dq0, dq1, dq2, q0, q1, q2, do0, do1, do2, k_ptr, v_ptr, stride_k_t, stride_v_t, k_start, len_k,
        n_full, n_end, row_end, row_ctr, lse2, delta, qk_scale, seed, dropout_thr, dropout_scale,
        True, DROPOUT, HEAD_DIM, D0, D1, D2, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    _store_chunk(dq_ptr, dq0 * softmax_scale, tokens, row_mask, stride_dq_t, 0, D0, HEAD_DIM)
    if D1 > 0:
        _store_chunk(dq_ptr, dq1 * softmax_scale, tokens, row_mask, stride_dq_t, D0, D1, HEAD_DIM)
    if D2 > 0:
        _store_chunk(dq_ptr, dq2 * softmax_scale, tokens, row_mask, stride_dq_t, D0 + D1, D2, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------------
# Tile accounting (benchmarks and tests): the kernels' own tile ranges, per work item
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _count_tiles_kernel(
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    prefix_lens_ptr,
    schedule_ptr,
    counts_ptr,
    MODE: tl.constexpr,
    KEY_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """counts (capacity, 2) int32: (tiles visited, of which masked) by the program of each work item, from the
    same _kv_range / _q_range the attention kernels loop over. KEY_TILES: the dK/dV schedule (key tiles)."""
    item = tl.program_id(0)
    seg = tl.load(schedule_ptr + 2 * item)
    visited = seg * 0
    masked = seg * 0
    if seg >= 0:
        start = tl.load(schedule_ptr + 2 * item + 1)
        _, len_q, _, len_k, prefix_len = _segment(cu_seqlens_q_ptr, cu_seqlens_k_ptr, prefix_lens_ptr, seg, MODE)
        if KEY_TILES:
            m_lo, m_full = _q_range(start, len_q, len_k, prefix_len, MODE, BLOCK_M, BLOCK_N)
            masked = (m_full - m_lo) // BLOCK_M
            visited = masked + tl.cdiv(tl.maximum(len_q - m_full, 0), BLOCK_M)
        else:
            n_full, n_end = _kv_range(start, len_q, len_k, prefix_len, MODE, BLOCK_M, BLOCK_N)
            masked = tl.cdiv(n_end - n_full, BLOCK_N)
            visited = masked + n_full // BLOCK_N
    tl.store(counts_ptr + 2 * item, visited)
    tl.store(counts_ptr + 2 * item + 1, masked)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    BLOCK_M: int  # queries per tile
    BLOCK_N: int  # keys per tile
    num_warps: int
    num_stages: int


# Block sizes for H100 (sm90). NOTE: not timed -- no GPU was available. Chosen by compiling every kernel for sm90
# with Triton 3.9 on the CPU machine (triton.compile with a GPUTarget, 16-byte-divisible pointers and strides as
# the JIT specialises them, then ptxas -v) over head dims 32-128, causal and prefix + dropout, and taking the
# largest tiles with no register spills that keep K/V loads pipelined (cp.async) into wgmma:
#  - forward 128 x 64, 8 warps, 3 stages: no spills at any head dim, with or without dropout (4 warps spills
#    124-1978 bytes at d = 64-128, and 2-4 KiB with dropout; 128 x 128 spills with dropout). 128 KiB of shared
#    memory at d = 128.
#  - dK/dV 32 queries x 128 keys, 8 warps, 2 stages (the Triton tutorial's backward tile): no spills without
#    dropout up to d = 128 except 28 bytes at d = 112, 8-80 bytes with dropout at d >= 80; 4 warps or 64 x 128
#    spill hundreds of bytes to KiBs.
#  - dQ 128 queries x 32 keys, 8 warps: no spills anywhere (128 x 64 spills with dropout).
# 8 warps everywhere also means two warpgroups per 128-row tile. Float32 uses ieee dots on CUDA cores (a
# correctness path): 32 x 32 tiles; 4 warps up to d = 64, 8 above (still 32-412 bytes of spills at d = 128).
# To be tuned by timing on the GPU: `bench_packed_attention.py --device cuda` ends with a sweep of alternatives
# (SWEEP_TILES there, swapped in through override_tiles below) timed beside these tables. @triton.autotune is left
# out: it needs a GPU driver to benchmark, the interpreter has none, and the schedules depend on the block sizes.
def _fwd_tiles(head_dim: int, dtype: torch.dtype) -> _Tiles:
    if dtype == torch.float32:
        return _Tiles(32, 32, 4 if head_dim <= 64 else 8, 2)
    return _TILE_OVERRIDES.get("fwd") or _Tiles(128, 64, 8, 3)


def _dkdv_tiles(head_dim: int, dtype: torch.dtype) -> _Tiles:
    if dtype == torch.float32:
        return _Tiles(32, 32, 4 if head_dim <= 64 else 8, 2)
    return _TILE_OVERRIDES.get("dkdv") or _Tiles(32, 128, 8, 2)


def _dq_tiles(head_dim: int, dtype: torch.dtype) -> _Tiles:
    if dtype == torch.float32:
        return _Tiles(32, 32, 4 if head_dim <= 64 else 8, 2)
    return _TILE_OVERRIDES.get("dq") or _Tiles(128, 32, 8, 3 if head_dim <= 64 else 2)


# Tiles that replace the float16 / bfloat16 tables above, per kernel ("fwd", "dkdv", "dq"), while override_tiles is
# active: for tuning runs (benchmarks/bench_packed_attention.py times alternatives side by side on a GPU). Empty in
# normal use.
_TILE_OVERRIDES: dict[str, _Tiles] = {}


@contextlib.contextmanager
def override_tiles(**tiles: tuple[int, int, int, int]):
    """Within this context the half-precision kernels named by the keywords (fwd, dkdv, dq) launch with the given
    (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of the tuned tables; for tuning runs only. Not thread-safe:
    the override is process-wide while active."""
    unknown = set(tiles) - {"fwd", "dkdv", "dq"}
    if unknown:
        raise ValueError(f"override_tiles: unknown kernel(s) {sorted(unknown)}; expected fwd, dkdv, dq")
    saved = dict(_TILE_OVERRIDES)
    _TILE_OVERRIDES.update({name: _Tiles(*t) for name, t in tiles.items()})
    try:
        yield
    finally:
        _TILE_OVERRIDES.clear()
        _TILE_OVERRIDES.update(saved)


def _dot_precision(dtype: torch.dtype) -> str:
    # NOTE: float32 tl.dot defaults to TF32 on NVIDIA GPUs (10-bit mantissa); the float32 path must be float32.
    return "ieee" if dtype == torch.float32 else "tf32"


def head_dim_chunks(head_dim: int) -> tuple[int, int, int]:
    """The head dim as up to three power-of-two chunks >= 16 (0 for an absent chunk): 80 -> (64, 16, 0),
    96 -> (64, 32, 0), 112 -> (64, 32, 16). Only when three chunks do not sum to head_dim exactly (e.g. 40,
    120) is the last one rounded up and its extra columns masked."""
    chunks = []
    rest = head_dim
    while rest > 0 and len(chunks) < 2:
        c = 1 << (rest.bit_length() - 1)
        if c < 16:
            break
        chunks.append(c)
        rest -= c
    if rest > 0:
        chunks.append(max(16, triton.next_power_of_2(rest)))
    return tuple(chunks + [0] * (3 - len(chunks)))


def head_dim_supported(head_dim: int) -> bool:
    """Head dims the launchers take: 8 to 128, multiples of 8 (exact, no padding, for multiples of 16)."""
    return 8 <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every tensor the launchers return (tests swap it for a NaN-filled one to prove every
    element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rowwise(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along the head dim (the kernels take any token and head strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _dropout_args(dropout_p: float) -> tuple[bool, float, int]:
    # Same threshold as mmcore.ops._philox.dropout_threshold: a draw below floor(p * 2**32) is dropped.
    if dropout_p > 0.0:
        return True, 1.0 / (1.0 - dropout_p), int(dropout_p * 4294967296.0)
    return False, 1.0, 0


def _mode_args(mode: int, prefix_lens: Optional[torch.Tensor], cu_seqlens_q: torch.Tensor):  # noqa: UP045
    """(MODE constexpr, prefix_lens pointer): a prefix mode without prefix lengths is causal; the pointer is a
    placeholder, never read, outside prefix mode."""
    if mode == 2 and prefix_lens is None:
        mode = 1
    prefix = prefix_lens.to(torch.int32).contiguous() if mode == 2 else cu_seqlens_q
    return mode, prefix


# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------


def schedule_capacity(num_segments: int, total: int, block_size: int) -> int:
    """Rows of a schedule: num_segments + total // block_size >= sum over segments of cdiv(L_s, block_size)."""
    return num_segments + total // block_size


def build_schedule(cu_seqlens: torch.Tensor, total: int, block_size: int) -> torch.Tensor:
    """Work items (segment, tile start within the segment) of the tiles of block_size tokens of each segment,
    in segment order, as int32 (capacity, 2); unused rows are (-1, -1). Torch ops on cu_seqlens' device, no host
    synchronisation. total: tokens in the packed tensor (>= cu_seqlens[-1]). Identical to the C++ op
    ``mmcore::packed_attention_schedule``."""
    num_segments = cu_seqlens.numel() - 1
    capacity = schedule_capacity(num_segments, total, block_size)
    device = cu_seqlens.device
    if num_segments <= 0 or capacity == 0:
        return torch.full((capacity, 2), -1, dtype=torch.int32, device=device)
    # int32 throughout: item < capacity <= segments + total and start <= total.
    tiles = torch.diff(cu_seqlens.to(torch.int32)).add_(block_size - 1).div_(block_size, rounding_mode="floor")
    ends = torch.cumsum(tiles, 0, dtype=torch.int32)  # (segments,) one past each segment's last item
    item = torch.arange(capacity, dtype=torch.int32, device=device)
    seg = torch.searchsorted(ends, item, right=True, out_int32=True)  # == num_segments past the last item
    first = torch.nn.functional.pad(ends - tiles, (0, 1))  # each segment's first item, and a sentinel
    out = torch.stack([seg, (item - first[seg]) * block_size], 1)
    return out.masked_fill_((seg == num_segments)[:, None], -1)


_CPP_SCHEDULE: Optional[bool] = None  # noqa: UP045
# (id(cu_seqlens), its version counter, total, block_size) -> (cu_seqlens, schedule), most recent last.
_SCHEDULE_CACHE: "OrderedDict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_SCHEDULE_CACHE_SIZE = 32


def _cpp_schedule_available() -> bool:
    global _CPP_SCHEDULE
    if _CPP_SCHEDULE is None:
        from mmcore import _extension  # loads mmcore._C, which registers the op's CPU kernel

        _CPP_SCHEDULE = _extension.extension() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            "mmcore::packed_attention_schedule", "CPU"
        )
    return _CPP_SCHEDULE


def _schedule(cu_seqlens: torch.Tensor, total: int, block_size: int) -> torch.Tensor:
    """The schedule of cu_seqlens: the C++ op for real CPU tensors (the interpreter path), the torch-ops builder
    on GPUs and when traced.

    Eagerly, schedules are cached per cu_seqlens tensor object and its version counter (the cache holds the
    tensor, so its id is not reused): every layer of a model, forward and backward, passes the same cu_seqlens,
    and building a schedule is about fifteen small launches -- as long as the attention kernel itself for a few
    ViT images. NOTE: a write that bypasses autograd's version counter (``.data``, a raw kernel) is not seen."""
    traced = is_fake(cu_seqlens) or torch.compiler.is_compiling()
    # Inference tensors have no version counter, so they are never cached.
    cacheable = not traced and not cu_seqlens.is_inference()
    key = (id(cu_seqlens), cu_seqlens._version, total, block_size) if cacheable else None
    if cacheable:
        hit = _SCHEDULE_CACHE.get(key)
        if hit is not None and hit[0] is cu_seqlens:
            _SCHEDULE_CACHE.move_to_end(key)
            return hit[1]
    if cu_seqlens.device.type == "cpu" and not traced and _cpp_schedule_available():
        schedule = torch.ops.mmcore.packed_attention_schedule(cu_seqlens, total, block_size)
    else:
        schedule = build_schedule(cu_seqlens, total, block_size)
    if cacheable:
        _SCHEDULE_CACHE[key] = (cu_seqlens, schedule)
        while len(_SCHEDULE_CACHE) > _SCHEDULE_CACHE_SIZE:
            _SCHEDULE_CACHE.popitem(last=False)
    return schedule


def tile_counts(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    mode: int,
    prefix_lens: Optional[torch.Tensor] = None,  # noqa: UP045
    *,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
) -> dict[str, int]:
    """Tiles the kernels visit for a layout, per head, against the minimum: the number of (query tile, key
    tile) pairs of the segment-local tiling that hold at least one visible (query, key) pair, counted from
    the materialised mask. Keys ``{fwd,dkdv,dq}_{visited,masked,minimum}`` (forward and dQ programs walk key
    tiles of their query tile, dK/dV programs query tiles of their key tile; "masked" ones apply the mask).
    Runs the counting kernel on cu_seqlens' device (a GPU, or CPU under TRITON_INTERPRET=1); synchronises."""
    from mmcore.ops.attention import visible_mask

    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(torch.int32).contiguous(), cu_seqlens_k.to(torch.int32).contiguous()
    mode_c, prefix = _mode_args(mode, prefix_lens, cu_seqlens_q)
    total_q, total_k = int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    plens = prefix_lens.tolist() if (mode == 2 and prefix_lens is not None) else [0] * (len(cq) - 1)
    mode_name = ("full", "causal", "prefix")[mode]
    result = {}
    for name, tiles, key_tiles in (
        ("fwd", _fwd_tiles(head_dim, dtype), False),
        ("dkdv", _dkdv_tiles(head_dim, dtype), True),
        ("dq", _dq_tiles(head_dim, dtype), False),
    ):
        bm, bn = tiles.BLOCK_M, tiles.BLOCK_N
        schedule = _schedule(cu_seqlens_k if key_tiles else cu_seqlens_q, total_k if key_tiles else total_q,
                             bn if key_tiles else bm)  # fmt: skip
        counts = torch.empty((schedule.shape[0], 2), dtype=torch.int32, device=schedule.device)
        if schedule.shape[0]:
            wrap_triton(_count_tiles_kernel)[(schedule.shape[0],)](
                cu_seqlens_q, cu_seqlens_k, prefix, schedule, counts,
                MODE=mode_c, KEY_TILES=key_tiles, BLOCK_M=bm, BLOCK_N=bn,
            )  # fmt: skip
        minimum = 0
        for s in range(len(cq) - 1):
            lq, lk = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
            if lq == 0 or lk == 0:
                continue
            vis = torch.zeros(triton.cdiv(lq, bm) * bm, triton.cdiv(lk, bn) * bn, dtype=torch.bool)
            vis[:lq, :lk] = visible_mask(lq, lk, mode_name, plens[s])
            minimum += int(vis.reshape(-1, bm, vis.shape[1] // bn, bn).any(3).any(1).sum())
        result[f"{name}_visited"] = int(counts[:, 0].sum())
        result[f"{name}_masked"] = int(counts[:, 1].sum())
        result[f"{name}_minimum"] = minimum
    return result


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _packed_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    mode: int,
    prefix_lens: Optional[torch.Tensor],  # noqa: UP045  (triton_op infers the schema from this annotation)
    softmax_scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed attention forward. q (total_q, heads, head_dim), k/v (total_k, heads_kv, head_dim), cu_seqlens
    int32 (segments + 1,), validated by the caller (cu_seqlens[-1] == total). Returns out (total_q, heads,
    head_dim) in q's dtype and lse (heads, total_q) float32 of the softmax before dropout, +inf for rows that
    see no key (their out row is 0)."""
    q, k, v = _rowwise(q), _rowwise(k), _rowwise(v)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, heads, head_dim = q.shape
    heads_kv = k.shape[1]
    out = _empty((total_q, heads, head_dim), q.dtype, q.device)
    lse = _empty((heads, total_q), torch.float32, q.device)
    tiles = _fwd_tiles(head_dim, q.dtype)
    schedule = _schedule(cu_seqlens_q, total_q, tiles.BLOCK_M)
    if schedule.shape[0] == 0 or heads == 0:
        return out, lse
    mode, prefix = _mode_args(mode, prefix_lens, cu_seqlens_q)
    dropout, dropout_scale, dropout_thr = _dropout_args(dropout_p)
    d0, d1, d2 = head_dim_chunks(head_dim)
    wrap_triton(_packed_attention_fwd_kernel)[(schedule.shape[0], heads)](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix, schedule,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total_q, max_seqlen_k, softmax_scale, dropout_scale, dropout_thr, seed, offset,
        GROUP=heads // heads_kv, MODE=mode, DROPOUT=dropout, HEAD_DIM=head_dim, D0=d0, D1=d1, D2=d2,
        BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return out, lse


def _packed_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    mode: int,
    prefix_lens: Optional[torch.Tensor],  # noqa: UP045  (triton_op infers the schema from this annotation)
    softmax_scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed attention backward: (dq, dk, dv) in the dtypes of q, k, v, from dout and out (total_q, heads,
    head_dim) and the forward's lse (heads, total_q); dropout is regenerated from (seed, offset)."""
    dout, q, k, v, out = _rowwise(dout), _rowwise(q), _rowwise(k), _rowwise(v), _rowwise(out)
    lse = lse.contiguous()
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, heads, head_dim = q.shape
    total_k, heads_kv, _ = k.shape
    dq = _empty((total_q, heads, head_dim), q.dtype, q.device)
    dk = _empty((total_k, heads_kv, head_dim), k.dtype, k.device)
    dv = _empty((total_k, heads_kv, head_dim), v.dtype, v.device)
    if heads == 0 or head_dim == 0:
        return dq, dk, dv
    mode, prefix = _mode_args(mode, prefix_lens, cu_seqlens_q)
    dropout, dropout_scale, dropout_thr = _dropout_args(dropout_p)
    d0, d1, d2 = head_dim_chunks(head_dim)
    precision = _dot_precision(q.dtype)

    delta = _empty((heads, total_q), torch.float32, q.device)
    if total_q:
        block_t = 64
        wrap_triton(_bwd_preprocess_kernel)[(triton.cdiv(total_q, block_t), heads)](
            out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), total_q,
            HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip

    tiles = _dkdv_tiles(head_dim, q.dtype)
    schedule = _schedule(cu_seqlens_k, total_k, tiles.BLOCK_N)
    if schedule.shape[0]:
        wrap_triton(_packed_attention_bwd_dkdv_kernel)[(schedule.shape[0], heads_kv)](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, prefix, schedule,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            total_q, max_seqlen_k, softmax_scale, dropout_scale, dropout_thr, seed, offset,
            GROUP=heads // heads_kv, MODE=mode, DROPOUT=dropout, HEAD_DIM=head_dim, D0=d0, D1=d1, D2=d2,
            BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, DOT_PRECISION=precision,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip

    tiles = _dq_tiles(head_dim, q.dtype)
    schedule = _schedule(cu_seqlens_q, total_q, tiles.BLOCK_M)
    if schedule.shape[0]:
        wrap_triton(_packed_attention_bwd_dq_kernel)[(schedule.shape[0], heads)](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, prefix, schedule,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            total_q, max_seqlen_k, softmax_scale, dropout_scale, dropout_thr, seed, offset,
            GROUP=heads // heads_kv, MODE=mode, DROPOUT=dropout, HEAD_DIM=head_dim, D0=d0, D1=d1, D2=d2,
            BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, DOT_PRECISION=precision,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return dq, dk, dv
