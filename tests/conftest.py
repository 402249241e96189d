import os
import random

# Triton kernels run on CPU tensors through the interpreter in tests; it must be set before Triton loads.
# Default dispatch never picks the interpreter, so this only matters where a test forces backend="triton".
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SEED = 1234


@pytest.fixture(autouse=True)
def _seed():
    random.seed(SEED)
    torch.manual_seed(SEED)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
