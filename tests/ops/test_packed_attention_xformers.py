"""The "xformers" backend of packed_attention (mmcore/ops/attention.py): the block-diagonal bias it builds equals
mmcore's visibility mask, its log-sum-exp conversion, the layouts and arguments it refuses and why.

xformers has no attention kernel for CPU tensors, but its biases materialise there: the CPU tests that need it run
when it is importable. Tests marked gpu run on a GPU machine (benchmarks/gpu_check.sh): output, lse and gradients
against the float64 reference in float16 and bfloat16, full and causal, GQA, head dims 64/80/128.
"""

import importlib.util
import re

import pytest
import torch

from mmcore.ops import BackendError, packed_attention, packed_attention_ref
from mmcore.ops.attention import (
    MODES,
    PACKED_ATTENTION,
    _xformers_bias,
    _xformers_lse,
    _xformers_supports,
    _XformersAttention,
    visible_mask,
)
from mmcore.testing import assert_close_to_ref

XFORMERS = PACKED_ATTENTION.backends["xformers"]

# (query lengths, key lengths) per segment, and the modes the backend takes them in.
LAYOUTS = {
    # a segment with keys but no queries, an empty one, length 1, Lq = Lk, Lq > Lk (full only)
    "mixed": (([5, 0, 0, 17, 1, 9], [5, 3, 0, 17, 1, 4]), ("full",)),
    # the same with Lq < Lk instead, so causal (bottom-right aligned) fits too
    "lq_le_lk": (([5, 0, 0, 17, 1, 3], [7, 3, 0, 17, 1, 9]), ("full", "causal")),
    "long_among_short": (([3, 130, 1, 2], [3, 130, 1, 2]), ("full", "causal")),
    # Kosmos-2's resampler: 64 latent queries over more keys
    "resampler": (([64, 64], [321, 257]), ("full", "causal")),
}
ACCEPTED = [(name, mode) for name, (_, modes) in LAYOUTS.items() for mode in modes]


def cu(lens, device="cpu"):
    return torch.tensor(
        [0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


def packed_visibility(lens_q, lens_k, mode):
    """(total_q, total_k) bool: mmcore's mask over all packed tokens, built segment by segment from cu_seqlens."""
    mask = torch.zeros(sum(lens_q), sum(lens_k), dtype=torch.bool)
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        mask[cq[s] : cq[s + 1], ck[s] : ck[s + 1]] = visible_mask(lq, lk, mode)
    return mask


def check_args(lens_q, lens_k, *, mode="full", heads=4, heads_kv=2, d=64, prefix_lens=None, dropout_p=0.0):
    """The backend's per-call check on CPU tensors of that layout (it does not look at the device)."""
    q = torch.randn(sum(lens_q), heads, d, dtype=torch.float16)
    k = torch.randn(sum(lens_k), heads_kv, d, dtype=torch.float16)
    return _xformers_supports(
        q, k, k, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), MODES[mode], prefix_lens, 0.125, dropout_p, 0, 0
    )


@pytest.fixture
def fmha():
    return pytest.importorskip("xformers.ops.fmha")


# ------------------------------------------------------------------------------------------ CPU: biases


@pytest.mark.parametrize(("layout", "mode"), ACCEPTED, ids=[f"{n}-{m}" for n, m in ACCEPTED])
def test_bias_equals_mmcore_visibility(fmha, layout, mode):
    (lens_q, lens_k), _ = LAYOUTS[layout]
    assert check_args(lens_q, lens_k, mode=mode) is None
    bias = _xformers_bias(lens_q, lens_k, mode == "causal", torch.device("cpu"))
    dense = bias.materialize((sum(lens_q), sum(lens_k)), dtype=torch.float32)
    mask = packed_visibility(lens_q, lens_k, mode)
    wrong = ((dense == 0) != mask).nonzero()
    assert wrong.numel() == 0, f"{len(wrong)} (query, key) pairs differ, first {wrong[0].tolist()}"
    assert torch.isneginf(dense[~mask]).all(), "hidden pairs must be -inf"
    assert mask.any(1).all(), "in a layout the backend takes, every query sees a key"


@pytest.mark.parametrize(
    ("lens_q", "lens_k", "mode", "match"),
    [
        ([4, 2], [4, 0], "full", r"segment 1 has 2 queries and no keys"),
        ([4, 0, 2], [4, 0, 0], "causal", r"segment 2 has 2 queries and no keys"),
        ([3, 5, 1], [3, 2, 1], "causal", r"causal segment 1 has more queries \(5\) than keys \(2\)"),
    ],
    ids=["full-no-keys", "causal-no-keys", "causal-lq-gt-lk"],
)
def test_layouts_with_rows_that_see_no_key_are_refused(lens_q, lens_k, mode, match):
    reason = check_args(lens_q, lens_k, mode=mode)
    assert reason is not None and re.search(match, reason), reason


def test_bottom_right_causal_bias_rejects_more_queries_than_keys(fmha):
    """Why the causal refusal exists: xformers' own bias cannot express the layout."""
    with pytest.raises(ValueError, match="num_keys >= num_queries"):
        _xformers_bias([3, 5], [3, 2], True, torch.device("cpu"))


# --------------------------------------------------------------------------------- CPU: lse conversion


def test_lse_packed_and_padded_to_mmcore_layout():
    lens = [3, 0, 5, 1]
    heads, total = 4, sum(lens)
    want = torch.randn(heads, total)
    # packed: (1, heads, total), possibly with spare columns
    assert torch.equal(_xformers_lse(want[None], lens), want)
    spare = torch.cat([want, torch.full((heads, 3), 7.0)], 1)[None]
    assert torch.equal(_xformers_lse(spare, lens), want)
    # padded: (segments, heads, >= max Lq), row t of segment s at [s, :, t]
    padded = torch.full((len(lens), heads, max(lens) + 2), float("nan"))
    starts = cu(lens).tolist()
    for s, n in enumerate(lens):
        padded[s, :, :n] = want[:, starts[s] : starts[s] + n]
    got = _xformers_lse(padded, lens)
    assert got.shape == (heads, total) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, want)
    # GQA (groups, heads per group) in both layouts: query head h = group * heads_per_group + j
    assert torch.equal(_xformers_lse(want.view(2, 2, total)[None], lens), want)
    assert torch.equal(_xformers_lse(padded.view(len(lens), 2, 2, -1), lens), want)


def test_lse_of_a_single_segment_reads_either_layout():
    want = torch.randn(2, 6)
    assert torch.equal(_xformers_lse(torch.cat([want, torch.zeros(2, 26)], 1)[None], [6]), want)


def test_lse_of_unknown_shape_is_an_error():
    with pytest.raises(RuntimeError, match=r"neither packed \(1, heads, >= 4\) nor padded \(2, heads, >= 3\)"):
        _xformers_lse(torch.zeros(3, 2, 4), [1, 3])


# ------------------------------------------------- CPU: the wrapper around xformers' two kernels, faked


def dense_attention(q, k, v, bias, scale):
    """What xformers' kernels compute, in plain PyTorch: batch-1 BMHK or BMGHK inputs, the bias materialised.
    Returns out in q's layout and lse (heads, total_q), heads in xformers' (group, head) order."""
    total_q, total_k = q.shape[1], k.shape[1]
    qh, kh, vh = (t[0].reshape(t.shape[1], -1, t.shape[-1]) for t in (q, k, v))
    scores = torch.einsum("thd,shd->hts", qh, kh) * scale + bias.materialize((total_q, total_k), dtype=q.dtype)
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("hts,shd->thd", torch.softmax(scores, -1), vh)
    return out.reshape(q.shape), lse


@pytest.fixture(params=["packed", "padded"])
def fake_kernels(request, fmha, monkeypatch):
    """Replace xformers' forward and backward with dense_attention, returning lse in the flash operators' packed
    layout or the cutlass operators' padded one; the backward, like xformers 0.0.35's, takes no BMGHK."""
    packed = request.param == "packed"
    calls = []

    def to_xformers_layout(lse, q, bias):  # (H, T) -> (1, *GH, T) or (segments, *GH, max Lq)
        lse = lse.unflatten(0, q.shape[2:-1])
        if packed:
            return lse[None]
        starts = bias.q_seqinfo.seqstart_py
        padded = lse.new_full((len(starts) - 1, *lse.shape[:-1], bias.q_seqinfo.max_seqlen + 5), float("nan"))
        for s, (a, b) in enumerate(zip(starts, starts[1:], strict=False)):
            padded[s, ..., : b - a] = lse[..., a:b]
        return padded

    def forward(q, k, v, attn_bias, p=0.0, scale=None):
        calls.append(("fwd", q.dim()))
        out, lse = dense_attention(q, k, v, attn_bias, scale)
        return out, to_xformers_layout(lse, q, attn_bias)

    def backward(grad, output, lse, q, k, v, attn_bias, p=0.0, scale=None):
        calls.append(("bwd", q.dim()))
        assert q.dim() == 4, "xformers 0.0.35 has no backward for BMGHK"
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():  # the caller's backward runs with grad mode off
            out, want_lse = dense_attention(*inputs, attn_bias, scale)
        assert torch.allclose(output, out) and torch.allclose(
            lse, to_xformers_layout(want_lse, q, attn_bias), equal_nan=True
        )
        return torch.autograd.grad(out, inputs, grad)

    monkeypatch.setattr(fmha, "memory_efficient_attention_forward_requires_grad", forward)
    monkeypatch.setattr(fmha, "memory_efficient_attention_backward", backward)
    return calls


@pytest.mark.parametrize(("layout", "mode"), ACCEPTED, ids=[f"{n}-{m}" for n, m in ACCEPTED])
@pytest.mark.parametrize("heads, heads_kv", [(4, 4), (6, 2)], ids=["mha", "gqa3"])
def test_wrapper_matches_reference_with_faked_kernels(fake_kernels, layout, mode, heads, heads_kv):
    """Layouts, GQA views, lse conversion and the gradient sums over each group, in float64 on CPU."""
    (lens_q, lens_k), _ = LAYOUTS[layout]
    q = torch.randn(sum(lens_q), heads, 16, dtype=torch.float64, requires_grad=True)
    # k and v as strided views of one fused projection, as models produce them
    kv = torch.randn(sum(lens_k), 2, heads_kv, 16, dtype=torch.float64, requires_grad=True)
    k, v = kv.unbind(1)
    out, lse = _XformersAttention.apply(q, k, v, lens_q, lens_k, mode == "causal", 0.3)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kv), dout)

    ref, ref_lse = packed_attention_ref(q, k, v, cu(lens_q), cu(lens_k), mode=mode, softmax_scale=0.3, return_lse=True)
    ref_grads = torch.autograd.grad(ref, (q, kv), dout)
    assert out.shape == q.shape and lse.shape == (heads, q.shape[0]) and lse.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(lse, ref_lse, atol=1e-5)
    for name, g, r in zip(("dq", "dkv"), grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-12), f"{name}: max error {(g - r).abs().max():.3e}"
    assert fake_kernels == [("fwd", 4 if heads == heads_kv else 5), ("bwd", 4)]


def test_wrapper_without_queries(fake_kernels):
    q = torch.randn(0, 4, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 2, 16, dtype=torch.float64, requires_grad=True)
    out, lse = _XformersAttention.apply(q, k, k, [0, 0], [5, 0], False, 0.25)
    assert out.shape == (0, 4, 16) and lse.shape == (4, 0)
    (dk,) = torch.autograd.grad(out.sum() + k.sum(), (k,))
    assert torch.equal(dk, torch.ones_like(k)) and fake_kernels == []


# ------------------------------------------------------------------------- CPU: refusals and dispatch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="prefix", prefix_lens=torch.tensor([2, 1], dtype=torch.int32)), "no prefix mode"),
        (dict(dropout_p=0.1), "dropout RNG is not mmcore's"),
        (dict(d=36), "head_dim 36 is not a multiple of 8 up to 256"),
        (dict(d=264), "head_dim 264 is not a multiple of 8 up to 256"),
    ],
    ids=["prefix", "dropout", "d36", "d264"],
)
def test_check_refuses_what_the_peers_cannot_do(kwargs, match):
    reason = check_args([3, 4], [3, 4], **kwargs)
    assert reason is not None and match in reason, reason


def test_check_accepts_head_dims_up_to_256():
    for d in (8, 64, 80, 128, 256):
        assert check_args([3, 4], [5, 4], mode="causal", d=d) is None


def test_check_refuses_inside_a_traced_graph(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "traced graph" in check_args([3, 4], [3, 4])


def test_forced_on_cpu_tensors_says_why():
    q, k = torch.randn(7, 4, 64, dtype=torch.float16), torch.randn(7, 2, 64, dtype=torch.float16)
    with pytest.raises(BackendError, match=r"backend='xformers' was forced.*runs on cuda tensors, not cpu"):
        packed_attention(q, k, k, cu([3, 4]), cu([3, 4]), 4, 4, backend="xformers")


def test_unavailable_says_why(monkeypatch):
    if importlib.util.find_spec("xformers") is None:
        assert "xformers is not installed" in XFORMERS.unavailable("cuda")
        return
    import xformers._cpp_lib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = XFORMERS.unavailable("cuda")
    if xformers._cpp_lib._built_with_cuda:
        assert reason is None
    else:  # this machine: xformers._C needs CUDA 12 libraries
        assert "xformers._C" in reason and "refuses CUDA tensors" in reason


# ------------------------------------------------------------------------------------------------- GPU


GPU_LAYOUTS = {
    # keys without queries, an empty segment, length 1, Lq > Lk (full) or Lq < Lk, one long among short
    "full": ([5, 0, 0, 33, 1, 300, 9], [7, 3, 0, 20, 1, 300, 2]),
    "causal": ([5, 0, 0, 20, 1, 300, 2], [7, 3, 0, 33, 1, 300, 9]),
}


@pytest.fixture
def on_gpu():
    pytest.importorskip("xformers")
    reason = XFORMERS.unavailable("cuda")
    if reason:
        pytest.skip(f"the xformers backend cannot run here: {reason}")


def check_against_reference(lens_q, lens_k, mode, heads, heads_kv, d, dtype):
    """Output, lse and gradients of backend="xformers" against packed_attention_ref in float64, by the tolerance
    rule with PyTorch in the inputs' dtype as the baseline."""
    q = torch.randn(sum(lens_q), heads, d, dtype=dtype, device="cuda", requires_grad=True)
    k = torch.randn(sum(lens_k), heads_kv, d, dtype=dtype, device="cuda", requires_grad=True)
    v = torch.randn(sum(lens_k), heads_kv, d, dtype=dtype, device="cuda", requires_grad=True)
    cq, ck = cu(lens_q, "cuda"), cu(lens_k, "cuda")
    out, lse = packed_attention(
        q, k, v, cq, ck, max(lens_q), max(lens_k), mode=mode, backend="xformers", return_lse=True
    )
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = packed_attention_ref(*inputs64, cq, ck, mode=mode, return_lse=True)
    ref_grads = torch.autograd.grad(ref, inputs64, dout.double())
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    base, base_lse = packed_attention_ref(*inputs, cq, ck, mode=mode, upcast=False, return_lse=True)
    base_grads = torch.autograd.grad(base, inputs, dout)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (heads, q.shape[0])
    assert_close_to_ref(out, ref, base, name="out")
    assert torch.isfinite(ref_lse).all(), "the layouts here leave every query a visible key"
    assert_close_to_ref(lse, ref_lse.double(), base_lse, name="lse")
    for name, g, x, r, b in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_grads, base_grads, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_to_ref(g, r, b, grad=True, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, heads_kv", [(8, 8), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("mode", ["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_matches_reference(on_gpu, dtype, mode, d, heads, heads_kv):
    lens_q, lens_k = GPU_LAYOUTS[mode]
    check_against_reference(lens_q, lens_k, mode, heads, heads_kv, d, dtype)


@pytest.mark.gpu
def test_gpu_resampler_and_dense_attention(on_gpu):
    check_against_reference([64] * 3, [321] * 3, "full", 8, 8, 64, torch.bfloat16)
    x = torch.randn(2, 257, 4, 64, dtype=torch.float16, device="cuda")
    from mmcore.ops import attention

    out = attention(x, x, x, causal=True, backend="xformers")
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).double(),) * 3, is_causal=True)
    base = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2),) * 3, is_causal=True)
    assert_close_to_ref(out, ref.transpose(1, 2), base.transpose(1, 2))


@pytest.mark.gpu
def test_gpu_no_queries(on_gpu):
    q = torch.randn(0, 4, 64, dtype=torch.float16, device="cuda", requires_grad=True)
    k = torch.randn(6, 2, 64, dtype=torch.float16, device="cuda", requires_grad=True)
    out, lse = packed_attention(
        q, k, k, cu([0, 0], "cuda"), cu([6, 0], "cuda"), 0, 6, backend="xformers", return_lse=True
    )
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)
    (dk,) = torch.autograd.grad(out.sum() + k.sum(), (k,))
    assert torch.equal(dk, torch.ones_like(k))


@pytest.mark.gpu
def test_gpu_default_dispatch_picks_xformers_beyond_tritons_head_dims(on_gpu):
    """Head dim 256: the Triton kernels stop at 128, so the default is flash-attn where it is installed (it comes
    first), else xformers."""
    lens = [100, 1, 37]
    q = torch.randn(sum(lens), 4, 256, dtype=torch.bfloat16, device="cuda")
    args = (q, q, q, cu(lens, "cuda"), cu(lens, "cuda"), 100, 100, MODES["causal"], None, 0.0625, 0.0, 0, 0)
    want = "flash_attn" if importlib.util.find_spec("flash_attn") is not None else "xformers"
    assert PACKED_ATTENTION.select("cuda", torch.bfloat16, args).name == want
    check_against_reference(lens, lens, "causal", 4, 4, 256, torch.bfloat16)
