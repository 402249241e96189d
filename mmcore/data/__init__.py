"""Data utilities: sample packing (``mmcore.data.packing``)."""

from mmcore.data.packing import (
    IGNORE_INDEX,
    KOSMOS2_IMAGE_END_ID,
    Kosmos2PackingCollator,
    PackedBatchSampler,
    collate_kosmos2_packed,
    first_fit_decreasing,
    first_fit_decreasing_ref,
    kosmos2_labels,
)

__all__ = [
    "IGNORE_INDEX",
    "KOSMOS2_IMAGE_END_ID",
    "Kosmos2PackingCollator",
    "PackedBatchSampler",
    "collate_kosmos2_packed",
    "first_fit_decreasing",
    "first_fit_decreasing_ref",
    "kosmos2_labels",
]
