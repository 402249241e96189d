"""Checks on token ids that every model's embedding needs before its lookup."""

from __future__ import annotations

import torch


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """ValueError naming the first bad id unless every id is in [0, vocab_size) (the embedding lookup's own error is
    an IndexError, or a device assert on a GPU). One host read; skipped while torch.compile traces."""
    if torch.compiler.is_compiling() or input_ids.numel() == 0:
        return
    low, high = torch.aminmax(input_ids)
    low, high = int(low), int(high)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside the vocabulary [0, {vocab_size})")
