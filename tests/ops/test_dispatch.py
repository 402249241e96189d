"""Declarative dispatch: default order, forcing, errors that list why, Triton never default on CPU."""

import pytest
import torch

from mmcore import _extension
from mmcore.ops import BACKENDS, Backend, BackendError, Op, _dispatch, available_backends, boxes_to_loc_indices

HAS_CPP = _extension.C_ERROR is None


def _calls(log):
    def make(name):
        def fn(x):
            log.append(name)
            return name

        return fn

    return make


@pytest.fixture
def toy(monkeypatch):
    """A throwaway op with all four backends, removed from the registry afterwards."""
    log = []
    make = _calls(log)
    op = Op(
        "toy_op_for_tests",
        [
            Backend("triton", make("triton"), ("cuda", "cpu"), auto_on_cpu=False),
            Backend("cuda", make("cuda"), ("cuda",)),
            Backend("cpp", make("cpp"), ("cpu",), (torch.float32,)),
            Backend("torch", make("torch"), ("cpu", "cuda"), check=lambda x: "x must be positive" if x <= 0 else None),
        ],
    )
    yield op, log
    _dispatch._OPS.pop("toy_op_for_tests")


def test_backends_in_default_order():
    assert BACKENDS == ("triton", "cuda", "flash_attn", "xformers", "cpp", "torch")


def test_optional_peer_backends_say_why_they_cannot_run(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    from mmcore.ops.attention import PACKED_ATTENTION

    assert "flash_attn is not installed" in PACKED_ATTENTION.backends["flash_attn"].unavailable("cuda")
    assert "flash_attn" not in available_backends("packed_attention", "cuda")


@pytest.mark.skipif(not HAS_CPP, reason="mmcore._C not built")
def test_default_order_prefers_cpp_on_cpu(toy, monkeypatch):
    op, log = toy
    monkeypatch.delenv("MMCORE_BACKEND", raising=False)
    assert op("cpu", torch.float32, 1) == "cpp"
    assert op("cpu", torch.float64, 1) == "torch"  # cpp declares float32 only


def test_triton_listed_on_cpu_only_under_interpreter(toy, monkeypatch):
    op, _ = toy
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in available_backends("toy_op_for_tests", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in available_backends("toy_op_for_tests", "cpu")
    with pytest.raises(BackendError, match="only under TRITON_INTERPRET=1"):
        op("cpu", torch.float32, 1, backend="triton")


def test_default_never_picks_the_interpreter(toy, monkeypatch):
    op, log = toy
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MMCORE_BACKEND", raising=False)
    assert op("cpu", torch.float32, 1) != "triton"
    assert op("cpu", torch.float32, 1, backend="triton") == "triton"


def test_forced_backend_that_cannot_run_says_why(toy, monkeypatch):
    op, _ = toy
    with pytest.raises(BackendError, match=r"backend='torch' was forced.*x must be positive"):
        op("cpu", torch.float32, -1, backend="torch")
    with pytest.raises(BackendError, match=r"backend='cuda'.*runs on cuda tensors, not cpu"):
        op("cpu", torch.float32, 1, backend="cuda")
    if HAS_CPP:
        with pytest.raises(BackendError, match=r"does not take torch.float64"):
            op("cpu", torch.float64, 1, backend="cpp")


def test_environment_variable_forces(toy, monkeypatch):
    op, log = toy
    monkeypatch.setenv("MMCORE_BACKEND", "torch")
    assert op("cpu", torch.float32, 1) == "torch"
    monkeypatch.setenv("MMCORE_BACKEND", "cuda")
    with pytest.raises(BackendError, match=r"MMCORE_BACKEND='cuda' was forced"):
        op("cpu", torch.float32, 1)
    monkeypatch.setenv("MMCORE_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"MMCORE_BACKEND='gpu' is not a backend"):
        op("cpu", torch.float32, 1)
    # backend= wins over the environment
    monkeypatch.setenv("MMCORE_BACKEND", "cuda")
    assert op("cpu", torch.float32, 1, backend="torch") == "torch"


def test_no_backend_fits_lists_every_reason(toy, monkeypatch):
    op, _ = toy
    monkeypatch.delenv("MMCORE_BACKEND", raising=False)
    with pytest.raises(BackendError) as info:
        op("cpu", torch.float64, -1)
    msg = str(info.value)
    assert "no backend can run op 'toy_op_for_tests'" in msg
    for line in ("triton: not chosen by default", "cuda: runs on cuda tensors", "cpp:", "torch: x must be positive"):
        assert line in msg


def test_missing_extension_changes_backend_not_import(monkeypatch):
    monkeypatch.setattr(_extension, "C_ERROR", "mmcore._C could not be imported (simulated)")
    monkeypatch.delenv("MMCORE_BACKEND", raising=False)
    assert [b for b in available_backends("boxes_to_loc_indices", "cpu") if b != "triton"] == ["torch"]
    assert boxes_to_loc_indices([[0.0, 0.0, 0.5, 0.5]]).tolist() == [[0, 495]]
    with pytest.raises(BackendError, match=r"simulated"):
        boxes_to_loc_indices([[0.0, 0.0, 0.5, 0.5]], backend="cpp")


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="unknown backend"):
        Backend("numba", lambda: None, ("cpu",))
    with pytest.raises(ValueError, match="in the order"):
        Op("bad_order", [Backend("torch", lambda: None, ("cpu",)), Backend("cpp", lambda: None, ("cpu",))])
    with pytest.raises(ValueError, match="already declared"):
        Op("boxes_to_loc_indices", [Backend("torch", lambda: None, ("cpu",))])


def test_available_backends_errors_and_defaults():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        available_backends("nope")
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert available_backends("boxes_to_loc_indices") == available_backends("boxes_to_loc_indices", expected_device)
    assert available_backends("boxes_to_loc_indices", "cpu")[-1] == "torch"
