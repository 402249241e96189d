"""The installed package: extension, kernels as mmcore.kernels, the mmcore command."""

import importlib.util
import json
import subprocess
import sys

import pytest

import mmcore


def test_extension_imports():
    import mmcore._C as C

    assert hasattr(C, "extract_entities_batch")
    assert isinstance(C.cuda_built, bool)


def test_kernels_install_as_mmcore_kernels(tmp_path):
    pytest.importorskip("triton")
    # From a directory outside the checkout: what an installed user sees.
    code = (
        "import importlib.util, mmcore.kernels.grounding as k; "
        "print(k.__name__); print(importlib.util.find_spec('kernels') is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["mmcore.kernels.grounding", "True"]


def test_version_and_public_api():
    assert mmcore.__version__
    for name in ("boxes_to_loc_indices", "loc_indices_to_boxes", "extract_entities", "extract_entities_batch"):
        assert callable(getattr(mmcore.grounding, name))
    assert callable(mmcore.ops.available_backends)


def test_mmcore_info_reports_backends(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mmcore", "info", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout)
    assert report["mmcore"] == mmcore.__version__
    assert report["extension"] == "loaded"
    assert report["backends"]["boxes_to_loc_indices"]["cpu"][-1] == "torch"
    text = subprocess.run(
        [sys.executable, "-m", "mmcore", "info"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "C++ extension mmcore._C : loaded" in text and "boxes_to_loc_indices" in text


def test_no_top_level_kernels_package_in_distribution():
    spec = importlib.util.find_spec("mmcore.kernels")
    assert spec is not None and spec.submodule_search_locations
