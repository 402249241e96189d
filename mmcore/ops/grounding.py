"""Box <-> location-index codec ops: references, backends, public entry points.

A box is normalised ``(x1, y1, x2, y2)`` in [0, 1]; its location indices are the top-left and bottom-right
cells of a ``num_bins x num_bins`` grid, row-major (``index = row * num_bins + col``). Kosmos-2 uses
``num_bins = 32`` (1024 location tokens). Facts: shared/research/kosmos2.md section 1.9.

Roundings:
  ``"hf"``    transformers' ``Kosmos2Processor``: ``floor(x1 * P)``, ``ceil(x2 * P - 1)``. NOTE: for x2 (or y2)
              below about 2**-53 / P, ``x2 * P - 1`` rounds to exactly -1 and transformers produces cell
              -1 (a negative index); mmcore clamps that cell to 0, its only departure from transformers.
  ``"unilm"`` the original training code (``unilm/data/vl/obj_utils.py``): ``floor(max(x1, 0) / c)``,
              ``floor(min(x2, 0.99999) / c)`` with ``c = 1 / P``. They differ only when ``x2 * P`` or
              ``y2 * P`` is an integer (a box ending exactly on a cell edge).
Decoding (indices -> boxes) is the same in both: cell edges when the two corners share a cell, a row or a
column, cell centres otherwise. All arithmetic is float64, so every backend is bit-identical to the Python
floats transformers computes with.
"""

from __future__ import annotations

import importlib.util

import torch

from mmcore.ops import _library
from mmcore.ops._dispatch import ArgumentTypeError, Backend, Op, extension_kernel

ROUNDINGS = ("hf", "unilm")
MAX_NUM_BINS = 1 << 20  # keeps num_bins**2 and all index arithmetic far inside int64 (as csrc/grounding/codec.cpp)


# ----------------------------------------------------------------------------------------- references


def boxes_to_loc_indices_ref(boxes: torch.Tensor, num_bins: int = 32, rounding: str = "hf") -> torch.Tensor:
    """Reference encoder. boxes: (..., 4) float, valid -> (..., 2) int64 (top-left, bottom-right)."""
    x1, y1, x2, y2 = boxes.to(torch.float64).unbind(-1)
    if rounding == "hf":
        p = float(num_bins)
        ux, uy = torch.floor(x1 * p), torch.floor(y1 * p)
        lx, ly = torch.ceil(x2 * p - 1).clamp(min=0), torch.ceil(y2 * p - 1).clamp(min=0)
    else:
        cell = 1.0 / num_bins
        ux, uy = torch.floor(x1.clamp(min=0) / cell), torch.floor(y1.clamp(min=0) / cell)
        lx, ly = torch.floor(x2.clamp(max=0.99999) / cell), torch.floor(y2.clamp(max=0.99999) / cell)
    ul = uy.long() * num_bins + ux.long()
    lr = ly.long() * num_bins + lx.long()
    return torch.stack([ul, lr], dim=-1)


def loc_indices_to_boxes_ref(indices: torch.Tensor, num_bins: int = 32) -> torch.Tensor:
    """Reference decoder. indices: (..., 2) integer, inside the grid -> (..., 4) float64 boxes."""
    ul, lr = indices.long().unbind(-1)
    ux, uy = ul % num_bins, ul // num_bins
    lx, ly = lr % num_bins, lr // num_bins
    cell = 1.0 / num_bins
    edges = (ul == lr) | (ux == lx) | (uy == ly)
    f = torch.float64
    # NOTE: scalar tensors in float64: torch.where on Python floats would round cell / 2 through float32.
    half, whole, zero = (torch.tensor(v, dtype=f, device=indices.device) for v in (cell / 2, cell, 0.0))
    lo, hi = torch.where(edges, zero, half), torch.where(edges, whole, half)
    return torch.stack([ux.to(f) * cell + lo, uy.to(f) * cell + lo, lx.to(f) * cell + hi, ly.to(f) * cell + hi], -1)


# ------------------------------------------------------------------------------------- value checks


def first_true(mask: torch.Tensor) -> tuple[int, ...]:
    """Index (as the caller indexes the tensor) of the first True element of ``mask``, which has one."""
    flat = int(mask.reshape(-1).nonzero()[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape))


def _fmt(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, index)) + "]"


def check_box_values(boxes: torch.Tensor) -> None:
    """Raise ValueError naming the first box that is not finite, leaves [0, 1] or has x2 <= x1 / y2 <= y1."""
    b = boxes.to(torch.float64)
    x1, y1, x2, y2 = b.unbind(-1)
    finite = torch.isfinite(b).all(-1)
    inside = (x1 >= 0) & (y1 >= 0) & (x2 <= 1) & (y2 <= 1)
    ordered = (x2 > x1) & (y2 > y1)
    bad = ~(finite & inside & ordered)
    if not bool(bad.any()):
        return
    at = first_true(bad)
    why = (
        "is not finite" if not finite[at] else "lies outside [0, 1]" if not inside[at] else "needs x2 > x1 and y2 > y1"
    )
    raise ValueError(f"boxes{_fmt(at)} = {tuple(b[at].tolist())} {why}")


def check_index_values(indices: torch.Tensor, num_bins: int) -> None:
    """Raise ValueError naming the first (top-left, bottom-right) pair with an index outside the grid."""
    cells = num_bins * num_bins
    bad = ((indices < 0) | (indices >= cells)).any(-1)
    if bool(bad.any()):
        at = first_true(bad)
        raise ValueError(
            f"indices{_fmt(at)} = {tuple(indices[at].tolist())} has an index outside the "
            f"{num_bins}x{num_bins} grid [0, {cells})"
        )


# ------------------------------------------------------------------------------------------ backends


@torch.library.register_fake("mmcore::boxes_to_loc_indices")
def _boxes_to_loc_indices_fake(boxes, num_bins, rounding):
    return boxes.new_empty((*boxes.shape[:-1], 2), dtype=torch.int64)


@torch.library.register_fake("mmcore::loc_indices_to_boxes")
def _loc_indices_to_boxes_fake(indices, num_bins):
    return indices.new_empty((*indices.shape[:-1], 4), dtype=torch.float64)


def _encode_cpp(boxes, num_bins, rounding):
    return _library.op("boxes_to_loc_indices")(boxes, num_bins, rounding)


def _decode_cpp(indices, num_bins):
    return _library.op("loc_indices_to_boxes")(indices, num_bins)


def _encode_torch(boxes, num_bins, rounding):
    check_box_values(boxes)
    return boxes_to_loc_indices_ref(boxes, num_bins, rounding)


def _decode_torch(indices, num_bins):
    check_index_values(indices, num_bins)
    return loc_indices_to_boxes_ref(indices, num_bins)


_triton_encode = _triton_decode = None
if importlib.util.find_spec("triton") is not None:
    from mmcore.kernels import grounding as _kernels

    # triton_op infers the schema from the launcher's annotations. The explicit fakes replace the traced
    # launcher as meta kernel: under TRITON_INTERPRET=1 wrap_triton hands back the interpreter, which
    # cannot run on fake tensors.
    _triton_encode = torch.library.triton_op(
        "mmcore::boxes_to_loc_indices_triton", _kernels._boxes_to_loc_indices, mutates_args=()
    )
    _triton_encode.register_fake(_boxes_to_loc_indices_fake)
    _triton_decode = torch.library.triton_op(
        "mmcore::loc_indices_to_boxes_triton", _kernels._loc_indices_to_boxes, mutates_args=()
    )
    _triton_decode.register_fake(_loc_indices_to_boxes_fake)


def _encode_triton(boxes, num_bins, rounding):
    check_box_values(boxes)
    flat = boxes.to(torch.float64).reshape(-1, 4).contiguous()
    return _triton_encode(flat, num_bins, rounding).reshape(*boxes.shape[:-1], 2)


def _decode_triton(indices, num_bins):
    check_index_values(indices, num_bins)
    flat = indices.to(torch.int64).reshape(-1, 2).contiguous()
    return _triton_decode(flat, num_bins).reshape(*indices.shape[:-1], 4)


_FLOATS = (torch.float32, torch.float64)
_ANY = ("cpu", "cuda")

BOXES_TO_LOC_INDICES = Op(
    "boxes_to_loc_indices",
    [
        Backend("triton", _encode_triton, ("cuda", "cpu"), auto_on_cpu=False),
        Backend("cpp", _encode_cpp, ("cpu",), _FLOATS, needs=extension_kernel("boxes_to_loc_indices")),
        Backend("torch", _encode_torch, _ANY),
    ],
)
LOC_INDICES_TO_BOXES = Op(
    "loc_indices_to_boxes",
    [
        Backend("triton", _decode_triton, ("cuda", "cpu"), auto_on_cpu=False),
        Backend("cpp", _decode_cpp, ("cpu",), needs=extension_kernel("loc_indices_to_boxes")),
        Backend("torch", _decode_torch, _ANY),
    ],
)


# ----------------------------------------------------------------------------------- public functions


def check_num_bins(num_bins) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 1 <= num_bins <= MAX_NUM_BINS:
        raise ValueError(f"num_bins must be an int in [1, {MAX_NUM_BINS}], got {num_bins!r}")
    return num_bins


def boxes_to_loc_indices(
    boxes, num_bins: int = 32, rounding: str = "hf", *, backend: str | None = None
) -> torch.Tensor:
    """Normalised boxes -> (top-left, bottom-right) location indices.

    boxes: (..., 4) tensor or nested sequence of ``(x1, y1, x2, y2)`` in [0, 1] with x2 > x1 and y2 > y1.
    Returns (..., 2) int64 on the same device. ``rounding="hf"`` equals transformers' Kosmos2Processor,
    ``"unilm"`` the original training code. Raises ValueError naming the first invalid box.
    """
    num_bins = check_num_bins(num_bins)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if not isinstance(boxes, torch.Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ArgumentTypeError(f"boxes must be a floating-point tensor of normalised coordinates, got {boxes.dtype}")
    if boxes.dtype not in _FLOATS:
        boxes = boxes.to(torch.float64)
    return BOXES_TO_LOC_INDICES(boxes.device.type, boxes.dtype, boxes, num_bins, rounding, backend=backend)


def loc_indices_to_boxes(indices, num_bins: int = 32, *, backend: str | None = None) -> torch.Tensor:
    """(top-left, bottom-right) location indices -> normalised boxes.

    indices: (..., 2) integer tensor or nested sequence, each in [0, num_bins**2). Returns (..., 4) float64
    on the same device (float64 so that results equal transformers' Python floats exactly).
    Raises ValueError naming the first pair with an index outside the grid.
    """
    num_bins = check_num_bins(num_bins)
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(indices, dtype=torch.int64)
    if indices.dim() == 0 or indices.shape[-1] != 2:
        raise ValueError(f"indices must have shape (..., 2), got {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ArgumentTypeError(f"indices must be an integer tensor, got {indices.dtype}")
    return LOC_INDICES_TO_BOXES(indices.device.type, indices.dtype, indices, num_bins, backend=backend)
