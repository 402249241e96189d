"""ScreenedHead, both kinds (int8 and bfloat16 copies): its bounds hold around the float32 head's logits, its exact
rows are the whole head's bit for bit, and the candidates it leaves always contain the token greedy decoding chooses
-- near ties included; and the int8 kernel (``mmcore::screen_logits_int8``) against a reference of its arithmetic,
on its AVX512-VNNI path and its scalar one."""

import pytest
import torch

from mmcore import ops
from mmcore.models.kosmos2 import generation
from mmcore.ops import logits
from mmcore.ops._library import op
from mmcore.testing import cpu_has_flag, run_in_subprocess

pytestmark = pytest.mark.skipif(not ops.ScreenedHead.available(), reason="mmcore._C has no decode_logits kernel")


def weights(v, d, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g)
    if kind == "bf16-exact":  # nothing for bfloat16 to drop: only the summation terms remain
        return w.bfloat16().float()
    if kind == "large":
        return w * 1e4
    if kind == "small":
        return w * 1e-18
    if kind == "mixed":  # rows of very different norms
        return w * torch.logspace(-6, 6, v)[:, None]
    if kind == "subnormal":  # rows below the smallest normal: flushed to zero in the bfloat16 copy
        return w * torch.logspace(-40, -30, v)[:, None]
    if kind == "outliers":  # one entry per row 1,000x the others: int8's per-row scale leaves the rest few levels
        w[torch.arange(v), torch.randint(0, d, (v,), generator=g)] *= 1000
        return w * 0.02
    if kind == "zero-rows":  # a padding row (Kosmos-2's embedding has one) and a row of one tiny entry
        w[::7] = 0
        w[3] = 0
        w[3, 1] = 1e-42
        return w * 0.02
    return w * 0.02


KINDS = ops.ScreenedHead.KINDS
WEIGHT_KINDS = ["normal", "bf16-exact", "large", "small", "mixed", "subnormal", "outliers", "zero-rows"]


@pytest.mark.parametrize("screen", KINDS)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("b, d", [(1, 64), (3, 100), (4, 512), (2, 7)])
def test_bounds_contain_the_float32_logits(screen, kind, b, d):
    w = weights(517, d, kind)
    head = ops.ScreenedHead(w, screen)
    for seed in range(5):
        hidden = torch.randn(b, d, generator=torch.Generator().manual_seed(100 + seed)) * (10.0**seed)
        if seed == 4:
            hidden[0] = 0  # an all-zero hidden state
            hidden[-1, 1:] *= 1e-30  # one dominant entry
        exact = ops.decode_logits(hidden, w)
        lower, upper = head.bounds(hidden)
        assert bool((lower <= exact).all()) and bool((exact <= upper).all())


@pytest.mark.parametrize("screen, width_max, kept_max", [("int8", 0.05, 80), ("bfloat16", 0.01, 40)])
def test_bounds_are_tight_enough_to_screen(screen, width_max, kept_max):
    """bfloat16 keeps 8 bits: the interval is ~0.5 % of ||h|| ||w||; int8's per-row scale ~3 %: both far narrower
    than the logits' spread."""
    w = weights(4099, 512, "normal")
    hidden = torch.randn(2, 512, generator=torch.Generator().manual_seed(7))
    lower, upper = ops.ScreenedHead(w, screen).bounds(hidden)
    width = (upper - lower) / (hidden.norm(dim=1, keepdim=True) * w.norm(dim=1))
    assert float(width.max()) < width_max
    exact = ops.decode_logits(hidden, w)
    kept = upper >= lower.amax(1, keepdim=True)
    assert int(kept.sum(1).max()) < kept_max, kept.sum(1)  # of 4,099 rows
    assert bool(kept.gather(1, exact.argmax(1, keepdim=True)).all()), "the argmax is among them"


def test_default_kind_follows_the_cpu():
    head = ops.ScreenedHead(weights(40, 16, "normal"))
    assert head.kind == ("int8" if logits._int8_fast() else "bfloat16")
    assert ops.ScreenedHead(weights(40, 16, "normal"), "bfloat16").kind == "bfloat16"


@pytest.mark.parametrize("screen", KINDS)
@pytest.mark.parametrize("b", [1, 2, 5])
@pytest.mark.parametrize("d", [7, 64, 100])
def test_exact_rows_equal_the_whole_head_bit_for_bit(screen, b, d):
    w = weights(301, d, "normal")
    hidden = torch.randn(b, d)
    head = ops.ScreenedHead(w, screen)
    rows = torch.tensor([0, 5, 6, 7, 99, 100, 250, 300])
    assert torch.equal(head.exact(hidden, rows), ops.decode_logits(hidden, w)[:, rows])


@pytest.mark.parametrize("screen", KINDS)
def test_bounds_refuse_what_could_overflow_or_is_not_finite(screen):
    head = ops.ScreenedHead(weights(64, 16, "large"), screen)
    assert head.bounds(torch.ones(2, 16)) is not None
    assert head.bounds(torch.full((2, 16), 1e34)) is None, "logits near float32's limit"
    bad = torch.ones(2, 16)
    bad[1, 3] = torch.nan
    assert head.bounds(bad) is None
    bad[1, 3] = torch.inf
    assert head.bounds(bad) is None
    w = weights(64, 16, "normal")
    w[5, 0] = torch.inf
    assert ops.ScreenedHead(w, screen).bounds(torch.ones(1, 16)) is None


def test_matches_follows_the_weight():
    w = weights(40, 16, "normal")
    head = ops.ScreenedHead(w)
    assert head.matches(w)
    assert not head.matches(w.clone())
    with torch.no_grad():
        w[0, 0] += 1.0
    assert not head.matches(w), "an in-place update (training, load_state_dict) changes the version"
    head = ops.ScreenedHead(w)
    w.data.copy_(torch.randn(40, 16))  # .data bypasses the version counter: the sampled rows see it
    assert not head.matches(w)


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (torch.randn(4, 8).double(), TypeError, "float32"),
        (torch.randn(8), TypeError, r"\(V, D\)"),
        ([[1.0]], TypeError, "float32"),
        (torch.randn(4, 8, device="meta"), ValueError, "runs on the CPU"),
    ],
)
def test_bad_weight(weight, error, match):
    with pytest.raises(error, match=match):
        ops.ScreenedHead(weight)


def test_bad_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.ScreenedHead(torch.randn(4, 8), "fp8")
    with pytest.raises(ValueError, match="D <= 66000"):
        ops.ScreenedHead(torch.randn(1, 66004), "int8")


def _step_options(**kw):
    options = dict(no_repeat_ngram_size=0, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                   constrain_boxes=True, backend=None)  # fmt: skip
    options.update(kw)
    return options


@pytest.mark.parametrize("screen", KINDS)
@pytest.mark.parametrize("ngram", [0, 1, 3])
def test_screened_step_chooses_what_the_whole_head_chooses_at_near_ties(screen, ngram):
    """Rows in near-identical pairs (equal in bfloat16, a few float32 ulps apart) and a hidden state aimed at them:
    the bfloat16 logits cannot tell the pair apart, the exact ones can, and the step must take the exact winner --
    also when n-gram blocking bans the leaders (ngram=1 bans every token already in the row)."""
    tokens = ops.GroundingTokens(phrase_open=100, phrase_close=101, object_open=102, object_close=103, delimiter=104,
                                 first_loc=105, num_bins=4, eos=2, pad=1)  # fmt: skip
    v, d = 400, 64
    g = torch.Generator().manual_seed(0)
    agree = 0
    for trial in range(60):
        base = torch.randn(v, d, generator=g).bfloat16().float()
        w = base.clone()
        # rows 10..29 become copies of row 10 nudged below bfloat16's resolution
        w[10:30] = base[10] * (1 + torch.randint(-40, 40, (20, 1), generator=g) * 2.0**-23)
        head = ops.ScreenedHead(w, screen)
        hidden = base[10][None].repeat(2, 1) + 0.01 * torch.randn(2, d, generator=g)
        prompt = torch.randint(3, 100, (2, 6), generator=g)
        prompt[0, 2:] = torch.arange(10, 14) + trial % 8  # some of the leaders already seen (banned for ngram=1)
        options = _step_options(no_repeat_ngram_size=ngram)
        state = ops.DecodeState.create(prompt, 4, tokens)
        twin = state.clone()
        screened = generation._screened_logits(head, hidden, state, tokens, options)
        assert screened is not None
        assert int(torch.isfinite(screened[0]).sum()) < v // 2
        got = ops.grounded_decode_step(screened, state, tokens, **options)
        want = ops.grounded_decode_step(ops.decode_logits(hidden, w), twin, tokens, **options)
        assert torch.equal(got, want), trial
        assert torch.equal(state.sequences, twin.sequences)
        agree += int(got[0] != 10)  # the bfloat16 argmax (row 10, first of the tie) is often not the winner
    assert agree > 10


@pytest.mark.parametrize("screen", KINDS)
def test_screened_step_with_every_token_banned_takes_the_grammars_first(screen):
    """A row whose allowed tokens are all banned (n-gram 1 with every text token already seen) falls back to the
    grammar's first token, with or without the screen."""
    tokens = ops.GroundingTokens(phrase_open=6, phrase_close=7, object_open=8, object_close=9, delimiter=10,
                                 first_loc=11, num_bins=2, eos=2, pad=1)  # fmt: skip
    prompt = torch.tensor([[0, 3, 8, 11, 14, 9, 6, 5, 7]])  # ends with </phrase>: only <object>, already seen
    w = torch.randn(16, 8)
    hidden = torch.randn(1, 8)
    head = ops.ScreenedHead(w, screen)
    options = _step_options(no_repeat_ngram_size=1)
    state = ops.DecodeState.create(prompt, 2, tokens)
    twin = state.clone()
    screened = generation._screened_logits(head, hidden, state, tokens, options)
    logits = screened if screened is not None else ops.decode_logits(hidden, w)
    got = ops.grounded_decode_step(logits, state, tokens, **options)
    want = ops.grounded_decode_step(ops.decode_logits(hidden, w), twin, tokens, **options)
    assert torch.equal(got, want)
    assert int(got) == tokens.object_open


# ------------------------------------------------------------------------------------ the int8 kernel


def int8_problem(b, v, d, seed=0):
    """The kernel's operands as ScreenedHead builds them, and the reference of its arithmetic: exact integer sums,
    then (sum * s_w) * s_h in float64, rounded to float32."""
    g = torch.Generator().manual_seed(seed)
    head = ops.ScreenedHead(torch.randn(v, d, generator=g), "int8")
    scale, codes, _ = logits._quantize_rows(torch.randn(b, d, generator=g).double())
    packed_d = head._padded_d
    hidden = torch.full((b, packed_d), 128, dtype=torch.uint8)
    hidden[:, :d] = (codes + 128).to(torch.uint8)
    q = head._packed.permute(0, 2, 1, 3).reshape(-1, packed_d)[:v].long()  # back to (V, D_pad)
    sums = (hidden.long() - 128) @ q.T  # exact
    want = (sums.double() * head._scale[:v].double() * scale.double()[:, None]).float()
    args = (hidden, head._packed, head._offsets, head._scale, scale, v)
    return args, want


@pytest.mark.parametrize("b", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("v, d", [(16, 4), (301, 100), (517, 7), (40, 512)])
def test_int8_kernel_matches_its_arithmetic_exactly(b, v, d):
    args, want = int8_problem(b, v, d)
    got = op("screen_logits_int8")(*args)
    assert got.dtype == torch.float32 and got.shape == (b, v)
    assert torch.equal(got, want)


def test_int8_scalar_path_gives_the_same_results():
    """MMCORE_DISABLE_AVX512VNNI=1: the path of CPUs without AVX512-VNNI, bit for bit the same."""
    args, want = int8_problem(6, 301, 100, seed=3)
    fast, got = run_in_subprocess(
        "from mmcore.ops import logits\nfrom mmcore.ops._library import op\n"
        "result = (logits._int8_fast(), op('screen_logits_int8')(*args))",
        dict(args=args),
        {"MMCORE_DISABLE_AVX512VNNI": "1"},
    )
    assert not fast, "the variable turned the AVX512-VNNI path off"
    assert torch.equal(got, want)
    if cpu_has_flag("avx512_vnni"):
        assert logits._int8_fast(), "this CPU has AVX512-VNNI: the direct calls above took that path"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden=lambda t: t.to(torch.int8)), "hidden must be uint8"),
        (dict(weight=lambda t: t.to(torch.uint8)), "weight must be int8"),
        (dict(hidden=lambda t: t[:, :-4]), "packed as"),
        (dict(weight=lambda t: t.reshape(t.shape[0], -1)), "packed as"),
        (dict(offsets=lambda t: t[:-1]), "offsets must have shape"),
        (dict(weight_scale=lambda t: t.double()), "weight_scale must be Float"),
        (dict(hidden_scale=lambda t: t[:1]), "hidden_scale must have shape"),
        (dict(vocab=lambda n: n + 16), "vocab must be within the last panel"),
        (dict(vocab=lambda n: n - 16), "vocab must be within the last panel"),
    ],
)
def test_int8_kernel_validation(change, match):
    args, _ = int8_problem(2, 40, 12)
    names = ["hidden", "weight", "offsets", "weight_scale", "hidden_scale", "vocab"]
    args = [change[n](a) if n in change else a for n, a in zip(names, args, strict=True)]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op("screen_logits_int8")(*args)


@pytest.mark.parametrize("b, v", [(1, 7), (3, 301), (8, 4099), (2, 0), (0, 5)])
def test_screen_candidates_is_the_union_of_allowed_rows_above_the_floor(b, v):
    g = torch.Generator().manual_seed(v)
    approx = torch.randn(b, v, generator=g)
    scores = torch.randn(b, v, generator=g)
    scores[torch.rand(b, v, generator=g) < 0.3] = -torch.inf  # banned
    if v > 2 and b:
        approx[0, 1] = torch.nan  # never a candidate
        approx[0, 2] = torch.inf
    t = torch.rand(3, v, generator=g) * 0.1
    coef = torch.rand(b, 3, generator=g)
    floor = torch.full((b,), 1.5)
    if b > 1:
        floor[1] = torch.inf  # a finished row: no candidates of its own
    upper = approx + ((coef[:, :1] * t[0] + coef[:, 1:2] * t[1]) + coef[:, 2:] * t[2])  # the op's order
    want = ((upper >= floor[:, None]) & (scores > -torch.inf)).any(0).nonzero().flatten() if b else torch.zeros(0)
    got = op("screen_candidates")(approx, scores, floor, t, coef)
    assert got.dtype == torch.int64 and torch.equal(got, want.long())


def test_screen_candidates_validation():
    x, t, c = torch.zeros(2, 5), torch.zeros(3, 5), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one shape"):
        op("screen_candidates")(x, torch.zeros(2, 4), torch.zeros(2), t, c)
    with pytest.raises(ValueError, match="floor must have shape"):
        op("screen_candidates")(x, x, torch.zeros(3), t, c)
    with pytest.raises(ValueError, match=r"table must have shape \(3, 5\)"):
        op("screen_candidates")(x, x, torch.zeros(2), torch.zeros(3, 6), c)
    with pytest.raises(ValueError, match="coef must have shape"):
        op("screen_candidates")(x, x, torch.zeros(2), t, torch.zeros(2, 2))
    with pytest.raises(TypeError, match="float32"):
        op("screen_candidates")(x.double(), x.double(), torch.zeros(2).double(), t, c)


@pytest.mark.parametrize("d, padded", [(512, 512), (7, 8), (100, 100)])
def test_quantize_rows_int8_matches_the_python_rules(d, padded):
    g = torch.Generator().manual_seed(d)
    hidden = torch.randn(5, d, generator=g) * torch.logspace(-30, 30, 5)[:, None]
    hidden[1] = 0  # scale 0: codes 0, the residual is h itself
    hidden[2, 3] = 2.5 * (hidden[2].abs().max() / 127)  # a code exactly halfway: rounds to even
    codes, scale, norms = op("quantize_rows_int8")(hidden, padded)
    want_scale, want_codes, residual = logits._quantize_rows(hidden.double())
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes[:, :d].long() - 128, want_codes.long()) and bool((codes[:, d:] == 128).all())
    want = torch.stack([hidden.double().norm(dim=1), residual.norm(dim=1)], dim=1)
    torch.testing.assert_close(norms, want, rtol=1e-12, atol=0)
