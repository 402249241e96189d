"""Numerical comparison helpers shared by mmcore's tests and benchmarks.

The tolerance rule (from FlashAttention's tests, DESIGN.md "Numerics and testing"): a kernel's error
against a float64 reference may be at most ``factor`` times the error of the same computation done by
PyTorch in the kernel's dtype -- 2x for outputs, 3x for gradients -- plus a floor for the dtype, from the
one table below.
"""

from __future__ import annotations

import torch

# Floors per dtype: about half an ulp at 1.0 for the half types (fp16 ulp 9.8e-4, bf16 ulp 7.8e-3), so an
# op PyTorch computes exactly in that dtype still leaves room for one rounding in the kernel.
FLOORS: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}
OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def error_report(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, tuple[int, ...]]:
    """(max abs error, mean abs error, index of the max) of ``out`` against ``ref``, in float64."""
    diff = (out.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs()
    if diff.numel() == 0:
        return 0.0, 0.0, ()
    flat = int(diff.reshape(-1).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), float(diff.mean()), where


def assert_close_to_ref(
    out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, *, grad: bool = False, name: str = "output"
) -> None:
    """Assert ``out`` is as close to the float64 ``ref`` as the tolerance rule allows.

    out: the kernel's result; ref: the reference in float64; baseline: the reference computed by PyTorch in
    ``out``'s dtype. Fails with max and mean error, where the max occurs, and the tolerance.
    """
    if out.shape != ref.shape or baseline.shape != ref.shape:
        raise AssertionError(
            f"{name}: shapes differ: out {tuple(out.shape)}, ref {tuple(ref.shape)}, baseline {tuple(baseline.shape)}"
        )
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        bad = (~torch.isfinite(out)).reshape(-1).nonzero()[0, 0]
        raise AssertionError(f"{name}: non-finite value at flat index {int(bad)} where the reference is finite")
    floor = FLOORS[out.dtype]
    factor = GRAD_FACTOR if grad else OUTPUT_FACTOR
    err, mean, where = error_report(out, ref)
    base_err, _, _ = error_report(baseline, ref)
    tol = factor * base_err + floor
    if not err <= tol:
        raise AssertionError(
            f"{name} ({out.dtype}): max error {err:.3e} at {list(where)} (out {float(out[where]):.6g}, "
            f"ref {float(ref[where]):.6g}), mean error {mean:.3e}; tolerance {tol:.3e} = {factor:g} x "
            f"PyTorch's error {base_err:.3e} + floor {floor:g}"
        )
