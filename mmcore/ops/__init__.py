"""mmcore's functional API and the dispatch between its backends.

``available_backends(op_name, device=None)`` lists which of ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"`` (and,
for packed attention when installed, ``"flash_attn"`` and ``"xformers"``) can run an op here; every op takes
``backend=`` (or reads ``MMCORE_BACKEND``) to force one.

Every op checks its arguments and raises ValueError naming the one at fault; for a wrong type or dtype it is an
``ArgumentTypeError``, which is a TypeError and a ValueError both.
"""

from mmcore.ops import _library  # noqa: F401, I001  (schemas first: the extension registers kernels for them)
from mmcore.ops.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from mmcore.ops.attention import MODES, attention, packed_attention, packed_attention_ref
from mmcore.ops._dispatch import BACKENDS, ArgumentTypeError, Backend, BackendError, Op, available_backends, ops
from mmcore.ops.grounding import (
    boxes_to_loc_indices,
    boxes_to_loc_indices_ref,
    loc_indices_to_boxes,
    loc_indices_to_boxes_ref,
)
from mmcore.ops.decoding import DecodeState, GroundingTokens, grounded_decode_step, grounded_decode_step_ref
from mmcore.ops.logits import ScreenedHead, decode_logits, decode_logits_ref, linear

__all__ = [
    "MODES",
    "attention",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "packed_attention",
    "packed_attention_ref",
    "ArgumentTypeError",
    "BACKENDS",
    "Backend",
    "BackendError",
    "Op",
    "available_backends",
    "boxes_to_loc_indices",
    "boxes_to_loc_indices_ref",
    "loc_indices_to_boxes",
    "loc_indices_to_boxes_ref",
    "DecodeState",
    "GroundingTokens",
    "grounded_decode_step",
    "grounded_decode_step_ref",
    "ScreenedHead",
    "decode_logits",
    "decode_logits_ref",
    "linear",
    "ops",
]
