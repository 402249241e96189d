"""Triton kernels for the box <-> location-index codec (Kosmos-2 location tokens).

Elementwise: one program handles BLOCK boxes. All arithmetic is float64 so results are bit-identical to
the C++ kernel and to transformers' Python floats (``floor(x1 * P)``, ``ceil(x2 * P - 1)``; the ``unilm``
rounding divides by the cell size as numpy does: float64 division lowers to the correctly rounded
``div.rn.f64``, Triton's approximate division being float32-only). FMA contraction is disabled at launch.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK = 1024  # boxes per program; elementwise and memory-bound, any power of two >= 128 saturates bandwidth


@triton.jit(do_not_specialize=["n", "num_bins"])
def _boxes_to_loc_indices_kernel(boxes_ptr, out_ptr, n, num_bins, UNILM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x1 = tl.load(boxes_ptr + 4 * offs, mask=mask, other=0.0)
    y1 = tl.load(boxes_ptr + 4 * offs + 1, mask=mask, other=0.0)
    x2 = tl.load(boxes_ptr + 4 * offs + 2, mask=mask, other=1.0)
    y2 = tl.load(boxes_ptr + 4 * offs + 3, mask=mask, other=1.0)
    p = num_bins.to(tl.float64)
    if UNILM:
        cell = 1.0 / p
        ux = tl.floor(tl.maximum(x1, 0.0) / cell)
        uy = tl.floor(tl.maximum(y1, 0.0) / cell)
        lx = tl.floor(tl.minimum(x2, 0.99999) / cell)
        ly = tl.floor(tl.minimum(y2, 0.99999) / cell)
    else:
        ux = tl.floor(x1 * p)
        uy = tl.floor(y1 * p)
        # NOTE: x2 * p - 1 is exactly -1 for x2 < ~2**-53 / p; clamp that cell to 0 (see mmcore/ops/grounding.py).
        lx = tl.maximum(tl.ceil(x2 * p - 1.0), 0.0)
        ly = tl.maximum(tl.ceil(y2 * p - 1.0), 0.0)
    ul = uy.to(tl.int64) * num_bins + ux.to(tl.int64)
    lr = ly.to(tl.int64) * num_bins + lx.to(tl.int64)
    tl.store(out_ptr + 2 * offs, ul, mask=mask)
    tl.store(out_ptr + 2 * offs + 1, lr, mask=mask)


@triton.jit(do_not_specialize=["n", "num_bins"])
def _loc_indices_to_boxes_kernel(idx_ptr, out_ptr, n, num_bins, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ul = tl.load(idx_ptr + 2 * offs, mask=mask, other=0)
    lr = tl.load(idx_ptr + 2 * offs + 1, mask=mask, other=0)
    ux = ul % num_bins
    uy = ul // num_bins
    lx = lr % num_bins
    ly = lr // num_bins
    cell = 1.0 / num_bins.to(tl.float64)
    # Same cell, row or column: the box spans the cells' edges; otherwise it joins the cells' centres.
    edges = (ul == lr) | (ux == lx) | (uy == ly)
    lo = tl.where(edges, 0.0, cell / 2)
    hi = tl.where(edges, cell, cell / 2)
    tl.store(out_ptr + 4 * offs, ux.to(tl.float64) * cell + lo, mask=mask)
    tl.store(out_ptr + 4 * offs + 1, uy.to(tl.float64) * cell + lo, mask=mask)
    tl.store(out_ptr + 4 * offs + 2, lx.to(tl.float64) * cell + hi, mask=mask)
    tl.store(out_ptr + 4 * offs + 3, ly.to(tl.float64) * cell + hi, mask=mask)


def _boxes_to_loc_indices(boxes: torch.Tensor, num_bins: int, rounding: str) -> torch.Tensor:
    """boxes: (N, 4) float64 contiguous, already validated -> (N, 2) int64."""
    n = boxes.shape[0]
    out = torch.empty((n, 2), dtype=torch.int64, device=boxes.device)
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        # NOTE: fp fusion off: `x * p - 1` and `u * cell + c` must round twice, as in Python, not fuse to FMA.
        wrap_triton(_boxes_to_loc_indices_kernel)[grid](
            boxes, out, n, num_bins, UNILM=rounding == "unilm", BLOCK=BLOCK, enable_fp_fusion=False
        )
    return out


def _loc_indices_to_boxes(indices: torch.Tensor, num_bins: int) -> torch.Tensor:
    """indices: (N, 2) int64 contiguous, already validated -> (N, 4) float64."""
    n = indices.shape[0]
    out = torch.empty((n, 4), dtype=torch.float64, device=indices.device)
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        wrap_triton(_loc_indices_to_boxes_kernel)[grid](indices, out, n, num_bins, BLOCK=BLOCK, enable_fp_fusion=False)
    return out
