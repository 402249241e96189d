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

Backends, in default order: "triton" (kernels/packed_attention.py), the optional peers "flash_attn" and
"xformers" (CUDA, half types, full and causal, no dropout), "cpp" (mmcore._C, CPU), "torch" (the reference).
"""

from __future__ import annotations

import math
import numbers

import torch

from mmcore.ops import _library
from mmcore.ops._dispatch import ArgumentTypeError, Backend, Op, extension_kernel
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


# ------------------------------------------------------------------------------------------- validation

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (total, heads, head_dim), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ArgumentTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ArgumentTypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("head_dim must be at least 1")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"heads of q ({q.shape[1]}) must be a multiple of heads of k/v ({k.shape[1]}) (GQA)")


def _check_cu_seqlens(name, cu, total, device, max_seqlen, max_name, check_values):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor of segments + 1 offsets")
    if cu.dtype != torch.int32:
        raise ArgumentTypeError(f"{name} must be int32 (flash-attn's varlen layout), got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device} with q, k, v, got {cu.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if not check_values:
        return
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"{name} must start at 0, got {c[0]}")
    if c[-1] != total:
        raise ValueError(f"{name} must end at the token count {total}, got {c[-1]}")
    lens = _lengths(c)
    if any(n < 0 for n in lens):
        s = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name} must be non-decreasing: {name}[{s}] = {c[s]} > {name}[{s + 1}] = {c[s + 1]}")
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is below the longest segment ({max(lens)} tokens)")


def _as_int(value):
    """An integer of another type (numpy's int64, say) as a Python int; anything else as given, for the checks."""
    if not isinstance(value, int) and isinstance(value, numbers.Integral):
        return int(value)
    return value


def _lengths(offsets: list[int]) -> list[int]:
    """Segment lengths from cumulative offsets."""
    return [b - a for a, b in zip(offsets, offsets[1:], strict=False)]


def _segment_lengths(cu_seqlens) -> list[int]:
    """Per-segment lengths as Python ints (a host read: a device sync for CUDA tensors)."""
    return _lengths(cu_seqlens.tolist())


def _should_check_values(device: torch.device, validate: bool | None) -> bool:
    if torch.compiler.is_compiling():
        return False  # value checks read tensors on the host; a traced graph cannot
    return validate if validate is not None else device.type == "cpu"


def check_packed_args(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    mode,
    prefix_lens,
    softmax_scale,
    dropout_p,
    validate=None,
):
    """Validate packed-attention arguments; returns (mode code, softmax_scale, prefix_lens as int32 or None).

    Shapes, dtypes and devices are always checked; values of cu_seqlens / prefix_lens (which need a host
    read) on CPU tensors, and on GPU tensors when ``validate=True``."""
    _check_tensors(q, k, v)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    check_values = _should_check_values(q.device, validate)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, max_seqlen_q, "max_seqlen_q", check_values)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, max_seqlen_k, "max_seqlen_k", check_values)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of segments, got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    if mode == "prefix":
        if prefix_lens is None:
            raise ValueError("mode='prefix' needs prefix_lens (one length per segment)")
        if not isinstance(prefix_lens, torch.Tensor):
            prefix_lens = torch.as_tensor(prefix_lens, device=q.device)
        if prefix_lens.dtype == torch.bool or prefix_lens.dtype.is_floating_point or prefix_lens.dtype.is_complex:
            raise ArgumentTypeError(f"prefix_lens must hold integers, got {prefix_lens.dtype}")
        if prefix_lens.shape != (cu_seqlens_q.numel() - 1,):
            raise ValueError(
                f"prefix_lens must have shape ({cu_seqlens_q.numel() - 1},) (one length per segment), got "
                f"{tuple(prefix_lens.shape)}"
            )
        prefix_lens = prefix_lens.to(device=q.device, dtype=torch.int32)
        if check_values:
            lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
            for s, (p, n) in enumerate(zip(prefix_lens.tolist(), lk, strict=True)):
                if not 0 <= p <= n:
                    raise ValueError(f"prefix_lens[{s}] = {p} is outside [0, {n}] (segment {s} has {n} keys)")
    elif prefix_lens is not None:
        raise ValueError(f"prefix_lens is only used with mode='prefix', got mode={mode!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2])
    elif (
        isinstance(softmax_scale, bool)
        or not isinstance(softmax_scale, (int, float))
        or not math.isfinite(softmax_scale)
    ):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    return MODES[mode], float(softmax_scale), prefix_lens


# ------------------------------------------------------------------------------------------- backends


def _fwd_fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    mode,
    prefix_lens,
    softmax_scale,
    dropout_p,
    seed,
    offset,
):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _bwd_fake(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    mode,
    prefix_lens,
    softmax_scale,
    dropout_p,
    seed,
    offset,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _autograd_for(bwd):
    """setup_context and backward for a forward op returning (out, lse), whose gradients come from ``bwd``."""

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, mode, prefix_lens, scale, p, seed, offset = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, prefix_lens)
        ctx.args = (max_q, max_k, mode, scale, p, seed, offset)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, prefix_lens = ctx.saved_tensors
        max_q, max_k, mode, scale, p, seed, offset = ctx.args
        dq, dk, dv = bwd(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, mode, prefix_lens, scale, p, seed, offset
        )
        return (dq, dk, dv) + (None,) * 10

    return setup_context, backward


torch.library.register_fake("mmcore::packed_attention_fwd")(_fwd_fake)
torch.library.register_fake("mmcore::packed_attention_bwd")(_bwd_fake)


@torch.library.register_fake("mmcore::packed_attention_schedule")
def _schedule_fake(cu_seqlens, total, block_size):
    return cu_seqlens.new_empty((cu_seqlens.numel() - 1 + total // block_size, 2), dtype=torch.int32)


_setup, _backward = _autograd_for(lambda *a: _library.op("packed_attention_bwd")(*a))
torch.library.register_autograd("mmcore::packed_attention_fwd", _backward, setup_context=_setup)


_kernels = _library.triton_kernels("packed_attention")
_triton_fwd = (
    _library.triton_op_with_backward(
        "packed_attention",
        _kernels._packed_attention_fwd,
        _fwd_fake,
        _kernels._packed_attention_bwd,
        _bwd_fake,
        _autograd_for,
    )
    if _kernels is not None
    else None
)


def _run_cpp(*args):
    return _library.op("packed_attention_fwd")(*args)


def _run_triton(*args):
    return _triton_fwd(*args)


def _run_torch(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    mode,
    prefix_lens,
    softmax_scale,
    dropout_p,
    seed,
    offset,
):
    # float32 math for half inputs (the CPU has no fast half matmul); the reference's own dtype otherwise.
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    name = next(n for n, c in MODES.items() if c == mode)
    out, lse = packed_attention_ref(
        q.to(compute),
        k.to(compute),
        v.to(compute),
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        mode=name,
        prefix_lens=prefix_lens,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        seed=seed,
        offset=offset,
        upcast=False,
        return_lse=True,
    )
    return out.to(q.dtype), lse


def _triton_supports(q, *args):
    d = q.shape[2]
    if not (8 <= d <= 128 and d % 8 == 0):  # kernels/packed_attention.py: head_dim_supported
        return f"head_dim {d} is not a multiple of 8 in [8, 128]"
    return None


def _peer_supports(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    mode,
    prefix_lens,
    softmax_scale,
    dropout_p,
    seed,
    offset,
):
    if mode == MODES["prefix"]:
        return "no prefix mode"
    if dropout_p > 0.0:
        return "its dropout RNG is not mmcore's counter-based one (masks would not be reproducible)"
    if q.shape[2] % 8 or q.shape[2] > 256:
        return f"head_dim {q.shape[2]} is not a multiple of 8 up to 256"
    return None


def _run_flash_attn(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    mode,
    prefix_lens,
    softmax_scale,
    dropout_p,
    seed,
    offset,
):
    """flash-attn's varlen kernel (causal is bottom-right aligned there too; lse (heads, total_q))."""
    from flash_attn import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=softmax_scale,
        causal=mode == MODES["causal"],
        return_attn_probs=True,
    )
    return out, lse


def _xformers_layout_refusal(lens_q: list[int], lens_k: list[int], mode: int) -> str | None:
    """Why xformers' block-diagonal biases cannot give mmcore's masks for this layout, or None.

    Every layout xformers accepts here leaves each query at least one visible key, so its kernels never meet a
    row with no visible key (mmcore gives zeros there; xformers does not promise anything)."""
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        if lq > 0 and lk == 0:
            return f"segment {s} has {lq} queries and no keys (xformers does not define what such rows give)"
        if mode == MODES["causal"] and lq > lk:
            return (
                f"causal segment {s} has more queries ({lq}) than keys ({lk}): xformers' bottom-right causal mask "
                f"needs queries <= keys per segment"
            )
    return None


def _xformers_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mode, *rest):
    """flash-attn's limits (``_peer_supports``), and the layouts xformers' biases can express."""
    reason = _peer_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mode, *rest)
    if reason is not None:
        return reason
    if torch.compiler.is_compiling():
        return "its bias is built from segment lengths read on the host, which a traced graph cannot do"
    return _xformers_layout_refusal(_segment_lengths(cu_seqlens_q), _segment_lengths(cu_seqlens_k), mode)


def _xformers_needs(device_type: str) -> str | None:
    # NOTE: xformers 0.0.35 refuses every CUDA tensor ("xFormers wasn't build with CUDA support") when its compiled
    # library xformers._C did not load -- it links libcudart.so.12 -- even though the attention kernels it would
    # call are PyTorch's own (aten._flash_attention_forward, aten._efficient_attention_forward).
    import xformers._cpp_lib

    if xformers._cpp_lib._built_with_cuda:
        return None
    return (
        "xformers' compiled library (xformers._C) did not load with CUDA here, so xformers refuses CUDA tensors "
        "(python -m xformers.info shows its build)"
    )


def _xformers_bias(lens_q: list[int], lens_k: list[int], causal: bool, device: torch.device):
    """xformers' block-diagonal bias for mmcore's full or causal (bottom-right aligned) segments."""
    from xformers.ops import fmha

    kind = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else fmha.attn_bias.BlockDiagonalMask
    return kind.from_seqlens(lens_q, lens_k, device=device)


def _xformers_lse(lse: torch.Tensor, lens_q: list[int]) -> torch.Tensor:
    """xformers' varlen log-sum-exp -> mmcore's (heads, total_q) float32.

    xformers returns it packed, (1, [groups,] heads, >= total_q) (its flash operators), or padded,
    (segments, [groups,] heads, >= max Lq) (its cutlass operators); with one segment the two agree."""
    lse = lse.flatten(1, -2)  # groups and heads-per-group back to mmcore's head order
    total = sum(lens_q)
    if lse.shape[0] == 1:
        return lse[0, :, :total].float().contiguous()
    if lse.shape[0] != len(lens_q):
        raise RuntimeError(
            f"xformers returned a log-sum-exp of shape {tuple(lse.shape)}, neither packed (1, heads, >= {total}) "
            f"nor padded ({len(lens_q)}, heads, >= {max(lens_q)})"
        )
    seg = torch.repeat_interleave(torch.arange(len(lens_q)), torch.tensor(lens_q, dtype=torch.int64))
    starts = torch.tensor([0, *lens_q[:-1]], dtype=torch.int64).cumsum(0)
    pos = torch.arange(total) - starts[seg]
    return lse[seg.to(lse.device), :, pos.to(lse.device)].transpose(0, 1).float().contiguous()


def _xformers_aligned(t: torch.Tensor) -> torch.Tensor:
    """t, copied only where xformers' kernels would refuse its strides (last dim contiguous, heads 8-aligned)."""
    return t if t.stride(-1) == 1 and t.stride(-2) % 8 == 0 else t.contiguous()


class _XformersAttention(torch.autograd.Function):
    """xformers' varlen attention returning (out, lse) in mmcore's layout; gradients from xformers' backward.

    Batch 1 with a block-diagonal bias; GQA as xformers' (1, total, heads_kv, group, head_dim) layout with k/v
    broadcast over the group (no copy) in the forward. xformers 0.0.35 has no backward for that layout, so the
    backward repeats k/v to all heads and sums dk/dv over each group."""

    @staticmethod
    def forward(ctx, q, k, v, lens_q, lens_k, causal, scale):
        from xformers.ops import fmha

        total_q, heads, head_dim = q.shape
        total_k, heads_kv, _ = k.shape
        group = heads // heads_kv
        ctx.group, ctx.scale = group, scale
        if total_q == 0:
            ctx.save_for_backward(q, k, v)
            ctx.bias = None
            return q.new_zeros(q.shape), q.new_zeros((heads, 0), dtype=torch.float32)
        q, k, v = _xformers_aligned(q), _xformers_aligned(k), _xformers_aligned(v)
        bias = _xformers_bias(lens_q, lens_k, causal, q.device)
        if group == 1:
            q_, k_, v_ = q[None], k[None], v[None]
        else:
            q_ = q.view(1, total_q, heads_kv, group, head_dim)
            k_, v_ = (t.view(1, total_k, heads_kv, 1, head_dim).expand(-1, -1, -1, group, -1) for t in (k, v))
        out, lse = fmha.memory_efficient_attention_forward_requires_grad(q_, k_, v_, bias, scale=scale)
        out = out.reshape(q.shape)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bias = bias
        lse_out = _xformers_lse(lse, lens_q)
        ctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        if ctx.bias is None:  # no queries: nothing depends on k, v
            q, k, v = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None
        from xformers.ops import fmha

        q, k, v, out, lse = ctx.saved_tensors
        heads_kv, group = k.shape[1], ctx.group
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dq, dk, dv = fmha.memory_efficient_attention_backward(
            dout.contiguous()[None], out[None], lse.flatten(1, -2), q[None], k[None], v[None], ctx.bias, scale=ctx.scale
        )
        dq, dk, dv = dq[0], dk[0], dv[0]
        if group > 1:  # NOTE: torch sums half tensors in float32 and rounds once
            dk, dv = dk.unflatten(1, (heads_kv, group)).sum(2), dv.unflatten(1, (heads_kv, group)).sum(2)
        return dq, dk, dv, None, None, None, None


def _run_xformers(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    mode,
    prefix_lens,
    softmax_scale,
    dropout_p,
    seed,
    offset,
):
    """xformers' memory-efficient attention with a block-diagonal bias (bottom-right causal for causal).

    Its biases are built from Python lists of segment lengths, so every call reads cu_seqlens on the host (a
    device sync, in the per-call check and again here) and copies the offsets back to the device."""
    lens_q, lens_k = _segment_lengths(cu_seqlens_q), _segment_lengths(cu_seqlens_k)
    return _XformersAttention.apply(q, k, v, lens_q, lens_k, mode == MODES["causal"], softmax_scale)


PACKED_ATTENTION = Op(
    "packed_attention",
    [
        Backend(
            "triton",
            _run_triton,
            ("cuda", "cpu"),
            (torch.float16, torch.bfloat16, torch.float32),
            check=_triton_supports,
            auto_on_cpu=False,
        ),
        Backend("flash_attn", _run_flash_attn, ("cuda",), (torch.float16, torch.bfloat16), check=_peer_supports),
        Backend(
            "xformers",
            _run_xformers,
            ("cuda",),
            (torch.float16, torch.bfloat16),
            check=_xformers_supports,
            needs=_xformers_needs,
        ),
        Backend("cpp", _run_cpp, ("cpu",), _DTYPES, needs=extension_kernel("packed_attention_fwd")),
        Backend("torch", _run_torch, ("cpu", "cuda"), _DTYPES),
    ],
)


def _dropout_seed(dropout_p: float, dropout_seed: int | None) -> int:
    if dropout_p == 0.0:
        return 0
    if dropout_seed is not None:
        return int(dropout_seed)
    return int(torch.randint(0, 2**62, (1,)))


# ------------------------------------------------------------------------------------- public functions


def packed_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    mode="full",
    prefix_lens=None,
    softmax_scale=None,
    dropout_p=0.0,
    backend=None,
    dropout_seed=None,
    validate=None,
    return_lse=False,
):
    """Attention over packed segments without padding and without a materialised mask.

    q: (total_q, heads, head_dim); k, v: (total_k, heads_kv, head_dim), heads a multiple of heads_kv;
    cu_seqlens_q, cu_seqlens_k: int32 (segments + 1,) offsets starting at 0; max_seqlen_q/k: ints at least
    the longest segment. mode: "full", "causal" (bottom-right aligned) or "prefix" with ``prefix_lens``
    (segments,). softmax_scale defaults to head_dim ** -0.5. dropout_p > 0 drops attention probabilities
    with a counter-based RNG; ``dropout_seed`` makes it reproducible (else a seed is drawn from torch's
    default generator). validate: check cu_seqlens / prefix_lens values (default: on CPU tensors only,
    since it reads them on the host). Returns out (total_q, heads, head_dim), and with return_lse also the
    log-sum-exp (heads, total_q) float32. Differentiable in q, k, v.
    """
    max_seqlen_q, max_seqlen_k = _as_int(max_seqlen_q), _as_int(max_seqlen_k)
    mode_code, scale, prefix_lens = check_packed_args(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        mode,
        prefix_lens,
        softmax_scale,
        dropout_p,
        validate,
    )
    seed = _dropout_seed(dropout_p, dropout_seed)
    out, lse = PACKED_ATTENTION(
        q.device.type,
        q.dtype,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        mode_code,
        prefix_lens,
        scale,
        float(dropout_p),
        seed,
        0,
        backend=backend,
    )
    return (out, lse) if return_lse else out


def attention(q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, dropout_seed=None, backend=None):
    """Dense attention in the (batch, seqlen, heads, head_dim) layout -- image-patch attention at any length
    (257 tokens for ViT-L/14 at 224) -- served by the packed kernels with one segment per batch row.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim). causal is
    bottom-right aligned when seqlen_q < seqlen_k. dropout_p, dropout_seed: as in ``packed_attention``. Returns
    (batch, seqlen_q, heads, head_dim)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, seqlen, heads, head_dim), got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    cu_q = (
        torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
        if lq
        else torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    )
    cu_k = (
        torch.arange(0, (b + 1) * lk, lk, dtype=torch.int32, device=q.device)
        if lk
        else torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    )
    out = packed_attention(
        q.reshape(b * lq, h, d),
        k.reshape(b * lk, *k.shape[2:]),
        v.reshape(b * lk, *v.shape[2:]),
        cu_q,
        cu_k,
        lq,
        lk,
        mode="causal" if causal else "full",
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        backend=backend,
        validate=False,
    )
    return out.reshape(b, lq, h, d)
