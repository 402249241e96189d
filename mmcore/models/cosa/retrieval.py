"""Text <-> video retrieval evaluation as COSA does it (shared/research/cosa.md section 4): rank every candidate by
ITC similarity, then re-rank each query's top k by the ITM head's match probability; R@1/5/10, median and mean rank
for both. Pairs for ITM are scored in batches of packed pairs, without a Python loop over queries."""

from __future__ import annotations

import torch

from mmcore.models.cosa.concat import PackedText, pack_padded, select_segments


def rank_metrics(scores: torch.Tensor, positives: torch.Tensor) -> dict:
    """scores (queries, candidates), higher first; positives (queries, candidates) bool, at least one per query.
    A query's rank is that of its best-ranked positive (1 = first; ties count against it). Returns R@1/5/10 in
    percent, the median and the mean rank."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a (queries, candidates) float tensor, got {_describe(scores)}")
    if not isinstance(positives, torch.Tensor) or positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool tensor, got {_describe(positives)}")
    if scores.shape != positives.shape or not bool(positives.any(1).all()):
        raise ValueError("positives must match scores in shape and hold at least one True per row")
    if scores.shape[0] == 0:
        raise ValueError("scores has no query row")
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).nonzero()[0].tolist()
        raise ValueError(f"scores[{bad[0]}, {bad[1]}] is {float(scores[bad[0], bad[1]])}: every score must be finite")
    best = scores.masked_fill(~positives, float("-inf")).amax(1, keepdim=True)
    ranks = (scores > best).sum(1) + 1 + ((scores == best) & ~positives).sum(1)
    ranks = ranks.double()
    return {
        "R@1": float((ranks <= 1).double().mean() * 100),
        "R@5": float((ranks <= 5).double().mean() * 100),
        "R@10": float((ranks <= 10).double().mean() * 100),
        "median_rank": float(ranks.quantile(0.5)),  # numpy's median: the mean of the middle two
        "mean_rank": float(ranks.mean()),
    }


def _describe(x) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


@torch.no_grad()
def itm_scores(model, text: PackedText, features: torch.Tensor, text_idx, video_idx, batch_size: int = 256):
    """(pairs,) match probabilities of texts ``text_idx`` with videos ``video_idx`` (the ITM head's class 1)."""
    out = []
    for s in range(0, text_idx.numel(), batch_size):
        t, v = text_idx[s : s + batch_size], video_idx[s : s + batch_size]
        pairs = select_segments(text, t)
        logits = model.itm_head(model.joint(pairs, features[v])[pairs.first])
        out.append(logits.float().softmax(-1)[:, 1])
    return torch.cat(out) if out else features.new_zeros(0)


def rerank(model, text, features, sim: torch.Tensor, k: int, *, videos_are_queries: bool, batch_size: int = 256):
    """ITC scores with each query's top k replaced by ITM probabilities, placed above every other candidate."""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # (queries, k)
    queries = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(k)
    cands = top.reshape(-1)
    t_idx, v_idx = (cands, queries) if videos_are_queries else (queries, cands)
    probs = itm_scores(model, text, features, t_idx, v_idx, batch_size).view(-1, k).to(sim.dtype)
    out = sim - sim.max() - 1.0  # every ITC score below the lowest probability (0)
    return out.scatter(1, top, probs)


@torch.no_grad()
def evaluate_retrieval(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    features: torch.Tensor | None = None,
    video_of_text: torch.Tensor | None = None,
    rerank_k: int = 50,
    batch_size: int = 256,
    return_scores: bool = False,
) -> dict:
    """Texts (captions, right-padded) against videos (batch, frames, 3, H, W) or their ``features``. video_of_text
    (texts,) maps each caption to its video (default: caption i describes video i). Returns {"itc": {"t2v": metrics,
    "v2t": metrics}, "itm": {...}} (``rank_metrics``); "itm" only when rerank_k > 0. return_scores: also
    ``"scores"``: {"itc": (texts, videos) similarities, "itm": the same with each text's top k re-ranked}."""
    for name, value in (("rerank_k", rerank_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if features is None:
        features = model.encode_vision(pixel_values)
    elif not isinstance(features, torch.Tensor) or features.dim() != 4:
        raise ValueError(
            f"features must be (videos, frames, tokens, dim) as encode_vision returns them, got {_describe(features)}"
        )
    text = pack_padded(input_ids, attention_mask)
    videos = features.shape[0]
    if video_of_text is None:
        if len(text) != videos:
            raise ValueError(f"{len(text)} captions for {videos} videos: pass video_of_text")
        video_of_text = torch.arange(len(text), device=features.device)
    else:
        video_of_text = check_video_of_text(video_of_text, len(text), videos).to(features.device)
    sim = model.text_features(text) @ model.video_features(features).t()  # (texts, videos)
    pos = video_of_text[:, None] == torch.arange(features.shape[0], device=sim.device)[None, :]
    out = {"itc": {"t2v": rank_metrics(sim, pos), "v2t": rank_metrics(sim.t(), pos.t())}}
    scores = {"itc": sim}
    if rerank_k > 0:
        t2v = rerank(model, text, features, sim, rerank_k, videos_are_queries=False, batch_size=batch_size)
        v2t = rerank(model, text, features, sim.t(), rerank_k, videos_are_queries=True, batch_size=batch_size)
        out["itm"] = {"t2v": rank_metrics(t2v, pos), "v2t": rank_metrics(v2t, pos.t())}
        scores["itm"] = t2v
    if return_scores:
        out["scores"] = scores
    return out


def check_video_of_text(video_of_text, texts: int, videos: int, name: str = "video_of_text") -> torch.Tensor:
    """(texts,) int64 video indices in [0, videos), each video described by at least one text (else v2t has no
    positive); a ValueError naming ``name`` otherwise. Accepts a tensor or a sequence of ints."""
    if not isinstance(video_of_text, torch.Tensor):
        video_of_text = torch.as_tensor(video_of_text)
    if video_of_text.is_floating_point() or video_of_text.is_complex() or video_of_text.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers (one video index per text), got {video_of_text.dtype}")
    if video_of_text.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one video index per text), got shape {tuple(video_of_text.shape)}")
    if video_of_text.shape[0] != texts:
        raise ValueError(f"{name} maps {video_of_text.shape[0]} texts, but there are {texts}")
    out_of_range = ((video_of_text < 0) | (video_of_text >= videos)).nonzero()
    if out_of_range.numel():
        i = int(out_of_range[0, 0])
        raise ValueError(f"{name}[{i}] = {int(video_of_text[i])} is not a video index in [0, {videos})")
    described = torch.zeros(videos, dtype=torch.bool, device=video_of_text.device)
    described[video_of_text] = True
    if not bool(described.all()):
        missing = int((~described).nonzero()[0, 0])
        raise ValueError(f"video {missing} has no text in {name} (v2t would have no positive)")
    return video_of_text.long()
