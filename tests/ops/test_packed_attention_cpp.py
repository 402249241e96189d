"""The C++ CPU kernels of packed attention (csrc/packed_attention/), called directly through
torch.ops.mmcore.packed_attention_fwd/_bwd, against the float64 reference packed_attention_ref.

Shapes are chosen around the kernels' tile sizes (forward 64 or 128 x 512, backward 128 x 64 or 128): several
query and key tiles per segment, partial tiles, masked diagonal tiles, key tiles that no query sees."""

import math

import pytest
import torch

from mmcore import _extension
from mmcore.ops._library import op
from mmcore.ops._philox import dropout_keep_mask
from mmcore.ops.attention import MODES, packed_attention_ref
from mmcore.testing import assert_close_to_ref

pytestmark = pytest.mark.skipif(
    _extension.extension() is None
    or not torch._C._dispatch_has_kernel_for_dispatch_key("mmcore::packed_attention_fwd", "CPU"),
    reason=f"mmcore._C without the packed attention CPU kernels ({_extension.C_ERROR})",
)

FWD = op("packed_attention_fwd")
BWD = op("packed_attention_bwd")

# (lens_q, lens_k) per segment
LAYOUTS = {
    "empty_and_one": ([0, 1, 5, 0, 1], [0, 1, 5, 3, 0]),
    "single257": ([257], [257]),
    "long_among_short": ([3, 300, 1, 2], [3, 300, 1, 2]),
    "lq_lt_lk": ([3, 70, 1], [9, 600, 6]),
    "lq_gt_lk": ([130, 4, 2], [67, 0, 1]),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


class Case:
    """Inputs of one call: q (total_q, heads, d), k/v (total_k, heads_kv, d), the index tensors and options."""

    def __init__(self, lens_q, lens_k, heads=2, heads_kv=1, d=64, dtype=torch.float32, mode="causal", p=0.0):
        self.q = torch.randn(sum(lens_q), heads, d).to(dtype)
        self.k = torch.randn(sum(lens_k), heads_kv, d).to(dtype)
        self.v = torch.randn(sum(lens_k), heads_kv, d).to(dtype)
        self.cq, self.ck = cu(lens_q), cu(lens_k)
        # max_seqlen_* are upper bounds; +3 checks that the kernels do not assume they are attained (they
        # enter the dropout counter, which the reference is given too).
        self.mq, self.mk = max(lens_q, default=0) + 3, max(lens_k, default=0) + 3
        self.mode = mode
        self.prefix = torch.tensor([(n + 1) // 2 for n in lens_k], dtype=torch.int32) if mode == "prefix" else None
        self.scale = 1.0 / math.sqrt(d)
        self.p, self.seed, self.offset = p, 2024, 5

    def args(self):
        return (
            self.cq,
            self.ck,
            self.mq,
            self.mk,
            MODES[self.mode],
            self.prefix,
            self.scale,
            self.p,
            self.seed,
            self.offset,
        )

    def fwd(self):
        return FWD(self.q, self.k, self.v, *self.args())

    def ref(self, q, k, v, upcast, return_lse=False):
        return packed_attention_ref(
            q,
            k,
            v,
            self.cq,
            self.ck,
            self.mq,
            self.mk,
            mode=self.mode,
            prefix_lens=self.prefix,
            softmax_scale=self.scale,
            dropout_p=self.p,
            seed=self.seed,
            offset=self.offset,
            upcast=upcast,
            return_lse=return_lse,
        )


def check_lse(lse, ref_lse):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and not torch.isnan(lse).any()
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


def check_forward(c):
    out, lse = c.fwd()
    ref, ref_lse = c.ref(c.q, c.k, c.v, upcast=True, return_lse=True)
    base = c.ref(c.q, c.k, c.v, upcast=False)
    assert out.dtype == c.q.dtype and out.shape == c.q.shape and out.is_contiguous()
    assert not torch.isnan(out).any()
    assert_close_to_ref(out, ref, base)
    check_lse(lse, ref_lse)
    # rows that see no key: exactly zero
    empty = torch.isinf(lse).T  # (total_q, heads)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    return out, lse


def check_backward(c):
    out, lse = c.fwd()
    dout = torch.randn(c.q.shape).to(c.q.dtype)
    grads = BWD(dout, c.q, c.k, c.v, out, lse, *c.args())
    leaves64 = [t.detach().double().requires_grad_() for t in (c.q, c.k, c.v)]
    refs = torch.autograd.grad(c.ref(*leaves64, upcast=True), leaves64, dout.double(), allow_unused=True)
    leaves = [t.detach().clone().requires_grad_() for t in (c.q, c.k, c.v)]
    bases = torch.autograd.grad(c.ref(*leaves, upcast=False), leaves, dout, allow_unused=True)
    for name, g, r, b, x in zip("qkv", grads, refs, bases, (c.q, c.k, c.v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape and not torch.isnan(g).any()
        r = torch.zeros_like(x, dtype=torch.float64) if r is None else r
        b = torch.zeros_like(x) if b is None else b
        assert_close_to_ref(g, r, b, grad=True, name=f"d{name}")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(mode, layout, dtype):
    check_forward(Case(*LAYOUTS[layout], dtype=dtype, mode=mode))


@pytest.mark.parametrize("d", [32, 80, 128])
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (6, 2), (3, 1)])
def test_forward_head_dims_and_groups(d, heads, heads_kv):
    check_forward(Case([40, 130], [40, 130], heads, heads_kv, d, mode="causal"))


# The forward's decode path: at most 4 queries in every segment (kRowsMaxQ in packed_attention_fwd.cpp; taken when
# max_seqlen_q <= 4, so these cases pass the exact maximum): keys walked in order, per block of kv heads.
DECODE_LAYOUTS = {
    # one query per row of a KV cache, gap segments (keys, no queries) between them, a row past one key tile (512)
    "cache_rows": ([0, 1, 0, 1, 0, 1, 0], [3, 40, 12, 700, 0, 1, 2]),
    # a few queries: causal rows that see no key (lq > lk), a segment with queries and no keys
    "few_rows": ([4, 2, 3, 2], [4, 600, 1, 0]),
}


def decode_case(layout, **kw):
    lens_q, lens_k = DECODE_LAYOUTS[layout]
    c = Case(lens_q, lens_k, **kw)
    c.mq = max(lens_q)
    return c


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", list(DECODE_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_decode_path_matches_reference(mode, layout, dtype):
    check_forward(decode_case(layout, heads=4, heads_kv=2, dtype=dtype, mode=mode))


@pytest.mark.parametrize("d", [32, 80, 128])
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (6, 2), (3, 1), (8, 8)])
def test_forward_decode_path_head_dims_and_groups(d, heads, heads_kv):
    check_forward(decode_case("cache_rows", heads=heads, heads_kv=heads_kv, d=d, mode="causal"))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_forward_decode_path_one_segment_any_threads(threads):
    """Few segments split the kv heads into blocks (two items per thread): every split gives the same answer."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        c = Case([1], [300], heads=12, heads_kv=6, d=64, mode="causal")
        c.mq = 1
        check_forward(c)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("mode", list(MODES))
def test_backward_after_decode_path(mode):
    check_backward(decode_case("few_rows", heads=4, heads_kv=2, mode=mode))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_matches_reference(mode, layout):
    check_backward(Case(*LAYOUTS[layout], mode=mode))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_backward_other_dtypes(dtype, mode):
    check_backward(Case([5, 0, 1, 140], [9, 2, 0, 140], dtype=dtype, mode=mode))


@pytest.mark.parametrize("d", [32, 80, 128])
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (6, 2), (3, 1)])
def test_backward_head_dims_and_groups(d, heads, heads_kv):
    check_backward(Case([1, 130], [9, 130], heads, heads_kv, d, mode="prefix"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_dropout_matches_reference(dtype, mode):
    c = Case([5, 0, 140, 1], [5, 3, 130, 1], dtype=dtype, mode=mode, p=0.3)
    out, lse = check_forward(c)
    # lse is that of the softmax before dropout
    check_lse(
        lse,
        packed_attention_ref(
            c.q, c.k, c.v, c.cq, c.ck, mode=mode, prefix_lens=c.prefix, softmax_scale=c.scale, return_lse=True
        )[1],
    )
    check_backward(c)


@pytest.mark.parametrize("seed,offset", [(0, 0), (-7, 3), (2**63 - 1, 2**32 - 300), (123456789012, 2**40 + 11)])
def test_dropout_mask_is_philox_bit_exact(seed, offset):
    # With q = 0 every visible key gets probability 1 / n_i, and with one-hot value rows (v[j] = e_j) output
    # element (i, h, j) is keep_ij / (1 - p) / n_i: the kernel's keep mask read back exactly. The offsets make
    # counters cross 2^32, so the counter's high word is exercised.
    lens_q, lens_k, heads, p = [3, 17, 0, 9], [3, 20, 2, 9], 2, 0.4
    c = Case(lens_q, lens_k, heads, 1, d=32, dtype=torch.float64, mode="causal", p=p)
    c.seed, c.offset = seed, offset
    c.q.zero_()
    for s in range(len(lens_k)):
        k0 = int(c.ck[s])
        for j in range(lens_k[s]):
            c.v[k0 + j, 0] = torch.nn.functional.one_hot(torch.tensor(j), 32).double()
    out, lse = c.fwd()
    total_q = c.q.shape[0]
    for s in range(len(lens_q)):
        q0, q1, lk = int(c.cq[s]), int(c.cq[s + 1]), lens_k[s]
        if q1 == q0 or lk == 0:
            continue
        rows = torch.arange(q0, q1)[:, None]
        cols = torch.arange(lk)[None, :]
        visible = cols <= (rows - q0) + (lk - (q1 - q0))
        for h in range(heads):
            keep = dropout_keep_mask(seed, offset, h, rows, cols, total_q, c.mk, p)
            got = out[q0:q1, h, :lk] != 0
            assert torch.equal(got, keep & visible), f"segment {s} head {h}"


def test_rows_without_keys():
    # causal with Lq > Lk: the first Lq - Lk queries of a segment see no key; an Lk = 0 segment likewise.
    c = Case([6, 3], [2, 0], 2, 1, 32, mode="causal")
    out, lse = check_forward(c)
    assert torch.isinf(lse[:, [0, 1, 2, 3, 6, 7, 8]]).all() and torch.isfinite(lse[:, [4, 5]]).all()
    dout = torch.randn_like(c.q)
    dq, dk, dv = BWD(dout, c.q, c.k, c.v, out, lse, *c.args())
    assert torch.equal(dq[[0, 1, 2, 3, 6, 7, 8]], torch.zeros_like(dq[[0, 1, 2, 3, 6, 7, 8]]))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_keys_no_query_sees_get_zero_gradients():
    # causal with Lq < Lk sees every key; prefix 0 and Lq > Lk hides none either, so use Lq = 0 segments
    c = Case([0, 4, 0], [5, 4, 3], 2, 2, 32, mode="causal")
    out, lse = c.fwd()
    dq, dk, dv = BWD(torch.randn_like(c.q), c.q, c.k, c.v, out, lse, *c.args())
    assert torch.equal(dk[:5], torch.zeros_like(dk[:5])) and torch.equal(dv[9:], torch.zeros_like(dv[9:]))


def test_non_contiguous_inputs():
    c = Case([70, 9], [70, 9], 4, 2, 32, mode="causal")
    c.q = torch.randn(4, sum([70, 9]), 32).transpose(0, 1)  # (total, heads, d) with strides of (heads, total, d)
    c.k = torch.randn(32, sum([70, 9]), 2).permute(1, 2, 0)
    out, lse = check_forward(c)
    dout = torch.randn_like(c.q)
    grads = BWD(dout, c.q, c.k, c.v, out, lse, *c.args())
    c.q, c.k = c.q.contiguous(), c.k.contiguous()
    out2, lse2 = c.fwd()
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for g, g2 in zip(grads, BWD(dout, c.q, c.k, c.v, out2, lse2, *c.args()), strict=True):
        assert torch.equal(g, g2)


def test_results_do_not_depend_on_thread_count():
    # each work item is computed by one thread in a fixed order, so results are bitwise reproducible
    c = Case([3, 600, 1, 40], [3, 600, 5, 40], 4, 2, 64, mode="prefix", p=0.1)
    dout = torch.randn_like(c.q)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = c.fwd()
            results.append((out, lse, *BWD(dout, c.q, c.k, c.v, out, lse, *c.args())))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_input_errors():
    c = Case([4, 2], [4, 2], 4, 2, 16)
    q, k, v = c.q, c.k, c.v
    a = list(c.args())

    def fwd(q=q, k=k, v=v, **over):
        args = list(a)
        for i, name in enumerate(["cq", "ck", "mq", "mk", "mode", "prefix", "scale", "p", "seed", "offset"]):
            args[i] = over.get(name, args[i])
        return FWD(q, k, v, *args)

    with pytest.raises(ValueError, match="shapes"):
        fwd(q=q[0])
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        fwd(k=torch.randn(6, 3, 16), v=torch.randn(6, 3, 16))
    with pytest.raises(ValueError, match="same shape"):
        fwd(v=torch.randn(6, 2, 8))
    with pytest.raises(TypeError, match="same dtype"):
        fwd(k=k.double())
    with pytest.raises(TypeError, match="float32, float64"):
        fwd(q=q.int(), k=k.int(), v=v.int())
    with pytest.raises(TypeError, match="int32"):
        fwd(cq=c.cq.long())
    with pytest.raises(ValueError, match="end at 6"):
        fwd(cq=torch.tensor([0, 4, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="segment lengths <= 3"):
        fwd(mq=3)
    with pytest.raises(ValueError, match="mode"):
        fwd(mode=3)
    with pytest.raises(ValueError, match="prefix_lens"):
        fwd(mode=2)
    with pytest.raises(ValueError, match="dropout_p"):
        fwd(p=1.0)
    out, lse = c.fwd()
    with pytest.raises(ValueError, match="lse must have shape"):
        BWD(out, q, k, v, out, lse.T.contiguous(), *a)
    with pytest.raises(TypeError, match="lse must be float32"):
        BWD(out, q, k, v, out, lse.double(), *a)
