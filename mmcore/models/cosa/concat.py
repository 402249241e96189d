"""Online sample concatenation (shared/research/cosa.md section 3) on packed tokens.

COSA turns every sample into a pseudo video-paragraph pair: its own frames and caption followed by those of
``k - 1`` partners drawn at random from the batch (the global batch when ``torch.distributed`` is initialised).
Here the partners' vision features are the ones the single-sample pass already computed (gathered across ranks,
with gradients through the local ones) unless ``reencode=True`` asks for the original's re-encoding of the joined
pixels; captions are joined at the token level from the packed single-sample tokens -- ``[CLS]`` + the bodies of
the members' captions in frame order + ``[SEP]``, cut to the token budget -- never re-tokenised. Member j's frames
take temporal slots ``j*n .. j*n + n - 1``.

Both passes run the same model code on the same kind of packed stream; they differ in which tokens the stream holds
and in ``cu_seqlens`` (one segment per caption, or one per paragraph). Token i of a paragraph attends (full
or causal) only to tokens of its paragraph and cross-attends only to the frames of its own sample's members.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmcore.models.layers.attention import Segments

# ------------------------------------------------------------------------------------------ packed text


@dataclass
class PackedText:
    """Packed token ids ``(tokens,)`` with segment offsets ``cu_seqlens`` (segments + 1,) int32."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def segments(self) -> Segments:
        return Segments(self.cu_seqlens, self.max_seqlen)

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def first(self) -> torch.Tensor:
        """(segments,) int64: the index of each segment's first token ([CLS])."""
        return self.cu_seqlens[:-1].long()

    def __len__(self) -> int:
        return self.cu_seqlens.numel() - 1

    @classmethod
    def from_lengths(cls, input_ids: torch.Tensor, lengths: torch.Tensor) -> PackedText:
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(input_ids, cu, int(lengths.max()) if lengths.numel() else 0)


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PackedText:
    """Right-padded (batch, seq) ids and 0/1 mask -> PackedText (the padding dropped)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, seq) tensor")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integers, got {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)} like input_ids")
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    if attention_mask.device.type == "cpu":
        prefix = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
        if not torch.equal(prefix, keep) or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must be 0/1 with each row's ones first (right padding)")
        if bool((lengths == 0).any()):
            raise ValueError(f"attention_mask row {int((lengths == 0).nonzero()[0, 0])} is empty")
    return PackedText.from_lengths(input_ids[keep].long(), lengths)


def unpack(x: torch.Tensor, text: PackedText, seq: int) -> torch.Tensor:
    """(tokens, ...) packed -> (segments, seq, ...) right-padded with zeros."""
    out = x.new_zeros(len(text), seq, *x.shape[1:])
    keep = torch.arange(seq, device=x.device)[None, :] < text.lengths[:, None]
    out[keep] = x
    return out


def token_positions(text: PackedText) -> torch.Tensor:
    """(tokens,) int64: each token's index within its segment (BERT's position ids)."""
    idx = torch.arange(text.input_ids.numel(), device=text.input_ids.device)
    return idx - torch.repeat_interleave(text.first, text.lengths, output_size=idx.numel())


def select_segments(text: PackedText, index: torch.Tensor) -> PackedText:
    """The segments ``index`` (int64, repeats allowed) of ``text``, in that order."""
    lengths = text.lengths[index]
    total = int(lengths.sum())
    starts = torch.repeat_interleave(text.first[index], lengths, output_size=total)
    out = PackedText.from_lengths(text.input_ids[:0], lengths)
    offsets = torch.arange(total, device=index.device) - torch.repeat_interleave(out.first, lengths, output_size=total)
    return PackedText(text.input_ids[starts + offsets], out.cu_seqlens, out.max_seqlen)


# ------------------------------------------------------------------------------------------ global batch


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(batch, ...) on every rank -> ((world * batch, ...), this rank's offset). Other ranks' rows carry no
    gradient; this rank's rows are ``x`` itself, so gradients flow through them (every rank must pass the same
    batch size). Without an initialised process group: (x, 0)."""
    if not distributed():
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def gather_packed(text: PackedText) -> tuple[PackedText, int]:
    """Every rank's packed captions, in rank order, and this rank's first segment index."""
    if not distributed():
        return text, 0
    lengths, offset = gather_batch(text.lengths)
    width = torch.tensor([text.input_ids.numel()], device=text.input_ids.device)
    widths, _ = gather_batch(width)
    ids = F.pad(text.input_ids, (0, int(widths.max()) - text.input_ids.numel()))
    gathered, _ = gather_batch(ids[None])
    ids = torch.cat([row[:w] for row, w in zip(gathered, widths.tolist(), strict=True)])
    return PackedText.from_lengths(ids, lengths), offset


# ------------------------------------------------------------------------------------------ concatenation


def sample_partners(batch: int, global_batch: int, k: int, *, offset: int = 0, generator=None) -> torch.Tensor:
    """(batch, k) int64 indices into the global batch: column 0 is the sample itself (``offset + row``), columns
    1..k-1 its partners, distinct within a row and drawn uniformly from the whole global batch (which may include
    the sample itself, as in the original). A global batch smaller than k - 1 repeats partners."""
    device = generator.device if generator is not None else None  # one generator serves masks and partners
    own = torch.arange(batch, device=device) + offset
    if k == 1:
        return own[:, None]
    if global_batch >= k - 1:
        partners = torch.rand(batch, global_batch, generator=generator, device=device).argsort(1)[:, : k - 1]
    else:
        partners = torch.randint(global_batch, (batch, k - 1), generator=generator, device=device)
    return torch.cat([own[:, None], partners], 1)


@dataclass
class ConcatText:
    """Joined captions: ``text`` holds one paragraph per sample; ``member`` (tokens,) int64 says which member
    (0 = the sample itself, j = partner j) each token came from, -1 for the paragraph's [CLS] and [SEP]."""

    text: PackedText
    member: torch.Tensor


def concat_captions(captions: PackedText, members: torch.Tensor, max_tokens: int, cls_id: int, sep_id: int):
    """Join the captions ``members`` (rows, k) of ``captions`` (each ``[CLS] body [SEP]``) into one paragraph per row:
    ``[CLS] body_0 body_1 ... body_{k-1} [SEP]``, bodies cut from the end to fit ``max_tokens``, as a tokenizer
    truncates the joined string (the original's ``truncation=True, max_length=80``)."""
    rows, k = members.shape
    device = captions.input_ids.device
    body_len = (captions.lengths - 2).clamp(min=0)[members]  # (rows, k)
    before = body_len.cumsum(1) - body_len
    kept = torch.minimum(body_len, (max_tokens - 2 - before).clamp(min=0))  # tokens of each body that fit
    flat_kept = kept.reshape(-1)
    body_total = int(flat_kept.sum())
    # source index of each kept body token, in (row, member, token) order
    starts = torch.repeat_interleave(captions.first[members].reshape(-1) + 1, flat_kept, output_size=body_total)
    chunk_first = F.pad(flat_kept.cumsum(0), (1, 0))[:-1]
    within = torch.arange(body_total, device=device) - torch.repeat_interleave(
        chunk_first, flat_kept, output_size=body_total
    )
    body_ids = captions.input_ids[starts + within]
    body_member = torch.arange(k, device=device).repeat(rows).repeat_interleave(flat_kept, output_size=body_total)
    # place the bodies between each row's [CLS] and [SEP]
    lengths = kept.sum(1) + 2
    out = PackedText.from_lengths(captions.input_ids.new_empty(int(lengths.sum())), lengths)
    member = torch.full_like(out.input_ids, -1)
    is_body = torch.ones_like(out.input_ids, dtype=torch.bool)
    is_body[out.first] = False
    is_body[out.cu_seqlens[1:].long() - 1] = False
    out.input_ids[out.first] = cls_id
    out.input_ids[out.cu_seqlens[1:].long() - 1] = sep_id
    out.input_ids[is_body] = body_ids
    member[is_body] = body_member
    return ConcatText(out, member)


@dataclass
class ConcatBatch:
    """The concatenated pass's inputs: paragraphs (``text``), vision features ``(batch, k * frames, tokens, dim)``
    of the members in frame order (member j's frames are slots ``j*frames .. (j+1)*frames - 1``), ``members``
    (batch, k) global indices, ``member`` (paragraph tokens,) as in ConcatText."""

    text: PackedText
    features: torch.Tensor
    members: torch.Tensor
    member: torch.Tensor


def concatenate(
    captions: PackedText,
    features: torch.Tensor,
    k: int,
    *,
    max_tokens: int,
    cls_id: int,
    sep_id: int,
    generator=None,
    pixel_values: torch.Tensor | None = None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ConcatBatch:
    """Draw k - 1 partners per sample from the (global) batch and build the concatenated pass.

    captions: this rank's packed captions; features: (batch, frames, tokens, dim) this rank's vision features. With
    ``pixel_values`` (batch, frames, 3, H, W) and ``encode`` the joined pixels are re-encoded (every member then
    carries gradients, at k times the vision cost); otherwise the given features are reused."""
    batch, frames = features.shape[:2]
    all_captions, offset = gather_packed(captions)
    members = sample_partners(batch, len(all_captions), k, offset=offset, generator=generator)
    members = members.to(features.device)
    joined = concat_captions(all_captions, members, max_tokens, cls_id, sep_id)
    if encode is not None and pixel_values is not None:
        all_pixels, _ = gather_batch(pixel_values)
        joined_pixels = all_pixels[members].flatten(1, 2)  # (batch, k * frames, 3, H, W)
        feats = encode(joined_pixels)
    else:
        all_features, _ = gather_batch(features)
        feats = all_features[members].flatten(1, 2)  # (batch, k * frames, tokens, dim)
    return ConcatBatch(joined.text, feats, members, joined.member)
