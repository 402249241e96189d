"""Beam-search bookkeeping with transformers' rules (``GenerationMixin._beam_search``, ``early_stopping=False``), for
any model that gives next-token log-probabilities for ``batch x beams`` rows: COSA's captions and Kosmos-2's
``generate(num_beams=...)``.

Per step, for each batch item: the 2k best continuations of its k running beams (accumulated log-probabilities);
a continuation that ends (``eos`` or the length limit) and is among the k best is scored ``sum(log p) / (generated
tokens ** length_penalty)`` and kept if among the k best finished; the k best continuations that did not end run on.
The search ends when no running beam can beat the worst of k finished ones (its score as if it finished now) or
every continuation has ended; the answer is the best finished sequence.
"""

from __future__ import annotations

import torch

BIG = 1.0e9


def check_num_beams(beams) -> int:
    """``num_beams`` must be an int >= 1 (1: no beam search)."""
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {beams!r}")
    return beams


class BeamSearch:
    """prompts (batch, prompt_len) int64, the same for a batch item's k beams; ``width`` the longest sequence
    (prompt_len + max_new_tokens); ``fill`` the id after a finished sequence's end."""

    def __init__(self, prompts: torch.Tensor, beams: int, width: int, *, eos_id: int, fill: int, length_penalty=1.0):
        check_num_beams(beams)
        b, start = prompts.shape
        dev, k = prompts.device, beams
        self.k, self.start, self.cur, self.width = k, start, start, width
        self.eos_id, self.fill, self.length_penalty = eos_id, fill, float(length_penalty)
        self.run = torch.full((b, k, width), fill, dtype=torch.long, device=dev)
        self.run[:, :, :start] = prompts[:, None, :]
        self.run_scores = torch.zeros(b, k, device=dev)
        self.run_scores[:, 1:] = -BIG  # the k beams start identical: only the first may spread
        self.fin, self.fin_scores = self.run.clone(), torch.full((b, k), -BIG, device=dev)
        self.fin_flag = torch.zeros(b, k, dtype=torch.bool, device=dev)
        self.improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
        self.among_best = torch.arange(2 * k, device=dev) < k
        self.done = False

    @property
    def sequences(self) -> torch.Tensor:
        """(batch * k, cur) the running beams so far, row b * k + j = beam j of item b."""
        return self.run[:, :, : self.cur].reshape(-1, self.cur)

    def step(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log_probs (batch * k, vocab), already processed (banned tokens -inf). Returns (source, tokens), each
        (batch * k,): running row r continues the previous row ``source[r]`` with ``tokens[r]``. Sets ``done``."""
        b, k, width, cur = self.run.shape[0], self.k, self.width, self.cur
        vocab = log_probs.shape[-1]
        total = (log_probs.float().view(b, k, vocab) + self.run_scores[:, :, None]).view(b, k * vocab)
        cand_scores, flat = total.topk(2 * k, dim=1)
        beam, token = flat // vocab, flat % vocab
        cand = self.run.gather(1, beam[:, :, None].expand(-1, -1, width)).clone()
        cand[:, :, cur] = token
        ended = (token == self.eos_id) | (cur + 1 >= width)
        alive = cand_scores - BIG * ended.float()
        keep = alive.topk(k, dim=1).indices
        self.run = cand.gather(1, keep[:, :, None].expand(-1, -1, width))
        self.run_scores = alive.gather(1, keep)
        just_finished = ended & self.among_best
        scored = cand_scores / ((cur + 1 - self.start) ** self.length_penalty)
        scored = scored - BIG * (~self.improvable).float() - BIG * (~just_finished).float()
        merged = torch.cat([self.fin_scores, scored], 1)
        best = merged.topk(k, dim=1).indices
        self.fin = torch.cat([self.fin, cand], 1).gather(1, best[:, :, None].expand(-1, -1, width))
        self.fin_flag = torch.cat([self.fin_flag, just_finished], 1).gather(1, best)
        self.fin_scores = merged.gather(1, best)
        self.cur = cur = cur + 1
        best_possible = self.run_scores[:, :1] / ((cur - self.start) ** self.length_penalty)
        worst = torch.where(self.fin_flag, self.fin_scores.min(1, keepdim=True).values, -BIG)
        self.improvable &= (best_possible > worst).any(1, keepdim=True)
        self.done = not bool(self.improvable.any()) or bool(ended.all())
        offsets = torch.arange(b, device=beam.device)[:, None] * k
        source = (beam.gather(1, keep) + offsets).reshape(-1)
        return source, token.gather(1, keep).reshape(-1)

    def best(self) -> torch.Tensor:
        """(batch, n) the best finished sequence of each item, ``fill`` after its end, cut to the longest."""
        out = self.fin[:, 0]
        is_end = out[:, self.start :] == self.eos_id
        limit = torch.full_like(out[:, 0], self.cur)  # no eos: it ran to the length limit
        ends = torch.where(is_end.any(1), is_end.float().argmax(1) + self.start + 1, limit)
        n = int(ends.max())
        out = out[:, :n].clone()
        out[torch.arange(n, device=out.device)[None, :] >= ends[:, None]] = self.fill
        return out
