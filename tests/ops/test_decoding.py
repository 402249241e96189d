"""The fused decoding step: the box grammar never violated (hypothesis, every backend), n-gram blocking, min-new-tokens
and warpers equal to transformers' processors, greedy = argmax of the processed logits, sampling distributions
(chi-square), every backend equal to the reference for the same seed, the state, opcheck, bad arguments."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmcore.ops import BackendError, DecodeState, GroundingTokens, available_backends, grounded_decode_step
from mmcore.ops._library import op
from mmcore.ops.decoding import (
    AFTER_PHRASE,
    BOX_STATES,
    EXPECT_BOTTOM_RIGHT,
    EXPECT_CLOSE,
    EXPECT_TOP_LEFT,
    MAX_NGRAM,
    TEXT,
    grounded_decode_step_ref,
    prefix_allowed_tokens_fn,
    process_logits_ref,
    uniforms,
)
from mmcore.testing import opcheck_triton_op

BACKENDS = [b for b in ("torch", "cpp", "triton") if b in available_backends("grounded_decode_step", "cpu")]
COMPILED = [b for b in BACKENDS if b != "torch"]
FAST = [b for b in BACKENDS if b != "triton"]  # the Triton interpreter takes ~0.2 s per sampled row

# A tiny vocabulary: 0 <s>, 1 pad, 2 eos, 3-7 the tags, 8-9 words, 10-25 a 4 x 4 grid of location tokens, 26-31 words.
TOK = GroundingTokens(
    phrase_open=3, phrase_close=4, object_open=5, object_close=6, delimiter=7, first_loc=10, num_bins=4, eos=2, pad=1
)
V = 32
WORDS = [0, 8, 9, 26, 27, 28, 29, 30, 31]
KOSMOS = GroundingTokens.kosmos2()
KOSMOS_VOCAB = 65037
LOC = list(range(TOK.first_loc, TOK.loc_end))

# Chi-square critical values at significance 1e-4 by degrees of freedom: scipy.stats.chi2.isf(1e-4, df), scipy 1.17.1.
CHI2_CRITICAL_1E4 = {
    1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88, 8: 31.83, 9: 33.72, 10: 35.56,
    11: 37.37, 12: 39.13, 13: 40.87, 14: 42.58, 15: 44.26, 16: 45.92, 17: 47.57, 18: 49.19, 19: 50.8, 20: 52.39,
    21: 53.96, 22: 55.52, 23: 57.07, 24: 58.61, 25: 60.14, 26: 61.66, 27: 63.16, 28: 64.66, 29: 66.15, 30: 67.63,
    31: 69.11,
}  # fmt: skip


def step(backend, logits, state, tokens=TOK, **options):
    return grounded_decode_step(logits, state, tokens, backend=backend, return_scores=True, **options)


def assert_same_state(got: DecodeState, want: DecodeState, what: str):
    for name in ("sequences", "lengths", "starts", "box_state", "top_left", "steps", "finished"):
        g, w = getattr(got, name), getattr(want, name)
        assert torch.equal(g, w), f"{what}: state.{name} differs:\n got  {g.tolist()}\n want {w.tolist()}"


def assert_scores_equal(got, want, what):
    """Processed logits equal, -inf positions included (NaN never allowed)."""
    assert not torch.isnan(got).any(), f"{what}: NaN in scores"
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: scores differ at {bad}: got {[got[r, c].item() for r, c in bad]}, "
                             f"want {[want[r, c].item() for r, c in bad]}")  # fmt: skip


def random_logits(gen, batch, vocab, style="normal"):
    x = torch.randn(batch, vocab, generator=gen) * 2
    if style == "loc_heavy":  # tempt every backend to break the grammar
        x[:, TOK.first_loc : TOK.loc_end] += 6
        x[:, [TOK.object_close, TOK.delimiter, TOK.eos]] += 5
    elif style == "ties":
        x = x.round()
    elif style == "neg_inf":  # some -inf, some rows entirely -inf (the fallback)
        x = x.masked_fill(torch.rand(batch, vocab, generator=gen) < 0.5, -math.inf)
        x[torch.rand(batch, generator=gen) < 0.3] = -math.inf
    return x


def left_padded(rows, pad=TOK.pad):
    """(input_ids, attention_mask) for token lists of different lengths, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


def right_padded(rows, pad=TOK.pad):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return ids, torch.tensor([len(r) for r in rows])


def row_tokens(state: DecodeState, r: int) -> list[int]:
    return state.sequences[r, int(state.starts[r]) : int(state.lengths[r])].tolist()


# ------------------------------------------------------------------------------------------ token ids


def _word_level_tokenizer(n_words, num_bins, tags=True):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from mmcore.grounding import TAG_TOKENS

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": len(vocab) for i in range(n_words)})
    if tags:
        vocab.update({t: len(vocab) + i for i, t in enumerate(TAG_TOKENS)})
    vocab.update({f"<patch_index_{k:04d}>": len(vocab) + k for k in range(num_bins * num_bins)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_grounding_tokens_kosmos2_config_and_tokenizer():
    from transformers import Kosmos2Config

    k = GroundingTokens.kosmos2()
    assert (k.phrase_open, k.phrase_close, k.object_open, k.object_close, k.delimiter) == tuple(range(64007, 64012))
    assert (k.first_loc, k.num_bins, k.eos, k.pad, k.loc_end, k.min_vocab) == (64013, 32, 2, 1, 65037, 65037)
    assert GroundingTokens.from_config(Kosmos2Config()) == k
    assert GroundingTokens.from_config(Kosmos2Config().text_config) == k
    # The released tokenizer's layout: 64002 base pieces (<s>, <pad>, </s>, <unk> and 63998 more), tags, locations.
    assert GroundingTokens.from_tokenizer(_word_level_tokenizer(64002 - 4, 32)) == k
    small = GroundingTokens.from_tokenizer(_word_level_tokenizer(4, 4))
    assert small == GroundingTokens(13, 14, 15, 16, 17, 19, 4, 2, 1)
    assert small.ids() == [13, 14, 15, 16, 17, 19, 4, 2, 1]


def test_grounding_tokens_errors():
    with pytest.raises(ValueError, match="tokenizer has no token '<phrase>'"):
        GroundingTokens.from_tokenizer(_word_level_tokenizer(4, 4, tags=False))
    with pytest.raises(ValueError, match="square number"):
        GroundingTokens.from_tokenizer(_word_level_tokenizer(4, 0))
    with pytest.raises(ValueError, match="num_bins must be"):
        GroundingTokens(3, 4, 5, 6, 7, 10, 0, 2, 1)
    with pytest.raises(ValueError, match="GroundingTokens.eos must be a non-negative int"):
        GroundingTokens(3, 4, 5, 6, 7, 10, 4, -2, 1)
    with pytest.raises(ValueError, match="GroundingTokens.pad must be a non-negative int"):
        GroundingTokens(3, 4, 5, 6, 7, 10, 4, 2, True)
    with pytest.raises(ValueError, match="tag ids must be distinct"):
        GroundingTokens(3, 4, 5, 5, 7, 10, 4, 2, 1)
    with pytest.raises(ValueError, match="object_close = 12 lies inside the location tokens"):
        GroundingTokens(3, 4, 5, 12, 7, 10, 4, 2, 1)
    with pytest.raises(ValueError, match="phrase_open = 2 is also the eos or pad id"):
        GroundingTokens(2, 4, 5, 6, 7, 10, 4, 2, 1)
    with pytest.raises(ValueError, match="too small"):
        GroundingTokens.from_config(type("C", (), {"vocab_size": 1000, "eos_token_id": 2, "pad_token_id": 1})())


# ------------------------------------------------------------------------------------------ state


@pytest.mark.parametrize(
    "tail,state,top_left",
    [
        ([8, 9], TEXT, -1),
        ([8, 4], AFTER_PHRASE, -1),
        ([4, 5], EXPECT_TOP_LEFT, -1),
        ([5, 10 + 6], EXPECT_BOTTOM_RIGHT, 6),
        ([5, 16, 20], EXPECT_CLOSE, -1),
        ([5, 16, 20, 7], EXPECT_TOP_LEFT, -1),
        ([5, 16, 20, 7, 11], EXPECT_BOTTOM_RIGHT, 1),
        ([5, 16, 20, 6], TEXT, -1),
        ([8, 16], TEXT, -1),  # a stray location token
        ([8, 7], TEXT, -1),  # a stray delimiter
        ([5, 16, 20, 21], TEXT, -1),  # a third location token
        ([], TEXT, -1),
    ],
)
def test_create_reads_the_grammar_state_from_the_prompt(tail, state, top_left):
    prompt = [0, 8, 27] + tail
    ids, mask = left_padded([prompt, [9] * 3])
    s = DecodeState.create(ids, 4, TOK, attention_mask=mask, seed=5)
    assert BOX_STATES[int(s.box_state[0])] == BOX_STATES[state] and int(s.top_left[0]) == top_left
    assert prefix_allowed_tokens_fn(TOK, V).state_of(prompt) == (state, top_left)
    assert s.starts.tolist() == [0, ids.shape[1] - 3] and s.lengths.tolist() == [ids.shape[1]] * 2
    assert s.sequences.shape == (2, ids.shape[1] + 4) and s.seed == 5 and s.steps_taken == 0


@pytest.mark.parametrize("padding", ["left", "right"])
def test_create_state_equals_the_oracle_on_random_grammar_heavy_prompts(padding):
    """Prompts dense in location tokens, delimiters, tags and whole-row runs of them (where the scan must start at a
    row's first token), left- or right-padded: each row's state equals the plain-Python oracle's."""
    g = torch.Generator().manual_seed(11)
    pool = [TOK.first_loc, TOK.first_loc + 5, TOK.loc_end - 1, TOK.delimiter, TOK.object_open, TOK.phrase_close,
            TOK.object_close, 9]  # fmt: skip
    oracle = prefix_allowed_tokens_fn(TOK, V).state_of
    for trial in range(20):
        prompts = []
        for r in range(5):
            n = int(torch.randint(0, 9, (1,), generator=g))
            only_chain = r == 0 and trial % 2 == 0  # a row of location tokens and delimiters alone
            choices = pool[:4] if only_chain else pool
            prompts.append([choices[int(i)] for i in torch.randint(0, len(choices), (n,), generator=g)])
        if padding == "left":
            ids, mask = left_padded(prompts) if any(prompts) else left_padded([[9]] + prompts[1:])
            s = DecodeState.create(ids, 2, TOK, attention_mask=mask)
        else:
            width = max(1, max(len(p) for p in prompts))
            ids = torch.tensor([p + [TOK.pad] * (width - len(p)) for p in prompts])
            s = DecodeState.create(ids, 2, TOK, prompt_lengths=torch.tensor([len(p) for p in prompts]))
        for r, p in enumerate(prompts):
            if padding == "left" and not any(prompts) and r == 0:
                p = [9]
            assert (int(s.box_state[r]), int(s.top_left[r])) == oracle(p), (trial, r, p)


def test_create_layouts_and_generated():
    rows = [[8, 9, 26], [27], [], [28, 29]]
    ids, mask = left_padded(rows)
    s = DecodeState.create(ids, 3, TOK, attention_mask=mask)
    assert s.starts.tolist() == [0, 2, 3, 1] and s.lengths.tolist() == [3] * 4
    ids_r, lens = right_padded(rows)
    s = DecodeState.create(ids_r, 3, TOK, prompt_lengths=lens)
    assert s.starts.tolist() == [0] * 4 and s.lengths.tolist() == [3, 1, 0, 2]
    s = DecodeState.create(ids_r, 3, TOK, prompt_lengths=lens.tolist())
    assert s.lengths.tolist() == [3, 1, 0, 2]
    logits = torch.full((4, V), -5.0)
    logits[:, 30] = 5.0
    grounded_decode_step(logits, s, TOK, backend="torch")
    logits[:, 31] = 9.0
    grounded_decode_step(logits, s, TOK, backend="torch")
    assert s.generated().tolist() == [[30, 31]] * 4
    assert row_tokens(s, 1) == [27, 30, 31] and s.steps.tolist() == [2] * 4
    torch.manual_seed(3)
    a = DecodeState.create(ids, 3, TOK).seed
    torch.manual_seed(3)
    assert DecodeState.create(ids, 3, TOK).seed == a


def test_create_errors():
    ids = torch.tensor([[8, 9], [26, 27]])
    with pytest.raises(TypeError, match="tokens must be a GroundingTokens"):
        DecodeState.create(ids, 3, None)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        DecodeState.create(ids.float(), 3, TOK)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        DecodeState.create(ids[0], 3, TOK)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        DecodeState.create(ids, 0, TOK)
    with pytest.raises(ValueError, match="not both"):
        DecodeState.create(ids, 3, TOK, attention_mask=torch.ones_like(ids), prompt_lengths=[2, 2])
    with pytest.raises(ValueError, match=r"attention_mask\[1\] is not left padding"):
        DecodeState.create(ids, 3, TOK, attention_mask=torch.tensor([[1, 1], [1, 0]]))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        DecodeState.create(ids, 3, TOK, attention_mask=torch.tensor([[1, 1], [0, 2]]))
    with pytest.raises(ValueError, match="attention_mask must be a tensor of shape"):
        DecodeState.create(ids, 3, TOK, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"prompt_lengths\[1\] = 3 is outside \[0, 2\]"):
        DecodeState.create(ids, 3, TOK, prompt_lengths=[2, 3])
    with pytest.raises(ValueError, match="prompt_lengths must be"):
        DecodeState.create(ids, 3, TOK, prompt_lengths=[2])
    with pytest.raises(ValueError, match="seed must be an int"):
        DecodeState.create(ids, 3, TOK, seed=-1)


# ------------------------------------------------------------------------------------------ grammar


def _grammar_case(draw_rows, padding, steps, seed, options, style, backends, tokens=TOK, vocab=V):
    """Run ``steps`` steps on every backend from one state; check every token against the plain-Python grammar
    (prefix_allowed_tokens_fn) and every backend against the reference."""
    if padding == "left":
        ids, mask = left_padded(draw_rows)
        state = DecodeState.create(ids, steps, tokens, attention_mask=mask, seed=seed)
    else:
        ids, lens = right_padded(draw_rows)
        state = DecodeState.create(ids, steps, tokens, prompt_lengths=lens, seed=seed)
    oracle = prefix_allowed_tokens_fn(tokens, vocab)
    ref = state.clone()
    states = {b: state.clone() for b in backends}
    gen = torch.Generator().manual_seed(seed % (1 << 62))
    for t in range(steps):
        logits = random_logits(gen, len(draw_rows), vocab, style)
        before = [row_tokens(ref, r) for r in range(len(draw_rows))]
        finished = ref.finished.clone()
        want, want_scores = grounded_decode_step_ref(logits, ref, tokens, **options)
        for r, tok in enumerate(want.tolist()):
            if finished[r]:
                assert tok == tokens.pad
            else:
                assert tok in oracle(r, before[r]), f"step {t} row {r}: {tok} after {before[r]} breaks the grammar"
        for b, s in states.items():
            got, got_scores = step(b, logits, s, tokens, **options)
            assert torch.equal(got, want), f"{b} step {t}: tokens {got.tolist()} != reference {want.tolist()}"
            assert_scores_equal(got_scores, want_scores, f"{b} step {t}")
            assert_same_state(s, ref, f"{b} step {t}")


_rows = st.lists(st.lists(st.sampled_from(list(range(V))), max_size=10), min_size=1, max_size=3)
_options = st.fixed_dictionaries(
    {
        "no_repeat_ngram_size": st.integers(0, 4),
        "min_new_tokens": st.integers(0, 3),
        "do_sample": st.booleans(),
        "temperature": st.sampled_from([0.5, 1.0, 2.0]),
        "top_k": st.sampled_from([0, 1, 3, 40]),
        "top_p": st.sampled_from([1.0, 0.9, 0.3, 0.0]),
    }
)
_case = dict(
    draw_rows=_rows,
    padding=st.sampled_from(["left", "right"]),
    steps=st.integers(1, 6),
    seed=st.integers(0, (1 << 63) - 1),
    options=_options,
    style=st.sampled_from(["normal", "loc_heavy", "ties", "neg_inf"]),
)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mmcore._C not built")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_case)
def test_grammar_never_violated_torch_cpp(draw_rows, padding, steps, seed, options, style):
    _grammar_case(draw_rows, padding, steps, seed, options, style, ["cpp"])


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not installed")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_case)
def test_grammar_never_violated_triton(draw_rows, padding, steps, seed, options, style):
    _grammar_case(draw_rows, padding, min(steps, 3), seed, options, style, ["triton"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grammar_wins_over_ngram_blocking(backend):
    # `a </phrase>` was followed by `<object>` before, so n = 3 bans `<object>` -- the only token the grammar
    # allows: the row falls back to the grammar (score 0 on its allowed tokens), as transformers'
    # PrefixConstrainedLogitsProcessor does when its constraint is unsatisfiable.
    prompt = [8, 4, 5, 10, 25, 6, 9, 8, 4]
    s = DecodeState.create(torch.tensor([prompt]), 2, TOK, seed=0)
    assert int(s.box_state[0]) == AFTER_PHRASE
    logits = torch.randn(1, V)
    got, scores = step(backend, logits, s, no_repeat_ngram_size=3)
    assert got.tolist() == [TOK.object_open]
    want = torch.full((1, V), -math.inf)
    want[0, TOK.object_open] = 0.0
    assert_scores_equal(scores, want, backend)
    # the bottom-right corner cell: only one bottom-right is possible, and the n-gram ban cannot remove it
    s = DecodeState.create(torch.tensor([[5, 25, 25, 6, 5, 25]]), 1, TOK)
    got, _ = step(backend, torch.randn(1, V), s, no_repeat_ngram_size=3)
    assert got.tolist() == [25]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottom_right_never_above_or_left_of_top_left(backend):
    # every top-left cell in one batch; the logits prefer the cells above and left of it
    rows = [[5, loc] for loc in LOC]
    s = DecodeState.create(torch.tensor(rows), 1, TOK)
    logits = torch.zeros(len(rows), V)
    logits[:, TOK.first_loc : TOK.loc_end] = -torch.arange(16.0)  # earlier cells (above / left) score higher
    got, scores = step(backend, logits, s, no_repeat_ngram_size=0)
    for k, g in enumerate(got.tolist()):
        r, c = divmod(g - TOK.first_loc, TOK.num_bins)
        assert TOK.first_loc <= g < TOK.loc_end and r >= k // 4 and c >= k % 4
        assert g == TOK.first_loc + k  # the best allowed cell is the top-left itself
        allowed = {TOK.first_loc + rr * 4 + cc for rr in range(k // 4, 4) for cc in range(k % 4, 4)}
        assert set(torch.isfinite(scores[k]).nonzero().flatten().tolist()) == allowed


# ------------------------------------------------------------------------------------------ transformers parity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_blocking_equals_transformers(backend, n):
    gen = torch.Generator().manual_seed(10 + n)
    batch, width, steps = (6, 40, 4) if backend != "triton" else (3, 24, 2)
    lens = torch.randint(0, width + 1, (batch,), generator=gen)
    lens[0], lens[1] = width, 0
    # a small alphabet, so n-grams repeat; left padding is excluded from the n-grams
    rows = [torch.randint(8, 14, (int(k),), generator=gen).tolist() for k in lens]
    ids, mask = left_padded(rows)
    state = DecodeState.create(ids, steps, TOK, attention_mask=mask, seed=1)
    hf = NoRepeatNGramLogitsProcessor(n)
    for t in range(steps):
        logits = torch.randn(batch, V, generator=gen)
        logits[:, 8:14] += 4
        logits[:, TOK.eos] = -math.inf  # no row finishes
        before = [row_tokens(state, r) for r in range(batch)]
        got, scores = step(backend, logits, state, no_repeat_ngram_size=n, constrain_boxes=False)
        for r in range(batch):
            want = hf(torch.tensor([before[r]], dtype=torch.int64).reshape(1, -1), logits[r : r + 1].clone())
            assert_scores_equal(scores[r : r + 1], want, f"step {t} row {r} {before[r]}")
            assert got[r] == want.argmax()


@pytest.mark.parametrize("backend", FAST)
def test_ngram_blocking_equals_transformers_kosmos_scale(backend):
    gen = torch.Generator().manual_seed(2)
    batch, width = 8, 300
    ids = torch.randint(0, 40, (batch, width), generator=gen)  # many repeats
    ids[:, ::7] = torch.randint(KOSMOS.first_loc, KOSMOS.loc_end, ids[:, ::7].shape, generator=gen)
    state = DecodeState.create(ids, 2, KOSMOS, seed=1)
    logits = torch.randn(batch, KOSMOS_VOCAB, generator=gen)
    _, scores = step(backend, logits, state, KOSMOS, constrain_boxes=False)
    assert_scores_equal(scores, NoRepeatNGramLogitsProcessor(3)(ids, logits.clone()), backend)


def _hf_warpers(temperature, top_k, top_p):
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


WARPER_CASES = [
    (1.0, 0, 1.0),
    (1.0, 0, 0.9),
    (0.7, 0, 0.5),
    (1.3, 5, 1.0),
    (0.7, 10, 0.8),
    (1.0, 1, 1.0),
    (1.0, 0, 0.0),
    (2.0, 100, 0.95),
    (0.5, 3, 0.3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_k,top_p", WARPER_CASES)
def test_warpers_equal_transformers(backend, temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    batch, vocab = (6, 1000) if backend != "triton" else (2, V)
    tokens = TOK
    if vocab != V:
        config = type("Config", (), {"vocab_size": vocab, "eos_token_id": 2, "pad_token_id": 1})
        tokens = GroundingTokens.from_config(config, num_bins=8)
    ids = torch.randint(0, 8, (batch, 5), generator=gen)
    state = DecodeState.create(ids, 1, tokens, seed=3)
    logits = torch.randn(batch, vocab, generator=gen) * 3
    if top_p == 1.0:
        logits[0, :4] = logits[0, 4]  # a tie (at a top-p cutoff transformers keeps an arbitrary part of a tie)
    got, scores = step(
        backend, logits, state, tokens, no_repeat_ngram_size=0, constrain_boxes=False, do_sample=True,
        temperature=temperature, top_k=top_k, top_p=top_p,
    )  # fmt: skip
    want = _hf_warpers(temperature, top_k, top_p)(ids, logits.clone())
    assert_scores_equal(scores, want, backend)
    assert torch.isfinite(want.gather(1, got[:, None])).all(), "sampled a filtered token"


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_keeps_ties_at_the_cutoff(backend):
    # probabilities (0.4, 0.2, 0.2, 0.2): top_p = 0.5 crosses inside the tie, and every tied token is kept
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2] + [1e-30] * (V - 4)]))
    state = DecodeState.create(torch.tensor([[8]]), 1, TOK)
    _, scores = step(backend, logits, state, no_repeat_ngram_size=0, constrain_boxes=False, do_sample=True, top_p=0.5)
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [0, 1, 2, 3]


def _hf_greedy_pipeline(tokens, vocab, prompt_len, min_new_tokens):
    return LogitsProcessorList(
        [
            NoRepeatNGramLogitsProcessor(3),
            MinNewTokensLengthLogitsProcessor(prompt_len, min_new_tokens, tokens.eos),
            PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn(tokens, vocab), num_beams=1),
        ]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["normal", "loc_heavy"])
def test_greedy_generation_equals_transformers(backend, style):
    """Step by step, the tokens of transformers' greedy loop with NoRepeatNGram(3), MinNewTokens and
    PrefixConstrained (the same grammar): argmax of the processed scores, pad after EOS."""
    gen = torch.Generator().manual_seed(7)
    batch, prompt_len, steps = (6, 12, 12) if backend != "triton" else (2, 8, 6)
    ids = torch.tensor(WORDS)[torch.randint(0, len(WORDS), (batch, prompt_len), generator=gen)]
    ids[0, -1] = TOK.phrase_close
    ids[1, -2:] = torch.tensor([TOK.object_open, TOK.first_loc + 5])
    state = DecodeState.create(ids, steps, TOK)
    hf = _hf_greedy_pipeline(TOK, V, prompt_len, min_new_tokens=3)
    seqs = ids.clone()
    unfinished = torch.ones(batch, dtype=torch.int64)
    for t in range(steps):
        logits = random_logits(gen, batch, V, style)
        logits[:, TOK.eos] += 2
        want_scores = hf(seqs, logits.clone())
        want = want_scores.argmax(-1) * unfinished + TOK.pad * (1 - unfinished)
        got, scores = step(backend, logits, state, min_new_tokens=3)
        assert_scores_equal(scores, want_scores, f"step {t}")
        assert got.tolist() == want.tolist(), f"step {t}"
        assert torch.equal(got[state.finished == 0], scores.argmax(-1)[state.finished == 0])
        seqs = torch.cat([seqs, want[:, None]], 1)
        unfinished = unfinished & (want != TOK.eos).long()
    assert torch.equal(state.sequences, seqs)
    assert state.finished.tolist() == (unfinished == 0).tolist()


@pytest.mark.parametrize("backend", FAST)
def test_greedy_generation_equals_transformers_kosmos_scale(backend):
    gen = torch.Generator().manual_seed(8)
    batch, prompt_len, steps = 3, 20, 5
    ids = torch.randint(4, 64000, (batch, prompt_len), generator=gen)
    ids[0, -1] = KOSMOS.phrase_close
    ids[1, -2:] = torch.tensor([KOSMOS.object_open, KOSMOS.first_loc + 300])
    state = DecodeState.create(ids, steps, KOSMOS)
    hf = _hf_greedy_pipeline(KOSMOS, KOSMOS_VOCAB, prompt_len, min_new_tokens=0)
    seqs = ids.clone()
    for t in range(steps):
        logits = torch.randn(batch, KOSMOS_VOCAB, generator=gen)
        logits[:, KOSMOS.first_loc :] += 3
        want = hf(seqs, logits.clone()).argmax(-1)
        got, _ = step(backend, logits, state, KOSMOS)
        assert got.tolist() == want.tolist(), f"step {t}"
        seqs = torch.cat([seqs, want[:, None]], 1)


# ------------------------------------------------------------------------------------------ min-new-tokens, finished


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_new_tokens_and_finished_rows(backend):
    ids = torch.tensor([[8, 9], [26, 27], [28, 29]])
    state = DecodeState.create(ids, 7, TOK, seed=4)
    out = []
    for t in range(7):
        logits = torch.randn(3, V, generator=torch.Generator().manual_seed(t))
        logits[:, TOK.eos] = 20.0  # EOS always wins when allowed
        logits[1, TOK.eos] = -math.inf if t < 4 else 20.0  # row 1 cannot finish before step 4
        got, scores = step(backend, logits, state, min_new_tokens=2, do_sample=t % 2 == 1, constrain_boxes=False)
        if t < 2:
            assert torch.isneginf(scores[:, TOK.eos]).all()
        out.append(got.tolist())
    eos, pad = TOK.eos, TOK.pad
    assert [o[0] for o in out] == [out[0][0], out[1][0], eos, pad, pad, pad, pad]
    assert [o[1] for o in out][4:] == [eos, pad, pad] and eos not in [o[1] for o in out][:4]
    assert eos not in out[0] + out[1]
    assert state.finished.tolist() == [True, True, True]
    assert state.generated().T.tolist() == out
    assert state.lengths.tolist() == [9, 9, 9] and state.steps.tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="state is full"):
        step(backend, logits, state)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_equals_rows_alone(backend, padding):
    """Pad tokens are never part of a row's n-grams or grammar: each row of a padded batch generates what it
    generates alone."""
    gen = torch.Generator().manual_seed(9)
    rows = [[8, 9, 8, 9, 4], [26], [], [27, 28, 27, 28, 5, 12]]
    steps = 5 if backend != "triton" else 3
    ids, extra = left_padded(rows) if padding == "left" else right_padded(rows)
    kw = {"attention_mask": extra} if padding == "left" else {"prompt_lengths": extra}
    batch_state = DecodeState.create(ids, steps, TOK, seed=11, **kw)
    alone = [DecodeState.create(torch.tensor([r], dtype=torch.int64).reshape(1, -1), steps, TOK, seed=11) for r in rows]
    for t in range(steps):
        logits = torch.randn(len(rows), V, generator=gen)
        logits[:, 8:10] += 3
        got, _ = step(backend, logits, batch_state, no_repeat_ngram_size=2)
        for r, s in enumerate(alone):
            g, _ = step(backend, logits[r : r + 1], s, no_repeat_ngram_size=2)
            assert g.item() == got[r].item(), f"step {t} row {r}"


# ------------------------------------------------------------------------------------------ sampling


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over categories with expected count >= 5 (the rest merged into one when that has
    >= 5), and its degrees of freedom."""
    n = counts.sum().item()
    expected = probs * n
    big = expected >= 5
    obs, exp = counts[big].double().tolist(), expected[big].tolist()
    rest_e, rest_o = expected[~big].sum().item(), counts[~big].sum().item()
    if rest_e >= 5:
        obs.append(rest_o)
        exp.append(rest_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    return stat, len(obs) - 1


SAMPLING_CASES = [(1.0, 0, 1.0), (0.7, 8, 1.0), (1.5, 0, 0.8), (1.0, 12, 0.9), (0.5, 0, 0.95)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING_CASES)
def test_sampling_distribution_chi_square(backend, temperature, top_k, top_p):
    """20,000 draws of one distribution (20,000 identical rows: row r draws Philox counter r) against the
    reference's processed probabilities."""
    n = 20_000
    gen = torch.Generator().manual_seed(int(temperature * 10) + top_k)
    row = torch.randn(1, V, generator=gen) * 1.5
    options = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    state = DecodeState.create(torch.tensor([[8, 9]]).expand(n, 2), 1, TOK, seed=12345)
    one = DecodeState.create(torch.tensor([[8, 9]]), 1, TOK)
    probs = torch.softmax(process_logits_ref(row, one, TOK, **options)[0].double(), -1)
    got, _ = step(backend, row.expand(n, V), state, **options)
    counts = torch.bincount(got, minlength=V)
    assert counts[probs == 0].sum() == 0, f"sampled filtered tokens: {(counts * (probs == 0)).nonzero().tolist()}"
    stat, df = _chi_square(counts, probs)
    assert df >= 2
    assert stat < CHI2_CRITICAL_1E4[df], f"chi-square {stat:.1f} >= {CHI2_CRITICAL_1E4[df]} (df {df}, p < 1e-4)"


def test_uniforms_are_philox_draws_per_step_and_row():
    steps = torch.tensor([0, 0, 3])
    u = uniforms(7, steps)
    from mmcore.ops._philox import philox_randint

    assert u.tolist() == (philox_randint(7, torch.tensor([0, 1, 11])).double() / 2**32).tolist()
    assert ((u >= 0) & (u < 1)).all()
    assert not torch.equal(uniforms(7, steps), uniforms(8, steps))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING_CASES)
def test_sampling_equals_reference_for_the_same_seed(backend, temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(21)
    batch, steps = (32, 4) if backend != "triton" else (6, 2)
    ids = torch.tensor(WORDS)[torch.randint(0, len(WORDS), (batch, 6), generator=gen)]
    state = DecodeState.create(ids, steps, TOK, seed=2**62 + 5)
    ref = state.clone()
    options = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=1)
    other = DecodeState.create(ids, steps, TOK, seed=99)
    for t in range(steps):
        logits = random_logits(gen, batch, V, "loc_heavy" if t % 2 else "normal")
        want, want_scores = grounded_decode_step_ref(logits, ref, TOK, **options)
        got, scores = step(backend, logits, state, **options)
        assert got.tolist() == want.tolist(), f"step {t}"
        assert_scores_equal(scores, want_scores, f"step {t}")
        step(backend, logits, other, **options)
    assert_same_state(state, ref, backend)
    assert not torch.equal(other.sequences, state.sequences), "another seed drew the same tokens"


@pytest.mark.parametrize("backend", ["cpp"] if "cpp" in BACKENDS else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_equals_reference_kosmos_scale(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    batch, steps = 6, 4
    ids = torch.randint(4, 64000, (batch, 50), generator=gen)
    for options in (
        dict(),
        dict(do_sample=True, temperature=0.7, top_p=0.9),
        dict(do_sample=True, top_k=50, top_p=0.95),
        dict(do_sample=True, top_k=1000),
    ):
        state = DecodeState.create(ids, steps, KOSMOS, seed=77)
        ref = state.clone()
        for t in range(steps):
            logits = (torch.randn(batch, KOSMOS_VOCAB, generator=gen) * 3).to(dtype)
            logits[:, KOSMOS.first_loc :] += 2
            want, want_scores = grounded_decode_step_ref(logits, ref, KOSMOS, **options)
            got, scores = step(backend, logits, state, KOSMOS, **options)
            assert got.tolist() == want.tolist(), f"{options} step {t}"
            assert_scores_equal(scores, want_scores, f"{options} step {t}")
        assert_same_state(state, ref, str(options))


@pytest.mark.parametrize("backend", COMPILED)
def test_half_logits(backend):
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(8, 10, (3, 6), generator=gen)
    for options in (dict(), dict(do_sample=True, top_k=5, top_p=0.9)):
        state = DecodeState.create(ids, 2, TOK, seed=1)
        ref = state.clone()
        for _ in range(2):
            logits = random_logits(gen, 3, V, "loc_heavy").half()
            want, want_scores = grounded_decode_step_ref(logits, ref, TOK, **options)
            got, scores = step(backend, logits, state, **options)
            assert got.tolist() == want.tolist()
            assert_scores_equal(scores, want_scores, backend)


# ------------------------------------------------------------------------------------------ ops, compile


def _op_args(scores=True, **options):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(8, 12, (4, 7), generator=gen)
    ids[0, -1] = TOK.phrase_close
    state = DecodeState.create(ids, 3, TOK, seed=9)
    logits = torch.randn(4, V, generator=gen)
    o = dict(no_repeat_ngram_size=3, min_new_tokens=1, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=9)
    o.update(options)
    out = torch.empty(4, V) if scores else None
    return (logits, *state.tensors(), out, TOK.ids(), o["no_repeat_ngram_size"], o["min_new_tokens"],
            o["do_sample"], o["temperature"], o["top_k"], o["top_p"], o["seed"], True)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("do_sample", [False, True])
def test_every_output_element_written(backend, do_sample):
    """Poisoned outputs: the scores (NaN) and the unwritten part of the token buffer (-7) before the call."""
    from mmcore.ops.decoding import GROUNDED_DECODE_STEP

    args = list(_op_args(do_sample=do_sample))
    args[8].fill_(math.nan)
    sequences, lengths = args[1], args[2]
    sequences[:, 7:] = -7
    out = GROUNDED_DECODE_STEP.backends[backend].fn(*args)
    assert not torch.isnan(args[8]).any(), "scores not fully written"
    assert torch.equal(sequences[:, 7], out) and (sequences[:, 8:] == -7).all()
    assert lengths.tolist() == [8] * 4


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("vocab", [V, 1000])
def test_nan_logits_raise_naming_the_row(backend, do_sample, vocab):
    """A NaN left after the bans in an unfinished row is an error naming the first such row, raised before any row's
    state changes (at the vectorised scan's blocks and its tail); a NaN on a banned token or in a finished row is
    not."""
    ids = torch.randint(8, 12, (4, 6), generator=torch.Generator().manual_seed(3))
    opts = dict(min_new_tokens=1, do_sample=do_sample, top_k=3 if do_sample else 0, backend=backend)
    for where in (9, vocab - 1, 26 if vocab == V else 70):  # words, in the scan's blocks and its tail
        logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(where))
        logits[2, where] = math.nan
        logits[3, where] = math.nan  # a later row too: the error names row 2
        state = DecodeState.create(ids, 3, TOK, seed=1)
        with pytest.raises(ValueError, match="logits of row 2 hold NaN"):
            grounded_decode_step(logits, state, TOK, **opts)
        assert_same_state(state, DecodeState.create(ids, 3, TOK, seed=1), "after the error")  # nothing advanced
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(8))
    logits[1, TOK.eos] = math.nan  # banned: min_new_tokens
    logits[3, TOK.first_loc] = math.nan  # banned: a location token outside a box
    state = DecodeState.create(ids, 3, TOK, seed=1)
    grounded_decode_step(logits, state, TOK, **opts)
    state = DecodeState.create(ids, 3, TOK, seed=1)
    state.finished[0] = True
    logits[0] = math.nan
    assert int(grounded_decode_step(logits, state, TOK, **opts)[0]) == TOK.pad


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mmcore._C not built")
def test_opcheck_cpp_op():
    torch.library.opcheck(op("grounded_decode_step"), _op_args())
    torch.library.opcheck(op("grounded_decode_step"), _op_args(scores=False, do_sample=False))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not installed")
def test_opcheck_triton_op_interpreted():
    opcheck_triton_op(torch.ops.mmcore.grounded_decode_step_triton.default, _op_args())


SM90_COMPILE = r"""
import mmcore.kernels.decoding as kd
from mmcore.testing import compile_for_sm90

fn = kd._grounded_decode_step_kernel
sig = {n: "*i64" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
sig.update(logits_ptr="*bf16", scores_ptr="*fp32", finished_ptr="*i1", temperature="fp32", top_p="fp64", seed="i64")
# every branch: grammar, n-grams, sampling with top-k and top-p, scores written
consts = dict(NGRAM=3, CONSTRAIN=True, DO_SAMPLE=True, TOP_K=True, TOP_P=True, WRITE_SCORES=True,
              BLOCK_V=kd.BLOCK_V_MAX, BLOCK_L=kd.BLOCK_L)
for c in consts:
    del sig[c]
k = compile_for_sm90(fn, sig, consts, num_warps=8)
print(fn.__name__, "shared", k.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.skipif("triton" not in BACKENDS or torch.cuda.is_available(), reason="the gpu tests compile the kernel")
def test_kernel_compiles_for_sm90():
    """The step kernel compiles for sm90 on this GPU-less machine: catches what the interpreter accepts and the GPU
    compiler does not (a module global that is not a tl.constexpr, types, shapes)."""
    from mmcore.testing import assert_runs_without_triton_interpreter

    pytest.importorskip("triton.backends.nvidia")
    assert_runs_without_triton_interpreter(SM90_COMPILE)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mmcore._C not built")
def test_compile_fullgraph_cpp():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(8, 12, (3, 5), generator=gen)
    eager, compiled = DecodeState.create(ids, 3, TOK, seed=2), DecodeState.create(ids, 3, TOK, seed=2)

    def run(logits, state):
        return grounded_decode_step(logits, state, TOK, do_sample=True, top_k=4, backend="cpp")

    fn = torch.compile(run, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        logits = torch.randn(3, V, generator=gen)
        assert torch.equal(fn(logits, compiled), run(logits, eager))
    assert_same_state(compiled, eager, "compiled")


@pytest.mark.gpu
def test_opcheck_triton_op_cuda():
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _op_args())
    opcheck_triton_op(torch.ops.mmcore.grounded_decode_step_triton.default, args)


def _moved(state: DecodeState, device) -> DecodeState:
    tensors = {name: t.to(device) for name, t in zip(_STATE_NAMES, state.tensors(), strict=True)}
    return DecodeState(**tensors, tokens=state.tokens, max_new_tokens=state.max_new_tokens, seed=state.seed,
                       steps_taken=state.steps_taken)  # fmt: skip


_STATE_NAMES = ("sequences", "lengths", "starts", "box_state", "top_left", "steps", "finished")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_equals_cpu_kosmos_scale(dtype):
    gen = torch.Generator().manual_seed(8)
    batch, steps = 64, 6
    ids = torch.randint(4, 64000, (batch, 200), generator=gen)
    cpu_backend = "cpp" if "cpp" in BACKENDS else "torch"
    for options in (dict(), dict(do_sample=True, temperature=0.7, top_p=0.9), dict(do_sample=True, top_k=50)):
        cpu = DecodeState.create(ids, steps, KOSMOS, seed=3)
        for t in range(steps):
            gpu = _moved(cpu, "cuda")  # each step from the CPU's state
            logits = (torch.randn(batch, KOSMOS_VOCAB, generator=gen) * 3).to(dtype)
            got, scores = step("triton", logits.cuda(), gpu, KOSMOS, **options)
            want, want_scores = step(cpu_backend, logits, cpu, KOSMOS, **options)
            # NOTE: the GPU's exp may differ from the CPU's in the last bit, which moves a sample or a top-p cutoff
            # only when a uniform or top_p falls within ~1e-7 of a step: allow one row in the batch to differ.
            assert (got.cpu() != want).sum() <= 1, f"{options} step {t}"
            assert ((scores.cpu() != want_scores).any(1)).sum() <= 1, f"{options} step {t}"


@pytest.mark.gpu
def test_triton_cuda_step_does_not_synchronise():
    ids = torch.randint(4, 64000, (8, 100)).cuda()
    state = DecodeState.create(ids, 4, KOSMOS, seed=1)
    logits = torch.randn(8, KOSMOS_VOCAB, device="cuda")
    grounded_decode_step(logits, state, KOSMOS, do_sample=True, top_p=0.9)  # compile the kernel first
    torch.cuda.set_sync_debug_mode("error")
    try:
        grounded_decode_step(logits, state, KOSMOS, do_sample=True, top_p=0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------ bad arguments


def test_bad_arguments():
    ids = torch.tensor([[8, 9], [26, 27]])
    state = DecodeState.create(ids, 2, TOK)
    logits = torch.randn(2, V)
    cases = [
        (dict(logits=logits.tolist()), TypeError, "logits must be a tensor"),
        (dict(logits=logits[0]), ValueError, r"logits must have shape \(batch, vocab\)"),
        (dict(logits=logits.long()), TypeError, "logits must be float16, bfloat16, float32 or float64"),
        (dict(logits=logits[:1]), ValueError, "logits has 1 rows but state has 2"),
        (dict(logits=logits[:, :20]), ValueError, "vocabulary of 20, but the grounding token ids need 26"),
        (dict(state=ids), TypeError, "state must be a DecodeState"),
        (dict(tokens=(3, 4)), TypeError, "tokens must be a GroundingTokens"),
        (dict(tokens=KOSMOS), ValueError, "differ from the GroundingTokens the state was created with"),
        (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size must be an int >= 0"),
        (dict(no_repeat_ngram_size=2.0), ValueError, "no_repeat_ngram_size must be an int"),
        (dict(min_new_tokens=-1), ValueError, "min_new_tokens must be an int >= 0"),
        (dict(do_sample=1), TypeError, "do_sample must be a bool"),
        (dict(constrain_boxes=None), TypeError, "constrain_boxes must be a bool"),
        (dict(return_scores="yes"), TypeError, "return_scores must be a bool"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=math.inf), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=True), ValueError, "temperature must be a finite float > 0"),
        (dict(top_k=-1), ValueError, "top_k must be an int >= 0"),
        (dict(top_p=1.5), ValueError, r"top_p must be a float in \[0, 1\]"),
        (dict(top_p=-0.1), ValueError, r"top_p must be a float in \[0, 1\]"),
        (dict(seed=-1), ValueError, "seed must be an int"),
        (dict(seed=2**63), ValueError, "seed must be an int"),
        (dict(backend="nope"), ValueError, "'nope' is not a backend"),
    ]
    for override, exc, match in cases:
        args = dict(logits=logits, state=state, tokens=TOK) | override
        with pytest.raises(exc, match=match):
            grounded_decode_step(args.pop("logits"), args.pop("state"), args.pop("tokens"), **args)
    assert state.steps_taken == 0 and state.steps.tolist() == [0, 0], "a rejected call changed the state"
    # float64 logits are cast, not refused
    assert grounded_decode_step(logits.double(), state, TOK).shape == (2,)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not installed")
def test_forced_triton_backend_limits():
    state = DecodeState.create(torch.tensor([[8, 9]]), 2, TOK)
    with pytest.raises(BackendError, match=f"no_repeat_ngram_size {MAX_NGRAM + 1} > {MAX_NGRAM}"):
        grounded_decode_step(torch.randn(1, V), state, TOK, no_repeat_ngram_size=MAX_NGRAM + 1, backend="triton")
    # the other backends take any n
    grounded_decode_step(torch.randn(1, V), state, TOK, no_repeat_ngram_size=MAX_NGRAM + 1, backend="torch")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mmcore._C not built")
def test_cpp_op_checks_its_arguments():
    args = list(_op_args())
    bad = list(args)
    bad[2] = bad[2].int()  # lengths
    with pytest.raises(TypeError, match="lengths must be Long"):
        op("grounded_decode_step")(*bad)
    bad = list(args)
    bad[9] = [1, 2, 3]
    with pytest.raises(ValueError, match="special_tokens must hold the 9 GroundingTokens fields"):
        op("grounded_decode_step")(*bad)
    bad = list(args)
    bad[8] = torch.empty(4, V + 1)
    with pytest.raises(ValueError, match="scores must have the shape of logits"):
        op("grounded_decode_step")(*bad)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpp"])
def test_greedy_argmax_is_the_first_maximum_at_kosmos_scale(backend):
    """The C++ step's vectorised maximum and search (AVX-512 where the CPU has it) on a 65,037-token row: ties take
    the first index (in and between 16-lane blocks and in the tail), a row whose every token is -inf takes the
    grammar's first allowed token -- as the reference does."""
    vocab = KOSMOS_VOCAB
    ids = torch.full((6, 3), 8)
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, vocab, generator=gen)
    logits[:, KOSMOS.first_loc :] = -torch.inf  # outside a box: location tokens are banned anyway
    logits[0, [40000, 40001, 40017]] = 9.0  # a tie inside one block and in the next: the first wins
    logits[1, [vocab - 1 - KOSMOS.num_bins**2 - 3, 70]] = 9.0  # the later position is not taken
    logits[2, 5003] = 9.0
    logits[3, :] = -torch.inf  # nothing allowed: the grammar's first token with score 0
    logits[4, 63] = 9.0  # the last entry of the first 64-wide block
    logits[5, KOSMOS.first_loc - 1] = 9.0  # the last text token, in the tail after the blocks
    state = DecodeState.create(ids, 2, KOSMOS)
    ref = state.clone()
    want, _ = grounded_decode_step_ref(logits, ref, KOSMOS)
    got = grounded_decode_step(logits, state, KOSMOS, backend=backend)
    assert got.tolist() == want.tolist()
    assert got.tolist()[:3] == [40000, 70, 5003] and got[4] == 63 and got[5] == KOSMOS.first_loc - 1
    assert_same_state(state, ref, "kosmos-scale argmax")
