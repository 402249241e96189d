"""Kosmos-2 (shared/research/kosmos2.md section 1.3): CLIP ViT -> latent-query resampler -> Magneto decoder.

    image_embeds = resampler(normalize(vit(pixel_values)))                      (images, latent_query_num, D)
    h0           = splice(embed(ids), image_embeds) * sqrt(D) + sinusoid(pos)   (image slots are scaled too)
    h            = LN(blocks(h0));  logits = h @ embed.T                        (tied head)
    block:  x += out_proj(inner_ln(attn(ln1(x))));  x += fc2(ffn_ln(gelu(fc1(ln2(x)))))

The decoder works on packed tokens ``(total, D)`` with ``cu_seqlens`` (DESIGN.md "Data layout: packed
sequences"): a padded batch is packed by dropping its padding, several samples can share a row, and generation
attends to a preallocated KV cache through the same ``packed_attention`` call (``mmcore.models.kosmos2.generation``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcore import ops
from mmcore.models.kosmos2.config import Kosmos2Config, Kosmos2TextConfig
from mmcore.models.layers.linear import Linear
from mmcore.models.layers.tokens import check_token_ids
from mmcore.models.layers.vit import ACTIVATIONS, VisionTransformer, init_linear_and_norms
from mmcore.ops import _library
from mmcore.ops._dispatch import extension_kernel
from mmcore.ops.logits import LINEAR_SMALL_ROWS

# the extension has the fused decoder step (TextDecoder.step)
_FUSED_STEP_ON_CPU = extension_kernel("kosmos2_decode_step")("cpu") is None


@torch.library.register_fake("mmcore::kosmos2_decode_step")
def _fake_decode_step(x, params, k_cache, v_cache, write_index, cu_q, cu_k, max_q, max_k, heads, eps, activation):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------ layout


@dataclass
class PackedLayout:
    """Which queries see which keys: segments ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of the queries attend causally
    (bottom-right aligned) to ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of the keys. Without a KV cache q and k are
    the same tokens."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    @classmethod
    def self_attention(cls, cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedLayout:
        return cls(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """(segments,) lengths -> (segments + 1,) int32 offsets starting at 0."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


class KVCache:
    """Preallocated keys and values for every decoder layer: ``(layers, batch * max_len, heads, head_dim)``; row r of
    the batch owns slots ``[r * max_len, (r + 1) * max_len)``. Zero-filled: slots outside a row's tokens sit in
    key segments no query reads, but must not hold NaN (a masked probability times NaN is NaN)."""

    def __init__(self, layers, batch, max_len, heads, head_dim, *, dtype, device):
        self.batch, self.max_len = batch, max_len
        self.k = torch.zeros(layers, batch * max_len, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.write_index: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (tokens, heads, head_dim) at ``write_index``; return the layer's cache."""
        self.k[layer].index_copy_(0, self.write_index, k)
        self.v[layer].index_copy_(0, self.write_index, v)
        return self.k[layer], self.v[layer]


# ------------------------------------------------------------------------------------------ modules


class SinusoidalPositions(nn.Module):
    """fairseq's sinusoidal table (concatenated sin | cos halves, frequencies 10000**(-k/(D/2-1))), row
    ``padding_idx`` zero; position p of a sequence uses row ``p + 2`` for Kosmos-2 (``padding_idx + 1 + p``)."""

    def __init__(self, dim: int, padding_idx: int, max_positions: int):
        super().__init__()
        self.dim, self.padding_idx = dim, padding_idx
        self.register_buffer("table", self.build(max_positions + 2), persistent=False)

    def build(self, rows: int) -> torch.Tensor:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
        angles = torch.arange(rows, dtype=torch.int64).float()[:, None] * freq[None, :]
        table = torch.cat([angles.sin(), angles.cos(), torch.zeros(rows, self.dim % 2)], dim=1)
        table[self.padding_idx] = 0
        return table

    def forward(self, positions: torch.Tensor, bound: int) -> torch.Tensor:
        """positions: int64 table rows, all below ``bound`` (a host-side int, so no device read) -> (..., dim)."""
        if bound > self.table.shape[0]:
            self.table = self.build(bound + 2).to(self.table.device)
        return self.table[positions]


class DecoderAttention(nn.Module):
    """Causal multi-head attention with Magneto's sub-LN (``inner_attn_ln``) before the output projection."""

    def __init__(self, config: Kosmos2TextConfig):
        super().__init__()
        d = config.embed_dim
        self.heads, self.head_dim, self.dropout = config.attention_heads, config.head_dim, config.attention_dropout
        self.qkv = Linear(d, 3 * d)
        self.inner_attn_ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.out_proj = Linear(d, d)

    def forward(self, x, layout: PackedLayout, cache: KVCache | None = None, layer: int = 0, keep=None):
        """x: (tokens, D) packed -> (tokens, D); with ``keep = (rows, layout)``, only those rows' queries (keys and
        values of every token still go to the cache) -> (len(rows), D)."""
        q, k, v = self.qkv(x).view(-1, 3, self.heads, self.head_dim).unbind(1)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if keep is not None:
            q, layout = q[keep[0]], keep[1]
        out = ops.packed_attention(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            layout.cu_seqlens_q,
            layout.cu_seqlens_k,
            layout.max_seqlen_q,
            layout.max_seqlen_k,
            mode="causal",
            dropout_p=self.dropout if self.training else 0.0,
            validate=False,
        )
        return self.out_proj(self.inner_attn_ln(out.reshape(q.shape[0], -1)))


class DecoderBlock(nn.Module):
    def __init__(self, config: Kosmos2TextConfig):
        super().__init__()
        d, eps = config.embed_dim, config.layer_norm_eps
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = DecoderAttention(config)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = Linear(d, config.ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(config.ffn_dim, eps=eps)
        self.fc2 = Linear(config.ffn_dim, d)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def forward(self, x, layout: PackedLayout, cache: KVCache | None = None, layer: int = 0, keep=None):
        """x: (tokens, D) -> (tokens, D), or (len(rows), D) with ``keep = (rows, layout)`` (``DecoderAttention``)."""
        h = self.self_attn(self.self_attn_layer_norm(x), layout, cache, layer, keep)
        if keep is not None:
            x = x[keep[0]]
        x = x + F.dropout(h, self.dropout, self.training)
        h = F.dropout(self.act(self.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)
        h = self.fc2(self.ffn_layernorm(h))
        return x + F.dropout(h, self.dropout, self.training)


class TextDecoder(nn.Module):
    def __init__(self, config: Kosmos2TextConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.embed_positions = SinusoidalPositions(d, config.pad_token_id, config.max_position_embeddings)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.layers))
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        # generation steps on the CPU through one C++ op (``step``); False runs the module path
        self.fused_step = True

    def embed(self, input_ids, positions, position_bound, image_embeds=None, image_mask=None):
        """input_ids, positions: (tokens,); image_embeds (images, latents, D) go to the True slots of image_mask in
        order. Returns (tokens, D): (token or image embedding) * embed_scale + sinusoid(position)."""
        x = self.embed_tokens(input_ids)
        if image_embeds is not None:
            x = x.masked_scatter(image_mask[:, None], image_embeds.to(x.dtype).reshape(-1, x.shape[-1]))
        x = x * self.config.embed_scale + self.embed_positions(positions, position_bound).to(x.dtype)
        # NOTE: transformers applies this dropout twice (embedding and decoder entry); the original applies it once.
        return F.dropout(x, self.config.dropout, self.training)

    def step_params(self) -> list[torch.Tensor]:
        """The parameters ``mmcore::kosmos2_decode_step`` takes, in its order: per layer the self-attention
        LayerNorm, qkv, inner_attn_ln, out_proj, final_layer_norm, fc1, ffn_layernorm, fc2 (weight, bias each), then
        the final LayerNorm."""
        params = []
        for layer in self.layers:
            attn = layer.self_attn
            for module in (layer.self_attn_layer_norm, attn.qkv, attn.inner_attn_ln, attn.out_proj,
                           layer.final_layer_norm, layer.fc1, layer.ffn_layernorm, layer.fc2):  # fmt: skip
                params += (module.weight, module.bias)
        return params + [self.layer_norm.weight, self.layer_norm.bias]

    def _fused_step_applies(self, x, cache: KVCache | None, keep) -> bool:
        """A generation step on the CPU that ``step`` can take: float32 inference on at most
        ``ops.logits.LINEAR_SMALL_ROWS`` tokens against a float32 cache, outside torch.compile."""
        return (
            self.fused_step
            and _FUSED_STEP_ON_CPU
            and cache is not None
            and keep is None
            and not self.training
            and not torch.is_grad_enabled()
            and 0 < x.shape[0] <= LINEAR_SMALL_ROWS
            and x.device.type == "cpu"
            and x.dtype == cache.k.dtype == torch.float32
            and not torch.compiler.is_compiling()
        )

    def step(self, x, layout: PackedLayout, cache: KVCache) -> torch.Tensor:
        """``forward(x, layout, cache)`` in eval mode as one C++ op (``mmcore::kosmos2_decode_step``,
        csrc/decoding/decoder_step.cpp): every layer's LayerNorms, products (the ``decode_logits`` kernel), cache
        writes, attention over the cache (``packed_attention``'s C++ forward), activation and residual adds, then
        the final LayerNorm. Same arithmetic as the module path; the sums differ from it in the last bits.
        x: (tokens, D) float32 on the CPU, a few tokens (a decoding step of a batch) -> (tokens, D)."""
        c = self.config
        return _library.op("kosmos2_decode_step")(
            x,
            self.step_params(),
            cache.k,
            cache.v,
            cache.write_index,
            layout.cu_seqlens_q,
            layout.cu_seqlens_k,
            layout.max_seqlen_q,
            layout.max_seqlen_k,
            c.attention_heads,
            c.layer_norm_eps,
            c.activation_function,
        )

    def forward(self, x, layout: PackedLayout, cache: KVCache | None = None, keep=None):
        """x: (tokens, D) embedded -> (tokens, D) after the final LayerNorm.

        keep = (rows, layout of those rows' queries against the keys): only those rows' outputs are wanted (a
        generation prefill needs each prompt's last token; the others only fill the KV cache). The last layer then
        runs attention for those queries only and its feed-forward on those rows only -- a quarter of a 4-layer
        prefill's matrix products -- and returns (len(rows), D)."""
        if self._fused_step_applies(x, cache, keep):
            return self.step(x, layout, cache)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, layout, use_reentrant=False)
            else:
                x = layer(x, layout, cache, i, keep if i == last else None)
        if keep is not None and not self.layers:
            x = x[keep[0]]
        return self.layer_norm(x)


class ImageToTextProjection(nn.Module):
    """The latent-query resampler: ``latent_query_num`` learned queries attend (full, no mask) over the projected
    image tokens followed by the queries themselves (257 + 64 keys); no residual, no FFN."""

    def __init__(self, config: Kosmos2Config):
        super().__init__()
        d, t = config.text.embed_dim, config.text
        self.heads, self.head_dim, self.dropout = t.attention_heads, t.head_dim, t.attention_dropout
        self.dense = nn.Linear(config.vision.hidden_size, d)
        self.latent_query = nn.Parameter(torch.zeros(config.latent_query_num, d))
        self.q_proj = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (images, vision tokens, vision D) -> (images, latent_query_num, D)."""
        b = features.shape[0]
        latents = self.latent_query.expand(b, -1, -1)
        keys = torch.cat([self.dense(features), latents], dim=1)
        q = self.q_proj(latents).view(b, -1, self.heads, self.head_dim)
        k, v = self.kv(keys).view(b, keys.shape[1], 2, self.heads, self.head_dim).unbind(2)
        out = ops.attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(b, -1, q.shape[2] * q.shape[3]))


# ------------------------------------------------------------------------------------------ the model


@dataclass
class Kosmos2Output:
    """loss: mean cross-entropy over the target tokens (with labels); logits: (batch, seq, vocab) for padded input
    (zeros where attention_mask is 0) or (tokens, vocab) for packed input, None unless asked; stats: token counts
    and accuracies split into location and text targets (``fused_linear_cross_entropy`` return_stats);
    image_embeds: (images, latent_query_num, D)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    stats: dict | None = None
    image_embeds: torch.Tensor | None = None


class Kosmos2ForConditionalGeneration(nn.Module):
    """Kosmos-2 with transformers' keyword names. Build from a config and ``init_weights()``, or load weights with
    ``from_hf`` / ``from_pretrained`` (``mmcore.models.kosmos2.convert``)."""

    def __init__(self, config: Kosmos2Config):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision)
        self.image_to_text_projection = ImageToTextProjection(config)
        self.text_model = TextDecoder(config.text)

    # ---- weights

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The tied output projection (vocab, D): the token embedding matrix."""
        return self.text_model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> Kosmos2ForConditionalGeneration:
        """Random initialisation for training from scratch: normal(0, init_std) linears and embeddings."""
        std = self.config.text.init_std
        init_linear_and_norms(self, std)
        self.vision_model.init_weights(std)
        nn.init.normal_(self.image_to_text_projection.latent_query, std=1.0)
        return self

    def gradient_checkpointing_enable(self) -> None:
        self.vision_model.gradient_checkpointing = self.text_model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.vision_model.gradient_checkpointing = self.text_model.gradient_checkpointing = False

    @classmethod
    def from_hf(cls, model_or_path, *, num_bins: int = 32, dtype=None) -> Kosmos2ForConditionalGeneration:
        from mmcore.models.kosmos2.convert import from_hf

        return from_hf(cls, model_or_path, num_bins=num_bins, dtype=dtype)

    @classmethod
    def from_pretrained(cls, name_or_path, *, num_bins: int = 32, dtype=None, revision=None):
        from mmcore.models.kosmos2.convert import from_pretrained

        return from_pretrained(cls, name_or_path, num_bins=num_bins, dtype=dtype, revision=revision)

    def to_hf(self):
        from mmcore.models.kosmos2.convert import to_hf

        return to_hf(self)

    # ---- encoders

    def encode_images(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values (images, 3, H, W) -> image embeddings (images, latent_query_num, D): the ViT's tokens,
        post-LayerNormed and L2-normalised, through the resampler. interpolate_pos_encoding: images of another size
        than the ViT's, its position embeddings resized (transformers' option of the same name)."""
        features = F.normalize(self.vision_model(pixel_values, interpolate_pos_encoding), dim=-1)
        return self.image_to_text_projection(features)

    def _images(self, pixel_values, image_embeds, image_mask, interpolate_pos_encoding=False, cu_seqlens=None):
        """Image embeddings for the True slots of the packed image_mask (tokens,), checked on CPU tensors: one set of
        latents each, and with cu_seqlens (rows or samples + 1 offsets) ``latent_query_num`` or no slots in each row,
        so that no image's latents land in another row."""
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, interpolate_pos_encoding)
        if image_mask is None:
            if image_embeds is not None:
                raise ValueError("image_embeds_position_mask is required with pixel_values / image_embeds")
            return None
        if image_mask.device.type == "cpu" and not torch.compiler.is_compiling():
            slots = int(image_mask.sum())
            have = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
            if slots != have:
                raise ValueError(
                    f"image_embeds_position_mask marks {slots} slots but the images give {have} embeddings "
                    f"({self.config.latent_query_num} per image); pass one image per row that has image slots"
                )
            if cu_seqlens is not None:
                before = F.pad(image_mask.long().cumsum(0), (1, 0))
                cu = cu_seqlens.long().cpu()
                per_row = before[cu[1:]] - before[cu[:-1]]
                wrong = ((per_row != 0) & (per_row != self.config.latent_query_num)).nonzero()
                if wrong.numel():
                    r = int(wrong[0, 0])
                    raise ValueError(
                        f"image_embeds_position_mask marks {int(per_row[r])} slots in row {r}: a row (a sample, "
                        f"packed) holds one image's {self.config.latent_query_num} slots or none"
                    )
        return image_embeds

    def decode(
        self, input_ids, positions, position_bound, layout, image_embeds=None, image_mask=None, cache=None, keep=None
    ):
        """Packed decoder pass: (tokens,) ids -> (tokens, D) final hidden states (only ``keep``'s rows when given:
        ``TextDecoder.forward``)."""
        x = self.text_model.embed(input_ids, positions, position_bound, image_embeds, image_mask)
        return self.text_model(x, layout, cache, keep)

    def _loss(self, hidden, targets, labels_given: bool):
        if not labels_given:
            return None, None
        tokens = ops.GroundingTokens.from_config(self.config.text, self.config.num_bins)
        if not torch.compiler.is_compiling():
            # Only tokens with a target reach the 65k-way head: in Kosmos-2 training the bos, <image> and 64 image
            # slots of every sample have none, often half of the tokens. (A boolean index has a data-dependent
            # shape, which a compiled graph cannot take; compiled, the head computes every row.)
            keep = targets != -100
            hidden, targets = hidden[keep], targets[keep]
        loss, stats = ops.fused_linear_cross_entropy(
            hidden, self.lm_head_weight, targets, return_stats=True, loc_range=(tokens.first_loc, tokens.loc_end)
        )
        return loss, stats

    # ---- forward

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        image_embeds_position_mask=None,
        attention_mask=None,
        labels=None,
        *,
        image_embeds=None,
        return_logits: bool = True,
        interpolate_pos_encoding: bool = False,
    ) -> Kosmos2Output:
        """Padded batch, transformers' names. input_ids (batch, seq); attention_mask (batch, seq) 0/1 whose ones are
        contiguous in each row (left or right padding); image_embeds_position_mask (batch, seq) 1 at the
        ``latent_query_num`` image slots of each row with an image; pixel_values (rows with image slots, 3, H, W);
        labels (batch, seq), transformers' convention (the model shifts them; -100 ignored; targets at padded
        positions are ignored). Positions follow transformers: the k-th non-pad token of a row is position k.

        Eager, the padding is dropped and the rows packed, so the cost is that of the real tokens; compiled, every
        token is kept so that shapes are static (``PaddedRows``). return_logits=False skips the (batch, seq, vocab)
        logits (the loss never needs them). interpolate_pos_encoding: pixel_values of another size than the ViT's
        (``encode_images``)."""
        ids, mask = _check_padded(input_ids, attention_mask, "input_ids")
        check_token_ids(ids, self.config.text.vocab_size)
        keep = mask.bool()
        rows = PaddedRows(keep, drop_padding=not torch.compiler.is_compiling())
        img_mask = None
        if image_embeds_position_mask is not None:
            img_mask = _check_like(image_embeds_position_mask, ids, "image_embeds_position_mask").bool()
            img_mask = rows.pack(img_mask & keep)
        # transformers' positions: count the non-pad tokens of the row (Kosmos2TextSinusoidalPositionalEmbedding)
        nonpad = (ids != self.config.text.pad_token_id).long()
        positions = nonpad.cumsum(1) * nonpad + self.config.text.pad_token_id
        layout = PackedLayout.self_attention(rows.cu_seqlens, ids.shape[1])
        embeds = self._images(pixel_values, image_embeds, img_mask, interpolate_pos_encoding, rows.cu_seqlens)
        hidden = self.decode(rows.pack(ids), rows.pack(positions), ids.shape[1] + 2, layout, embeds, img_mask)
        targets = None
        if labels is not None:
            labels = _check_like(labels, ids, "labels").long().masked_fill(~keep, -100)
            targets = shift_targets(rows.pack(labels), rows.cu_seqlens)
        loss, stats = self._loss(hidden, targets, labels is not None)
        logits = rows.unpack(F.linear(hidden, self.lm_head_weight)) if return_logits else None
        return Kosmos2Output(loss=loss, logits=logits, stats=stats, image_embeds=embeds)

    def forward_packed(
        self,
        pixel_values,
        input_ids,
        image_embeds_position_mask,
        cu_seqlens,
        max_seqlen: int,
        labels=None,
        *,
        image_embeds=None,
        return_logits: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> Kosmos2Output:
        """Several samples in one packed stream (``mmcore.data.packing.collate_kosmos2_packed``): input_ids,
        image_embeds_position_mask, labels (tokens,); cu_seqlens (samples + 1,) int32; pixel_values (images, 3, H,
        W), one per sample with image slots, in order. Attention is causal within each sample, positions restart
        at each sample, labels shift within each sample. Returns logits (tokens, vocab) only with return_logits;
        interpolate_pos_encoding as in ``forward``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ValueError("input_ids must be a 1-D packed tensor (tokens,)")
        if input_ids.is_floating_point():
            raise TypeError(f"input_ids must be integers, got {input_ids.dtype}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor of samples + 1 offsets")
        check_token_ids(input_ids, self.config.text.vocab_size)
        img_mask = None
        if image_embeds_position_mask is not None:
            img_mask = _check_like(image_embeds_position_mask, input_ids, "image_embeds_position_mask").bool()
        if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
            c = cu_seqlens.tolist()
            if c[0] != 0 or c[-1] != input_ids.numel() or any(b < a for a, b in zip(c, c[1:], strict=False)):
                raise ValueError(f"cu_seqlens must rise from 0 to the token count {input_ids.numel()}")
            if max(b - a for a, b in zip(c, c[1:], strict=False)) > max_seqlen:
                raise ValueError(f"max_seqlen = {max_seqlen} is below the longest sample")
        layout = PackedLayout.self_attention(cu_seqlens, max_seqlen)
        positions = segment_positions(cu_seqlens, input_ids.numel()) + self.config.text.pad_token_id + 1
        embeds = self._images(pixel_values, image_embeds, img_mask, interpolate_pos_encoding, cu_seqlens)
        hidden = self.decode(input_ids.long(), positions, max_seqlen + 2, layout, embeds, img_mask)
        targets = None
        if labels is not None:
            targets = shift_targets(_check_like(labels, input_ids, "labels").long(), cu_seqlens)
        loss, stats = self._loss(hidden, targets, labels is not None)
        logits = F.linear(hidden, self.lm_head_weight) if return_logits else None
        return Kosmos2Output(loss=loss, logits=logits, stats=stats, image_embeds=embeds)

    # ---- generation

    def generate(self, pixel_values=None, input_ids=None, image_embeds_position_mask=None, attention_mask=None, **kw):
        """Prompt + new ids (batch, prompt_len + new); see ``mmcore.models.kosmos2.generation.generate``."""
        from mmcore.models.kosmos2.generation import generate

        return generate(self, pixel_values, input_ids, image_embeds_position_mask, attention_mask, **kw)

    @staticmethod
    def post_process(ids, tokenizer, num_bins: int = 32):
        """Generated ids (batch, len) -> [(clean text, entities)] per row, as transformers'
        ``post_process_generation`` on ``batch_decode(ids, skip_special_tokens=True)``."""
        from mmcore.grounding import extract_entities_batch

        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        return extract_entities_batch([t.split("</image>")[-1] for t in texts], num_bins)


# ------------------------------------------------------------------------------------------ helpers


class PaddedRows:
    """How a padded batch (keep: (batch, seq) bool, True at real tokens, contiguous in each row) becomes the decoder's
    packed stream, and back.

    drop_padding=True (eager): the real tokens only, one segment per row; cost that of the real tokens.
    drop_padding=False (compiled): all batch * seq tokens, since a boolean index has a data-dependent shape that a
    compiled graph cannot take. Each row is two segments split where its padding meets its real tokens, [pads][real]
    for left padding and [real][pads] for right padding (the other one empty), so causal attention never mixes real
    tokens and pads; padded positions must be given no target (-100) by the caller."""

    def __init__(self, keep: torch.Tensor, drop_padding: bool):
        self.keep, self.drop_padding = keep, drop_padding
        batch, seq = keep.shape
        if drop_padding:
            self.cu_seqlens = cu_seqlens_from_lengths(keep.sum(1))
        else:
            real = keep.sum(1)
            leading_pads = (keep.long().cumsum(1) == 0).sum(1)
            # [pads][real (pads)] when the row starts with padding (all-pad rows too), else [real][pads]
            split = torch.where(leading_pads > 0, leading_pads, real)
            starts = torch.arange(batch, device=keep.device) * seq
            bounds = torch.stack([starts, starts + split], dim=1).flatten()
            self.cu_seqlens = F.pad(bounds, (0, 1), value=batch * seq).to(torch.int32)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (tokens, ...)."""
        return t[self.keep] if self.drop_padding else t.flatten(0, 1)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(tokens, features) -> (batch, seq, features), zeros at the padded positions."""
        if self.drop_padding:
            out = t.new_zeros(*self.keep.shape, t.shape[1])
            out[self.keep] = t
            return out
        return t.view(*self.keep.shape, t.shape[1]).masked_fill(~self.keep[..., None], 0)


def segment_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(tokens,) int64: each token's index within its segment."""
    idx = torch.arange(total, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
    return idx - cu_seqlens.long()[seg]


def shift_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Packed labels (transformers' convention) -> per-token targets: token i predicts ``labels[i + 1]`` within its
    segment; each segment's last token predicts nothing."""
    targets = torch.roll(labels, -1)
    if labels.numel():
        # An empty segment's "last token" cu_seqlens[s + 1] - 1 is the last token of the segment before it (or, for
        # leading empty segments, index -1: the stream's last token), already a last token, so no mask is needed
        # (a boolean mask would give a data-dependent shape that torch.compile cannot trace).
        targets[cu_seqlens[1:].long() - 1] = ignore_index
    return targets


def _check_like(t, ref: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, device=ref.device)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have shape {tuple(ref.shape)} like input_ids, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} with input_ids, got {t.device}")
    if t.is_floating_point():
        raise TypeError(f"{name} must be an integer or bool tensor, got {t.dtype}")
    return t


def _check_padded(input_ids, attention_mask, name: str):
    """(batch, seq) ids and a 0/1 mask whose ones are contiguous in every row (checked on CPU)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{name} must be a (batch, seq) tensor")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got {input_ids.dtype}")
    if attention_mask is None:
        return input_ids.long(), torch.ones_like(input_ids, dtype=torch.long)
    mask = _check_like(attention_mask, input_ids, "attention_mask").long()
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        # contiguous ones: at most one 0->1 step and one 1->0 step per row, in that order
        rises = (mask[:, 1:] > mask[:, :-1]).sum(1) + mask[:, 0]
        if bool((rises > 1).any()):
            r = int((rises > 1).nonzero()[0, 0])
            raise ValueError(f"attention_mask[{r}] has holes: each row's ones must be contiguous (left/right padding)")
    return input_ids.long(), mask
