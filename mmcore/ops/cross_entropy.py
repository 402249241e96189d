"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, labels)`` without materialising the
(tokens x vocab) logits.

Kosmos-2's head maps 2048-wide hidden states to 65,037 tokens; materialised float32 logits for 16k tokens
take 4.3 GB, and their gradient as much again. Here the logits exist one chunk of rows at a time: the C++
CPU kernel (csrc/cross_entropy/) and the Triton GPU kernel (kernels/cross_entropy.py) compute each chunk's
loss and, for sum/mean reductions, its gradients in the same pass. The same pass can return grounding
statistics: loss and token accuracy split into location-token targets and text targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmcore.ops import _library
from mmcore.ops._dispatch import ArgumentTypeError, Backend, Op, extension_kernel

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_linear_cross_entropy_ref(
    hidden, weight, labels, *, bias=None, ignore_index=-100, label_smoothing=0.0, reduction="mean", upcast=True
):
    """Reference: materialised logits and ``F.cross_entropy``. upcast: in float64 (True) or in the inputs'
    dtype (False, the tolerance rule's "PyTorch in that dtype" baseline)."""
    dtype = torch.float64 if upcast else hidden.dtype
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return F.cross_entropy(
        logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


# Logits up to this size are never split further: every chunk reads the whole weight three times (logits, the
# hidden states' and the weight's gradients), so small chunks cost time while saving little memory. COSA's CPU
# training step (330 and 75 target rows, vocabulary 30,522, width 256) took 1.13 s with chunks of 42 and 10 rows and
# 0.86-0.95 s in one chunk each.
SMALL_LOGITS_BYTES = 64 << 20


def default_chunk_rows(n_rows: int, width: int, vocab: int) -> int:
    """Rows per logits chunk: about ``width / vocab`` of the rows, so a chunk of logits is about the size of
    the hidden states (Liger-Kernel's rule), but at least 256 rows or ``SMALL_LOGITS_BYTES`` of float32 logits,
    whichever is more -- narrow hidden states would otherwise give chunks of a few rows whose matrix products run
    far below peak -- and at most 256 MB of float32 logits. The rows are then split into equal chunks (the last
    one is not left with a few rows)."""
    n = max(n_rows, 1)
    by_ratio = math.ceil(n / max(1, math.ceil(vocab / max(width, 1))))
    floor = max(256, SMALL_LOGITS_BYTES // (4 * max(vocab, 1)))
    by_memory = max(1, (256 << 20) // (4 * max(vocab, 1)))
    rows = max(1, min(max(by_ratio, floor), by_memory, n))
    return math.ceil(n / math.ceil(n / rows))


# ------------------------------------------------------------------------------------ custom-op plumbing


def _fwd_fake(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, compute_grad, chunk_rows):
    n, width = hidden.shape
    vocab = weight.shape[0]
    f = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grads = compute_grad and reduction != 0
    loss = hidden.new_empty((n,) if reduction == 0 else (), dtype=f)
    rows = hidden.new_empty((n,), dtype=f)
    return (
        loss,
        rows,
        hidden.new_empty((n,), dtype=f),
        hidden.new_empty((n,), dtype=torch.int64),
        hidden.new_empty((n, width) if grads else (0,), dtype=f),
        hidden.new_empty((vocab, width) if grads else (0,), dtype=f),
        hidden.new_empty((vocab,) if grads and bias is not None else (0,), dtype=f),
    )


def _bwd_fake(grad_rows, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, chunk_rows):
    f = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (
        hidden.new_empty(hidden.shape, dtype=f),
        hidden.new_empty(weight.shape, dtype=f),
        hidden.new_empty((weight.shape[0],) if bias is not None else (0,), dtype=f),
    )


def _autograd_for(bwd):
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, ignore_index, eps, reduction, compute_grad, chunk_rows = inputs
        _, rows, lse, argmax, dh, dw, db = output
        ctx.mark_non_differentiable(rows, lse, argmax, dh, dw, db)
        ctx.info = (
            reduction,
            compute_grad,
            ignore_index,
            eps,
            chunk_rows,
            hidden.dtype,
            weight.dtype,
            None if bias is None else bias.dtype,
        )
        if reduction == 0:
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        else:
            ctx.save_for_backward(dh, dw, db)

    def backward(ctx, grad, *_):
        reduction, compute_grad, ignore_index, eps, chunk_rows, h_dtype, w_dtype, b_dtype = ctx.info
        if reduction == 0:
            hidden, weight, bias, labels, lse = ctx.saved_tensors
            dh, dw, db = bwd(grad.contiguous(), hidden, weight, bias, labels, lse, ignore_index, eps, chunk_rows)
        else:
            if not compute_grad:
                raise RuntimeError(
                    "fused_linear_cross_entropy ran without gradients (grad mode was off or no input "
                    "required grad when it was called); call it again with gradients enabled"
                )
            dh, dw, db = ctx.saved_tensors
            # NOTE: an upstream gradient of exactly 1 (loss.backward() on a plain sum of losses) returns the saved
            # gradients as they are instead of scaled copies: the weight's gradient (vocab x width) is the largest
            # tensor here (66 MB for Kosmos-2's head at width 256). CPU only: reading the value on a GPU would
            # synchronise the backward; plain tensors only (traced backwards see fake or functional ones).
            unit = type(grad) is torch.Tensor and grad.device.type == "cpu" and grad.numel() == 1
            if not (unit and not torch.compiler.is_compiling() and bool(grad == 1)):
                dh, dw, db = dh * grad, dw * grad, db * grad
        return (dh.to(h_dtype), dw.to(w_dtype), None if b_dtype is None else db.to(b_dtype)) + (None,) * 6

    return setup_context, backward


torch.library.register_fake("mmcore::fused_linear_cross_entropy_fwd")(_fwd_fake)
torch.library.register_fake("mmcore::fused_linear_cross_entropy_bwd")(_bwd_fake)
_setup, _backward = _autograd_for(lambda *a: _library.op("fused_linear_cross_entropy_bwd")(*a))
torch.library.register_autograd("mmcore::fused_linear_cross_entropy_fwd", _backward, setup_context=_setup)
# NOTE: the C++ kernel calls ATen matrix products; under CPU autocast they would run in bfloat16 and clash with
# the kernel's float32 buffers. The op runs in float32 there (autocast off inside), as it accumulates anyway.
for _name in ("fused_linear_cross_entropy_fwd", "fused_linear_cross_entropy_bwd"):
    torch.library.register_autocast(f"mmcore::{_name}", "cpu", torch.float32)


_kernels = _library.triton_kernels("cross_entropy")
_triton_fwd = (
    _library.triton_op_with_backward(
        "fused_linear_cross_entropy", _kernels._flce_fwd, _fwd_fake, _kernels._flce_bwd, _bwd_fake, _autograd_for
    )
    if _kernels is not None
    else None
)


def _run_cpp(*args):
    return _library.op("fused_linear_cross_entropy_fwd")(*args)


def _run_triton(*args):
    return _triton_fwd(*args)


def _run_torch(hidden, weight, bias, labels, ignore_index, eps, reduction, compute_grad, chunk_rows):
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute) @ weight.to(compute).t()
    if bias is not None:
        logits = logits + bias.to(compute)
    rows = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=eps, reduction="none")
    loss = rows if reduction == 0 else rows.sum() if reduction == 1 else rows.sum() / (labels != ignore_index).sum()
    lse = torch.logsumexp(logits, dim=-1)
    empty = hidden.new_empty((0,), dtype=compute)
    return loss, rows.detach(), lse.detach(), logits.argmax(-1), empty, empty, empty


FUSED_LINEAR_CROSS_ENTROPY = Op(
    "fused_linear_cross_entropy",
    [
        Backend(
            "triton", _run_triton, ("cuda", "cpu"), (torch.float16, torch.bfloat16, torch.float32), auto_on_cpu=False
        ),
        Backend("cpp", _run_cpp, ("cpu",), _DTYPES, needs=extension_kernel("fused_linear_cross_entropy_fwd")),
        Backend("torch", _run_torch, ("cpu", "cuda"), _DTYPES),
    ],
)


# --------------------------------------------------------------------------------------------- public


def _check(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, loc_range):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(
                f"{name} must be a 2-D tensor, got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.dtype not in _DTYPES:
            raise ArgumentTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) must share H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if hidden.dtype != weight.dtype:
        raise ArgumentTypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (hidden.shape[0],):
        raise ValueError(
            f"labels must have shape ({hidden.shape[0]},), got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if labels.dtype != torch.int64:
        raise ArgumentTypeError(f"labels must be int64, got {labels.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must have shape ({weight.shape[0]},)")
    if bias is not None and bias.dtype != weight.dtype:
        raise ArgumentTypeError(f"bias must share weight's dtype {weight.dtype}, got {bias.dtype}")
    devices = {t.device for t in (hidden, weight, labels) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0.0 <= label_smoothing <= 1.0
    ):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if loc_range is not None:
        lo, hi = loc_range
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi):
            raise ValueError(f"loc_range must be (first, end) ints with 0 <= first < end, got {loc_range!r}")
    if hidden.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {weight.shape[0]}) and is "
                f"not ignore_index ({ignore_index})"
            )


def _stats(rows, argmax, labels, ignore_index, loc_range):
    valid = labels != ignore_index
    correct = (argmax == labels) & valid
    out = {"loss": rows.sum() / valid.sum(), "accuracy": correct.sum() / valid.sum(), "tokens": valid.sum()}
    if loc_range is not None:
        is_loc = valid & (labels >= loc_range[0]) & (labels < loc_range[1])
        for name, sel in (("loc", is_loc), ("text", valid & ~is_loc)):
            n = sel.sum()
            # NOTE: a split with no tokens reports NaN (0 / 0): "no data", not a perfect or zero score.
            out[f"{name}_loss"] = (rows * sel).sum() / n
            out[f"{name}_accuracy"] = (correct & sel).sum() / n
            out[f"{name}_tokens"] = n
    return {k: v.detach() for k, v in out.items()}


def _autocast_inputs(hidden, weight, bias):
    """Under autocast, inputs of mixed dtypes (bfloat16 activations, float32 weights) meet in one dtype, as they
    would in ``F.linear``: the autocast dtype on a GPU, float32 on the CPU (where the kernel computes in float32)."""
    tensors = [t for t in (hidden, weight, bias) if isinstance(t, torch.Tensor)]
    if len(tensors) < 2 or len({t.dtype for t in tensors}) == 1 or not all(t.is_floating_point() for t in tensors):
        return hidden, weight, bias
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device) if device != "cpu" else torch.float32
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (hidden, weight, bias))


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    backend=None,
    chunk_rows=None,
    return_stats=False,
    loc_range=None,
):
    """``F.cross_entropy(hidden @ weight.T + bias, labels, ...)`` holding at most one chunk of logits.

    hidden: (N, H); weight: (V, H); labels: (N,) int64 in [0, V) or ``ignore_index``; bias: (V,) or None.
    reduction: "mean" (over non-ignored rows; NaN when all are ignored, as PyTorch), "sum" or "none" (N,).
    Differentiable in hidden, weight and bias; for "mean"/"sum" the gradients are computed in the forward pass
    (so call it with gradients enabled when you will backpropagate). chunk_rows overrides
    ``default_chunk_rows``. With return_stats, also returns a dict of detached tensors from the same pass:
    loss, accuracy (argmax == label) and token count over non-ignored rows, and with
    ``loc_range=(first_loc_id, end)`` the same split into ``loc_*`` (location-token targets) and ``text_*``.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check(hidden, weight, labels, bias, ignore_index, label_smoothing, reduction, loc_range)
    n, width = hidden.shape
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(n, width, weight.shape[0])
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, rows, _, argmax, _, _, _ = FUSED_LINEAR_CROSS_ENTROPY(
        hidden.device.type,
        hidden.dtype,
        hidden,
        weight,
        bias,
        labels,
        ignore_index,
        float(label_smoothing),
        REDUCTIONS[reduction],
        wants_grad,
        chunk_rows,
        backend=backend,
    )
    if not return_stats:
        return loss
    return loss, _stats(rows, argmax, labels, ignore_index, loc_range)
