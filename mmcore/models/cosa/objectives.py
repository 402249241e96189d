"""COSA's objectives as functions of packed tensors (shared/research/cosa.md section 2.3): the contrastive loss, hard
negatives for ITM, and the token masker shared by MLM, masked captioning and QA. Everything is vectorised: no Python
loop over the batch or the tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def itc_loss(sim_t2v: torch.Tensor, sim_v2t: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1):
    """Symmetric contrastive loss: the mean of text->video and video->text cross-entropies with label smoothing.

    sim_t2v: (batch, global batch) local texts against every video, already divided by the temperature; sim_v2t the
    same for local videos against every text; targets (batch,): the column of each row's own pair."""
    t2v = F.cross_entropy(sim_t2v.float(), targets, label_smoothing=label_smoothing)
    v2t = F.cross_entropy(sim_v2t.float(), targets, label_smoothing=label_smoothing)
    return (t2v + v2t) / 2


def sample_hard_negatives(sim: torch.Tensor, targets: torch.Tensor, generator=None) -> torch.Tensor:
    """One negative column per row, drawn with probability ``softmax(sim) + 1e-4`` and never the row's own pair.

    sim: (batch, global batch); targets (batch,): each row's own column. Returns (batch,) int64 column indices --
    one ``torch.multinomial`` call for all rows (the original loops over the batch in Python). A global batch of one
    has no negative: the row's own column comes back (a weight of zero everywhere is not a distribution)."""
    weights = torch.softmax(sim.detach().float(), dim=1) + 1e-4
    weights.scatter_(1, targets[:, None], 0.0)
    if weights.shape[1] == 1:
        return targets.clone()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(tokens,) int64: the segment each packed token belongs to."""
    idx = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)


def mask_tokens(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    probability: float,
    *,
    mask_token_id: int,
    random_range: tuple[int, int],
    eligible: torch.Tensor | None = None,
    generator=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's token masker on packed tokens: each eligible token is picked with ``probability``; a picked token
    becomes [MASK] (80%), a random id from ``random_range`` (10%) or stays (10%). Returns (masked ids, labels): labels
    hold the original id at picked tokens and -100 elsewhere.

    eligible: (tokens,) bool; default every token but each segment's first ([CLS]). A segment with eligible tokens
    always gets at least one pick: where the draw picked none, its eligible token with the smallest draw is picked
    (the original re-draws the whole row until one is picked)."""
    total = input_ids.numel()
    seg = segment_ids(cu_seqlens, total)
    if eligible is None:
        eligible = torch.ones(total, dtype=torch.bool, device=input_ids.device)
        eligible[cu_seqlens[:-1].long()[cu_seqlens[1:] > cu_seqlens[:-1]]] = False
    u = torch.rand(total, generator=generator, device=input_ids.device)
    u = u.masked_fill(~eligible, 2.0)
    smallest = torch.full((cu_seqlens.numel() - 1,), 2.0, device=u.device).scatter_reduce(0, seg, u, "amin")
    picked = eligible & ((u < probability) | (u == smallest[seg]))
    kind = torch.rand(total, generator=generator, device=input_ids.device)
    random_ids = torch.randint(*random_range, (total,), generator=generator, device=input_ids.device)
    masked = torch.where(picked & (kind < 0.8), mask_token_id, input_ids)
    masked = torch.where(picked & (kind >= 0.8) & (kind < 0.9), random_ids, masked)
    labels = torch.where(picked, input_ids, IGNORE_INDEX)
    return masked, labels
