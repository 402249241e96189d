"""Triton kernel for fused linear cross-entropy (GPU).

Rows of logits are produced one chunk at a time by cuBLAS (``hidden_chunk @ weight.T``); one program per row
then streams over the vocabulary in BLOCK_V slices with an online log-sum-exp (and running argmax and logit
sum, for token accuracy and label smoothing), writes the row's loss, and -- when gradients are wanted --
overwrites the logits with ``d loss / d logits`` in place. The chunk's gradient then feeds two more matrix
products (``dhidden = g @ W``, ``dweight += g.T @ h``). Only one chunk of logits ever exists.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK_V = 2048  # vocabulary slice per iteration; 65037 / 2048 = 32 iterations, registers stay small at 8 warps


@triton.jit(do_not_specialize=["n_vocab", "ignore_index"])
def _ce_rows_kernel(
    logits_ptr,
    stride_logits_row,
    labels_ptr,
    weight_ptr,
    loss_ptr,
    lse_ptr,
    argmax_ptr,
    n_vocab,
    ignore_index,
    eps,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_logits_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    m = -float("inf")
    s = 0.0
    z_sum = 0.0
    best = -float("inf")
    best_idx = 0
    for start in range(0, n_vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inside = offs < n_vocab
        z = tl.load(base + offs, mask=inside, other=-float("inf")).to(tl.float32)
        block_max = tl.max(z, 0)
        # first index of the block's maximum; a later block wins only if strictly larger (torch.argmax order)
        block_idx = tl.min(tl.where(z == block_max, offs, n_vocab), 0)
        best_idx = tl.where(block_max > best, block_idx, best_idx)
        best = tl.maximum(best, block_max)
        m_new = tl.maximum(m, block_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        z_sum += tl.sum(tl.where(inside, z, 0.0), 0)
    lse = m + tl.log(s)
    safe = tl.where(valid, label, 0)
    z_label = tl.load(base + safe).to(tl.float32)
    loss = lse - z_label
    loss = (1.0 - eps) * loss + eps * (lse - z_sum / n_vocab)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    tl.store(argmax_ptr + row, best_idx.to(tl.int64))
    if COMPUTE_GRAD:
        w = tl.where(valid, tl.load(weight_ptr + row).to(tl.float32), 0.0)
        for start in range(0, n_vocab, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inside = offs < n_vocab
            z = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - eps / n_vocab - tl.where(offs == safe, 1.0 - eps, 0.0)
            tl.store(base + offs, (g * w).to(logits_ptr.dtype.element_ty), mask=inside)


def _ce_rows(logits, labels, row_weight, ignore_index, eps, compute_grad):
    """logits (n, V) contiguous, modified in place into gradients when compute_grad. Returns loss, lse, argmax."""
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n:
        wrap_triton(_ce_rows_kernel)[(n,)](
            logits,
            logits.stride(0),
            labels,
            row_weight,
            loss,
            lse,
            argmax,
            vocab,
            ignore_index,
            eps,
            COMPUTE_GRAD=compute_grad,
            BLOCK_V=BLOCK_V,
            num_warps=8,
        )
    return loss, lse, argmax


def _chunk_logits(h, weight, bias):
    return torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())


def _flce_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    compute_grad: bool,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the C++ op mmcore::fused_linear_cross_entropy_fwd (see mmcore/ops/_library.py)."""
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    grads = compute_grad and reduction != 0
    valid = labels != ignore_index
    n_valid = valid.sum()
    # mean: each row's gradient carries 1 / n_valid (a tensor: no host sync); zero valid rows give zero grads.
    row_weight = valid.float() / n_valid.clamp(min=1) if reduction == 2 else valid.float()
    f32 = torch.float32
    loss_rows = torch.empty(n_rows, dtype=f32, device=hidden.device)
    lse = torch.empty(n_rows, dtype=f32, device=hidden.device)
    argmax = torch.empty(n_rows, dtype=torch.int64, device=hidden.device)
    dh = torch.empty((n_rows, width) if grads else (0,), dtype=f32, device=hidden.device)
    dw = torch.zeros((vocab, width) if grads else (0,), dtype=f32, device=hidden.device)
    db = torch.zeros((vocab,) if grads and bias is not None else (0,), dtype=f32, device=hidden.device)
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias)
        loss_rows[start:end], lse[start:end], argmax[start:end] = _ce_rows(
            logits, labels[start:end], row_weight[start:end], ignore_index, label_smoothing, grads
        )
        if grads:
            dh[start:end] = torch.mm(logits, weight)
            dw += torch.mm(logits.t(), h)
            if bias is not None:
                db += logits.sum(0, dtype=f32)
    total = loss_rows.sum()
    # outputs of a custom op may not alias one another: reduction none returns a copy of loss_rows
    loss = loss_rows.clone() if reduction == 0 else total if reduction == 1 else total / n_valid
    return loss, loss_rows, lse, argmax, dh, dw, db


def _flce_bwd(
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as mmcore::fused_linear_cross_entropy_bwd: gradients weighted per row by grad_rows."""
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    f32 = torch.float32
    row_weight = grad_rows.float() * (labels != ignore_index)
    dh = torch.empty((n_rows, width), dtype=f32, device=hidden.device)
    dw = torch.zeros((vocab, width), dtype=f32, device=hidden.device)
    db = torch.zeros((vocab,) if bias is not None else (0,), dtype=f32, device=hidden.device)
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        h = hidden[start:end]
        logits = _chunk_logits(h, weight, bias)
        _ce_rows(logits, labels[start:end], row_weight[start:end], ignore_index, label_smoothing, True)
        dh[start:end] = torch.mm(logits, weight)
        dw += torch.mm(logits.t(), h)
        if bias is not None:
            db += logits.sum(0, dtype=f32)
    return dh, dw, db
