"""Loads the compiled extension ``mmcore._C`` once and records why it is missing when it is."""

import torch

# NOTE: the extension registers kernels (TORCH_LIBRARY_IMPL) for schemas that mmcore/ops/_library.py
# defines; the dispatcher accepts the two in either order. Loading it here, before any op is declared, lets
# each op record at declaration which kernels the extension brought.

try:
    from mmcore import _C
except ImportError as exc:  # built without the extension, or built against another torch
    _C = None
    C_ERROR: str | None = (
        f"mmcore._C could not be imported ({exc}); reinstall with `pip install --no-build-isolation -e .`"
    )
else:
    C_ERROR = None


def extension():
    """The ``mmcore._C`` module, or None when it could not be imported."""
    return _C


def cuda_built() -> bool:
    """True when ``mmcore._C`` was compiled with its CUDA sources."""
    return _C is not None and bool(getattr(_C, "cuda_built", False))


def cuda_available() -> bool:
    return torch.cuda.is_available()
