"""decode_logits against the float64 reference: batch x width x row ranges x bias, layouts, dtypes, errors,
gradients refused by the C++ kernel, custom-op checks."""

import pytest
import torch

from mmcore.ops import BackendError, available_backends, decode_logits, decode_logits_ref
from mmcore.testing import assert_close_to_ref, cpu_has_flag, error_report, run_in_subprocess

CPU = [b for b in available_backends("decode_logits", "cpu") if b != "triton"]
HAS_CPP = "cpp" in CPU
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="mmcore._C has no decode_logits kernel")

V = 37  # small and odd: every register tile size and the single-row remainder occur
RANGES = {"full": None, "interior": (5, 30), "empty": (11, 11)}


def problem(b, d, v=V, dtype=torch.float32, bias=True):
    """Logits of order 1: inputs scaled by d ** -0.25 each."""
    hidden = (torch.randn(b, d, dtype=torch.float64) / max(d, 1) ** 0.25).to(dtype)
    weight = (torch.randn(v, d, dtype=torch.float64) / max(d, 1) ** 0.25).to(dtype)
    return hidden, weight, torch.randn(v, dtype=torch.float64).to(dtype) if bias else None


def check(out, hidden, weight, b, rows, name="logits"):
    ref = decode_logits_ref(hidden, weight, b, rows=rows)
    base = decode_logits_ref(hidden, weight, b, rows=rows, upcast=False)
    assert out.dtype == base.dtype
    assert_close_to_ref(out, ref, base, name=name)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("rows", list(RANGES.values()), ids=list(RANGES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("d", [8, 64, 100, 512])
@pytest.mark.parametrize("b", [1, 3, 8, 17])
def test_matches_reference(backend, rows, bias, d, b):
    hidden, weight, bias_t = problem(b, d, bias=bias)
    out = decode_logits(hidden, weight, bias_t, rows=rows, backend=backend)
    start, end = rows or (0, V)
    assert out.shape == (b, end - start)
    check(out, hidden, weight, bias_t, rows)


@pytest.mark.parametrize("backend", CPU)
def test_float64_is_exact_path(backend):
    hidden, weight, bias = problem(5, 100, dtype=torch.float64)
    out = decode_logits(hidden, weight, bias, rows=(3, 31), backend=backend)
    assert out.dtype == torch.float64
    check(out, hidden, weight, bias, (3, 31))


@pytest.mark.parametrize("backend", CPU)
def test_many_rows_on_two_threads(backend):
    """Enough rows for at::parallel_for to split them; the result does not depend on the thread count."""
    hidden, weight, bias = problem(8, 64, v=1037)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = decode_logits(hidden, weight, bias, rows=(13, 1030), backend=backend)
        torch.set_num_threads(1)
        one = decode_logits(hidden, weight, bias, rows=(13, 1030), backend=backend)
    finally:
        torch.set_num_threads(before)
    check(two, hidden, weight, bias, (13, 1030))
    assert torch.equal(one, two)


@needs_cpp
def test_relative_difference_from_linear_at_kosmos2_width():
    """At Kosmos-2's width (D = 2048) the C++ kernel is as close to the float64 product as F.linear is.
    Measured in float64, relative to the largest |logit| (seed 1234; seeds 1-3 alike): C++ kernel 2.8e-7,
    F.linear 2.6e-7, C++ kernel vs F.linear 3.4e-7 (at most 3.8e-7): two to three float32 ulps."""
    hidden, weight, _ = problem(8, 2048, v=4099, bias=False)
    ref = decode_logits_ref(hidden, weight)
    scale = float(ref.abs().max())
    cpp = decode_logits(hidden, weight, backend="cpp")
    linear = torch.nn.functional.linear(hidden, weight)
    cpp_err, linear_err = error_report(cpp, ref)[0] / scale, error_report(linear, ref)[0] / scale
    assert cpp_err <= 2 * linear_err, (cpp_err, linear_err)
    assert error_report(cpp, linear)[0] / scale < 6e-7


@pytest.mark.parametrize("backend", CPU)
def test_non_contiguous_inputs(backend):
    d = 100
    hidden = (torch.randn(d, 6) / d**0.25).t()  # (6, d), column-major
    wide = torch.randn(V, d + 7) / d**0.25
    bias = torch.randn(2 * V)[::2]
    weight = wide[:, 3 : 3 + d]  # rows of stride d + 7: read in place by the C++ kernel
    check(decode_logits(hidden, weight, bias, rows=(2, 35), backend=backend), hidden, weight, bias, (2, 35))
    weight_t = torch.randn(d, V).t()  # column-major: the C++ kernel copies the selected rows
    for rows in (None, (4, 30)):
        out = decode_logits(hidden, weight_t, bias, rows=rows, backend=backend)
        check(out, hidden, weight_t, bias, rows, name="column-major weight")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("shape", [(0, 16), (3, 0)], ids=["no-rows", "zero-width"])
def test_degenerate_shapes(backend, shape):
    hidden, weight, bias = problem(*shape)
    out = decode_logits(hidden, weight, bias, backend=backend)
    assert out.shape == (shape[0], V)
    check(out, hidden, weight, bias, None)


def test_float16_inputs_go_to_torch_in_float32():
    hidden, weight, bias = problem(3, 64, dtype=torch.float16)
    out = decode_logits(hidden, weight, bias, rows=(1, 20))
    assert out.dtype == torch.float32
    assert torch.equal(out, decode_logits_ref(hidden, weight, bias, rows=(1, 20), upcast=False))
    if HAS_CPP:
        with pytest.raises(BackendError, match="does not take torch.float16"):
            decode_logits(hidden, weight, bias, backend="cpp")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("rows", list(RANGES.values()), ids=list(RANGES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("d", [8, 31, 64, 100, 512])
@pytest.mark.parametrize("b", [1, 3, 8, 17])
def test_bfloat16_inputs_give_float32(backend, rows, bias, d, b):
    """bfloat16 hidden states and weights (the screening head): float32 sums, on the C++ kernel AVX512-BF16 dot
    products where the CPU has them (d = 31, 100: the masked tail of 32-pair steps)."""
    hidden, weight, bias_t = problem(b, d, dtype=torch.bfloat16, bias=bias)
    out = decode_logits(hidden, weight, bias_t, rows=rows, backend=backend)
    assert out.dtype == torch.float32
    check(out, hidden, weight, bias_t, rows)


@needs_cpp
def test_bfloat16_widening_path_matches():
    """MMCORE_DISABLE_AVX512BF16=1: the path of CPUs without AVX512-BF16 (both operands widened to float32) gives
    the reference too, and agrees with the dot-product path to float32 rounding."""
    torch.manual_seed(3)
    hidden, weight, bias = problem(5, 100, v=301, dtype=torch.bfloat16)
    widened = run_in_subprocess(
        "from mmcore.ops import decode_logits\nresult = decode_logits(hidden, weight, bias, backend='cpp')",
        dict(hidden=hidden, weight=weight, bias=bias),
        {"MMCORE_DISABLE_AVX512BF16": "1"},
    )
    check(widened, hidden, weight, bias, None)
    direct = decode_logits(hidden, weight, bias, backend="cpp")
    if cpu_has_flag("avx512_bf16"):  # then the direct call took the dot products
        assert not torch.equal(widened, direct), "the variable selected the other path (another summation order)"
    assert (widened - direct).abs().max() <= 1e-5 * decode_logits_ref(hidden.abs(), weight.abs()).max()


@needs_cpp
def test_gradients_go_to_torch_and_cpp_refuses_them():
    hidden, weight, bias = problem(2, 16)
    weight.requires_grad_()
    out = decode_logits(hidden, weight, bias)  # default dispatch: the differentiable torch backend
    (g,) = torch.autograd.grad(out.sum(), weight)
    assert torch.allclose(g, hidden.sum(0).expand_as(weight))
    with pytest.raises(BackendError, match="inference-only"):
        decode_logits(hidden, weight, bias, backend="cpp")
    with torch.no_grad():
        assert not decode_logits(hidden, weight, bias, backend="cpp").requires_grad
    raw = torch.ops.mmcore.decode_logits.default(hidden, weight, bias, 0, V)
    with pytest.raises(RuntimeError, match="inference-only and has no backward"):
        raw.sum().backward()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hidden=torch.randn(2, 8, 1)), ValueError, r"hidden must be a 2-D tensor, got \(2, 8, 1\)"),
        (dict(weight=[[1.0]]), ValueError, "weight must be a 2-D tensor, got list"),
        (dict(hidden=torch.randn(2, 7)), ValueError, "must share D"),
        (dict(hidden=torch.ones(2, 8, dtype=torch.int64)), TypeError, "hidden must be float16, bfloat16"),
        (dict(hidden=torch.randn(2, 8, dtype=torch.float64)), TypeError, "hidden and weight must share a dtype"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(37,\), got \(5,\)"),
        (dict(bias=torch.randn(V, dtype=torch.float64)), TypeError, "bias must share weight's dtype"),
        (dict(weight=torch.randn(V, 8).bfloat16()), TypeError, "hidden and weight must share a dtype"),
        (dict(bias=torch.randn(V, device="meta")), ValueError, "must be on one device"),
        (dict(rows=(5, 2)), ValueError, r"rows must be None or \(start, end\) ints with 0 <= start <= end <= 37"),
        (dict(rows=(0, 38)), ValueError, "rows must be None"),
        (dict(rows=(-1, 3)), ValueError, "rows must be None"),
        (dict(rows=(0.0, 3)), ValueError, "rows must be None"),
        (dict(rows=slice(0, 3)), ValueError, "rows must be None"),
        (dict(backend="gpu"), ValueError, "is not a backend"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(hidden=torch.randn(2, 8), weight=torch.randn(V, 8), bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        decode_logits(args.pop("hidden"), args.pop("weight"), args.pop("bias"), **args)


@needs_cpp
def test_cpp_entry_point_checks_its_inputs():
    op = torch.ops.mmcore.decode_logits.default
    hidden, weight, bias = problem(2, 8)
    with pytest.raises(ValueError, match=r"rows \[4, 40\) must satisfy"):
        op(hidden, weight, bias, 4, 40)
    with pytest.raises(TypeError, match="must be float32, float64 or bfloat16"):
        op(hidden.half(), weight.half(), None, 0, V)
    with pytest.raises(TypeError, match="weight must share hidden's dtype"):
        op(hidden, weight.bfloat16(), None, 0, V)
    with pytest.raises(ValueError, match=r"bias must have shape \(37,\)"):
        op(hidden, weight, bias[:3], 0, V)


@needs_cpp
def test_opcheck_and_compile():
    op = torch.ops.mmcore.decode_logits.default
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        hidden, weight, bias = problem(3, 20, dtype=dtype)
        torch.library.opcheck(op, (hidden, weight, bias, 0, V))
        torch.library.opcheck(op, (hidden, weight, None, 4, 9))
        torch.library.opcheck(op, (hidden, weight, None, 7, 7))

    hidden, weight, bias = problem(3, 20)
    with torch.no_grad():
        compiled = torch.compile(lambda h: decode_logits(h, weight, bias, rows=(2, 30)), fullgraph=True)
        assert torch.equal(compiled(hidden), decode_logits(hidden, weight, bias, rows=(2, 30)))


@pytest.mark.parametrize("shape", [(1, 40), (3, 5, 40), (16, 40), (17, 40)])
def test_linear_matches_f_linear(shape):
    """ops.linear: the kernel for few-row inference, F.linear otherwise; same values either way (to float32 ulps)."""
    import torch.nn.functional as F

    from mmcore.ops import linear

    torch.manual_seed(0)
    x, w, b = torch.randn(shape), torch.randn(24, 40), torch.randn(24)
    with torch.no_grad():
        got = linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    w.requires_grad_(True)
    out = linear(x, w, b)  # differentiable: F.linear, gradients flow
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.reshape(-1, 40).sum(0).expand(24, 40))
