"""COSA retrieval evaluation: rank metrics on hand-made scores, ITC ranking and ITM re-ranking against per-pair
loops on a tiny model."""

from __future__ import annotations

import pytest
import torch

from mmcore.models.cosa import pack_padded
from mmcore.models.cosa.concat import select_segments
from mmcore.models.cosa.retrieval import evaluate_retrieval, rank_metrics, rerank

pytest.importorskip("transformers")

from cosa_tiny import captions, pixels, tiny_cosa  # noqa: E402


def test_rank_metrics_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.0],  # positive 0 first: rank 1
            [0.9, 0.1, 0.2, 0.0],  # positive 1 last but one: rank 3
            [0.5, 0.5, 0.5, 0.9],  # positive 2 tied with two others below 0.9: rank 4
            [0.1, 0.2, 0.3, 0.4],  # positives 0 and 3: the best (3) is first
        ]
    )
    pos = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = pos[3, 0] = pos[3, 3] = True
    m = rank_metrics(scores, pos)
    assert m == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "median_rank": 2.0, "mean_rank": 2.25}
    with pytest.raises(ValueError):
        rank_metrics(scores, torch.zeros(4, 4, dtype=torch.bool))
    nan = scores.clone()
    nan[1, 0] = float("nan")  # compares False with everything: it would rank the positive first
    with pytest.raises(ValueError, match=r"scores\[1, 0\] is nan"):
        rank_metrics(nan, pos)
    with pytest.raises(ValueError, match="positives must be a bool tensor"):
        rank_metrics(scores, pos.long())
    with pytest.raises(ValueError, match="no query row"):
        rank_metrics(scores[:0], pos[:0])


def test_evaluate_retrieval_arguments_are_named(data):
    model, ids, mask, feats = data
    for video_of_text, match in (
        ([0, 1, 2, 3, 4, 9], r"video_of_text\[5\] = 9 is not a video index in \[0, 6\)"),
        ([0, 1, 2, 3, 4, -1], r"video_of_text\[5\] = -1"),
        ([0, 1, 2], "video_of_text maps 3 texts, but there are 6"),
        ([0, 1, 2, 3, 4, 4], "video 5 has no text in video_of_text"),
    ):
        with pytest.raises(ValueError, match=match):
            evaluate_retrieval(model, ids, mask, features=feats, video_of_text=video_of_text)
    listed = evaluate_retrieval(model, ids, mask, features=feats, video_of_text=[0, 1, 2, 3, 4, 5], rerank_k=0)
    assert listed == evaluate_retrieval(model, ids, mask, features=feats, rerank_k=0)
    with pytest.raises(ValueError, match="rerank_k must be an int"):
        evaluate_retrieval(model, ids, mask, features=feats, rerank_k=2.5)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        evaluate_retrieval(model, ids, mask, features=feats, batch_size=0)
    with pytest.raises(ValueError, match=r"features must be \(videos, frames, tokens, dim\)"):
        evaluate_retrieval(model, ids, mask, features=feats[:, 0])


@pytest.fixture(scope="module")
def data():
    model = tiny_cosa()
    ids, mask = captions([5, 7, 4, 6, 3, 8], seed=1)
    with torch.no_grad():
        feats = model.encode_vision(pixels(6, 2, seed=2))
    return model, ids, mask, feats


def per_pair_itm(model, text, feats, t, v):
    one = select_segments(text, torch.tensor([t]))
    return float(model.itm_head(model.joint(one, feats[v : v + 1])[0]).softmax(-1)[1])


def test_itc_ranking_matches_similarities(data):
    model, ids, mask, feats = data
    out = evaluate_retrieval(model, ids, mask, features=feats, rerank_k=0)
    with torch.no_grad():
        text = pack_padded(ids, mask)
        sim = model.text_features(text) @ model.video_features(feats).t()
    assert out["itc"]["t2v"] == rank_metrics(sim, torch.eye(6, dtype=torch.bool))
    assert out["itc"]["v2t"] == rank_metrics(sim.t(), torch.eye(6, dtype=torch.bool))
    assert "itm" not in out


@pytest.mark.parametrize("videos_are_queries", [False, True], ids=["t2v", "v2t"])
def test_itm_rerank_of_top_k_against_per_pair_scores(data, videos_are_queries):
    model, ids, mask, feats = data
    text = pack_padded(ids, mask)
    with torch.no_grad():
        sim = model.text_features(text) @ model.video_features(feats).t()
        sim = sim.t() if videos_are_queries else sim
        out = rerank(model, text, feats, sim, 3, videos_are_queries=videos_are_queries, batch_size=4)
        for q in range(6):
            top = sim[q].topk(3).indices.tolist()
            for c in range(6):
                if c in top:
                    t, v = (c, q) if videos_are_queries else (q, c)
                    assert abs(float(out[q, c]) - per_pair_itm(model, text, feats, t, v)) < 1e-5
                else:
                    assert float(out[q, c]) < 0 <= float(out[q, top].min())
            rest = [c for c in range(6) if c not in top]  # the others keep ITC order
            assert sorted(rest, key=lambda c: -float(sim[q, c])) == sorted(rest, key=lambda c: -float(out[q, c]))


def test_several_captions_per_video(data):
    model, ids, mask, feats = data
    video_of_text = torch.tensor([0, 0, 1, 1, 2, 2])
    out = evaluate_retrieval(model, ids, mask, features=feats[:3], video_of_text=video_of_text, rerank_k=2)
    assert set(out) == {"itc", "itm"} and set(out["itm"]) == {"t2v", "v2t"}
    assert out["itc"]["v2t"]["R@5"] == 100.0  # 6 candidates, two positives each
    with pytest.raises(ValueError, match="video_of_text"):
        evaluate_retrieval(model, ids, mask, features=feats[:3])


def test_return_scores_are_the_ranked_scores(data):
    """return_scores gives the matrices the metrics were computed from: ITC similarities and the ITM re-ranking."""
    model, ids, mask, feats = data
    out = evaluate_retrieval(model, ids, mask, features=feats, rerank_k=3, return_scores=True)
    text = pack_padded(ids, mask)
    with torch.no_grad():
        sim = model.text_features(text) @ model.video_features(feats).t()
        t2v = rerank(model, text, feats, sim, 3, videos_are_queries=False)
    positives = torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(out["scores"]["itc"], sim)
    torch.testing.assert_close(out["scores"]["itm"], t2v)
    assert out["itm"]["t2v"] == rank_metrics(out["scores"]["itm"], positives)
    assert "scores" not in evaluate_retrieval(model, ids, mask, features=feats, rerank_k=0)
