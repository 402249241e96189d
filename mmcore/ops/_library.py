"""Every mmcore custom op's schema, in one place.

The C++ extension supplies kernels for these names (``TORCH_LIBRARY_IMPL(mmcore, CPU/CUDA, ...)``) and the
ops modules register fake (meta) implementations and autograd next to their dispatch code. The schemas
are defined even when the extension is missing, so fake registrations and ``torch.compile`` tracing of the
reference paths never depend on a build.
"""

import torch

NAMESPACE = "mmcore"

SCHEMAS: dict[str, str] = {
    # grounding codec: (..., 4) float boxes -> (..., 2) int64 cell indices, and back to float64 boxes
    "boxes_to_loc_indices": "(Tensor boxes, int num_bins, str rounding) -> Tensor",
    "loc_indices_to_boxes": "(Tensor indices, int num_bins) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def op(name: str) -> torch._ops.OpOverload:
    """The default overload of ``mmcore::<name>``."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


# Ops whose only kernels are Triton kernels are defined with torch.library.triton_op beside their dispatch
# code (so torch.compile can see into the kernels); their schemas are inferred from the launchers' type
# annotations, which the launchers in kernels/ keep exact.
