"""The box <-> location-index codec: parity with transformers and the original code, every backend, errors."""

import math
import re

import numpy as np
import pytest
import torch
from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index, patch_index_to_coordinate

from mmcore.grounding import boxes_to_loc_indices, loc_indices_to_boxes
from mmcore.ops import BackendError, available_backends
from mmcore.ops._library import op
from mmcore.testing import opcheck_triton_op

BACKENDS = [b for b in ("cpp", "torch", "triton") if b in available_backends("boxes_to_loc_indices", "cpu")]


def unilm_encode(box, p):
    """The original training code's formula (unilm/data/vl/obj_utils.py::get_box_coords_index), numpy float64."""
    c = np.array([*box], dtype=np.float64)
    cell = 1.0 / p
    ux, uy = int(np.floor(max(c[0], 0) / cell)), int(np.floor(max(c[1], 0) / cell))
    lx, ly = int(np.floor(min(c[2], 0.99999) / cell)), int(np.floor(min(c[3], 0.99999) / cell))
    return ux + uy * p, lx + ly * p


def random_boxes(n, num_bins, gen):
    """Random valid boxes, a third of them with every coordinate on an exact cell edge (where the two
    roundings differ) and some touching 0 and 1."""
    a, b = torch.rand(n, 2, generator=gen, dtype=torch.float64), torch.rand(n, 2, generator=gen, dtype=torch.float64)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    grid = torch.randint(0, num_bins + 1, (n, 4), generator=gen).double() / num_bins
    glo, ghi = torch.minimum(grid[:, :2], grid[:, 2:]), torch.maximum(grid[:, :2], grid[:, 2:])
    on_edge = torch.rand(n, generator=gen) < 1 / 3
    lo = torch.where(on_edge[:, None], glo, lo)
    hi = torch.where(on_edge[:, None], ghi, hi)
    hi = torch.where(hi <= lo, torch.clamp(lo + 1 / (2 * num_bins), max=1.0), hi)
    lo = torch.where(hi <= lo, lo - 1 / (2 * num_bins), lo)
    boxes = torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], 1)
    boxes[:8] = torch.tensor(
        [
            [0, 0, 1, 1],
            [0.25, 0.25, 0.5, 0.5],
            [0, 0, 1 / num_bins, 1 / num_bins],
            [1 - 1e-9, 1 - 1e-9, 1, 1],
            [0.1, 0.2, 0.3, 0.4],
            [0, 0.5, 1, 0.5 + 1e-12],
            [0.5 - 1e-16, 0.5 - 1e-16, 0.5, 0.5],
            [0.39, 0.05, 0.98, 0.83],
        ],
        dtype=torch.float64,
    )
    assert bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all())
    return boxes


def float32_boxes(n, gen):
    boxes = random_boxes(n, 32, gen).float()
    return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]  # float32 can collapse tiny boxes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_bins", [32, 7, 100])
def test_encode_matches_transformers_and_unilm(backend, num_bins):
    gen = torch.Generator().manual_seed(num_bins)
    n = 12_000 if backend != "triton" else 2_000
    boxes = random_boxes(n, num_bins, gen)
    hf = torch.tensor([coordinate_to_patch_index(tuple(b), num_bins) for b in boxes.tolist()])
    unilm = torch.tensor([unilm_encode(b, num_bins) for b in boxes.tolist()])
    got_hf = boxes_to_loc_indices(boxes, num_bins, "hf", backend=backend)
    got_unilm = boxes_to_loc_indices(boxes, num_bins, "unilm", backend=backend)
    assert got_hf.dtype == torch.int64 and got_hf.shape == (n, 2)
    mism = (got_hf != hf).any(1).nonzero().flatten()
    assert mism.numel() == 0, f"hf mismatch at {mism[:5].tolist()}: {boxes[mism[:5]].tolist()}"
    mism = (got_unilm != unilm).any(1).nonzero().flatten()
    assert mism.numel() == 0, f"unilm mismatch at {mism[:5].tolist()}: {boxes[mism[:5]].tolist()}"
    # The two roundings differ only where x2 * P or y2 * P is an integer.
    differs = (got_hf != got_unilm).any(1)
    x2p, y2p = boxes[:, 2] * num_bins, boxes[:, 3] * num_bins
    on_edge = (x2p == x2p.floor()) | (y2p == y2p.floor())
    assert not bool((differs & ~on_edge).any())
    assert bool(differs.any())


def test_float32_boxes_are_encoded_as_their_exact_values():
    boxes = float32_boxes(2000, torch.Generator().manual_seed(0))
    expected = [coordinate_to_patch_index(tuple(b), 32) for b in boxes.double().tolist()]
    assert boxes_to_loc_indices(boxes).tolist() == [list(e) for e in expected]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_bins", [32, 7, 1])
def test_decode_matches_transformers_on_every_pair(backend, num_bins):
    cells = num_bins * num_bins
    if num_bins == 32:
        gen = torch.Generator().manual_seed(1)
        pairs = torch.randint(0, cells, (20_000 if backend != "triton" else 3_000, 2), generator=gen)
        pairs[:4] = torch.tensor([[44, 863], [0, 1023], [5, 5], [3, 35]])
    else:
        pairs = torch.cartesian_prod(torch.arange(cells), torch.arange(cells))
    got = loc_indices_to_boxes(pairs, num_bins, backend=backend)
    expected = torch.tensor(
        [patch_index_to_coordinate(ul, lr, num_bins) for ul, lr in pairs.tolist()], dtype=torch.float64
    )
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)  # bit-identical, not merely close


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shapes_round_trip(backend):
    boxes = random_boxes(24, 32, torch.Generator().manual_seed(2)).reshape(2, 3, 4, 4)
    idx = boxes_to_loc_indices(boxes, backend=backend)
    assert idx.shape == (2, 3, 4, 2)
    assert torch.equal(idx.reshape(-1, 2), boxes_to_loc_indices(boxes.reshape(-1, 4), backend=backend))
    assert loc_indices_to_boxes(idx, backend=backend).shape == (2, 3, 4, 4)
    empty = boxes_to_loc_indices(torch.empty(0, 4), backend=backend)
    assert empty.shape == (0, 2)
    assert loc_indices_to_boxes(torch.empty(0, 2, dtype=torch.long), backend=backend).shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vanishing_bottom_right_is_clamped_to_the_first_cell(backend):
    # transformers computes ceil(1e-300 * 32 - 1) = -1 here, a negative cell; mmcore's one documented departure.
    boxes = torch.tensor([[0.0, 0.0, 1e-300, 0.5], [0.0, 0.0, 1.0, 1e-300]], dtype=torch.float64)
    assert coordinate_to_patch_index(tuple(boxes[1].tolist()), 32)[1] == -1
    assert boxes_to_loc_indices(boxes, backend=backend).tolist() == [[0, 15 * 32], [0, 31]]


def test_worked_examples():
    assert boxes_to_loc_indices([0.25, 0.25, 0.5, 0.5]).tolist() == [264, 495]
    assert boxes_to_loc_indices([0.25, 0.25, 0.5, 0.5], rounding="unilm").tolist() == [264, 528]
    assert loc_indices_to_boxes([44, 863]).tolist() == [0.390625, 0.046875, 0.984375, 0.828125]
    assert loc_indices_to_boxes([0, 1023]).tolist() == [0.015625, 0.015625, 0.984375, 0.984375]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("box", "why"),
    [
        ((0.1, 0.1, 1.2, 0.5), "outside [0, 1]"),
        ((-0.1, 0.1, 0.2, 0.5), "outside [0, 1]"),
        ((0.5, 0.1, 0.4, 0.5), "x2 > x1"),
        ((0.1, 0.5, 0.4, 0.5), "x2 > x1 and y2 > y1"),
        ((0.1, math.nan, 0.4, 0.5), "not finite"),
        ((0.1, 0.2, math.inf, 0.5), "not finite"),
    ],
)
def test_invalid_boxes_name_the_box(backend, box, why):
    boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2]] * 3, [[0.1, 0.1, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2], box]])
    with pytest.raises(ValueError, match=r"boxes\[1, 2\] = .*" + re.escape(why)):
        boxes_to_loc_indices(boxes, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_indices_name_the_pair(backend):
    with pytest.raises(ValueError, match=r"indices\[2\] = \(5, 1024\) .*outside the 32x32 grid"):
        loc_indices_to_boxes([[0, 1], [2, 3], [5, 1024]], backend=backend)
    with pytest.raises(ValueError, match=r"indices\[0\] = \(-1, 3\)"):
        loc_indices_to_boxes([[-1, 3]], backend=backend)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: boxes_to_loc_indices(torch.rand(3, 3)), ValueError, r"shape \(\.\.\., 4\), got \(3, 3\)"),
        (lambda: boxes_to_loc_indices(torch.tensor(0.5)), ValueError, r"shape \(\.\.\., 4\)"),
        (lambda: boxes_to_loc_indices(torch.ones(2, 4, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: boxes_to_loc_indices([[0, 0, 1, 1]], num_bins=0), ValueError, "num_bins"),
        (
            lambda: loc_indices_to_boxes([[0, 1]], num_bins=2**33),
            ValueError,
            r"num_bins must be an int in \[1, 1048576\]",
        ),
        (lambda: boxes_to_loc_indices([[0, 0, 1, 1]], rounding="round"), ValueError, "rounding"),
        (lambda: loc_indices_to_boxes(torch.rand(2, 2)), TypeError, "integer"),
        (lambda: loc_indices_to_boxes(torch.ones(2, 3, dtype=torch.long)), ValueError, r"shape \(\.\.\., 2\)"),
        (lambda: boxes_to_loc_indices([[0, 0, 1, 1]], backend="fast"), ValueError, "not a backend"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mmcore._C not built")
def test_cpp_kernel_checks_its_own_inputs():
    with pytest.raises(ValueError, match=r"boxes = \(0, 0, 0.5, 1.0000001\d*\) lies outside"):
        op("boxes_to_loc_indices")(torch.tensor([0, 0, 0.5, 1.0000001], dtype=torch.float64), 32, "hf")
    with pytest.raises(ValueError, match=r"num_bins must be in \[1, 1048576\]"):
        op("loc_indices_to_boxes")(torch.tensor([[0, 1]]), 2**33)


def test_half_precision_boxes_are_accepted():
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.75]], dtype=torch.float16)
    assert boxes_to_loc_indices(boxes).tolist() == [list(coordinate_to_patch_index((0.25, 0.25, 0.5, 0.75), 32))]


def test_forced_cuda_backend_explains_why_not():
    with pytest.raises(BackendError, match="no 'cuda' backend"):
        boxes_to_loc_indices([[0, 0, 1, 1]], backend="cuda")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mmcore._C not built")
def test_opcheck_cpp_ops():
    boxes = random_boxes(16, 32, torch.Generator().manual_seed(3)).reshape(4, 4, 4)
    torch.library.opcheck(op("boxes_to_loc_indices"), (boxes, 32, "hf"))
    torch.library.opcheck(op("boxes_to_loc_indices"), (float32_boxes(16, torch.Generator()), 7, "unilm"))
    idx = torch.randint(0, 1024, (5, 3, 2))
    torch.library.opcheck(op("loc_indices_to_boxes"), (idx, 32))


def _triton_opcheck(device):
    boxes = random_boxes(16, 32, torch.Generator().manual_seed(4)).to(device)
    opcheck_triton_op(torch.ops.mmcore.boxes_to_loc_indices_triton.default, (boxes, 32, "hf"))
    idx = torch.randint(0, 1024, (9, 2)).to(device)
    opcheck_triton_op(torch.ops.mmcore.loc_indices_to_boxes_triton.default, (idx, 32))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not installed")
def test_opcheck_triton_ops_interpreted():
    _triton_opcheck("cpu")


@pytest.mark.gpu
def test_opcheck_triton_ops_cuda():
    _triton_opcheck("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rounding", ["hf", "unilm"])
def test_triton_cuda_matches_cpu(rounding):
    boxes = random_boxes(50_000, 32, torch.Generator().manual_seed(6))
    expected = boxes_to_loc_indices(boxes, rounding=rounding, backend="torch")
    got = boxes_to_loc_indices(boxes.cuda(), rounding=rounding)
    assert torch.equal(got.cpu(), expected)
    assert torch.equal(loc_indices_to_boxes(got).cpu(), loc_indices_to_boxes(expected, backend="torch"))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="mmcore._C not built")
def test_compiles_without_graph_breaks():
    def f(boxes):
        idx = boxes_to_loc_indices(boxes, 32)
        return loc_indices_to_boxes(idx, 32) * 2

    boxes = float32_boxes(64, torch.Generator().manual_seed(5))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(boxes), f(boxes))


SM90_COMPILE = r"""
import mmcore.kernels.grounding as kg
from mmcore.testing import compile_for_sm90

for unilm in (False, True):
    compile_for_sm90(kg._boxes_to_loc_indices_kernel, dict(boxes_ptr="*fp64", out_ptr="*i64", n="i32", num_bins="i32"),
                     dict(UNILM=unilm, BLOCK=kg.BLOCK), enable_fp_fusion=False)
k = compile_for_sm90(kg._loc_indices_to_boxes_kernel, dict(idx_ptr="*i64", out_ptr="*fp64", n="i32", num_bins="i32"),
                     dict(BLOCK=kg.BLOCK), enable_fp_fusion=False)
assert "fma" not in k.asm["ptx"], "a fused multiply-add: the boxes would differ from transformers' in the last bit"
"""


@pytest.mark.slow
@pytest.mark.skipif("triton" not in BACKENDS or torch.cuda.is_available(), reason="Triton absent, or gpu tests run it")
def test_triton_kernels_compile_for_sm90():
    """Both codec kernels compile for sm90 on this GPU-less machine, without fused multiply-adds (bit-exactness)."""
    from mmcore.testing import assert_runs_without_triton_interpreter

    pytest.importorskip("triton.backends.nvidia")
    assert_runs_without_triton_interpreter(SM90_COMPILE)
