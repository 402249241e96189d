"""Packed (varlen) attention over concatenated samples, and dense attention served by the same kernels.

Layout (flash-attn's varlen, DESIGN.md "Data layout: packed sequences"): ``q (total_q, heads, head_dim)``,
``k, v (total_k, heads_kv, head_dim)``, ``cu_seqlens_q / cu_seqlens_k`` int32 ``(segments + 1,)``. Segment s
holds queries ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and keys ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``; tokens
never attend across segments. Query i and key j (counted within their segment, Lq and Lk its lengths) see
each other when

    full     always
    causal   j <= i + (Lk - Lq)                    (bottom-right aligned when Lq < Lk)
    prefix   j <= i + (Lk - Lq)  or  j < prefix_lens[s]

Query head h reads key/value head ``h // (heads // heads_kv)`` (GQA). A row with no visible key gives zeros
and log-sum-exp +inf. Dropout keeps an element by the counter-based draw of ``mmcore.ops._philox``.
"""

from __future__ import annotations

import math

import torch

from mmcore.ops._philox import dropout_keep_mask

MODES = {"full": 0, "causal": 1, "prefix": 2}


def visible_mask(lq: int, lk: int, mode: str, prefix_len: int = 0, device=None) -> torch.Tensor:
    """(lq, lk) bool: which keys each query of one segment may attend to."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    if mode == "full":
        return torch.ones(lq, lk, dtype=torch.bool, device=device)
    causal = j <= i + (lk - lq)
    return causal if mode == "causal" else causal | (j < prefix_len)


def packed_attention_ref(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    *,
    mode="full",
    prefix_lens=None,
    softmax_scale=None,
    dropout_p=0.0,
    seed=0,
    offset=0,
    upcast=True,
    return_lse=False,
):
    """Reference packed attention in plain PyTorch: one segment at a time, a materialised (Lq, Lk) mask.

    upcast: compute in float64 (True) or in the inputs' dtype (False, the "PyTorch in that dtype" baseline of
    the tolerance rule). Differentiable through autograd. Returns out (total_q, heads, head_dim) in q's
    dtype, and with return_lse also lse (heads, total_q) float32 (+inf for rows that see no key).
    """
    total_q, heads, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads // heads_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
    dtype = torch.float64 if upcast else q.dtype
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        lq, lk = q1 - q0, k1 - k0
        qs = q[q0:q1].to(dtype).transpose(0, 1)  # (heads, lq, d)
        ks = k[k0:k1].to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[k0:k1].to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        plen = int(prefix_lens[s]) if prefix_lens is not None else 0
        mask = visible_mask(lq, lk, mode, plen, q.device)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (heads, lq); -inf where no key is visible
        empty = ~mask.any(-1)  # (lq,)
        probs = torch.exp(scores - lse[..., None].masked_fill(empty[:, None], 0.0))
        probs = probs.masked_fill(~mask, 0.0)
        if dropout_p > 0.0:
            rows = torch.arange(q0, q1, device=q.device)[:, None]
            cols = torch.arange(lk, device=q.device)[None, :]
            keep = torch.stack(
                [dropout_keep_mask(seed, offset, h, rows, cols, total_q, max_seqlen_k, dropout_p) for h in range(heads)]
            )
            probs = probs * keep / (1.0 - dropout_p)
        outs.append((probs @ vs).transpose(0, 1))
        lses.append(lse.masked_fill(empty[None, :], float("inf")))
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, heads, head_dim, dtype=dtype)
    out = out.reshape(total_q, heads, head_dim).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, 1) if lses else q.new_zeros(heads, 0, dtype=dtype)
    return out, lse.float()
