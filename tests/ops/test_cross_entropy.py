"""fused_linear_cross_entropy against the float64 reference: loss, gradients, stats, memory, custom-op checks."""

import subprocess
import sys
import textwrap

import pytest
import torch

from mmcore.ops import available_backends, fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from mmcore.ops.cross_entropy import default_chunk_rows
from mmcore.testing import assert_close_to_ref

CPU = [b for b in available_backends("fused_linear_cross_entropy", "cpu") if b != "triton"]
INTERPRETED = "triton" in available_backends("fused_linear_cross_entropy", "cpu")
HAS_CPP = "cpp" in CPU


def problem(n, h, v, dtype=torch.float32, bias=True, ignore_every=5):
    hidden = (torch.randn(n, h) / h**0.25).to(dtype).requires_grad_()
    weight = (torch.randn(v, h) / h**0.25).to(dtype).requires_grad_()
    b = torch.randn(v).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,))
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def grads(loss, params, seed=0):
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype)
    return torch.autograd.grad(loss, [p for p in params if p is not None], g)


def check_against_reference(backend, n, h, v, reduction, eps, bias, dtype=torch.float32, chunk_rows=None):
    hidden, weight, b, labels = problem(n, h, v, dtype, bias)
    params = (hidden, weight, b)
    loss = fused_linear_cross_entropy(
        hidden, weight, labels, bias=b, reduction=reduction, label_smoothing=eps, backend=backend, chunk_rows=chunk_rows
    )
    ref = fused_linear_cross_entropy_ref(hidden, weight, labels, bias=b, reduction=reduction, label_smoothing=eps)
    # PyTorch in the inputs' dtype is the baseline; the fused loss is float32 (float64 for float64 inputs)
    base = fused_linear_cross_entropy_ref(
        hidden, weight, labels, bias=b, reduction=reduction, label_smoothing=eps, upcast=False
    )
    assert loss.shape == ref.shape
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_ref(loss, ref, base.to(loss.dtype), name="loss")
    for name, g, r, bg in zip("hwb", grads(loss, params), grads(ref, params), grads(base, params), strict=False):
        assert g.dtype == dtype
        assert_close_to_ref(g, r, bg, grad=True, name=f"d{name}")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("bias", [True, False])
def test_unit_upstream_gradient_and_repeated_backward(backend, bias):
    """loss.backward() (upstream gradient exactly 1: the saved gradients are returned unscaled) gives the reference
    gradients; a second backward through the retained graph gives them again, even after .grad was zeroed in place
    (the returned gradient is not kept aliased by .grad)."""
    hidden, weight, b, labels = problem(40, 32, 1037, torch.float32, bias)
    params = [t for t in (hidden, weight, b) if t is not None]
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend=backend, chunk_rows=16)
    ref = fused_linear_cross_entropy_ref(hidden, weight, labels, bias=b)
    want = torch.autograd.grad(ref, params)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    for p in params:  # were .grad the saved gradient itself, this would zero what the next backward returns
        p.grad.zero_()
    loss.backward()
    for name, w, f, p in zip("hwb", want, first, params, strict=False):
        torch.testing.assert_close(f, w.to(f.dtype), rtol=1e-4, atol=1e-6, msg=f"d{name}")
        torch.testing.assert_close(p.grad, f, rtol=0, atol=0, msg=f"d{name} again")
    (half,) = torch.autograd.grad(
        fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend=backend, chunk_rows=16) * 0.5, [weight]
    )
    torch.testing.assert_close(half, first[1] * 0.5, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("v", [1037, 4099])
def test_matches_reference(backend, reduction, eps, bias, v):
    check_against_reference(backend, 40, 32, v, reduction, eps, bias, chunk_rows=16)


@pytest.mark.parametrize("backend", CPU)
def test_kosmos2_vocabulary(backend):
    check_against_reference(backend, 12, 16, 65037, "mean", 0.1, True)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_dtypes(backend, dtype):
    check_against_reference(backend, 24, 32, 1037, "mean", 0.0, True, dtype=dtype)


@pytest.mark.skipif(not INTERPRETED, reason="Triton not installed")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_interpreted(reduction):
    check_against_reference("triton", 10, 32, 1037, reduction, 0.1, True, chunk_rows=4)


@pytest.mark.parametrize("backend", CPU)
def test_all_rows_ignored(backend):
    hidden, weight, b, labels = problem(6, 8, 50)
    labels[:] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, backend=backend)
    assert torch.isnan(loss)  # 0 / 0, as F.cross_entropy
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, (hidden, weight, b)))
    total = fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction="sum", backend=backend)
    assert float(total) == 0.0


@pytest.mark.parametrize("backend", CPU)
def test_stats_split_location_and_text_targets(backend):
    hidden, weight, b, labels = problem(64, 16, 300, ignore_every=9)
    labels[1::3] = torch.randint(200, 300, labels[1::3].shape)  # some location targets
    loss, stats = fused_linear_cross_entropy(
        hidden, weight, labels, bias=b, backend=backend, return_stats=True, loc_range=(200, 300)
    )
    logits = hidden.double() @ weight.double().t() + b.double()
    rows = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    valid = labels != -100
    loc = valid & (labels >= 200)
    text = valid & ~loc
    correct = logits.argmax(-1) == labels
    assert torch.allclose(stats["loss"].double(), rows[valid].mean(), atol=1e-5)
    assert torch.allclose(stats["loc_loss"].double(), rows[loc].mean(), atol=1e-5)
    assert torch.allclose(stats["text_loss"].double(), rows[text].mean(), atol=1e-5)
    assert float(stats["loc_accuracy"]) == pytest.approx(float(correct[loc].double().mean()))
    assert float(stats["text_accuracy"]) == pytest.approx(float(correct[text].double().mean()))
    assert int(stats["loc_tokens"]) == int(loc.sum()) and int(stats["tokens"]) == int(valid.sum())
    assert not any(v.requires_grad for v in stats.values())


@pytest.mark.skipif(not HAS_CPP, reason="mmcore._C has no fused cross-entropy kernel")
def test_peak_memory_far_below_materialised_logits(tmp_path):
    # A fresh process, so ru_maxrss measures this op alone: 2048 x 65037 float32 logits are 533 MB.
    code = textwrap.dedent("""
        import resource, torch, mmcore
        from mmcore.ops import fused_linear_cross_entropy
        torch.manual_seed(0)
        n, h, v = 2048, 64, 65037
        hidden = torch.randn(n, h, requires_grad=True)
        weight = torch.randn(v, h, requires_grad=True)
        labels = torch.randint(0, v, (n,))
        w_grad = torch.zeros_like(weight)  # the weight gradient exists in any trainer; allocate it up front
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = fused_linear_cross_entropy(hidden, weight, labels, backend="cpp")
        loss.backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    extra = int(out.stdout.strip().splitlines()[-1])
    logits_bytes = 2048 * 65037 * 4
    weight_bytes = 65037 * 64 * 4
    # What remains besides one chunk of logits is gradient-sized: dweight (float32) and its autograd copy.
    assert extra < logits_bytes / 4, f"extra peak {extra / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"
    assert extra < 4 * weight_bytes + logits_bytes / 16


def test_default_chunk_rows():
    assert default_chunk_rows(16384, 2048, 65037) == 512
    assert default_chunk_rows(1, 8, 65037) == 1
    assert default_chunk_rows(2048, 64, 65037) == 256  # narrow hidden: the floor, 1/8 of the rows
    assert default_chunk_rows(10**7, 64, 65037) == (256 << 20) // (4 * 65037)
    assert default_chunk_rows(330, 256, 30522) == 330  # 40 MB of logits: one chunk (SMALL_LOGITS_BYTES)
    assert default_chunk_rows(600, 256, 65037) == 200  # 257 rows' worth of 64 MB, split into 3 equal chunks
    assert default_chunk_rows(100, 8, 10**7) == 6  # the 256 MB cap wins over the floor


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(labels=torch.tensor([0, 1, 2, 1037])), ValueError, r"labels\[3\] = 1037 is outside the vocabulary"),
        (dict(labels=torch.tensor([0, 1, -1, 3])), ValueError, r"labels\[2\] = -1"),
        (dict(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must have shape \(4,\)"),
        (dict(labels=torch.tensor([0.0, 1, 2, 3])), TypeError, "labels must be int64"),
        (dict(hidden=torch.randn(4, 7)), ValueError, "must share H"),
        (dict(hidden=torch.randn(4, 8, dtype=torch.float64)), TypeError, "share a dtype"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(1037,\)"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be a positive int"),
        (dict(loc_range=(5, 2)), ValueError, "loc_range"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(1037, 8), labels=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.skipif(not HAS_CPP, reason="mmcore._C has no fused cross-entropy kernel")
def test_backward_after_no_grad_call_explains():
    hidden, weight, b, labels = problem(4, 8, 20)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b)
    assert not loss.requires_grad


@pytest.mark.skipif(not HAS_CPP, reason="mmcore._C has no fused cross-entropy kernel")
def test_opcheck_and_compile():
    hidden, weight, b, labels = problem(9, 8, 37)
    fwd = torch.ops.mmcore.fused_linear_cross_entropy_fwd.default
    for reduction in (0, 1, 2):
        torch.library.opcheck(fwd, (hidden, weight, b, labels, -100, 0.1, reduction, True, 4))
    lse = torch.logsumexp(hidden.detach() @ weight.detach().t() + b.detach(), -1)
    torch.library.opcheck(
        torch.ops.mmcore.fused_linear_cross_entropy_bwd.default,
        (torch.randn(9), hidden, weight, b, labels, lse, -100, 0.1, 4),
    )

    head = torch.nn.Linear(8, 37)

    def step(x, y):
        return fused_linear_cross_entropy(x, head.weight, y, bias=head.bias, label_smoothing=0.1)

    x = torch.randn(9, 8)
    eager = torch.autograd.grad(step(x, labels), head.weight)[0]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, labels), head.weight)[0]
    assert torch.allclose(got, eager, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_autocast_runs_in_float32(reduction):
    """Under CPU autocast (bfloat16) the op computes in float32: same loss and gradients as without autocast."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    results = []
    for autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
        loss.sum().backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    assert results[0][0].dtype == torch.float32
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_cpu_autocast_mixed_dtypes():
    """bfloat16 activations with float32 weights under autocast meet in float32 (a clear error without autocast)."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 16).bfloat16().requires_grad_(True)
    weight = torch.randn(30, 16, requires_grad=True)
    labels = torch.randint(0, 30, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(hidden.detach().float() @ weight.detach().t(), labels)
    torch.testing.assert_close(loss.detach(), ref)
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_cross_entropy(hidden, weight, labels)


SM90_COMPILE = r"""
import mmcore.kernels.cross_entropy as ce
from mmcore.testing import compile_for_sm90

fn = ce._ce_rows_kernel
sig = dict(logits_ptr="*bf16", stride_logits_row="i32", labels_ptr="*i64", weight_ptr="*fp32", loss_ptr="*fp32",
           lse_ptr="*fp32", argmax_ptr="*i64", n_vocab="i32", ignore_index="i32", eps="fp32")
for grad in (False, True):
    compile_for_sm90(fn, sig, dict(COMPUTE_GRAD=grad, BLOCK_V=ce.BLOCK_V), num_warps=8)
"""


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED or torch.cuda.is_available(), reason="Triton absent, or the gpu tests run it")
def test_triton_kernel_compiles_for_sm90():
    """The row kernel compiles for sm90 on this GPU-less machine (what the interpreter accepts and the GPU compiler
    rejects: module globals that are not tl.constexpr, types)."""
    from mmcore.testing import assert_runs_without_triton_interpreter

    pytest.importorskip("triton.backends.nvidia")
    assert_runs_without_triton_interpreter(SM90_COMPILE)
