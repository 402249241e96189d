"""The installed package: extension, kernels as mmcore.kernels, the mmcore command."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mmcore


def test_extension_imports():
    import mmcore._C as C

    assert hasattr(C, "extract_entities_batch")
    assert isinstance(C.cuda_built, bool)


KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


def test_kernels_install_as_mmcore_kernels(tmp_path):
    pytest.importorskip("triton")
    # From a directory outside the checkout: what an installed user sees. A top-level "kernels" may exist (Hugging
    # Face's, a dependency of transformers >= 5.25), but it is never mmcore's folder.
    code = (
        "import importlib.util, mmcore.kernels.grounding as k; print(k.__name__); "
        "s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    name, origin = out.stdout.split()
    assert name == "mmcore.kernels.grounding"
    assert origin == "None" or not Path(origin).resolve().is_relative_to(KERNELS_DIR)


def test_repository_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    """Run from the checkout's root (on sys.path for ``python -c``), ``import kernels`` gives the installed
    top-level package, as transformers >= 5.25 expects of Hugging Face's, and never mmcore's Triton folder; with
    none installed, an ImportError that says where mmcore's kernels are."""
    find = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    installed = subprocess.run(
        [sys.executable, "-c", find], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    out = subprocess.run(
        [sys.executable, "-c", "import kernels; print(kernels.__file__)"],
        cwd=KERNELS_DIR.parent, capture_output=True, text=True,
    )  # fmt: skip
    if installed:
        assert out.returncode == 0, out.stderr[-2000:]
        assert Path(out.stdout.strip()).resolve() == Path(installed).resolve()
    else:
        assert out.returncode != 0 and "mmcore.kernels" in out.stderr and "no top-level" in out.stderr
    # Without site-packages no other "kernels" exists: the error, whatever is installed.
    bare = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=KERNELS_DIR.parent,
                          capture_output=True, text=True)  # fmt: skip
    assert bare.returncode != 0 and "imported as mmcore.kernels" in bare.stderr


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
