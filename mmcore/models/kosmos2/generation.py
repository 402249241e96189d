"""Batched grounded generation for Kosmos-2: image encoded once, a preallocated KV cache, per-row positions, and the
fused decoding step (``mmcore.ops.grounded_decode_step``: box grammar, n-gram blocking, warpers, token choice).

Cache layout and attention. Row r of a left-padded batch (prompt length L, ``start_r`` pads) keeps its keys in
cache slots ``[r*M + start_r, r*M + end)`` (M = L + max_new_tokens, ``end`` the tokens so far). One
``packed_attention`` call serves the whole batch: the cache is read as a packed key stream whose segments alternate
between a gap (the slots no query may read: the previous row's unused tail and this row's pads, zero queries) and
the row's real keys (this step's queries, causal, bottom-right aligned). So pads are never attended, and a row's
positions count only its own tokens: each row gets exactly what it gets alone. transformers counts the pads into
the positions of cached steps (shared/research/kosmos2.md section 1.13, item 2); mmcore does not.

Nothing in a step reads the device on the host except the check for "every row finished" (every step on the CPU,
every ``FINISHED_CHECK_EVERY`` steps on a GPU) and, on the CPU with the box grammar on, the rows' grammar states:
when every unfinished row is inside a box, the output head computes only the rows the grammar can allow (the
1,024 location tokens, or ``<object>`` after ``</phrase>``, or ``</object>`` / the delimiter) and the others get
-inf, which the grammar would have banned anyway -- the tokens chosen are the same, the head's cost (the largest
of a step at batch 1) drops 64x or more on those steps. On a GPU with half-precision weights the head is
transformers' product: in the weights' dtype, then float32 (``_head``).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from mmcore import ops
from mmcore.models.kosmos2.modeling import KVCache, PackedLayout
from mmcore.models.layers.beam import BeamSearch, check_num_beams
from mmcore.models.layers.tokens import check_token_ids
from mmcore.ops import _library, decoding

FINISHED_CHECK_EVERY = 8  # GPU only: a host read per 8 steps costs < 1 % while finished rows idle at most 7 steps
# A screen that leaves more than this fraction of the vocabulary is not worth its gather: the whole head instead.
SCREEN_MAX_FRACTION = 1 / 8


def _layout(starts, end: int, new: torch.Tensor, max_len: int, max_new: int) -> PackedLayout:
    """Gap/real segments over the cache for rows with keys ``[starts_r, end)`` and ``new[r]`` queries each."""
    batch = starts.shape[0]
    base = torch.arange(batch, device=starts.device) * max_len
    bounds = torch.stack([base + starts, base + end], dim=1).reshape(-1)  # start_0, end_0, start_1, end_1, ...
    total = torch.tensor([batch * max_len], device=starts.device)
    cu_k = torch.cat([bounds.new_zeros(1), bounds, total]).to(torch.int32)
    q_ends = new.cumsum(0)
    q_bounds = torch.stack([q_ends - new, q_ends], dim=1).reshape(-1)
    cu_q = torch.cat([q_bounds.new_zeros(1), q_bounds, q_ends[-1:]]).to(torch.int32)
    return PackedLayout(cu_q, cu_k, max_new, max_len)


class _StepLayouts:
    """``_layout(starts, end, ones, max_len, 1)`` for successive ``end``s, each in one tensor op: the query offsets
    (one query per row) never change and the key offsets change only at the rows' ends. (Building the layout afresh
    took ~80 us a step at batch 8; on a GPU this also keeps the step free of host data.)"""

    def __init__(self, starts: torch.Tensor, max_len: int):
        batch = starts.shape[0]
        first = _layout(starts, 0, torch.ones_like(starts), max_len, 1)
        self.cu_q, self.max_len = first.cu_seqlens_q, max_len
        self.base_k = first.cu_seqlens_k
        self.end_mask = torch.zeros_like(self.base_k)
        self.end_mask[2 : 2 * batch + 1 : 2] = 1  # entries base + r * max_len + end

    def at(self, end: int) -> PackedLayout:
        return PackedLayout(self.cu_q, torch.add(self.base_k, self.end_mask, alpha=end), 1, self.max_len)


def _grammar_rows(state: ops.DecodeState, tokens: ops.GroundingTokens) -> tuple[int, int] | None:
    """The vocabulary range [start, end) holding every token the grammar allows next in every unfinished row, when
    all of them are in one box state that allows a contiguous range; else None (compute the whole head). CPU only
    (reads the state on the host)."""
    states = {s for s, done in zip(state.box_state.tolist(), state.finished.tolist(), strict=True) if not done}
    if len(states) != 1:
        return None
    (s,) = states
    if s in (decoding.EXPECT_TOP_LEFT, decoding.EXPECT_BOTTOM_RIGHT):
        return tokens.first_loc, tokens.loc_end
    if s == decoding.AFTER_PHRASE:
        return tokens.object_open, tokens.object_open + 1
    if s == decoding.EXPECT_CLOSE:
        lo, hi = sorted((tokens.object_close, tokens.delimiter))
        return (lo, hi + 1) if hi == lo + 1 else None
    return None


def _head(
    hidden: torch.Tensor, weight: torch.Tensor, rows: tuple[int, int] | None, half_product: bool | None = None
) -> torch.Tensor:
    """(batch, vocab) float32 logits (``ops.decode_logits``: a memory-bound C++ GEMV on the CPU); with ``rows``
    only that range is computed and the rest is -inf.

    half_product (default: on a GPU): with float16 / bfloat16 weights, the product in the weights' dtype (float32
    accumulation in cuBLAS), then float32 -- transformers' logits exactly, where decode_logits' torch backend would
    upcast the whole head (65,037 x 2,048 at 1.6B: 0.5 GB of float32) at every step."""
    if half_product is None:
        half_product = hidden.device.type != "cpu"
    half = hidden.dtype == weight.dtype and weight.dtype in (torch.float16, torch.bfloat16)
    if rows is None and half_product and half:
        return torch.nn.functional.linear(hidden, weight).float()
    if rows is None:
        return ops.decode_logits(hidden, weight).float()
    logits = torch.full((hidden.shape[0], weight.shape[0]), -torch.inf, dtype=torch.float32, device=hidden.device)
    logits[:, rows[0] : rows[1]] = ops.decode_logits(hidden, weight, rows=rows).float()
    return logits


# Each model's screened head, built on first use; held beside the model rather than on it, so that pickling or
# copying a model never carries the low-precision copy, and dropped with the model.
_SCREENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _screen(model) -> ops.ScreenedHead:
    """The model's screened head, built on first use and rebuilt when the weight changes (moved, trained)."""
    weight = model.lm_head_weight
    screen = _SCREENS.get(model)
    if screen is None or not screen.matches(weight):
        screen = _SCREENS[model] = ops.ScreenedHead(weight)
    return screen


def _screened_logits(screen, hidden, state, tokens, step_options) -> torch.Tensor | None:
    """A greedy step's logits: exact float32 for every token that may still be the step's choice, -inf for the
    rest, so the step chooses what it chooses on the whole head (``ops.ScreenedHead``); None when the screen leaves
    too much (compute the whole head).

    A dry run of the step itself, on a copy of the state, with the screening logits L' (``approximate``) gives each
    row a token r* the step allows and the scores of every token (-inf where the grammar, n-gram blocking or the
    minimum length bans). Row r's floor is r*'s lower bound L'(r*) - e(r*) <= L(r*) <= the largest allowed float32
    logit, so the step's true choice has an upper bound L' + e at or above the floor: the candidates are the
    allowed tokens whose upper bound reaches it (``screen_candidates``, which forms L' + e on the fly). (A row with
    every token banned scores the grammar's tokens 0 in both runs and takes the first: the same.)"""
    found = screen.approximate(hidden)
    if found is None:  # not finite, or could overflow
        return None
    approx, coef = found
    chosen, scores = ops.grounded_decode_step(approx, state.clone(), tokens, return_scores=True, **step_options)
    table = screen.table
    # in float64, then rounded down to float32: a floor at most r*'s lower bound
    err = (coef.double() * table[:, chosen].T.double()).sum(1)
    floor64 = (scores.gather(1, chosen[:, None])[:, 0].double() - err).masked_fill_(state.finished, 0.0)
    if not bool(torch.isfinite(floor64).all()):
        return None
    floor = floor64.float()
    floor = torch.where(floor.double() > floor64, torch.nextafter(floor, floor.new_tensor(-torch.inf)), floor)
    floor.masked_fill_(state.finished, torch.inf)  # finished rows take pad whatever the logits
    rows = _library.op("screen_candidates")(approx, scores, floor, table, coef)  # allowed, may still win
    if rows.numel() > SCREEN_MAX_FRACTION * approx.shape[1]:
        return None
    logits = torch.full_like(approx, -torch.inf)
    logits[:, rows] = screen.exact(hidden, rows)
    return logits


def _beam_decode(model, last, cache, state, starts, prompts, k, length_penalty, ngram, min_new, constrain, tokens):
    """The decoding loop of ``generate(num_beams=k)`` after the prefill of batch * k rows: log-softmax of the head,
    the same bans as the greedy step (n-grams, EOS before ``min_new_tokens``, the box grammar), a ``BeamSearch``
    step, and the running rows' KV cache and grammar state reordered to follow their beams."""
    t, plen = model.config.text, prompts.shape[1]
    max_len = cache.max_len
    search = BeamSearch(prompts, k, max_len, eos_id=tokens.eos, fill=tokens.pad, length_penalty=length_penalty)
    box_state, top_left = state.box_state.clone(), state.top_left.clone()
    rows = torch.arange(prompts.shape[0] * k, device=prompts.device)
    layouts = _StepLayouts(starts, max_len)
    for step in range(max_len - plen):
        logp = torch.log_softmax(_head(last, model.lm_head_weight, None), -1)
        vocab = logp.shape[-1]
        seqs = search.sequences
        banned = decoding.ngram_banned_mask(seqs, torch.full_like(starts, seqs.shape[1]), starts, ngram, vocab)
        if constrain:
            banned |= ~decoding.box_allowed_mask(box_state, top_left, vocab, tokens)
        if step < min_new:
            banned[:, tokens.eos] = True
        scores = logp.masked_fill(banned, -torch.inf)
        decoding.check_no_nan(scores, None, "generate(num_beams > 1)")
        source, chosen = search.step(scores)
        if search.done:
            break
        cache.k = cache.k.view(cache.k.shape[0], -1, max_len, *cache.k.shape[2:])[:, source].flatten(1, 2)
        cache.v = cache.v.view(cache.v.shape[0], -1, max_len, *cache.v.shape[2:])[:, source].flatten(1, 2)
        box_state, top_left = decoding.advance_box_state(box_state[source], top_left[source], chosen, tokens)
        end = plen + step + 1
        cache.write_index = rows * max_len + (end - 1)
        positions = (end - starts) + t.pad_token_id
        last = model.decode(chosen, positions, max_len + 2, layouts.at(end), cache=cache)
    return search.best()


def _check_prompt(input_ids, attention_mask, image_embeds_position_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a (batch, prompt_len) tensor with prompt_len >= 1")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integers, got {input_ids.dtype}")
    for name, t in (("attention_mask", attention_mask), ("image_embeds_position_mask", image_embeds_position_mask)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != input_ids.shape):
            raise ValueError(f"{name} must be a tensor of shape {tuple(input_ids.shape)} like input_ids")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    mask = attention_mask.long()
    if mask.device.type == "cpu":
        decoding.check_left_padding(mask, "pad prompts on the left for generation (tokenizer.padding_side = 'left')")
        if not bool(mask[:, -1].all()):
            r = int((mask[:, -1] == 0).nonzero()[0, 0])
            raise ValueError(f"attention_mask[{r}] is all zeros: every prompt needs at least one token")
    return mask


@torch.no_grad()
def generate(
    model,
    pixel_values=None,
    input_ids=None,
    image_embeds_position_mask=None,
    attention_mask=None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int | None = None,
    constrain_boxes: bool = True,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    image_embeds=None,
    tokens: ops.GroundingTokens | None = None,
    narrow_head: bool = True,
    screen_head: bool = True,
    backend: str | None = None,
    interpolate_pos_encoding: bool = False,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after left-padded prompts; returns (batch, prompt_len + steps) int64, the
    prompts followed by the new tokens (``pad_token_id`` after a row's EOS), as transformers' ``generate``.

    pixel_values (rows with image slots, 3, H, W) or image_embeds (same rows, latent_query_num, D);
    image_embeds_position_mask, attention_mask (batch, prompt_len) as from ``Kosmos2Processor`` with left padding.
    no_repeat_ngram_size defaults to the config's (3 for Kosmos-2). constrain_boxes: the box grammar (location
    tokens only inside ``<object>...</object>``, bottom-right not above/left of top-left); with False, greedy
    output equals transformers'. seed: the sampling key (default drawn from torch's generator). tokens: the
    grounding token ids (default ``GroundingTokens.from_config(config.text, config.num_bins)``; eos/pad ids from
    the arguments override it). narrow_head: on the CPU with the grammar on, compute only the head rows the grammar
    allows when it fixes the token class (module docstring; same tokens, fewer FLOPs). screen_head: greedy on the
    CPU, float32: bound every logit from 8-bit (AVX512-VNNI CPUs) or bfloat16 copies of the head and the hidden
    states and compute only the rows that can still be chosen (``ops.ScreenedHead``; same tokens, a quarter or half
    the bytes; the copy is built on the first call and kept beside the model while it lives). backend: force the
    decoding step's backend. interpolate_pos_encoding: images of another size than the ViT's
    (``VisionTransformer.forward``).
    num_beams > 1: beam search with transformers' rules (``mmcore.models.layers.beam``; ``length_penalty``;
    greedy only, with the same n-gram blocking, minimum length and box grammar), returning each prompt with its best
    finished continuation (``pad_token_id`` after its EOS).
    """
    config = model.config
    mask = _check_prompt(input_ids, attention_mask, image_embeds_position_mask)
    check_token_ids(input_ids, config.text.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if tokens is None:
        tokens = ops.GroundingTokens.from_config(config.text, config.num_bins)
    if eos_token_id is not None or pad_token_id is not None:
        tokens = dataclasses.replace(
            tokens,
            eos=tokens.eos if eos_token_id is None else eos_token_id,
            pad=tokens.pad if pad_token_id is None else pad_token_id,
        )
    if no_repeat_ngram_size is None:
        no_repeat_ngram_size = config.text.no_repeat_ngram_size
    check_num_beams(num_beams)
    if num_beams > 1 and do_sample:
        raise ValueError("num_beams > 1 is beam search: do_sample=True is not supported with it")
    step_options = dict(
        no_repeat_ngram_size=no_repeat_ngram_size,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        constrain_boxes=constrain_boxes,
        backend=backend,
    )
    ids = input_ids.long()
    if num_beams > 1:  # every prompt k times, row b * k + j = beam j of prompt b; the images are encoded once
        ids, mask = ids.repeat_interleave(num_beams, 0), mask.repeat_interleave(num_beams, 0)
        if image_embeds_position_mask is not None:
            image_embeds_position_mask = image_embeds_position_mask.repeat_interleave(num_beams, 0)
        if image_embeds is None and pixel_values is not None:
            image_embeds = model.encode_images(pixel_values, interpolate_pos_encoding)
        if image_embeds is not None:
            image_embeds = image_embeds.repeat_interleave(num_beams, 0)
    batch, plen = ids.shape
    device = ids.device
    max_len = plen + max_new_tokens
    keep = mask.bool()
    lengths = mask.sum(1)
    starts = plen - lengths

    img_mask = None if image_embeds_position_mask is None else image_embeds_position_mask.bool()[keep]
    row_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    embeds = model._images(pixel_values, image_embeds, img_mask, interpolate_pos_encoding, row_offsets)
    t = config.text
    cache = KVCache(t.layers, batch, max_len, t.attention_heads, t.head_dim, dtype=model.lm_head_weight.dtype,
                    device=device)  # fmt: skip
    rows = torch.arange(batch, device=device)

    # prefill: the prompts' real tokens, packed
    cols = torch.arange(plen, device=device)
    cache.write_index = (rows[:, None] * max_len + cols[None, :])[keep]
    positions = (mask.cumsum(1) + t.pad_token_id)[keep]  # k-th real token of the row -> k + 1 + pad (= k + 2)
    layout = _layout(starts, plen, lengths, max_len, plen)
    layouts = _StepLayouts(starts, max_len)
    # only each prompt's last token needs an output: the last layer computes those rows alone (its keys and values
    # still fill the cache)
    final = (lengths.cumsum(0) - 1, layouts.at(plen))
    last = model.decode(ids[keep], positions, max_len + 2, layout, embeds, img_mask, cache, keep=final)

    state = ops.DecodeState.create(ids, max_new_tokens, tokens, attention_mask=mask, seed=seed)
    if num_beams > 1:
        return _beam_decode(model, last, cache, state, starts, ids[::num_beams], num_beams, float(length_penalty),
                            no_repeat_ngram_size, min_new_tokens, constrain_boxes, tokens)  # fmt: skip
    check_every = 1 if device.type == "cpu" else FINISHED_CHECK_EVERY
    narrow = narrow_head and constrain_boxes and device.type == "cpu"
    screen = None
    weight = model.lm_head_weight
    if (
        screen_head
        and not do_sample
        and device.type == "cpu"
        and weight.dtype == last.dtype == torch.float32
        and ops.ScreenedHead.available()
    ):
        screen = _screen(model)
    for step in range(max_new_tokens):
        head_rows = _grammar_rows(state, tokens) if narrow else None
        logits = None
        if head_rows is None and screen is not None:
            logits = _screened_logits(screen, last, state, tokens, step_options)
        if logits is None:
            logits = _head(last, weight, head_rows)
        next_tokens = ops.grounded_decode_step(logits, state, tokens, **step_options)
        if step + 1 == max_new_tokens or ((step + 1) % check_every == 0 and bool(state.finished.all())):
            break
        end = plen + step + 1  # the cache holds tokens [start_r, end) after this step's token is written
        cache.write_index = rows * max_len + (end - 1)
        positions = (end - starts) + t.pad_token_id  # this token is the row's (end - start_r)-th
        last = model.decode(next_tokens, positions, max_len + 2, layouts.at(end), cache=cache)
    return state.sequences[:, : plen + state.steps_taken].clone()
