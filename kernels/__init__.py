"""Triton kernels of mmcore, installed as ``mmcore.kernels`` (never a top-level ``kernels`` package).

One kernel family per module; each module imports Triton, so import them only where Triton is installed.
Models never import this package: they call ``mmcore.ops``, which dispatches here.
"""

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by tests/test_package.py
    # Imported as a top-level package: the repository root is on sys.path (``python -c`` or ``python -m`` run from
    # it) and this folder shadows any installed ``kernels``, such as Hugging Face's, which transformers >= 5.25
    # imports. Load that package in this one's place, or say where mmcore's kernels are.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ImportError(
            f"{_root}/kernels holds mmcore's Triton kernels, imported as mmcore.kernels; there is no top-level "
            "'kernels' package installed (this folder shadowed the name because the repository root is on sys.path)"
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this runs
    _spec.loader.exec_module(_module)
