"""A fused decoding step for grounded generation: box grammar, n-gram blocking, warpers and the token choice.

One call per generated token. It takes the step's logits ``(batch, vocab)`` and a :class:`DecodeState` that lives
on the logits' device, and, per row, in this order:

1. **box grammar** (Kosmos-2, shared/research/kosmos2.md sections 1.7 and 1.10), from the row's grammar state:

   ============================  ==================================================================
   state (after ...)             allowed next tokens
   ============================  ==================================================================
   ``TEXT`` (anything else)      every token but location tokens, ``</object>`` and the delimiter
   ``AFTER_PHRASE``              ``<object>`` only
   (``</phrase>``)
   ``EXPECT_TOP_LEFT``           any location token (a box's top-left cell)
   (``<object>``, delimiter)
   ``EXPECT_BOTTOM_RIGHT``       location tokens whose row and column (``idx // num_bins``,
   (a top-left)                  ``idx % num_bins``) are both >= the top-left's
   ``EXPECT_CLOSE``              ``</object>`` or ``</delimiter_of_multi_objects/>``
   (a bottom-right)
   ============================  ==================================================================

   (``</object>`` and the delimiter are banned outside a box as well: they close or continue a box, so the
   output always parses as boxes.) Token ids come from :class:`GroundingTokens`, never from the kernels.
2. **no-repeat-n-gram** blocking over the row's whole sequence, prompt included and left padding excluded
   (``sequences[r, starts[r]:lengths[r]]``): exactly transformers' ``NoRepeatNGramLogitsProcessor`` on that row.
3. **min-new-tokens**: EOS is banned while the row has generated fewer than ``min_new_tokens`` tokens.
   If 1-3 leave a row no token with a finite score, the row falls back to the grammar's allowed tokens with score
   0 -- what transformers' ``PrefixConstrainedLogitsProcessor`` does when its constraint is unsatisfiable -- so the
   grammar always holds (e.g. when the n-gram ban hits the only allowed ``<object>``).
4. **sampling only** (``do_sample=True``; greedy ignores them, as transformers does): temperature, top-k, top-p,
   with the semantics of transformers' warpers (``min_tokens_to_keep=1``). Ties at the top-k or top-p cutoff are
   all kept (transformers' top-p keeps an arbitrary subset of tied values, in sort order).
5. **the choice**: greedy is the first index of the maximum (``torch.argmax``); sampling is the inverse CDF over
   the kept tokens in vocabulary order: with weights ``w_j = exp(x_j - max)`` (float32) summed in float64 and a
   uniform ``u = r / 2**32`` from the 32-bit Philox draw ``r = philox(seed, step * batch + row)``
   (``mmcore.ops._philox``, Triton's ``tl.randint``), the token is the first j with ``cumsum(w)[j] > u * sum(w)``.
   Every backend regenerates the same draw; no generator state, no host synchronisation.

Rows that emitted EOS are finished and produce ``pad`` from then on. The step appends the token to
``sequences``, advances ``lengths``, ``steps``, the grammar state and ``finished`` in place and returns the tokens
``(batch,)`` int64. Nothing in the step reads a tensor on the host or branches on tensor values: the host never
waits for the device (the buffer's bound is guarded by a host-side step count, ``DecodeState.steps_taken``).

Logits are processed in float32 (transformers' generate casts the step's logits to float32 too); float16 and
bfloat16 logits are read as they are, float64 logits are cast at the boundary. Logits must not hold NaN or +inf;
on CPU tensors (torch and C++ backends) a NaN left after the bans in an unfinished row raises ValueError naming
the row, on CUDA tensors it is not checked (that would read the device on the host).
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from mmcore.grounding.tokens import FIRST_LOC_TOKEN_ID, TAG_TOKENS
from mmcore.ops import _library
from mmcore.ops._dispatch import ArgumentTypeError, Backend, Op, extension_kernel
from mmcore.ops._philox import philox_randint

# Grammar states (the values stored in DecodeState.box_state; the kernels use the same numbers).
TEXT, AFTER_PHRASE, EXPECT_TOP_LEFT, EXPECT_BOTTOM_RIGHT, EXPECT_CLOSE = range(5)
BOX_STATES = ("TEXT", "AFTER_PHRASE", "EXPECT_TOP_LEFT", "EXPECT_BOTTOM_RIGHT", "EXPECT_CLOSE")
MAX_NGRAM = 8  # the Triton kernel unrolls the n-gram comparison; transformers' users set 2-4 (Kosmos-2: 3)
MAX_SEED = (1 << 63) - 1  # seeds travel as int64 op arguments


# ------------------------------------------------------------------------------------------ token ids


@dataclass(frozen=True)
class GroundingTokens:
    """The token ids the box grammar needs. Location token k (cell ``row = k // num_bins``, ``col = k % num_bins``)
    has id ``first_loc + k``, for k in ``[0, num_bins**2)``.

    ``GroundingTokens.kosmos2()`` is the released Kosmos-2 vocabulary (65,037 ids); ``from_tokenizer`` reads the ids
    from a tokenizer, ``from_config`` derives them from a Kosmos2Config-like description (vocab_size, eos/pad ids).
    """

    phrase_open: int
    phrase_close: int
    object_open: int
    object_close: int
    delimiter: int
    first_loc: int
    num_bins: int
    eos: int
    pad: int

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"GroundingTokens.{name} must be a non-negative int, got {value!r}")
        if not 1 <= self.num_bins <= 1 << 15:
            raise ValueError(f"GroundingTokens.num_bins must be in [1, 32768], got {self.num_bins}")
        tags = {
            "phrase_open": self.phrase_open,
            "phrase_close": self.phrase_close,
            "object_open": self.object_open,
            "object_close": self.object_close,
            "delimiter": self.delimiter,
        }
        if len(set(tags.values())) != len(tags):
            raise ValueError(f"GroundingTokens: the tag ids must be distinct, got {tags}")
        for name, tid in {**tags, "eos": self.eos, "pad": self.pad}.items():
            if self.first_loc <= tid < self.loc_end:
                raise ValueError(
                    f"GroundingTokens.{name} = {tid} lies inside the location tokens [{self.first_loc}, {self.loc_end})"
                )
            if name in tags and tid in (self.eos, self.pad):
                raise ValueError(f"GroundingTokens.{name} = {tid} is also the eos or pad id")

    @property
    def loc_end(self) -> int:
        """One past the last location token id."""
        return self.first_loc + self.num_bins * self.num_bins

    @property
    def min_vocab(self) -> int:
        """The smallest vocabulary that holds every id."""
        singles = (self.phrase_open, self.phrase_close, self.object_open, self.object_close, self.delimiter)
        return max(self.loc_end, *(tid + 1 for tid in (*singles, self.eos, self.pad)))

    def ids(self) -> list[int]:
        """The fields in declaration order: the ``special_tokens`` argument of the ``grounded_decode_step`` op."""
        return [getattr(self, name) for name in self.__dataclass_fields__]

    @classmethod
    def kosmos2(cls) -> GroundingTokens:
        """The released checkpoints' ids: tags 64007-64011, locations 64013-65036 (32 x 32), ``</s>`` 2, ``<pad>`` 1."""
        return cls.from_config(None)

    @classmethod
    def from_config(cls, config, num_bins: int = 32) -> GroundingTokens:
        """From a Kosmos2Config (or its ``text_config``, or anything with ``vocab_size``, ``eos_token_id`` and
        ``pad_token_id``; None for the released defaults). Kosmos2Processor appends the 11 tags of
        ``mmcore.grounding.TAG_TOKENS`` and then the ``num_bins**2`` location tokens to the base vocabulary, so
        the ids follow from ``vocab_size``."""
        text = getattr(config, "text_config", config)
        vocab = getattr(text, "vocab_size", FIRST_LOC_TOKEN_ID + 1024) if text is not None else 65037
        eos = getattr(text, "eos_token_id", 2) if text is not None else 2
        pad = getattr(text, "pad_token_id", 1) if text is not None else 1
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"config.eos_token_id must be one id, got {eos!r}")
            eos = eos[0]
        if eos is None or pad is None:
            raise ValueError(f"config needs eos_token_id and pad_token_id, got {eos!r} and {pad!r}")
        first_loc = vocab - num_bins * num_bins
        tag = {name: first_loc - len(TAG_TOKENS) + i for i, name in enumerate(TAG_TOKENS)}
        if first_loc - len(TAG_TOKENS) < 0:
            raise ValueError(f"vocab_size {vocab} is too small for {len(TAG_TOKENS)} tags and {num_bins}^2 locations")
        return cls(
            phrase_open=tag["<phrase>"],
            phrase_close=tag["</phrase>"],
            object_open=tag["<object>"],
            object_close=tag["</object>"],
            delimiter=tag["</delimiter_of_multi_objects/>"],
            first_loc=first_loc,
            num_bins=num_bins,
            eos=int(eos),
            pad=int(pad),
        )

    @classmethod
    def from_tokenizer(cls, tokenizer) -> GroundingTokens:
        """From a Kosmos-2 tokenizer (``Kosmos2Processor.tokenizer`` or any tokenizer with its added tokens):
        tag ids by name, the location tokens ``<patch_index_0000>`` ... (their count is ``num_bins**2``; their ids
        must be consecutive), ``eos_token_id`` and ``pad_token_id``."""
        unk = getattr(tokenizer, "unk_token_id", None)

        def lookup(token: str) -> int:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or (tid == unk and token != getattr(tokenizer, "unk_token", None)):
                raise ValueError(f"tokenizer has no token {token!r}")
            return int(tid)

        n_loc = sum(1 for t in tokenizer.get_vocab() if re.fullmatch(r"<patch_index_\d{4}>", t))
        num_bins = math.isqrt(n_loc)
        if n_loc == 0 or num_bins * num_bins != n_loc:
            raise ValueError(f"tokenizer has {n_loc} <patch_index_XXXX> tokens; expected a square number (32^2)")
        first_loc = lookup("<patch_index_0000>")
        for k in range(n_loc):
            if lookup(f"<patch_index_{k:04d}>") != first_loc + k:
                raise ValueError(f"tokenizer's location token ids are not consecutive at <patch_index_{k:04d}>")
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ValueError(f"tokenizer.{name} is not set")
        return cls(
            phrase_open=lookup("<phrase>"),
            phrase_close=lookup("</phrase>"),
            object_open=lookup("<object>"),
            object_close=lookup("</object>"),
            delimiter=lookup("</delimiter_of_multi_objects/>"),
            first_loc=first_loc,
            num_bins=num_bins,
            eos=int(tokenizer.eos_token_id),
            pad=int(tokenizer.pad_token_id),
        )


# ------------------------------------------------------------------------------------------ grammar


def box_allowed_mask(box_state: torch.Tensor, top_left: torch.Tensor, vocab: int, tokens: GroundingTokens):
    """(batch, vocab) bool: the tokens the box grammar allows next, per row's state (module docstring)."""
    v = torch.arange(vocab, device=box_state.device)[None, :]
    state, tl_idx = box_state[:, None], top_left[:, None]
    is_loc = (v >= tokens.first_loc) & (v < tokens.loc_end)
    idx = (v - tokens.first_loc).clamp(min=0)
    nb = tokens.num_bins
    below_right = (idx // nb >= tl_idx // nb) & (idx % nb >= tl_idx % nb)
    closes = (v == tokens.object_close) | (v == tokens.delimiter)
    return torch.where(
        state == TEXT,
        ~is_loc & ~closes,
        torch.where(
            state == AFTER_PHRASE,
            v == tokens.object_open,
            torch.where(
                state == EXPECT_TOP_LEFT,
                is_loc,
                torch.where(state == EXPECT_BOTTOM_RIGHT, is_loc & below_right, closes),
            ),
        ),
    )


def advance_box_state(
    box_state: torch.Tensor, top_left: torch.Tensor, token: torch.Tensor, tokens: GroundingTokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grammar state after ``token`` (all (batch,)): a total function, so malformed prompts get a state too
    (a location token that does not continue a box leaves the row in TEXT)."""
    is_loc = (token >= tokens.first_loc) & (token < tokens.loc_end)
    new = torch.full_like(box_state, TEXT)
    new = torch.where(is_loc & (box_state == EXPECT_BOTTOM_RIGHT), EXPECT_CLOSE, new)
    new = torch.where(is_loc & (box_state == EXPECT_TOP_LEFT), EXPECT_BOTTOM_RIGHT, new)
    new = torch.where((token == tokens.delimiter) & (box_state == EXPECT_CLOSE), EXPECT_TOP_LEFT, new)
    new = torch.where(token == tokens.object_open, EXPECT_TOP_LEFT, new)
    new = torch.where(token == tokens.phrase_close, AFTER_PHRASE, new)
    new_top_left = torch.where(new == EXPECT_BOTTOM_RIGHT, token - tokens.first_loc, torch.full_like(top_left, -1))
    return new, new_top_left


def prefix_allowed_tokens_fn(tokens: GroundingTokens, vocab: int):
    """The box grammar as a transformers ``prefix_allowed_tokens_fn(batch_id, input_ids) -> list[int]`` (for
    ``generate`` or ``PrefixConstrainedLogitsProcessor``), in plain Python.

    It reads the state from the sequence's tail: back over the trailing run of location and delimiter tokens to
    the token before it (which alone fixes the state: ``</phrase>``, ``<object>`` or TEXT), then forward through
    the run. The allowed lists are built once (bottom-right lists per top-left on first use). The tests use it as
    an oracle independent of the batched implementations; benchmarks/bench_decoding.py as the transformers
    baseline."""
    first, end, nb = tokens.first_loc, tokens.loc_end, tokens.num_bins
    closes = (tokens.object_close, tokens.delimiter)
    text = [v for v in range(vocab) if not first <= v < end and v not in closes]
    after_phrase, top_lefts, close = [tokens.object_open], list(range(first, end)), list(closes)
    bottom_rights: dict[int, list[int]] = {}

    def state_of(seq: list[int]) -> tuple[int, int]:
        i = len(seq)
        while i > 0 and (first <= seq[i - 1] < end or seq[i - 1] == tokens.delimiter):
            i -= 1
        before = seq[i - 1] if i > 0 else None
        state = {tokens.phrase_close: AFTER_PHRASE, tokens.object_open: EXPECT_TOP_LEFT}.get(before, TEXT)
        top_left = -1
        for t in seq[i:]:
            if t == tokens.delimiter:
                state, top_left = (EXPECT_TOP_LEFT if state == EXPECT_CLOSE else TEXT), -1
            elif state == EXPECT_TOP_LEFT:
                state, top_left = EXPECT_BOTTOM_RIGHT, t - first
            else:
                state, top_left = (EXPECT_CLOSE if state == EXPECT_BOTTOM_RIGHT else TEXT), -1
        return state, top_left

    def allowed(batch_id: int, input_ids) -> list[int]:
        state, top_left = state_of(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids))
        if state == EXPECT_BOTTOM_RIGHT:
            if top_left not in bottom_rights:
                row, col = divmod(top_left, nb)
                bottom_rights[top_left] = [first + r * nb + c for r in range(row, nb) for c in range(col, nb)]
            return bottom_rights[top_left]
        return {TEXT: text, AFTER_PHRASE: after_phrase, EXPECT_TOP_LEFT: top_lefts, EXPECT_CLOSE: close}[state]

    allowed.state_of = state_of  # for tests: the (state, top_left) after a sequence
    return allowed


# ------------------------------------------------------------------------------------------ state


def check_left_padding(mask: torch.Tensor, hint: str) -> None:
    """Raise ValueError naming the first row of a (batch, L) 0/1 mask that is not zeros then ones (reads the host)."""
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        r = int((mask[:, 1:] < mask[:, :-1]).any(1).nonzero()[0, 0])
        raise ValueError(f"attention_mask[{r}] is not left padding (zeros then ones); {hint}")


@dataclass
class DecodeState:
    """Per-row decoding state, on the logits' device; the step updates the tensors in place.

    sequences: (batch, max_len) int64 -- row r's tokens are ``sequences[r, starts[r]:lengths[r]]`` (positions before
    ``starts[r]`` are left padding, positions from ``lengths[r]`` are not written yet). lengths, starts, steps:
    (batch,) int64 (``steps``: tokens generated so far). box_state: (batch,) int64 grammar state (``BOX_STATES``);
    top_left: (batch,) int64 location index of the open box's top-left (-1 outside EXPECT_BOTTOM_RIGHT). finished:
    (batch,) bool. ``tokens``, ``max_new_tokens`` and ``seed`` are fixed at ``create``; ``steps_taken`` counts
    steps on the host (it guards the buffer without reading the device).
    """

    sequences: torch.Tensor
    lengths: torch.Tensor
    starts: torch.Tensor
    box_state: torch.Tensor
    top_left: torch.Tensor
    steps: torch.Tensor
    finished: torch.Tensor
    tokens: GroundingTokens
    max_new_tokens: int
    seed: int
    steps_taken: int = field(default=0)

    @classmethod
    def create(
        cls,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        tokens: GroundingTokens,
        *,
        attention_mask: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> DecodeState:
        """State for generating up to ``max_new_tokens`` tokens after the prompts ``input_ids`` (batch, L).

        attention_mask: (batch, L) 0/1, left padding (each row's ones are a suffix): row r starts at
        ``L - attention_mask[r].sum()``. prompt_lengths: (batch,) for right-padded or ragged prompts: row r is
        ``input_ids[r, :prompt_lengths[r]]`` and its new tokens overwrite the padding after it. Neither: every row
        is the full L tokens. seed: the Philox key of sampling steps (default: drawn from torch's default CPU
        generator, so ``torch.manual_seed`` makes it reproducible). The grammar state is read from each prompt's
        tail (a prompt ending in ``</phrase>`` must continue with ``<object>``).
        """
        if not isinstance(tokens, GroundingTokens):
            raise ArgumentTypeError(f"tokens must be a GroundingTokens, got {type(tokens).__name__}")
        if not isinstance(input_ids, torch.Tensor):
            raise ArgumentTypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(
                f"input_ids must have shape (batch, prompt_len) with batch >= 1, got {tuple(input_ids.shape)}"
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ArgumentTypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        _check_seed(seed)
        batch, plen = input_ids.shape
        device = input_ids.device
        check_values = device.type == "cpu" and not torch.compiler.is_compiling()
        full = torch.full((batch,), plen, dtype=torch.int64, device=device)
        if attention_mask is not None and prompt_lengths is not None:
            raise ValueError("pass attention_mask (left padding) or prompt_lengths (right padding), not both")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must be a tensor of shape {tuple(input_ids.shape)} like input_ids")
            if attention_mask.device != device:
                raise ValueError(f"attention_mask must be on {device} with input_ids, got {attention_mask.device}")
            mask = attention_mask.to(torch.int64)
            if check_values:
                check_left_padding(mask, "pass prompt_lengths for right-padded prompts")
            starts, lengths = full - mask.sum(1), full
        elif prompt_lengths is not None:
            pl = torch.as_tensor(prompt_lengths, device=device)
            if pl.shape != (batch,) or pl.is_floating_point() or pl.dtype == torch.bool:
                raise ValueError(f"prompt_lengths must be ({batch},) integers, got {pl.dtype} {tuple(pl.shape)}")
            pl = pl.to(torch.int64)
            if check_values and not bool(((pl >= 0) & (pl <= plen)).all()):
                r = int(((pl < 0) | (pl > plen)).nonzero()[0, 0])
                raise ValueError(f"prompt_lengths[{r}] = {int(pl[r])} is outside [0, {plen}]")
            starts, lengths = torch.zeros_like(full), pl
        else:
            starts, lengths = torch.zeros_like(full), full
        sequences = torch.full((batch, plen + max_new_tokens), tokens.pad, dtype=torch.int64, device=device)
        sequences[:, :plen] = input_ids
        box_state = torch.full((batch,), TEXT, dtype=torch.int64, device=device)
        top_left = torch.full((batch,), -1, dtype=torch.int64, device=device)
        first = 0
        if check_values and plen:
            # A token other than a location or the delimiter fixes the state by itself (advance_box_state), so each
            # row's scan may start at its last such token; the batch's scan starts at the earliest of those (a row
            # without one, from its start). On the CPU this cuts the scan from the prompt length (~15 small ops a
            # position, 3.7 ms for 8 x 71 tokens) to the trailing run of location tokens, usually one position.
            seq, cols = sequences[:, :plen], torch.arange(plen, device=device)
            chain = ((seq >= tokens.first_loc) & (seq < tokens.loc_end)) | (seq == tokens.delimiter)
            inside_all = (cols >= starts[:, None]) & (cols < lengths[:, None])
            last_break = torch.where(inside_all & ~chain, cols, -1).amax(1)
            first = int(torch.where(last_break >= 0, last_break, starts).min())
        for p in range(first, plen):  # a scan of the prompts through the grammar, batched over rows
            inside = (p >= starts) & (p < lengths)
            new_state, new_top_left = advance_box_state(box_state, top_left, sequences[:, p], tokens)
            box_state = torch.where(inside, new_state, box_state)
            top_left = torch.where(inside, new_top_left, top_left)
        return cls(
            sequences=sequences,
            lengths=lengths.contiguous(),
            starts=starts.contiguous(),
            box_state=box_state,
            top_left=top_left,
            steps=torch.zeros(batch, dtype=torch.int64, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            tokens=tokens,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def device(self) -> torch.device:
        return self.sequences.device

    def generated(self) -> torch.Tensor:
        """(batch, steps_taken) int64: the tokens generated so far (pad after a row's EOS)."""
        first = (self.lengths - self.steps)[:, None]
        idx = first + torch.arange(self.steps_taken, device=self.device)[None, :]
        return self.sequences.gather(1, idx.clamp(max=self.sequences.shape[1] - 1))

    def clone(self) -> DecodeState:
        """A deep copy (tensors cloned), e.g. to run two backends from the same state."""
        copies = {name: getattr(self, name).clone() for name in _STATE_TENSORS}
        return DecodeState(**copies, tokens=self.tokens, max_new_tokens=self.max_new_tokens, seed=self.seed,
                           steps_taken=self.steps_taken)  # fmt: skip

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The state tensors in the op's argument order."""
        return tuple(getattr(self, name) for name in _STATE_TENSORS)


_STATE_TENSORS = ("sequences", "lengths", "starts", "box_state", "top_left", "steps", "finished")


# ------------------------------------------------------------------------------------------ reference


class StepOutput(NamedTuple):
    next_tokens: torch.Tensor  # (batch,) int64
    scores: torch.Tensor  # (batch, vocab) float32, the processed logits (-inf where banned or filtered)


def ngram_banned_mask(sequences, lengths, starts, ngram_size: int, vocab: int) -> torch.Tensor:
    """(batch, vocab) bool: tokens that would repeat an n-gram of row r's ``sequences[r, starts[r]:lengths[r]]``.

    transformers' rule: a complete window ``seq[j : j + n]`` whose first n - 1 tokens equal the last n - 1 tokens
    of the sequence bans its last token (n = 1 bans every token seen)."""
    batch, max_len = sequences.shape
    n = ngram_size
    banned = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=sequences.device)
    if n == 0 or max_len < n:
        return banned[:, :vocab]
    windows = sequences.unfold(1, n, 1)  # (batch, max_len - n + 1, n): window j is seq[j : j + n]
    j = torch.arange(windows.shape[1], device=sequences.device)[None, :]
    complete = (j >= starts[:, None]) & (j + n <= lengths[:, None])
    prefix_pos = (lengths[:, None] - (n - 1) + torch.arange(n - 1, device=sequences.device)[None, :]).clamp(min=0)
    prefix = sequences.gather(1, prefix_pos)  # (batch, n - 1): the sequence's last n - 1 tokens
    matches = complete & (windows[..., :-1] == prefix[:, None, :]).all(-1)
    matches &= (lengths - starts >= n)[:, None]
    last = windows[..., -1]
    # Non-matching windows (and ids outside the vocabulary) go to a spare column, as in transformers.
    target = torch.where(matches & (last >= 0) & (last < vocab), last, vocab)
    banned.scatter_(1, target, True)
    return banned[:, :vocab]


def top_p_keep_mask(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(batch, vocab) bool: tokens kept by top-p. Token i is kept when the probability of the tokens with a
    strictly larger score is below ``top_p`` (transformers' ``cumprob <= 1 - top_p`` removal read from the
    other end), or when it has the largest score (``min_tokens_to_keep=1``). Weights ``exp(x - max)`` in float32,
    sums in float64."""
    top = scores.amax(-1, keepdim=True)
    w = torch.exp(scores - top).double()
    desc, order = scores.sort(-1, descending=True)
    w_desc = w.gather(-1, order)
    # exclusive prefix sums: the mass before each sorted position
    above = torch.cat([torch.zeros_like(w_desc[:, :1]), torch.cumsum(w_desc, -1)[:, :-1]], -1)
    # ties share the mass above their first sorted position
    first_of_value = torch.searchsorted(-desc.contiguous(), -scores.contiguous(), right=False)
    mass_above = above.gather(-1, first_of_value)
    total = w.sum(-1, keepdim=True)
    return (mass_above < top_p * total) | (scores == top)


def uniforms(seed: int, steps: torch.Tensor) -> torch.Tensor:
    """(batch,) float64 uniforms in [0, 1): the 32-bit Philox draw for counter ``step * batch + row``, / 2**32."""
    batch = steps.shape[0]
    counters = steps * batch + torch.arange(batch, device=steps.device)
    return philox_randint(seed, counters).double() / 4294967296.0


def process_logits_ref(
    logits: torch.Tensor,
    state: DecodeState,
    tokens: GroundingTokens,
    *,
    no_repeat_ngram_size: int = 3,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    constrain_boxes: bool = True,
) -> torch.Tensor:
    """(batch, vocab) float32: the step's logits after grammar, n-gram, min-new-tokens and (sampling) warpers."""
    batch, vocab = logits.shape
    x = logits.float()
    if constrain_boxes:
        allowed = box_allowed_mask(state.box_state, state.top_left, vocab, tokens)
    else:
        allowed = torch.ones(batch, vocab, dtype=torch.bool, device=logits.device)
    x = x.masked_fill(~allowed, -math.inf)
    x = x.masked_fill(ngram_banned_mask(state.sequences, state.lengths, state.starts, no_repeat_ngram_size, vocab),
                      -math.inf)  # fmt: skip
    if tokens.eos < vocab:
        too_early = (state.steps < min_new_tokens)[:, None] & (torch.arange(vocab, device=x.device) == tokens.eos)
        x = x.masked_fill(too_early, -math.inf)
    # Nothing left: the grammar's allowed tokens with score 0 (PrefixConstrainedLogitsProcessor's fallback).
    dead = torch.isneginf(x).all(-1, keepdim=True)
    x = torch.where(dead, torch.where(allowed, 0.0, -math.inf), x)
    if not do_sample:
        return x
    x = x / temperature
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        x = x.masked_fill(~top_p_keep_mask(x, top_p), -math.inf)
    return x


def check_no_nan(scores: torch.Tensor, finished: torch.Tensor | None, what: str = "grounded_decode_step") -> None:
    """ValueError naming the first unfinished row (``finished`` None: any row) whose processed scores hold NaN: no
    token can be chosen from them (``torch.argmax`` would return the NaN's index). CPU tensors outside torch.compile
    only (elsewhere it would read the device on the host); the C++ backend raises the same error, the Triton backend
    does not check."""
    if scores.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = torch.isnan(scores).any(-1)
    if finished is not None:
        bad &= ~finished
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{what}: the logits of row {row} hold NaN (after the bans): the model's output is not finite")


def choose_tokens_ref(scores: torch.Tensor, steps: torch.Tensor, *, do_sample: bool, seed: int) -> torch.Tensor:
    """(batch,) int64: argmax (first maximum), or the inverse-CDF sample of the module docstring."""
    if not do_sample:
        return scores.argmax(-1)
    w = torch.exp(scores - scores.amax(-1, keepdim=True)).double()
    cdf = torch.cumsum(w, -1)
    target = uniforms(seed, steps)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1)  # first j with cdf[j] > target


def advance_state_(state_tensors, next_tokens: torch.Tensor, tokens: GroundingTokens) -> torch.Tensor:
    """Appends the step's tokens (pad for finished rows) and advances the state in place; returns the tokens."""
    sequences, lengths, starts, box_state, top_left, steps, finished = state_tensors
    out = torch.where(finished, torch.full_like(next_tokens, tokens.pad), next_tokens)
    room = lengths < sequences.shape[1]
    pos = lengths.clamp(max=sequences.shape[1] - 1)[:, None]
    sequences.scatter_(1, pos, torch.where(room, out, sequences.gather(1, pos).squeeze(1))[:, None])
    new_state, new_top_left = advance_box_state(box_state, top_left, out, tokens)
    box_state.copy_(new_state)
    top_left.copy_(new_top_left)
    finished.logical_or_(out == tokens.eos)
    lengths.add_(1)
    steps.add_(1)
    return out


def grounded_decode_step_ref(
    logits: torch.Tensor,
    state: DecodeState,
    tokens: GroundingTokens,
    *,
    no_repeat_ngram_size: int = 3,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    constrain_boxes: bool = True,
) -> StepOutput:
    """Reference decoding step in plain PyTorch (no host synchronisation either). Advances ``state`` in place
    (``steps_taken`` included) and returns the tokens and the processed logits."""
    scores = process_logits_ref(
        logits,
        state,
        tokens,
        no_repeat_ngram_size=no_repeat_ngram_size,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        constrain_boxes=constrain_boxes,
    )
    check_no_nan(scores, state.finished)
    chosen = choose_tokens_ref(scores, state.steps, do_sample=do_sample, seed=state.seed if seed is None else seed)
    out = advance_state_(state.tensors(), chosen, tokens)
    state.steps_taken += 1
    return StepOutput(out, scores)


# ------------------------------------------------------------------------------------------ backends


@torch.library.register_fake("mmcore::grounded_decode_step")
def _fake(logits, sequences, lengths, starts, box_state, top_left, steps, finished, scores, *args):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def _unpack(args):
    """The op's flat arguments -> (logits, state tensors, scores, GroundingTokens, options dict)."""
    logits, *state, scores, special, n, min_new, do_sample, temperature, top_k, top_p, seed, constrain = args
    options = dict(
        no_repeat_ngram_size=n,
        min_new_tokens=min_new,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        constrain_boxes=constrain,
    )
    return logits, tuple(state), scores, GroundingTokens(*special), options, seed


def _run_torch(*args):
    logits, state_tensors, scores_out, tokens, options, seed = _unpack(args)
    sequences, lengths, starts, box_state, top_left, steps, finished = state_tensors
    view = DecodeState(*state_tensors, tokens=tokens, max_new_tokens=1, seed=seed)
    scores = process_logits_ref(logits, view, tokens, **options)
    check_no_nan(scores, finished)
    chosen = choose_tokens_ref(scores, steps, do_sample=options["do_sample"], seed=seed)
    if scores_out is not None:
        scores_out.copy_(scores)
    return advance_state_(state_tensors, chosen, tokens)


def _run_cpp(*args):
    return _library.op("grounded_decode_step")(*args)


_triton_step = None
if importlib.util.find_spec("triton") is not None:
    from mmcore.kernels import decoding as _kernels

    _triton_step = torch.library.triton_op(
        "mmcore::grounded_decode_step_triton",
        _kernels._grounded_decode_step,
        mutates_args={"sequences", "lengths", "box_state", "top_left", "steps", "finished", "scores"},
    )
    # NOTE: an explicit fake, as for the codec: under TRITON_INTERPRET=1 the traced launcher would run the interpreter.
    _triton_step.register_fake(_fake)


def _run_triton(*args):
    return _triton_step(*args)


def _triton_supports(logits, *args):
    n = args[-8]
    if n > MAX_NGRAM:
        return f"no_repeat_ngram_size {n} > {MAX_NGRAM} (the kernel unrolls the n-gram comparison)"
    return None


_HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)

GROUNDED_DECODE_STEP = Op(
    "grounded_decode_step",
    [
        Backend("triton", _run_triton, ("cuda", "cpu"), _HALF_AND_FLOAT, check=_triton_supports, auto_on_cpu=False),
        Backend("cpp", _run_cpp, ("cpu",), _HALF_AND_FLOAT, needs=extension_kernel("grounded_decode_step")),
        Backend("torch", _run_torch, ("cpu", "cuda"), _HALF_AND_FLOAT),
    ],
)


# ------------------------------------------------------------------------------------------ public function


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


def _check_seed(seed) -> int:
    return _check_int("seed", seed, 0, MAX_SEED)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def grounded_decode_step(
    logits: torch.Tensor,
    state: DecodeState,
    tokens: GroundingTokens,
    *,
    no_repeat_ngram_size: int = 3,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    constrain_boxes: bool = True,
    return_scores: bool = False,
    backend: str | None = None,
):
    """One decoding step (module docstring): returns the next tokens (batch,) int64 and advances ``state``.

    logits: (batch, vocab) float16/bfloat16/float32 (float64 is cast to float32), on ``state``'s device.
    tokens: the ids ``state`` was created with. no_repeat_ngram_size: 0 turns n-gram blocking off (Kosmos-2
    uses 3). top_k: 0 turns it off. top_p: in [0, 1], 1 turns it off. temperature, top_k and top_p apply only with
    ``do_sample=True``. seed: the Philox key (default: ``state.seed``); keep it fixed across one generation's
    steps -- each step draws a fresh counter. constrain_boxes=False skips the grammar (the state still tracks
    it). return_scores: also return the processed logits (batch, vocab) float32, -inf where banned or filtered
    (transformers' ``output_scores``). backend: force ``"triton"``, ``"cpp"`` or ``"torch"``.
    """
    if not isinstance(logits, torch.Tensor):
        raise ArgumentTypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if not isinstance(state, DecodeState):
        raise ArgumentTypeError(f"state must be a DecodeState (DecodeState.create), got {type(state).__name__}")
    if not isinstance(tokens, GroundingTokens):
        raise ArgumentTypeError(f"tokens must be a GroundingTokens, got {type(tokens).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)}")
    if logits.dtype == torch.float64:
        logits = logits.float()
    if logits.dtype not in _HALF_AND_FLOAT:
        raise ArgumentTypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    batch, vocab = logits.shape
    if batch != state.batch_size:
        raise ValueError(f"logits has {batch} rows but state has {state.batch_size}")
    if logits.device != state.device:
        raise ValueError(f"logits must be on the state's device {state.device}, got {logits.device}")
    if tokens != state.tokens:
        raise ValueError(f"tokens {tokens} differ from the GroundingTokens the state was created with {state.tokens}")
    if vocab < tokens.min_vocab:
        raise ValueError(f"logits has a vocabulary of {vocab}, but the grounding token ids need {tokens.min_vocab}")
    if state.steps_taken >= state.max_new_tokens:
        raise ValueError(f"state is full: it was created for max_new_tokens={state.max_new_tokens} steps")
    _check_int("no_repeat_ngram_size", no_repeat_ngram_size, 0)
    _check_int("min_new_tokens", min_new_tokens, 0)
    _check_bool("do_sample", do_sample)
    _check_bool("constrain_boxes", constrain_boxes)
    _check_bool("return_scores", return_scores)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    _check_int("top_k", top_k, 0)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be a float in [0, 1], got {top_p!r}")
    seed = state.seed if seed is None else _check_seed(seed)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    scores = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device) if return_scores else None
    args = (
        logits,
        *state.tensors(),
        scores,
        tokens.ids(),
        no_repeat_ngram_size,
        min_new_tokens,
        do_sample,
        float(temperature),
        top_k,
        float(top_p),
        seed,
        constrain_boxes,
    )
    next_tokens = GROUNDED_DECODE_STEP(logits.device.type, logits.dtype, *args, backend=backend)
    state.steps_taken += 1
    return (next_tokens, scores) if return_scores else next_tokens
