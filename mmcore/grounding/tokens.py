"""Location index <-> location token id, and the Kosmos-2 tag tokens.

In the released Kosmos-2 vocabulary the location tokens ``<patch_index_0000>`` ... ``<patch_index_1023>``
have ids 64013 ... 65036 (shared/research/kosmos2.md section 1.7). Pass the first id from your tokenizer
(``tokenizer.convert_tokens_to_ids("<patch_index_0000>")``) when it differs.
"""

from __future__ import annotations

import torch

from mmcore.ops.grounding import first_true

FIRST_LOC_TOKEN_ID = 64013

# Tag tokens in the order Kosmos2Processor adds them (ids 64002 ... 64012 in the released vocabulary).
TAG_TOKENS = (
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
)


def loc_token(index: int) -> str:
    """``<patch_index_0044>`` for 44 (zero-padded to four digits, as the processor writes them)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"a location index must be a non-negative int, got {index!r}")
    return f"<patch_index_{index:04d}>"


def loc_tokens(num_bins: int = 32) -> list[str]:
    """All location tokens of a ``num_bins x num_bins`` grid, in id order."""
    return [loc_token(i) for i in range(num_bins * num_bins)]


def _as_long(x, what: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must be integers, got {t.dtype}")
    return t.long()


def _first_outside(t: torch.Tensor, lo: int, hi: int) -> tuple[tuple[int, ...], int] | None:
    bad = (t < lo) | (t >= hi)
    if not bool(bad.any()):
        return None
    where = first_true(bad)
    return where, int(t[where])


def loc_indices_to_token_ids(indices, num_bins: int = 32, first_loc_token_id: int = FIRST_LOC_TOKEN_ID):
    """Location indices (any shape) -> token ids. Raises ValueError naming an index outside the grid."""
    t = _as_long(indices, "indices")
    bad = _first_outside(t, 0, num_bins * num_bins)
    if bad:
        raise ValueError(
            f"indices{list(bad[0])} = {bad[1]} is outside the {num_bins}x{num_bins} grid [0, {num_bins * num_bins})"
        )
    return t + first_loc_token_id


def token_ids_to_loc_indices(token_ids, num_bins: int = 32, first_loc_token_id: int = FIRST_LOC_TOKEN_ID):
    """Location token ids (any shape) -> indices. Raises ValueError naming an id that is no location token."""
    t = _as_long(token_ids, "token_ids")
    last = first_loc_token_id + num_bins * num_bins
    bad = _first_outside(t, first_loc_token_id, last)
    if bad:
        raise ValueError(
            f"token_ids{list(bad[0])} = {bad[1]} is not a location token id [{first_loc_token_id}, {last})"
        )
    return t - first_loc_token_id


def is_loc_token(token_ids, num_bins: int = 32, first_loc_token_id: int = FIRST_LOC_TOKEN_ID) -> torch.Tensor:
    """Boolean mask of the location token ids in ``token_ids``."""
    t = _as_long(token_ids, "token_ids")
    return (t >= first_loc_token_id) & (t < first_loc_token_id + num_bins * num_bins)
