"""COSA on mmcore's ops: a CLIP ViT, BERT with cross-attention on packed tokens, online concatenation, objectives."""

from mmcore.models.cosa.concat import ConcatBatch, PackedText, concatenate, pack_padded, sample_partners
from mmcore.models.cosa.config import COSAConfig, COSATextConfig
from mmcore.models.cosa.modeling import COSAModel
from mmcore.models.cosa.retrieval import evaluate_retrieval, rank_metrics
from mmcore.models.layers.vit import ViTConfig

__all__ = [
    "COSAConfig",
    "COSAModel",
    "COSATextConfig",
    "ConcatBatch",
    "PackedText",
    "ViTConfig",
    "concatenate",
    "evaluate_retrieval",
    "pack_padded",
    "rank_metrics",
    "sample_partners",
]
