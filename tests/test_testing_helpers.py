"""The tolerance helper fails when it should and explains the failure."""

import pytest
import torch

from mmcore.testing import FLOORS, assert_close_to_ref


def test_float16_matmul_within_rule_and_a_worse_result_fails():
    a, b = torch.randn(64, 64, dtype=torch.float64), torch.randn(64, 64, dtype=torch.float64)
    ref = a @ b
    baseline = (a.half().float() @ b.half().float()).half()  # PyTorch's own result in float16
    assert_close_to_ref(baseline.clone(), ref, baseline)
    worse = baseline.double() + 10 * (baseline.double() - ref).abs().max()
    with pytest.raises(AssertionError, match=r"max error .* at \[.*\].*tolerance .* = 2 x PyTorch's error"):
        assert_close_to_ref(worse.half(), ref, baseline)


def test_gradients_get_three_times_and_nan_is_caught():
    ref = torch.linspace(0, 1, 10, dtype=torch.float64)
    baseline = ref.float() + 1e-3
    assert_close_to_ref(ref.float() + 2.9e-3, ref, baseline, grad=True)
    with pytest.raises(AssertionError):
        assert_close_to_ref(ref.float() + 2.9e-3, ref, baseline, grad=False)
    nan = ref.float().clone()
    nan[3] = float("nan")
    with pytest.raises(AssertionError, match="non-finite value at flat index 3"):
        assert_close_to_ref(nan, ref, baseline)


def test_one_floor_per_dtype():
    assert set(FLOORS) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    assert FLOORS[torch.bfloat16] > FLOORS[torch.float16] > FLOORS[torch.float32] > FLOORS[torch.float64]


def test_run_in_subprocess_sees_inputs_and_environment():
    from mmcore.testing import run_in_subprocess

    got = run_in_subprocess(
        "import os\nresult = (x * 2, os.environ.get('MMCORE_HELPER_TEST'))",
        dict(x=torch.arange(3)),
        {"MMCORE_HELPER_TEST": "1"},
    )
    assert torch.equal(got[0], torch.tensor([0, 2, 4])) and got[1] == "1"
