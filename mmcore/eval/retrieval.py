"""Text <-> video (or image) retrieval metrics from a score matrix or from features: R@1/5/10, median and mean rank.

The ranking rule is ``mmcore.models.cosa.retrieval.rank_metrics`` (a query's rank is that of its best-ranked
positive; ties count against it); this module adds the loading of saved scores or features, the cosine similarity
computed in batches, and the text-of-video mapping for datasets with several captions per video. A COSA model in
Python is evaluated end to end (ITC ranking, ITM re-ranking) by ``mmcore.models.cosa.evaluate_retrieval``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmcore.models.cosa.retrieval import check_video_of_text, rank_metrics


def load_matrix(path: str | Path, name: str = "matrix") -> torch.Tensor:
    """A 2-D float tensor from ``.npy`` (numpy) or ``.pt``/``.pth`` (``torch.save`` of a tensor)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    if path.suffix == ".npy":
        t = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix in (".pt", ".pth"):
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {path} holds a {type(t).__name__}, expected a tensor")
    else:
        raise ValueError(f"{name}: {path} must be .npy, .pt or .pth")
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D float matrix, got {t.dtype} {tuple(t.shape)}")
    return t


def load_video_of_text(path: str | Path, num_texts: int, num_videos: int) -> torch.Tensor:
    """(texts,) int64 from a JSON list of column indices, one per text row."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(type(v) is int for v in data):
        raise ValueError(f"{path} must hold a JSON list of ints (the video column of each text row)")
    return check_video_of_text(torch.tensor(data, dtype=torch.int64), num_texts, num_videos, name=str(path))


def cosine_scores(
    text_features: torch.Tensor, video_features: torch.Tensor, *, batch_size: int = 1024, progress: bool = False
) -> torch.Tensor:
    """(texts, videos) cosine similarities, computed ``batch_size`` text rows at a time (float32)."""
    if text_features.dim() != 2 or video_features.dim() != 2 or text_features.shape[1] != video_features.shape[1]:
        raise ValueError(
            f"features must be (texts, dim) and (videos, dim), got {tuple(text_features.shape)} and "
            f"{tuple(video_features.shape)}"
        )
    v = F.normalize(video_features.float(), dim=-1)
    rows = range(0, text_features.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, unit="batch", file=sys.stderr, desc="similarities")
    out = [F.normalize(text_features[s : s + batch_size].float(), dim=-1) @ v.t() for s in rows]
    return torch.cat(out) if out else text_features.new_zeros(0, video_features.shape[0])


def retrieval_metrics(scores: torch.Tensor, video_of_text: torch.Tensor | None = None) -> dict:
    """``{"t2v": rank_metrics, "v2t": rank_metrics}`` of a (texts, videos) score matrix; video_of_text (texts,) maps
    each text to its video (default: text i describes video i, which needs a square matrix)."""
    texts, videos = scores.shape
    if video_of_text is None:
        if texts != videos:
            raise ValueError(f"{texts} texts and {videos} videos: give the video of each text")
        video_of_text = torch.arange(texts)
    video_of_text = check_video_of_text(video_of_text, texts, videos)
    pos = video_of_text[:, None] == torch.arange(videos)[None, :]
    return {"t2v": rank_metrics(scores, pos), "v2t": rank_metrics(scores.t(), pos.t())}
