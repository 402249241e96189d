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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmcore.models.layers.attention import Segments

# ------------------------------------------------------------------------------------------ packed text


@dataclass
class PackedText:
    """Packed token ids ``(tokens,)`` with segment offsets ``cu_seqlens`` (segments + 1,) int32.

    valid_lengths: None (every token of a segment is real: the eager layout, no padding anywhere), or (segments,)
    int32 for the fixed-shape layout that ``torch.compile`` traces without data-dependent shapes: every segment is
    ``max_seqlen`` tokens wide, its first ``valid_lengths[s]`` real and the rest padding. Padding never reaches a real
    token: full attention runs as prefix attention with the real tokens as the prefix, causal attention never looks
    ahead, losses ignore it."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    valid_lengths: torch.Tensor | None = None

    @property
    def padded(self) -> bool:
        return self.valid_lengths is not None

    @property
    def segments(self) -> Segments:
        return Segments(self.cu_seqlens, self.max_seqlen)

    @property
    def extents(self) -> torch.Tensor:
        """(segments,) int64: the tokens each segment spans, padding included."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def lengths(self) -> torch.Tensor:
        """(segments,) int64: the real tokens of each segment."""
        return self.valid_lengths.long() if self.padded else self.extents

    @property
    def first(self) -> torch.Tensor:
        """(segments,) int64: the index of each segment's first token ([CLS])."""
        return self.cu_seqlens[:-1].long()

    def real(self) -> torch.Tensor:
        """(tokens,) bool: True at real tokens (everywhere in the eager layout)."""
        if not self.padded:
            return torch.ones_like(self.input_ids, dtype=torch.bool)
        valid = torch.repeat_interleave(self.lengths, self.extents, output_size=len(self.input_ids))
        return token_positions(self) < valid

    def with_ids(self, input_ids: torch.Tensor) -> PackedText:
        """The same segments holding other ids (masked copies)."""
        return dataclasses.replace(self, input_ids=input_ids)

    def __len__(self) -> int:
        return self.cu_seqlens.numel() - 1

    @classmethod
    def from_lengths(cls, input_ids: torch.Tensor, lengths: torch.Tensor) -> PackedText:
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(input_ids, cu, int(lengths.max()) if lengths.numel() else 0)

    @classmethod
    def from_rows(cls, input_ids: torch.Tensor, lengths: torch.Tensor) -> PackedText:
        """The fixed-shape layout of right-padded (rows, width) ids whose row r holds ``lengths[r]`` real tokens."""
        rows, width = input_ids.shape
        cu = Segments.uniform(rows, width, device=input_ids.device).cu_seqlens
        return cls(input_ids.reshape(-1), cu, width, lengths.to(torch.int32))


def pack_padded(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    keep_padding: bool | None = None,
    names: tuple[str, str] = ("input_ids", "attention_mask"),
) -> PackedText:
    """Right-padded (batch, seq) ids and 0/1 mask -> PackedText: the padding dropped (the eager layout), or kept in the
    fixed-shape layout (``PackedText.valid_lengths``) with ``keep_padding=True``; the default keeps it exactly when
    ``torch.compile`` is tracing, whose graphs then need no data-dependent shape. names: the caller's names of the two
    arguments, for the error messages."""
    ids_name, mask_name = names
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{ids_name} must be a (batch, seq) tensor")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"{ids_name} must be integers, got {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{mask_name} must have shape {tuple(input_ids.shape)} like {ids_name}")
    compiling = torch.compiler.is_compiling()
    keep_padding = compiling if keep_padding is None else keep_padding
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    if attention_mask.device.type == "cpu" and not compiling:
        prefix = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
        if not torch.equal(prefix, keep) or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"{mask_name} must be 0/1 with each row's ones first (right padding)")
        if bool((lengths == 0).any()):
            raise ValueError(f"{mask_name} row {int((lengths == 0).nonzero()[0, 0])} is empty")
    if keep_padding:
        return PackedText.from_rows(input_ids.long(), lengths)
    return PackedText.from_lengths(input_ids[keep].long(), lengths)


def unpack(x: torch.Tensor, text: PackedText, seq: int) -> torch.Tensor:
    """(tokens, ...) packed -> (segments, seq, ...) right-padded with zeros."""
    if text.padded:
        real = text.real().view(-1, *([1] * (x.dim() - 1)))
        rows = x.masked_fill(~real, 0).view(len(text), text.max_seqlen, *x.shape[1:])
        if seq <= text.max_seqlen:
            return rows[:, :seq]
        return F.pad(rows, (0, 0) * (x.dim() - 1) + (0, seq - text.max_seqlen))
    out = x.new_zeros(len(text), seq, *x.shape[1:])
    keep = torch.arange(seq, device=x.device)[None, :] < text.lengths[:, None]
    out[keep] = x
    return out


def token_positions(text: PackedText) -> torch.Tensor:
    """(tokens,) int64: each token's index within its segment (BERT's position ids)."""
    idx = torch.arange(text.input_ids.numel(), device=text.input_ids.device)
    return idx - torch.repeat_interleave(text.first, text.extents, output_size=idx.numel())


def select_segments(text: PackedText, index: torch.Tensor) -> PackedText:
    """The segments ``index`` (int64, repeats allowed) of ``text``, in that order."""
    if text.padded:
        rows = text.input_ids.view(len(text), text.max_seqlen)[index]
        return PackedText.from_rows(rows, text.valid_lengths[index])
    lengths = text.lengths[index]
    total = int(lengths.sum())
    starts = torch.repeat_interleave(text.first[index], lengths, output_size=total)
    out = PackedText.from_lengths(text.input_ids[:0], lengths)
    offsets = torch.arange(total, device=index.device) - torch.repeat_interleave(out.first, lengths, output_size=total)
    return PackedText(text.input_ids[starts + offsets], out.cu_seqlens, out.max_seqlen)


# ------------------------------------------------------------------------------------------ global batch


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_same_batch_on_every_rank(batch: int, device: torch.device | str = "cpu") -> None:
    """Raise ValueError on every rank at once when the ranks' batch sizes differ: the gathers below need equal sizes
    (unequal ones abort gloo and can hang NCCL), and a last batch without ``drop_last`` is the usual cause. One
    all_gather of an int and a host read; nothing without an initialised process group or while compiling."""
    if not distributed() or torch.compiler.is_compiling():
        return
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([batch], dtype=torch.int64, device=device))
    sizes = [int(t) for t in sizes]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"every rank must pass the same batch size, got {sizes} (rank order): use a DataLoader with "
            f"drop_last=True and a DistributedSampler"
        )


def gather_batch(x: torch.Tensor, *, with_grad: bool = False) -> tuple[torch.Tensor, int]:
    """(batch, ...) on every rank -> ((world * batch, ...), this rank's offset). As the original, other ranks' rows
    carry no gradient; this rank's rows are ``x`` itself, so gradients flow through them (every rank must pass the
    same batch size). with_grad: every row carries its gradient back to its rank (``torch.distributed.nn``'s
    all_gather, whose backward sums the ranks' gradients), so that DDP's averaged update equals one process's on the
    global batch. Without an initialised process group: (x, 0)."""
    if not distributed():
        return x, 0
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous())), dist.get_rank() * x.shape[0]
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def gather_packed(text: PackedText) -> tuple[PackedText, int]:
    """Every rank's packed captions, in rank order, and this rank's first segment index."""
    if not distributed():
        return text, 0
    if text.padded:  # rows of each rank's width, padded to the widest rank's (a host read: not traced as one graph)
        widths, _ = gather_batch(torch.tensor([text.max_seqlen], device=text.input_ids.device))
        width = int(widths.max())
        rows = F.pad(text.input_ids.view(len(text), text.max_seqlen), (0, width - text.max_seqlen))
        all_rows, offset = gather_batch(rows)
        valid, _ = gather_batch(text.valid_lengths)
        return PackedText.from_rows(all_rows, valid), offset
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


def concat_captions(
    captions: PackedText, members: torch.Tensor, max_tokens: int, cls_id: int, sep_id: int, pad_id: int = 0
):
    """Join the captions ``members`` (rows, k) of ``captions`` (each ``[CLS] body [SEP]``) into one paragraph per row:
    ``[CLS] body_0 body_1 ... body_{k-1} [SEP]``, bodies cut from the end to fit ``max_tokens``, as a tokenizer
    truncates the joined string (the original's ``truncation=True, max_length=80``). Captions in the fixed-shape
    layout give paragraphs in it (padded with ``pad_id``)."""
    rows, k = members.shape
    device = captions.input_ids.device
    body_len = (captions.lengths - 2).clamp(min=0)[members]  # (rows, k)
    before = body_len.cumsum(1) - body_len
    kept = torch.minimum(body_len, (max_tokens - 2 - before).clamp(min=0))  # tokens of each body that fit
    if captions.padded:
        return _concat_rows(captions, members, kept, max_tokens, cls_id, sep_id, pad_id)
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


def _concat_rows(captions, members, kept, max_tokens, cls_id, sep_id, pad_id) -> ConcatText:
    """concat_captions in the fixed-shape layout: paragraph token p of row r is found by a search over the row's
    cumulative kept body lengths (no data-dependent shape anywhere)."""
    rows, k = members.shape
    width = min(max_tokens, k * max(captions.max_seqlen - 2, 0) + 2)
    ends = kept.cumsum(1)  # (rows, k): where each member's kept body ends in the joined body
    total = ends[:, -1]
    pos = torch.arange(width, device=members.device)
    body_pos = (pos - 1).expand(rows, width).contiguous()  # the joined body's token index at paragraph position p
    j = torch.searchsorted(ends, body_pos, right=True).clamp(max=k - 1)  # its member
    within = body_pos - (ends - kept).gather(1, j)
    src = members.gather(1, j) * captions.max_seqlen + 1 + within
    is_body = (body_pos >= 0) & (body_pos < total[:, None])
    ids = captions.input_ids[src.clamp(0, captions.input_ids.numel() - 1)]
    ids = torch.where(is_body, ids, pad_id)
    ids = torch.where(pos == 0, cls_id, torch.where(body_pos == total[:, None], sep_id, ids))
    member = torch.where(is_body, j, -1)
    return ConcatText(PackedText.from_rows(ids, total + 2), member.reshape(-1))


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
    pad_id: int = 0,
    generator=None,
    pixel_values: torch.Tensor | None = None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gather_with_grad: bool = False,
) -> ConcatBatch:
    """Draw k - 1 partners per sample from the (global) batch and build the concatenated pass.

    captions: this rank's packed captions; features: (batch, frames, tokens, dim) this rank's vision features. With
    ``pixel_values`` (batch, frames, 3, H, W) and ``encode`` the joined pixels are re-encoded (every member then
    carries gradients, at k times the vision cost); otherwise the given features are reused. gather_with_grad: other
    ranks' partner features carry gradients back to them (``gather_batch``)."""
    batch, frames = features.shape[:2]
    all_captions, offset = gather_packed(captions)
    members = sample_partners(batch, len(all_captions), k, offset=offset, generator=generator)
    members = members.to(features.device)
    joined = concat_captions(all_captions, members, max_tokens, cls_id, sep_id, pad_id)
    if encode is not None and pixel_values is not None:
        all_pixels, _ = gather_batch(pixel_values)
        joined_pixels = all_pixels[members].flatten(1, 2)  # (batch, k * frames, 3, H, W)
        feats = encode(joined_pixels)
    else:
        all_features, _ = gather_batch(features, with_grad=gather_with_grad)
        feats = all_features[members].flatten(1, 2)  # (batch, k * frames, tokens, dim)
    return ConcatBatch(joined.text, feats, members, joined.member)
