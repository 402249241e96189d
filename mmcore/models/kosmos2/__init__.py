"""Kosmos-2 on mmcore's ops: exact transformers weights, packed training, batched grounded generation."""

from mmcore.models.kosmos2.config import Kosmos2Config, Kosmos2TextConfig
from mmcore.models.kosmos2.modeling import Kosmos2ForConditionalGeneration, Kosmos2Output, KVCache, PackedLayout
from mmcore.models.kosmos2.processing import Kosmos2Processor
from mmcore.models.layers.vit import ViTConfig

__all__ = [
    "KVCache",
    "Kosmos2Config",
    "Kosmos2ForConditionalGeneration",
    "Kosmos2Output",
    "Kosmos2Processor",
    "Kosmos2TextConfig",
    "PackedLayout",
    "ViTConfig",
]
