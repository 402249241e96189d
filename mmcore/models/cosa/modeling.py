"""COSA (shared/research/cosa.md section 1): a vision encoder, a bridge, and one BERT that is the text encoder, the
multimodal encoder and the decoder.

    feats   = vit(frames)                                     (batch, frames, tokens, vision D), post-LN on all tokens
    vision  = LN(Linear(feats)) + frame_embedding[slot]       (batch * frames * tokens, D): the cross-attention keys
    text    = BERT(ids)                                       self-attention only: ITC
    joint   = BERT(ids, cross=vision)                         + cross-attention in every layer: ITM, MLM (full),
                                                              captioning (causal), QA (prefix)
    BERT layer (post-LN):  x = LN(x + attn(x));  x = LN(x + xattn(x, vision));  x = LN(x + fc2(gelu(fc1(x))))

Text is packed (``PackedText``: no padding, one segment per caption or per concatenated paragraph); every attention
is ``mmcore.ops.packed_attention``. ``forward`` runs COSA's pretraining step: the single-sample pass and the
concatenated pass (``mmcore.models.cosa.concat``) with their objectives, and returns the named losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcore import ops
from mmcore.models.cosa.concat import (
    PackedText,
    check_same_batch_on_every_rank,
    concatenate,
    gather_batch,
    gather_packed,
    pack_padded,
    select_segments,
    token_positions,
    unpack,
)
from mmcore.models.cosa.config import CAPTION_MODES, COSAConfig, COSATextConfig, TimmSwinConfig
from mmcore.models.cosa.objectives import IGNORE_INDEX, itc_loss, mask_tokens, sample_hard_negatives
from mmcore.models.layers.attention import PackedCrossAttention, PackedSelfAttention, Segments
from mmcore.models.layers.beam import BeamSearch, check_num_beams
from mmcore.models.layers.tokens import check_token_ids
from mmcore.models.layers.vit import ACTIVATIONS, VisionTransformer, check_pixels, init_linear_and_norms

# ------------------------------------------------------------------------------------------ text encoder


class BertEmbeddings(nn.Module):
    def __init__(self, config: COSATextConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(tokens,) ids and positions -> (tokens, D); token type 0 everywhere, as COSA."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return F.dropout(self.norm(x), self.dropout, self.training)


class BertLayer(nn.Module):
    def __init__(self, config: COSATextConfig):
        super().__init__()
        d, eps, heads = config.hidden_size, config.layer_norm_eps, config.num_attention_heads
        self.self_attn = PackedSelfAttention(d, heads, config.attention_probs_dropout_prob)
        self.self_attn_norm = nn.LayerNorm(d, eps=eps)
        self.cross_attn = PackedCrossAttention(d, d, heads, config.attention_probs_dropout_prob)
        self.cross_attn_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dropout = config.hidden_dropout_prob

    def _drop(self, x):
        return F.dropout(x, self.dropout, self.training)

    def forward(self, x, seg: Segments, mode="full", prefix_lens=None, vision=None, vision_seg=None):
        x = self.self_attn_norm(x + self._drop(self.self_attn(x, seg, mode, prefix_lens)))
        if vision is not None:
            x = self.cross_attn_norm(x + self._drop(self.cross_attn(x, seg, vision, vision_seg)))
        return self.ffn_norm(x + self._drop(self.fc2(self.act(self.fc1(x)))))


class TextEncoder(nn.Module):
    """BERT on packed tokens; cross-attention runs only when vision tokens are given."""

    def __init__(self, config: COSATextConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, text: PackedText, mode="full", prefix_lens=None, vision=None, vision_seg=None):
        """text: packed ids; vision: (vision tokens, D) packed, segment s of ``vision_seg`` for text segment s ->
        (tokens, D)."""
        if text.max_seqlen > self.config.max_position_embeddings:
            raise ValueError(
                f"a text segment has {text.max_seqlen} tokens, more than max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        x = self.embeddings(text.input_ids, token_positions(text))
        seg = text.segments
        if text.padded and mode == "full":  # the real tokens are the prefix: they never see the padding after them
            mode, prefix_lens = "prefix", text.valid_lengths
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, seg, mode, prefix_lens, vision, vision_seg, use_reentrant=False
                )
            else:
                x = layer(x, seg, mode, prefix_lens, vision, vision_seg)
        return x


# ------------------------------------------------------------------------------------------ heads


class FrameEmbedding(nn.Module):
    """Learned temporal embeddings, one per frame slot, added to every token of the frame. A different frame count
    uses the slots nearest-interpolated (4 slots -> 8 frames: e0 e0 e1 e1 e2 e2 e3 e3; -> 1 frame: e0), at run time
    and when loading a state dict saved with another slot count."""

    def __init__(self, slots: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(slots, dim))

    def forward(self, frames: int) -> torch.Tensor:
        """(frames, D)."""
        return resize_slots(self.weight, frames)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 3 and state_dict[key].shape[0] == 1:
            state_dict[key] = state_dict[key][0]  # the original's layout: video_frame_embedding (1, slots, D)
        if key in state_dict and state_dict[key].dim() == 2 and state_dict[key].shape[0] == 0:
            raise ValueError(f"{key} has no frame slot to resize from")
        if key in state_dict and state_dict[key].shape[0] != self.weight.shape[0]:
            state_dict[key] = resize_slots(state_dict[key], self.weight.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def resize_slots(weight: torch.Tensor, frames: int) -> torch.Tensor:
    """(slots, D) -> (frames, D) by nearest interpolation (``F.interpolate(mode="nearest")``, as the original)."""
    if weight.shape[0] == frames:
        return weight
    return F.interpolate(weight.t()[None], size=frames, mode="nearest")[0].t()


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm, then the word embeddings (tied) plus a bias."""

    def __init__(self, config: COSATextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The transform only: (N, D) -> (N, D); the vocabulary projection is fused into the loss."""
        return self.norm(self.act(self.dense(hidden)))


class ITMHead(nn.Module):
    """Linear -> GELU -> LayerNorm(1e-12) -> Linear(2), on the [CLS] output."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        return self.out(self.norm(F.gelu(self.dense(x))))


class TimmSwin(nn.Module):
    """A timm Swin Transformer as COSA's vision encoder (``vision_type="swin"``, cosa.md 1.1): every token of the last
    stage after timm's final LayerNorm; no pooling, no head. Swin-B at 224: 7 x 7 = 49 tokens of 1024 channels."""

    def __init__(self, config: TimmSwinConfig):
        super().__init__()
        try:
            import timm
            from timm.models.swin_transformer import SwinTransformer
        except ImportError as e:
            raise ImportError(
                "vision_type='swin' needs timm, which is not installed: pip install timm "
                "(or pip install 'mmcore[swin]')"
            ) from e
        self.config = config
        self.swin = timm.create_model(config.model_name, pretrained=False, num_classes=0, **config.timm_kwargs())
        if not isinstance(self.swin, SwinTransformer):
            raise ValueError(f"{config.model_name!r} builds a timm {type(self.swin).__name__}, not a SwinTransformer")

    @property
    def gradient_checkpointing(self) -> bool:
        return all(stage.grad_checkpointing for stage in self.swin.layers)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.swin.set_grad_checkpointing(enable)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (batch, 3, img_size, img_size) -> (batch, num_tokens, num_features), the last stage's grid
        in row-major order."""
        check_pixels(pixel_values, 3, self.config.img_size)
        x = self.swin.forward_features(pixel_values.to(self.swin.patch_embed.proj.weight.dtype))  # (batch, H', W', C)
        return x.flatten(1, 2)


def build_vision_encoder(config: COSAConfig) -> nn.Module:
    """The CLIP ViT (``vision_type="clip"``) or the timm Swin (``"swin"``, needs timm)."""
    if config.vision_type == "clip":
        return VisionTransformer(config.vision)
    return TimmSwin(config.swin)


# ------------------------------------------------------------------------------------------ the model


class COSAModel(nn.Module):
    """COSA with its pretraining objectives. Build from a config and ``init_weights()``, or from transformers
    models with ``from_hf(text=BertModel or BertForMaskedLM, vision=CLIPVisionModel or a timm Swin)``."""

    def __init__(self, config: COSAConfig):
        super().__init__()
        self.config = config
        d, dv = config.text.hidden_size, config.vision_dim
        self.vision_model = build_vision_encoder(config)
        self.text_model = TextEncoder(config.text)
        self.bridge = nn.Linear(dv, d)
        self.bridge_norm = nn.LayerNorm(d, eps=1e-12)
        self.frame_embedding = FrameEmbedding(config.frame_slots, d)
        self.contra_head_t = nn.Linear(d, config.contra_dim, bias=False)
        self.contra_head_v = nn.Linear(dv, config.contra_dim, bias=False)
        self.contra_temp = nn.Parameter(torch.tensor(float(config.temperature)))
        self.itm_head = ITMHead(d)
        self.mlm_head = MLMHead(config.text)

    # ---- weights

    @torch.no_grad()
    def init_weights(self) -> COSAModel:
        """BERT-style random initialisation (normal(0, 0.02), zero biases, unit LayerNorms); frame embeddings
        0.02 * randn, temperature from the config."""
        std = self.config.text.initializer_range
        init_linear_and_norms(self, std)
        if isinstance(self.vision_model, VisionTransformer):
            self.vision_model.init_weights(std)
        nn.init.normal_(self.frame_embedding.weight, std=0.02)
        nn.init.zeros_(self.mlm_head.bias)
        self.contra_temp.fill_(self.config.temperature)
        return self

    @property
    def word_embeddings(self) -> torch.Tensor:
        """(vocab, D): the token embeddings, also the MLM/caption output projection (tied)."""
        return self.text_model.embeddings.word_embeddings.weight

    def gradient_checkpointing_enable(self) -> None:
        self.vision_model.gradient_checkpointing = self.text_model.gradient_checkpointing = True

    @classmethod
    def from_hf(cls, *, text, vision, config: COSAConfig | None = None, **config_kw) -> COSAModel:
        from mmcore.models.cosa.convert import from_hf

        return from_hf(cls, text=text, vision=vision, config=config, **config_kw)

    def to_hf(self):
        from mmcore.models.cosa.convert import to_hf

        return to_hf(self)

    # ---- encoders

    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (batch, frames, 3, H, W) -> (batch, frames, tokens, vision D): every frame through the vision
        encoder independently, all tokens post-LayerNormed (no projection)."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must have shape (batch, frames, 3, H, W), got {shape}")
        b, n = pixel_values.shape[:2]
        if b == 0 or n == 0:
            raise ValueError(f"pixel_values holds no frame: shape {tuple(pixel_values.shape)}")
        feats = self.vision_model(pixel_values.flatten(0, 1))
        return feats.view(b, n, *feats.shape[1:])

    def vision_tokens(self, features: torch.Tensor) -> tuple[torch.Tensor, Segments]:
        """(batch, frames, tokens, vision D) -> cross-attention keys (batch * frames * tokens, D) with
        ``LN(Linear(f)) + frame_embedding[frame]``, and their segments (one per sample)."""
        b, n, t = features.shape[:3]
        x = self.bridge_norm(self.bridge(features)) + self.frame_embedding(n)[None, :, None, :].to(features.dtype)
        return x.reshape(b * n * t, -1), Segments.uniform(b, n * t, device=features.device)

    def pool_vision(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, frames, tokens, vision D) -> (batch, vision D) for ITC: CLIP's [CLS] token (Swin: the mean of
        the tokens), then the mean over frames; from the raw encoder output, before the bridge."""
        per_frame = features[:, :, 0] if self.config.vision_type == "clip" else features.mean(2)
        return per_frame.mean(1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text only (no cross-attention), bidirectional: right-padded (batch, seq) ids -> (batch, seq, D) last hidden
        states, zeros at the padding."""
        text = pack_padded(input_ids, attention_mask)
        self.check_captions(text, cls=False, sep=False)
        return unpack(self.text_model(text), text, input_ids.shape[1])

    def check_captions(self, text: PackedText, *, cls: bool = True, sep: bool = True, name: str = "input_ids") -> None:
        """Every caption must be ``[CLS] ... [SEP]`` (concatenation keeps each caption's body between them, and ITC
        pools the first token; ``cls`` / ``sep`` False skip either) with ids inside the vocabulary. A host read;
        skipped while torch.compile traces."""
        if torch.compiler.is_compiling() or len(text) == 0:
            return
        t = self.config.text
        check_token_ids(text.input_ids[text.real()] if text.padded else text.input_ids, t.vocab_size, name)
        ends = []
        if cls:
            ends.append(("start", "[CLS]", text.input_ids[text.first], t.cls_token_id))
        if sep:
            ends.append(("end", "[SEP]", text.input_ids[text.first + text.lengths - 1], t.sep_token_id))
        for where, token, got, want in ends:
            wrong = (got != want).nonzero()
            if wrong.numel():
                r = int(wrong[0, 0])
                raise ValueError(
                    f"{name} row {r} must {where} with {token} (id {want}), got id {int(got[r])}: tokenise with the "
                    f"tokenizer's special tokens (COSA joins the captions' bodies between [CLS] and [SEP])"
                )

    def text_features(self, text: PackedText) -> torch.Tensor:
        """(segments, contra_dim) L2-normalised ITC features from the [CLS] states of a text-only pass."""
        return F.normalize(self.contra_head_t(self.text_model(text)[text.first]), dim=-1)

    def video_features(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, contra_dim) L2-normalised ITC features."""
        return F.normalize(self.contra_head_v(self.pool_vision(features)), dim=-1)

    def joint(self, text: PackedText, features: torch.Tensor, mode="full", prefix_lens=None) -> torch.Tensor:
        """The multimodal pass: text segment s cross-attends to sample s of ``features`` -> (tokens, D)."""
        vision, vision_seg = self.vision_tokens(features)
        return self.text_model(text, mode, prefix_lens, vision, vision_seg)

    # ---- objectives

    def _token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the tied LM head on the rows with a label (the others are never projected; under
        torch.compile every row is, the unlabelled ones ignored, so that no shape depends on the data)."""
        if not torch.compiler.is_compiling():
            rows = labels != IGNORE_INDEX
            hidden, labels = hidden[rows], labels[rows]
        return ops.fused_linear_cross_entropy(
            self.mlm_head(hidden), self.word_embeddings, labels, bias=self.mlm_head.bias
        )

    def _mask(self, text: PackedText, probability: float, eligible=None, generator=None):
        t = self.config.text
        if eligible is None and text.padded:  # every real token but [CLS]
            eligible = text.real() & (token_positions(text) > 0)
        return mask_tokens(
            text.input_ids,
            text.cu_seqlens,
            probability,
            mask_token_id=t.mask_token_id,
            random_range=(t.random_token_start, t.vocab_size),
            eligible=eligible,
            generator=generator,
        )

    def contrastive(self, text: PackedText, features: torch.Tensor):
        """ITC similarities against the global batch: (sim_t2v, sim_v2t, targets), each sim (batch, global batch)
        divided by the temperature; other ranks' features carry no gradient."""
        t, v = self.text_features(text), self.video_features(features)
        t_all, offset = gather_batch(t, with_grad=self.config.gather_with_grad)
        v_all, _ = gather_batch(v, with_grad=self.config.gather_with_grad)
        targets = offset + torch.arange(t.shape[0], device=t.device)
        return t @ v_all.t() / self.contra_temp, v @ t_all.t() / self.contra_temp, targets

    def itm_loss(self, text, features, sim_t2v, sim_v2t, targets, generator=None, rows: int | None = None):
        """Matching on 3 x batch pairs: (text, its video) label 1; (text, hard-negative video) and (hard-negative
        text, video) label 0. Negatives come from the global batch, drawn from the softmax similarities. rows: only
        the first ``rows`` samples make pairs (negatives are still drawn for all, as the original's ``cret``)."""
        if sim_t2v.shape[1] < 2:
            raise ValueError(
                "ITM draws its hard negatives from the other samples of the (global) batch, and this batch has only "
                "one sample: use batches of at least 2 (a DataLoader with drop_last=True), or leave 'itm' out of "
                "COSAConfig.origin_tasks / concat_tasks"
            )
        neg_video = sample_hard_negatives(sim_t2v, targets, generator)
        neg_text = sample_hard_negatives(sim_v2t, targets, generator)
        all_text, _ = gather_packed(text)
        all_features, _ = gather_batch(features, with_grad=self.config.gather_with_grad)
        if rows is not None:
            features, targets = features[:rows], targets[:rows]
            neg_video, neg_text = neg_video[:rows], neg_text[:rows]
        pairs_text = select_segments(all_text, torch.cat([targets, targets, neg_text]))
        pairs_video = torch.cat([features, all_features[neg_video], features])
        hidden = self.joint(pairs_text, pairs_video)
        logits = self.itm_head(hidden[pairs_text.first])
        b = targets.numel()
        labels = torch.cat([targets.new_ones(b), targets.new_zeros(2 * b)])
        return F.cross_entropy(logits.float(), labels)

    def mlm_loss(self, text: PackedText, features: torch.Tensor, generator=None) -> torch.Tensor:
        """15% of the tokens masked (80/10/10), bidirectional with cross-attention, predicted at the masked ones."""
        ids, labels = self._mask(text, self.config.mlm_probability, generator=generator)
        hidden = self.joint(text.with_ids(ids), features, "full")
        return self._token_loss(hidden, labels)

    def caption_loss(self, text: PackedText, features: torch.Tensor, generator=None, mode=None) -> torch.Tensor:
        """Causal captioning with cross-attention. "masked" (the official): 60% of the tokens masked, predicted at
        the same positions; "next_token": unmasked input, token i predicts token i + 1 within its caption."""
        mode = _caption_mode(mode or self.config.caption_mode)
        if mode == "masked":
            ids, labels = self._mask(text, self.config.caption_probability, generator=generator)
        else:
            ids, labels = text.input_ids, next_token_labels(text)
        hidden = self.joint(text.with_ids(ids), features, "causal")
        return self._token_loss(hidden, labels)

    def qa_loss(
        self, pixel_values, question_ids, question_mask, answer_ids, answer_mask, *, features=None, generator=None
    ) -> torch.Tensor:
        """Generative QA fine-tuning: question (right-padded, [CLS] first) then answer in one segment; prefix mode
        (the question is bidirectional and cannot see the answer, the answer is causal and sees the question); 99%
        of the answer tokens masked and predicted."""
        if features is None:
            features = self.encode_vision(pixel_values)
        question = pack_padded(question_ids, question_mask, keep_padding=False, names=("question_ids", "question_mask"))
        answer = pack_padded(answer_ids, answer_mask, keep_padding=False, names=("answer_ids", "answer_mask"))
        if len(answer) != len(question):
            raise ValueError(f"answer_ids has {len(answer)} rows but question_ids has {len(question)}")
        self.check_captions(question, sep=False, name="question_ids")
        self.check_captions(answer, cls=False, sep=False, name="answer_ids")
        ids = torch.cat([question_ids, answer_ids], 1)[torch.cat([question_mask, answer_mask], 1).bool()].long()
        text = PackedText.from_lengths(ids, question.lengths + answer.lengths)
        is_answer = torch.arange(ids.numel(), device=ids.device) >= (
            torch.repeat_interleave(text.first + question.lengths, text.lengths, output_size=ids.numel())
        )
        masked, labels = self._mask(text, self.config.qa_probability, eligible=is_answer, generator=generator)
        prefix = question.lengths.to(torch.int32)
        hidden = self.joint(PackedText(masked, text.cu_seqlens, text.max_seqlen), features, "prefix", prefix)
        return self._token_loss(hidden, labels)

    def objectives(self, text: PackedText, features: torch.Tensor, tasks, suffix: str, generator=None) -> dict:
        """The named losses of one pass (``{task}_{suffix}``)."""
        out = {}
        if "itc" in tasks or "itm" in tasks:
            sim_t2v, sim_v2t, targets = self.contrastive(text, features)
            if "itc" in tasks:
                out[f"itc_{suffix}"] = itc_loss(sim_t2v, sim_v2t, targets, self.config.label_smoothing)
            if "itm" in tasks:
                rows = None
                if suffix == "concatenated" and self.config.concat_itm_divisor > 1:
                    rows = max(1, features.shape[0] // self.config.concat_itm_divisor)
                loss = self.itm_loss(text, features, sim_t2v, sim_v2t, targets, generator, rows)
                out[f"itm_{suffix}"] = self.config.itm_ratio * loss
        if "mlm" in tasks:
            out[f"mlm_{suffix}"] = self.mlm_loss(text, features, generator)
        if "cap" in tasks:
            out[f"cap_{suffix}"] = self.caption_loss(text, features, generator)
        return out

    def forward(
        self, pixel_values, input_ids, attention_mask=None, *, concat: int | None = None, reencode=False, generator=None
    ) -> dict:
        """One pretraining step. pixel_values (batch, frames, 3, H, W); input_ids / attention_mask (batch, seq),
        right-padded, each caption ``[CLS] ... [SEP]``. Runs ``origin_tasks`` on the single samples and, with
        concat > 1, ``concat_tasks`` on pseudo video-paragraph pairs of ``concat`` samples (with concat = 1 both
        task lists run on the single samples). Returns {"itc_origin": ..., "itm_concatenated": ..., "loss": sum}.
        generator: a torch.Generator for the masks, hard negatives and partners (seed it per rank). Under
        torch.compile leave it None (the global generator draws): dynamo does not trace Generator arguments. While
        compiling, the captions take the fixed-shape layout (``pack_padded``) and the forward is one graph."""
        k = self.config.concat if concat is None else concat
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"concat must be a positive int, got {k!r}")
        text = pack_padded(input_ids, attention_mask)
        if len(text) == 0:
            raise ValueError("input_ids holds no caption (an empty batch)")
        self.check_captions(text)
        check_same_batch_on_every_rank(len(text), self.contra_temp.device)
        features = self.encode_vision(pixel_values)
        if features.shape[0] != len(text):
            raise ValueError(f"pixel_values has {features.shape[0]} samples but input_ids has {len(text)} captions")
        cfg = self.config
        origin = cfg.origin_tasks if k > 1 else tuple(dict.fromkeys(cfg.origin_tasks + cfg.concat_tasks))
        losses = self.objectives(text, features, origin, "origin", generator)
        if k > 1 and cfg.concat_tasks:
            batch = concatenate(
                text,
                features,
                k,
                max_tokens=cfg.max_concat_tokens,
                cls_id=cfg.text.cls_token_id,
                sep_id=cfg.text.sep_token_id,
                pad_id=cfg.text.pad_token_id,
                generator=generator,
                pixel_values=pixel_values if reencode else None,
                encode=self.encode_vision if reencode else None,
                gather_with_grad=cfg.gather_with_grad,
            )
            losses.update(self.objectives(batch.text, batch.features, cfg.concat_tasks, "concatenated", generator))
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def generate_captions(
        self,
        pixel_values=None,
        *,
        features=None,
        max_new_tokens: int = 40,
        mode=None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
    ):
        """Captions: (batch, 1 + steps) ids starting with [CLS]; a row stops after [SEP] and is padded with [PAD].
        mode "masked" (the official decoding) appends a [MASK] and predicts it at each step; "next_token" predicts
        from the last token. num_beams 1: greedy; more: beam search as transformers' ``generate(num_beams=...,
        length_penalty=..., early_stopping=False)`` (the original evaluates captions with 3 beams and length
        penalty 0.6). Every step re-runs the causal pass over the prefix (no KV cache)."""
        check_num_beams(num_beams)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        mode = _caption_mode(mode or self.config.caption_mode)
        longest = 1 + max_new_tokens + (mode == "masked")  # [CLS], the new tokens, the [MASK] predicted from
        if longest > self.config.text.max_position_embeddings:
            raise ValueError(
                f"max_new_tokens = {max_new_tokens} makes captions of {longest} positions in {mode!r} mode, more than "
                f"the text encoder's max_position_embeddings ({self.config.text.max_position_embeddings})"
            )
        if features is None:
            features = self.encode_vision(pixel_values)
        if num_beams > 1:
            return self._beam_captions(features, max_new_tokens, mode, num_beams, float(length_penalty))
        t = self.config.text
        b = features.shape[0]
        seq = torch.full((b, 1), t.cls_token_id, dtype=torch.long, device=features.device)
        done = torch.zeros(b, dtype=torch.bool, device=features.device)
        for _ in range(max_new_tokens):
            token = self._next_logits(seq, features, mode).argmax(-1).masked_fill(done, t.pad_token_id)
            seq = torch.cat([seq, token[:, None]], 1)
            done |= token == t.sep_token_id
            if bool(done.all()):
                break
        return seq

    def _next_logits(self, seq: torch.Tensor, features: torch.Tensor, mode: str) -> torch.Tensor:
        """(rows, vocab) logits of the next token after each row of ``seq`` (rows, n), row r cross-attending to
        ``features[r]``."""
        ids = F.pad(seq, (0, 1), value=self.config.text.mask_token_id) if mode == "masked" else seq
        rows, n = ids.shape
        text = PackedText(ids.reshape(-1), Segments.uniform(rows, n, device=ids.device).cu_seqlens, n)
        last = self.joint(text, features, "causal").view(rows, n, -1)[:, -1]
        return F.linear(self.mlm_head(last), self.word_embeddings, self.mlm_head.bias)

    def _beam_captions(self, features, max_new_tokens: int, mode: str, k: int, length_penalty: float):
        """Beam search (``mmcore.models.layers.beam.BeamSearch``, transformers' rules) from [CLS]."""
        t = self.config.text
        b = features.shape[0]
        prompts = torch.full((b, 1), t.cls_token_id, dtype=torch.long, device=features.device)
        search = BeamSearch(prompts, k, 1 + max_new_tokens, eos_id=t.sep_token_id, fill=t.pad_token_id,
                            length_penalty=length_penalty)  # fmt: skip
        feats = features.repeat_interleave(k, 0)
        while not search.done:
            search.step(torch.log_softmax(self._next_logits(search.sequences, feats, mode).float(), -1))
        return search.best()


def _caption_mode(mode) -> str:
    if mode not in CAPTION_MODES:
        raise ValueError(f"caption mode must be one of {CAPTION_MODES}, got {mode!r}")
    return mode


def next_token_labels(text: PackedText) -> torch.Tensor:
    """(tokens,): token i's label is token i + 1 of its segment; each segment's last token has none (-100), nor has
    padding."""
    labels = torch.roll(text.input_ids, -1)
    if text.padded:
        last = torch.repeat_interleave(text.lengths - 1, text.extents, output_size=labels.numel())
        return labels.masked_fill(token_positions(text) >= last, IGNORE_INDEX)
    if labels.numel():
        labels[text.cu_seqlens[1:].long()[text.lengths > 0] - 1] = IGNORE_INDEX
    return labels
