"""Triton kernel for the fused grounded decoding step (semantics and reference: mmcore/ops/decoding.py).

One program per row, one launch per step. The program loops over the vocabulary in BLOCK_V chunks:

  mask     logits -> grammar and min-new-tokens masks (and / temperature when sampling) -> ``scores`` (workspace)
  n-gram   windows of the row's sequence whose first n - 1 tokens equal its last n - 1 store -inf at their last token
  max      the maximum and its first index; a row left with no finite score gets 0 on the grammar's allowed tokens
  top-k    the k-th largest score, as a 32-bit order-preserving key built bit by bit from the top: one counting
           pass per bit (32 passes, no sort, no extra memory)
  top-p    the cutoff key, by the same search on the weight ``exp(x - max)`` of the keys at or above a candidate
  sample   the kept weight, then the first token whose running weight exceeds ``u * total`` (u from tl.randint)
  scores   only when asked: the kept scores, -inf elsewhere
and then the scalar state update. The scattered n-gram stores and the fallback rewrite are read back by other
threads of the program (or overwrite what they stored), hence the tl.debug_barrier() around them.

NOTE: the top-k / top-p searches read the row 32 times each; at vocab 65,037 that is 8 MB per search from L2
per row -- tens of microseconds -- which a radix select with tl.histogram could cut, but only the counts of top-k
fit tl.histogram (top-p needs weighted buckets). Greedy decoding (Kosmos-2's default) runs none of them.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# NOTE: a tl.constexpr: compiled kernels may read module globals only in that form (the interpreter takes any value).
NEG_INF = tl.constexpr(float("-inf"))
BLOCK_V_MAX = 2048  # vocabulary chunk: 8 floats per thread at 8 warps; the kernel is L2-bound, not tuned further
BLOCK_L = 128  # n-gram windows compared per iteration (Kosmos-2 sequences are a few hundred tokens)


@triton.jit
def _allowed(v, state, top_left, object_open, object_close, delimiter, first_loc, num_bins):
    """Tokens ``v`` the box grammar allows in ``state`` (codes of mmcore.ops.decoding.BOX_STATES)."""
    is_loc = (v >= first_loc) & (v < first_loc + num_bins * num_bins)
    idx = tl.maximum(v - first_loc, 0)
    below_right = (idx // num_bins >= top_left // num_bins) & (idx % num_bins >= top_left % num_bins)
    closes = (v == object_close) | (v == delimiter)
    ok = tl.where(state == 0, (is_loc == 0) & (closes == 0), closes)  # TEXT; anything else: EXPECT_CLOSE
    ok = tl.where(state == 1, v == object_open, ok)  # AFTER_PHRASE
    ok = tl.where(state == 2, is_loc, ok)  # EXPECT_TOP_LEFT
    ok = tl.where(state == 3, is_loc & below_right, ok)  # EXPECT_BOTTOM_RIGHT
    return ok


@triton.jit
def _order_key(x):
    """float32 -> int64 key in [0, 2**32) with the order of the values (-0.0 and +0.0 share a key)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits + 2147483648, -1 - bits)


@triton.jit(do_not_specialize=["batch", "vocab", "max_len", "min_new_tokens", "top_k", "seed"])
def _grounded_decode_step_kernel(
    logits_ptr,
    seq_ptr,
    lengths_ptr,
    starts_ptr,
    box_state_ptr,
    top_left_ptr,
    steps_ptr,
    finished_ptr,
    scores_ptr,
    out_ptr,
    stride_logits_b,
    stride_seq_b,
    stride_scores_b,
    batch,
    vocab,
    max_len,
    phrase_close,
    object_open,
    object_close,
    delimiter,
    first_loc,
    num_bins,
    eos,
    pad,
    min_new_tokens,
    temperature,
    top_k,
    top_p: tl.float64,
    seed,
    NGRAM: tl.constexpr,
    CONSTRAIN: tl.constexpr,
    DO_SAMPLE: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    WRITE_SCORES: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    length = tl.load(lengths_ptr + row)
    start = tl.load(starts_ptr + row)
    state = tl.load(box_state_ptr + row)
    top_left = tl.load(top_left_ptr + row)
    step = tl.load(steps_ptr + row)
    finished = tl.load(finished_ptr + row)
    logits_row = logits_ptr + row * stride_logits_b
    scores_row = scores_ptr + row * stride_scores_b
    seq_row = seq_ptr + row * stride_seq_b
    offs = tl.arange(0, BLOCK_V)
    suppress_eos = step < min_new_tokens

    # ---- masks (and temperature) into the workspace
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + offs
        in_v = v < vocab
        x = tl.load(logits_row + v, mask=in_v, other=0.0).to(tl.float32)
        ok = (v != eos) | (suppress_eos == 0)
        if CONSTRAIN:
            ok = ok & _allowed(v, state, top_left, object_open, object_close, delimiter, first_loc, num_bins)
        if DO_SAMPLE:
            x = tl.math.div_rn(x, tl.zeros_like(x) + temperature)
        tl.store(scores_row + v, tl.where(ok, x, NEG_INF), mask=in_v)

    # ---- no-repeat-n-gram: window j = seq[j : j + NGRAM] for j in [start, length - NGRAM]
    if NGRAM > 0:
        tl.debug_barrier()  # the scattered -inf must land after every thread's masked store
        if length - start >= NGRAM:
            last = length - NGRAM
            for j0 in range(start, last + 1, BLOCK_L):
                j = j0 + tl.arange(0, BLOCK_L)
                match = j <= last
                for i in tl.static_range(NGRAM - 1):
                    want = tl.load(seq_row + last + 1 + i)
                    got = tl.load(seq_row + j + i, mask=match, other=-1)
                    match = match & (got == want)
                banned = tl.load(seq_row + j + NGRAM - 1, mask=match, other=0)
                hit = match & (banned >= 0) & (banned < vocab)
                tl.store(scores_row + banned, tl.full([BLOCK_L], NEG_INF, tl.float32), mask=hit)
    tl.debug_barrier()

    # ---- maximum and its first index
    best = tl.full([], NEG_INF, tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + offs
        x = tl.load(scores_row + v, mask=v < vocab, other=NEG_INF)
        block_max = tl.max(x, 0)
        block_idx = v0 + tl.argmax(x, 0, tie_break_left=True)
        better = block_max > best
        best_idx = tl.where(better, block_idx, best_idx)
        best = tl.where(better, block_max, best)

    # ---- nothing finite left: the grammar's allowed tokens with score 0
    if best == NEG_INF:
        tl.debug_barrier()
        first = tl.full([], 0, tl.int32) + vocab
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + offs
            in_v = v < vocab
            ok = in_v
            if CONSTRAIN:
                ok = ok & _allowed(v, state, top_left, object_open, object_close, delimiter, first_loc, num_bins)
            tl.store(scores_row + v, tl.where(ok, 0.0, NEG_INF), mask=in_v)
            first = tl.minimum(first, tl.min(tl.where(ok, v, vocab), 0))
        best = tl.full([], 0.0, tl.float32)
        best_idx = first
        tl.debug_barrier()

    next_token = best_idx.to(tl.int64)
    if DO_SAMPLE:
        # ---- top-k: the largest key K with #(key >= K) >= top_k is the k-th largest score's key
        key_k = tl.full([], 0, tl.int64)
        if TOP_K:
            bit = tl.full([], 2147483648, tl.int64)
            for _ in range(32):
                cand = key_k + bit
                count = tl.full([], 0, tl.int32)
                for v0 in range(0, vocab, BLOCK_V):
                    v = v0 + offs
                    x = tl.load(scores_row + v, mask=v < vocab, other=NEG_INF)
                    count += tl.sum(((_order_key(x) >= cand) & (v < vocab)).to(tl.int32), 0)
                key_k = tl.where(count >= top_k, cand, key_k)
                bit = bit // 2
        key_cut = key_k
        if TOP_P:
            # ---- top-p: the largest key J whose weight at or above it reaches top_p * total; keep keys >= J
            total = tl.full([], 0.0, tl.float64)
            for v0 in range(0, vocab, BLOCK_V):
                v = v0 + offs
                x = tl.load(scores_row + v, mask=v < vocab, other=NEG_INF)
                total += tl.sum(tl.where(_order_key(x) >= key_k, tl.exp(x - best), 0.0).to(tl.float64), 0)
            mass = top_p * total
            key_p = tl.full([], 0, tl.int64)
            bit = tl.full([], 2147483648, tl.int64)
            for _ in range(32):
                cand = key_p + bit
                above = tl.full([], 0.0, tl.float64)
                for v0 in range(0, vocab, BLOCK_V):
                    v = v0 + offs
                    x = tl.load(scores_row + v, mask=v < vocab, other=NEG_INF)
                    key = _order_key(x)
                    w = tl.where((key >= cand) & (key >= key_k), tl.exp(x - best), 0.0)
                    above += tl.sum(w.to(tl.float64), 0)
                key_p = tl.where(above >= mass, cand, key_p)
                bit = bit // 2
            # the largest score is always kept (min_tokens_to_keep=1; also top_p = 0)
            key_p = tl.minimum(key_p, _order_key(best))
            key_cut = tl.maximum(key_k, key_p)

        # ---- inverse-CDF sample over the kept tokens, in vocabulary order
        kept_total = tl.full([], 0.0, tl.float64)
        last_kept = tl.full([], 0, tl.int32)
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + offs
            x = tl.load(scores_row + v, mask=v < vocab, other=NEG_INF)
            w = tl.where(_order_key(x) >= key_cut, tl.exp(x - best), 0.0).to(tl.float64)
            kept_total += tl.sum(w, 0)
            last_kept = tl.maximum(last_kept, tl.max(tl.where(w > 0.0, v, 0), 0))
        draw = tl.randint(seed, step * batch + row).to(tl.int64) & 0xFFFFFFFF
        target = draw.to(tl.float64) * (1.0 / 4294967296.0) * kept_total
        running = tl.full([], 0.0, tl.float64)
        chosen = tl.full([], 0, tl.int32) + vocab
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + offs
            x = tl.load(scores_row + v, mask=v < vocab, other=NEG_INF)
            w = tl.where(_order_key(x) >= key_cut, tl.exp(x - best), 0.0).to(tl.float64)
            cdf = running + tl.cumsum(w, 0)
            chosen = tl.minimum(chosen, tl.min(tl.where((cdf > target) & (w > 0.0), v, vocab), 0))
            running += tl.sum(w, 0)
        # NOTE: float64 rounding can leave the last running sum a hair below the target: take the last kept token.
        next_token = tl.where(chosen < vocab, chosen, last_kept).to(tl.int64)

        if WRITE_SCORES and (TOP_K or TOP_P):
            tl.debug_barrier()
            for v0 in range(0, vocab, BLOCK_V):
                v = v0 + offs
                x = tl.load(scores_row + v, mask=v < vocab, other=NEG_INF)
                tl.store(scores_row + v, tl.where(_order_key(x) >= key_cut, x, NEG_INF), mask=v < vocab)

    # ---- state update: finished rows emit pad; append; grammar transition
    next_token = tl.where(finished, pad, next_token)
    tl.store(out_ptr + row, next_token)
    tl.store(seq_row + length, next_token, mask=length < max_len)
    tl.store(lengths_ptr + row, length + 1)
    tl.store(steps_ptr + row, step + 1)
    tl.store(finished_ptr + row, finished | (next_token == eos))
    is_loc = (next_token >= first_loc) & (next_token < first_loc + num_bins * num_bins)
    new_state = tl.where(is_loc & (state == 3), 4, 0)
    new_state = tl.where(is_loc & (state == 2), 3, new_state)
    new_state = tl.where((next_token == delimiter) & (state == 4), 2, new_state)
    new_state = tl.where(next_token == object_open, 2, new_state)
    new_state = tl.where(next_token == phrase_close, 1, new_state)
    tl.store(box_state_ptr + row, new_state.to(tl.int64))
    tl.store(top_left_ptr + row, tl.where(new_state == 3, next_token - first_loc, -1).to(tl.int64))


def _grounded_decode_step(
    logits: torch.Tensor,
    sequences: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor,
    box_state: torch.Tensor,
    top_left: torch.Tensor,
    steps: torch.Tensor,
    finished: torch.Tensor,
    scores: torch.Tensor | None,
    special_tokens: list[int],
    no_repeat_ngram_size: int,
    min_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    constrain_boxes: bool,
) -> torch.Tensor:
    """Launcher (arguments as the ``mmcore::grounded_decode_step`` schema, already validated): logits (batch,
    vocab) with unit stride over the vocabulary; state tensors contiguous int64 (finished bool); scores None or a
    contiguous (batch, vocab) float32 output. Returns the next tokens (batch,) int64."""
    batch, vocab = logits.shape
    _, phrase_close, object_open, object_close, delimiter, first_loc, num_bins, eos, pad = special_tokens
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    workspace = scores if scores is not None else torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)
    block_v = min(BLOCK_V_MAX, triton.next_power_of_2(vocab))
    wrap_triton(_grounded_decode_step_kernel)[(batch,)](
        logits,
        sequences,
        lengths,
        starts,
        box_state,
        top_left,
        steps,
        finished,
        workspace,
        out,
        logits.stride(0),
        sequences.stride(0),
        workspace.stride(0),
        batch,
        vocab,
        sequences.shape[1],
        phrase_close,
        object_open,
        object_close,
        delimiter,
        first_loc,
        num_bins,
        eos,
        pad,
        min_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        NGRAM=no_repeat_ngram_size,
        CONSTRAIN=constrain_boxes,
        DO_SAMPLE=do_sample,
        TOP_K=0 < top_k < vocab,
        TOP_P=top_p < 1.0,
        WRITE_SCORES=scores is not None,
        BLOCK_V=block_v,
        BLOCK_L=BLOCK_L,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return out
