"""packed_attention / attention through the public API: every available backend against the float64 reference,
gradients, validation, dispatch, custom-op checks and torch.compile."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmcore.ops import (
    ArgumentTypeError,
    BackendError,
    attention,
    available_backends,
    packed_attention,
    packed_attention_ref,
)
from mmcore.testing import assert_close_to_ref, opcheck_triton_op

CPU_BACKENDS = [b for b in available_backends("packed_attention", "cpu") if b != "triton"]
HAS_CPP = "cpp" in CPU_BACKENDS


def cu(lens, device="cpu"):
    return torch.tensor(
        [0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


def make(lens_q, lens_k, heads, heads_kv, d, dtype, requires_grad=False):
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, heads, d, dtype=dtype)
    k = torch.randn(tk, heads_kv, d, dtype=dtype)
    v = torch.randn(tk, heads_kv, d, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, cu(lens_q), cu(lens_k)


LAYOUTS = {
    "mixed": ([5, 0, 17, 1], [5, 0, 17, 1]),
    "single257": ([257], [257]),
    "long_among_short": ([3, 130, 1, 2], [3, 130, 1, 2]),
    "lq_lt_lk": ([3, 1, 6], [9, 4, 6]),
    "lq_gt_lk": ([9, 4, 2], [3, 0, 2]),
    "all_empty": ([0, 0], [0, 0]),
}


def run(backend, q, k, v, cq, ck, mode, prefix=None, **kw):
    mq = int((cq[1:] - cq[:-1]).max()) if cq.numel() > 1 else 0
    mk = int((ck[1:] - ck[:-1]).max()) if ck.numel() > 1 else 0
    return packed_attention(q, k, v, cq, ck, mq, mk, mode=mode, prefix_lens=prefix, backend=backend, **kw)


def prefix_for(lens_k):
    return torch.tensor([n // 2 for n in lens_k], dtype=torch.int32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["full", "causal", "prefix"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_matches_reference(backend, mode, layout, dtype):
    lq, lk = LAYOUTS[layout]
    q, k, v, cq, ck = make(lq, lk, 4, 2, 64, dtype)
    prefix = prefix_for(lk) if mode == "prefix" else None
    out, lse = run(backend, q, k, v, cq, ck, mode, prefix, return_lse=True)
    ref, ref_lse = packed_attention_ref(q, k, v, cq, ck, mode=mode, prefix_lens=prefix, return_lse=True)
    base = packed_attention_ref(q, k, v, cq, ck, mode=mode, prefix_lens=prefix, upcast=False)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert_close_to_ref(out, ref, base)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-3 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d", [32, 80, 96, 128])
@pytest.mark.parametrize("mode", ["full", "causal", "prefix"])
def test_gradients_match_reference(backend, d, mode):
    lq, lk = [6, 1, 0, 33], [9, 1, 0, 33]
    q, k, v, cq, ck = make(lq, lk, 4, 1, d, torch.float32, requires_grad=True)
    prefix = prefix_for(lk) if mode == "prefix" else None
    dout = torch.randn(q.shape[0], 4, d)
    out = run(backend, q, k, v, cq, ck, mode, prefix)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = packed_attention_ref(q64, k64, v64, cq, ck, mode=mode, prefix_lens=prefix)
    refs = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    q32, k32, v32 = (t.detach().requires_grad_() for t in (q, k, v))
    base = packed_attention_ref(q32, k32, v32, cq, ck, mode=mode, prefix_lens=prefix, upcast=False)
    bases = torch.autograd.grad(base, (q32, k32, v32), dout)
    for name, g, r, b in zip("qkv", grads, refs, bases, strict=True):
        assert_close_to_ref(g, r, b, grad=True, name=f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_without_keys_are_zero_and_their_gradients_finite(backend):
    # causal with Lq > Lk: the first Lq - Lk queries see no key
    q, k, v, cq, ck = make([5], [2], 2, 2, 32, torch.float32, requires_grad=True)
    out, lse = run(backend, q, k, v, cq, ck, "causal", return_lse=True)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert torch.isinf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["full", "causal", "prefix"])
@pytest.mark.parametrize("where", ["q", "k", "k_inf"])
def test_non_finite_inputs_give_nan_rows_not_zeros(backend, mode, where):
    # A NaN (or an infinite score) must reach the rows that attend to it, never pass as a row without keys (zeros).
    # Segment 1 is keys/queries 3..6; the bad entry is query 4 or key 4 of head 1.
    q, k, v, cq, ck = make([3, 4], [3, 4], 2, 2, 16, torch.float32, requires_grad=False)
    bad = {"q": (q, float("nan")), "k": (k, float("nan")), "k_inf": (k, float("inf"))}
    t, value = bad[where]
    t[4, 1, 0] = value
    q[:, 1, 0] = q[:, 1, 0].abs() + 0.1  # so that an infinite key makes +inf scores (-inf would just drop the key)
    prefix = torch.tensor([1, 2], dtype=torch.int32) if mode == "prefix" else None
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = run(backend, q, k, v, cq, ck, mode, prefix)
    if where == "q":
        sees_bad = torch.tensor([r == 4 for r in range(7)])
    else:  # rows of segment 1 whose visible keys include key 4 (local key 1)
        visible = {"full": lambda i: 4, "causal": lambda i: i + 1, "prefix": lambda i: max(i + 1, 2)}[mode]
        sees_bad = torch.tensor([r >= 3 and visible(r - 3) > 1 for r in range(7)])
    assert out[sees_bad, 1].isnan().all(), "rows that see the bad entry must be NaN"
    assert torch.isfinite(out[~sees_bad]).all() and torch.isfinite(out[:, 0]).all()
    out.sum().backward()
    assert q.grad[sees_bad, 1].isnan().any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_is_reproducible_and_matches_reference(backend):
    q, k, v, cq, ck = make([7, 12], [7, 12], 2, 2, 32, torch.float64)
    a = run(backend, q, k, v, cq, ck, "causal", dropout_p=0.3, dropout_seed=11)
    b = run(backend, q, k, v, cq, ck, "causal", dropout_p=0.3, dropout_seed=11)
    c = run(backend, q, k, v, cq, ck, "causal", dropout_p=0.3, dropout_seed=12)
    ref = packed_attention_ref(q, k, v, cq, ck, mode="causal", dropout_p=0.3, seed=11)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, ref, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dense_attention_matches_sdpa(backend, causal):
    q = torch.randn(3, 17, 4, 64)
    k = torch.randn(3, 17, 2, 64)
    v = torch.randn(3, 17, 2, 64)
    out = attention(q, k, v, causal=causal, backend=backend)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2).double(),
        k.transpose(1, 2).double(),
        v.transpose(1, 2).double(),
        is_causal=causal,
        enable_gqa=True,
    )
    base = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    )
    assert_close_to_ref(out, ref.transpose(1, 2), base.transpose(1, 2))


def test_dense_attention_vit_length_and_scale():
    x = torch.randn(2, 257, 2, 64)
    out = attention(x, x, x, softmax_scale=0.1)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2).double(),) * 3, scale=0.1).transpose(1, 2)
    base = F.scaled_dot_product_attention(*(x.transpose(1, 2),) * 3, scale=0.1).transpose(1, 2)
    assert_close_to_ref(out, ref, base)


# ------------------------------------------------------------------------------------------- validation


def _args(**over):
    q, k, v, cq, ck = make([3, 4], [3, 4], 4, 2, 32, torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=4)
    args.update(over)
    return args


def _call(**over):
    a = _args(**over)
    kw = {n: a.pop(n) for n in ("mode", "prefix_lens", "softmax_scale", "dropout_p") if n in a}
    return packed_attention(
        a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"], **kw
    )


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        (dict(q=torch.randn(7, 4)), ValueError, r"q must have shape \(total, heads, head_dim\)"),
        (dict(k=torch.randn(7, 3, 32), v=torch.randn(7, 3, 32)), ValueError, "multiple of heads of k/v"),
        (dict(v=torch.randn(7, 2, 16)), ValueError, "k and v must have the same shape"),
        (dict(q=torch.randn(7, 4, 32, dtype=torch.float64)), TypeError, "share a dtype"),
        (dict(q=torch.randint(0, 3, (7, 4, 32))), TypeError, "q must be float16"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens_q must be int32"),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
        (dict(cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "must end at the token count 7"),
        (
            dict(
                cu_seqlens_q=torch.tensor([0, 5, 3, 7], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 3, 5, 7], dtype=torch.int32),
            ),
            ValueError,
            "must be non-decreasing",
        ),
        (dict(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32), max_seqlen_k=7), ValueError, "same number of"),
        (dict(max_seqlen_q=3), ValueError, "max_seqlen_q = 3 is below the longest segment"),
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be a non-negative int"),
        (dict(mode="sliding"), ValueError, "mode must be one of"),
        (dict(mode="prefix"), ValueError, "needs prefix_lens"),
        (
            dict(mode="prefix", prefix_lens=torch.tensor([1, 5])),
            ValueError,
            r"prefix_lens\[1\] = 5 is outside \[0, 4\]",
        ),
        (dict(mode="prefix", prefix_lens=torch.tensor([1])), ValueError, r"shape \(2,\)"),
        (dict(mode="prefix", prefix_lens=torch.tensor([1.0, 2.0])), TypeError, "prefix_lens must hold integers"),
        (dict(max_seqlen_q=4.0), ValueError, "max_seqlen_q must be a non-negative int"),
        (dict(mode="causal", prefix_lens=torch.tensor([1, 1])), ValueError, "only used with mode='prefix'"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite float"),
    ],
)
def test_validation_names_the_argument(over, error, match):
    with pytest.raises(error, match=match):
        _call(**over)


def test_every_bad_argument_is_a_value_error():
    # dtype errors are ArgumentTypeError: a TypeError as Python has it and a ValueError as the API promises
    for over in (
        dict(cu_seqlens_q=torch.tensor([0, 3, 7])),
        dict(q=torch.randint(0, 3, (7, 4, 32))),
        dict(q=torch.randn(7, 4, 32, dtype=torch.float64)),
        dict(mode="prefix", prefix_lens=torch.tensor([1.0, 2.0])),
    ):
        with pytest.raises(ValueError) as info:
            _call(**over)
        assert isinstance(info.value, (TypeError, ArgumentTypeError))


def test_integer_arguments_of_other_types_are_taken():
    a = _args()
    tensors = {n: a[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")}
    want = _call(**tensors, mode="prefix", prefix_lens=torch.tensor([1, 2], dtype=torch.int32))
    got = _call(
        **tensors,
        mode="prefix",
        prefix_lens=torch.tensor([1, 2], dtype=torch.int16),
        max_seqlen_q=np.int64(4),
        max_seqlen_k=np.int32(4),
    )
    assert torch.equal(got, want)
    assert torch.equal(_call(**tensors, mode="prefix", prefix_lens=[1, 2]), want)


def test_dense_validation():
    with pytest.raises(ValueError, match=r"q must have shape \(batch, seqlen, heads, head_dim\)"):
        attention(torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="share the batch size"):
        attention(torch.randn(2, 4, 1, 8), torch.randn(3, 4, 1, 8), torch.randn(3, 4, 1, 8))


def test_forced_backends_explain_themselves():
    a = _args()
    with pytest.raises(BackendError, match="backend='cuda'.*no 'cuda' backend"):
        packed_attention(*a.values(), backend="cuda")


# ---------------------------------------------------------------------------------- custom op, compile


@pytest.mark.skipif(not HAS_CPP, reason="mmcore._C has no packed attention kernel")
def test_opcheck_cpp_forward_and_backward():
    q, k, v, cq, ck = make([3, 0, 5], [4, 0, 5], 2, 1, 32, torch.float32, requires_grad=True)
    fwd = torch.ops.mmcore.packed_attention_fwd.default
    for mode, prefix in ((0, None), (1, None), (2, torch.tensor([1, 0, 2], dtype=torch.int32))):
        torch.library.opcheck(fwd, (q, k, v, cq, ck, 5, 5, mode, prefix, 0.3, 0.0, 0, 0))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), cq, ck, 5, 5, 1, None, 0.3, 0.0, 0, 0)
    bwd = torch.ops.mmcore.packed_attention_bwd.default
    torch.library.opcheck(
        bwd,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cq, ck, 5, 5, 1, None, 0.3, 0.0, 0, 0),
    )


def _triton_opcheck(device):
    q, k, v, cq, ck = make([3, 0, 5], [4, 0, 5], 2, 1, 32, torch.float32)
    q, k, v, cq, ck = (t.to(device) for t in (q, k, v, cq, ck))
    fwd = torch.ops.mmcore.packed_attention_fwd_triton.default
    for mode, prefix in ((0, None), (1, None), (2, torch.tensor([1, 0, 2], dtype=torch.int32, device=device))):
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cq, ck, 5, 5, mode, prefix, 0.3, 0.0, 0, 0)
        opcheck_triton_op(fwd, args)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = fwd(q, k, v, cq, ck, 5, 5, 1, None, 0.3, 0.0, 0, 0)
    opcheck_triton_op(
        torch.ops.mmcore.packed_attention_bwd_triton.default,
        (torch.randn_like(out), q, k, v, out, lse, cq, ck, 5, 5, 1, None, 0.3, 0.0, 0, 0),
    )


@pytest.mark.skipif(
    "triton" not in available_backends("packed_attention", "cpu"), reason="Triton not installed or not interpreted"
)
def test_opcheck_triton_ops_interpreted():
    _triton_opcheck("cpu")


@pytest.mark.gpu
def test_opcheck_triton_ops_cuda():
    _triton_opcheck("cuda")


@pytest.mark.skipif(not HAS_CPP, reason="mmcore._C has no packed attention kernel")
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_module_forward_and_backward(compiler):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x, cu_seqlens, max_seqlen):
            q, k, v = self.qkv(x).view(x.shape[0], 3, 2, 16).unbind(1)
            return packed_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, mode="causal").sum()

    m = Block()
    x = torch.randn(12, 32)
    c = cu([5, 7])
    eager = torch.autograd.grad(m(x, c, 7), m.qkv.weight)[0]
    compiled = torch.compile(m, fullgraph=True, backend=compiler)
    got = torch.autograd.grad(compiled(x, c, 7), m.qkv.weight)[0]
    assert torch.allclose(got, eager, atol=1e-5)


def test_reference_softmax_scale_default():
    q, k, v, cq, ck = make([4], [4], 1, 1, 16, torch.float64)
    a = packed_attention_ref(q, k, v, cq, ck)
    b = packed_attention_ref(q, k, v, cq, ck, softmax_scale=1 / math.sqrt(16))
    assert torch.equal(a, b)
