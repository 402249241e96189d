"""Evaluation: referring expressions (RefCOCO family), Flickr30k Entities phrase grounding (ANY-BOX), retrieval
(R@k, median rank) and captioning (CIDEr-D). The metric functions take predictions directly; ``mmcore.eval.kosmos2``
produces them from a Kosmos-2 model, and ``mmcore eval`` runs both from the command line."""

from mmcore.eval.boxes import box_iou, coco_box, xywh_to_xyxy
from mmcore.eval.cider import cider_d, simple_tokenize
from mmcore.eval.flickr import FlickrPhrase, any_box_recall, flickr_prompt, load_flickr, phrase_hits
from mmcore.eval.refexp import RefExample, load_refexp, rec_accuracy, rec_correct, rec_prompt
from mmcore.eval.retrieval import cosine_scores, retrieval_metrics

__all__ = [
    "FlickrPhrase",
    "RefExample",
    "any_box_recall",
    "box_iou",
    "cider_d",
    "coco_box",
    "cosine_scores",
    "flickr_prompt",
    "load_flickr",
    "load_refexp",
    "phrase_hits",
    "rec_accuracy",
    "rec_correct",
    "rec_prompt",
    "retrieval_metrics",
    "simple_tokenize",
    "xywh_to_xyxy",
]
