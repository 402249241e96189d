"""Counter-based random numbers for attention dropout: Philox-4x32-10, as Triton's ``tl.randint``.

The Triton kernel draws ``tl.randint(seed, counter)`` in-kernel; the C++ kernel and the tests regenerate the
same numbers from the same ``(seed, counter)``, so a dropout mask is reproducible on every backend. An
attention element (query head h, packed query row i, key j counted from its segment's first key) uses

    counter = offset + (h * total_q + i) * max_seqlen_k + j

and is kept when the 32-bit draw is >= ``dropout_threshold(p)``; kept values are scaled by 1 / (1 - p).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # NOTE: a * b of two 32-bit values can exceed int64's range; the multiply wraps modulo 2**64, and the
    # masks recover the true high and low words.
    prod = b * a
    return (prod >> 32) & _M32, prod & _M32


def philox_randint(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The first 32-bit output of Philox-4x32-10 for each int64 counter, as Triton's ``tl.randint(seed,
    counter)`` with int64 counters: key (seed low word, seed high word), state (counter low word, counter high
    word, 0, 0). Returns int64 values in [0, 2**32)."""
    c = counters.to(torch.int64)
    c0, c1 = c & _M32, (c >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def dropout_threshold(p: float) -> int:
    """Draws below this 32-bit threshold are dropped: P(drop) = threshold / 2**32 ~= p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return int(p * 4294967296.0)


def dropout_keep_mask(
    seed: int, offset: int, head: int, rows: torch.Tensor, cols: torch.Tensor, total_q: int, max_seqlen_k: int, p: float
) -> torch.Tensor:
    """Boolean keep mask for one head: ``rows`` (packed query indices, shape (m, 1)) x ``cols`` (keys
    counted from the segment's first key, shape (1, n))."""
    counters = offset + (head * total_q + rows.to(torch.int64)) * max_seqlen_k + cols.to(torch.int64)
    return philox_randint(seed, counters) >= dropout_threshold(p)
