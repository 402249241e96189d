"""Multi-head attention on packed tokens (DESIGN.md "Data layout: packed sequences"), every product through
``mmcore.ops.packed_attention``: self-attention with one fused q/k/v projection, and cross-attention whose queries
come from one packed stream and keys/values (one fused k/v projection) from another."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcore import ops


@dataclass
class Segments:
    """Packed segments: segment s is ``cu_seqlens[s]:cu_seqlens[s+1]``; ``max_seqlen`` bounds their lengths."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def uniform(cls, count: int, length: int, device=None) -> Segments:
        """``count`` segments of ``length`` tokens each (vision tokens: every sample has as many)."""
        cu = torch.arange(count + 1, device=device, dtype=torch.int32) * length
        return cls(cu, length)


class PackedSelfAttention(nn.Module):
    """q, k, v = split(qkv(x)); attention within each segment in mode full / causal / prefix; out_proj."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seg: Segments, mode: str = "full", prefix_lens=None) -> torch.Tensor:
        """x: (tokens, dim) -> (tokens, dim)."""
        q, k, v = self.qkv(x).view(-1, 3, self.heads, self.head_dim).unbind(1)
        out = ops.packed_attention(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            seg.cu_seqlens,
            seg.cu_seqlens,
            seg.max_seqlen,
            seg.max_seqlen,
            mode=mode,
            prefix_lens=prefix_lens,
            dropout_p=self.dropout if self.training else 0.0,
            validate=False,
        )
        return self.out_proj(out.reshape(x.shape))


class PackedCrossAttention(nn.Module):
    """Queries of segment s (from x) attend to every key of segment s of ``context`` (full mode, Lq != Lk)."""

    def __init__(self, dim: int, context_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seg: Segments, context: torch.Tensor, context_seg: Segments) -> torch.Tensor:
        """x: (tokens, dim); context: (context tokens, context_dim) -> (tokens, dim)."""
        q = self.q_proj(x).view(-1, self.heads, self.head_dim)
        k, v = self.kv(context).view(-1, 2, self.heads, self.head_dim).unbind(1)
        out = ops.packed_attention(
            q,
            k.contiguous(),
            v.contiguous(),
            seg.cu_seqlens,
            context_seg.cu_seqlens,
            seg.max_seqlen,
            context_seg.max_seqlen,
            mode="full",
            dropout_p=self.dropout if self.training else 0.0,
            validate=False,
        )
        return self.out_proj(out.reshape(x.shape))
