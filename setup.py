"""Build mmcore and its compiled extension ``mmcore._C``.

Environment switches (also listed in the README):

  MMCORE_SKIP_CUDA_BUILD=1   build only the C++ CPU code even when a CUDA toolkit and a CUDA build of torch
                             are present (the default builds the CUDA sources too in that case).
  TORCH_CUDA_ARCH_LIST       GPU architectures to compile for, e.g. "9.0" or "8.0;9.0" (read by torch's
                             cpp_extension; default: the GPUs visible at build time).
  MAX_JOBS                   parallel compile jobs for ninja (read by torch's cpp_extension).
  MMCORE_DEBUG_BUILD=1       compile with -O0 -g instead of -O3.

Build with the torch that will run it: ``pip install --no-build-isolation -e .`` (or ``pip wheel
--no-build-isolation .``); build isolation would fetch another torch.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - a message for people who skipped the README's first step
    sys.exit(
        "mmcore builds against an installed torch: `pip install torch==2.13.0`, then install mmcore with "
        "`pip install --no-build-isolation -e .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP_CUDA = os.environ.get("MMCORE_SKIP_CUDA_BUILD", "0") == "1"
DEBUG = os.environ.get("MMCORE_DEBUG_BUILD", "0") == "1"


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _sources(pattern):
    # csrc/tests holds the ctest executable's sources (CMakeLists.txt), not extension code.
    return [
        p
        for p in _rel(glob.glob(os.path.join(HERE, "csrc", "**", pattern), recursive=True))
        if not p.startswith(os.path.join("csrc", "tests"))
    ]


def _want_cuda():
    if SKIP_CUDA:
        return False, "MMCORE_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda} at {cpp_extension.CUDA_HOME}"


def extensions():
    with_cuda, why = _want_cuda()
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    # NOTE: -ffp-contract=off keeps `a * b + c` as two roundings, as in Python; the grounding codec is
    # bit-identical to transformers' float arithmetic only without FMA contraction.
    cxx = opt + ["-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unused-function"]
    sources = _sources("*.cpp")
    kwargs = dict(name="mmcore._C", include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    print(f"mmcore: building mmcore._C with {'CUDA' if with_cuda else 'C++ CPU code only'} ({why})")
    if with_cuda:
        cu = _sources("*.cu")
        nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "--use_fast_math", "-fmad=false", "-DMMCORE_WITH_CUDA"]
        return [
            cpp_extension.CUDAExtension(
                sources=sources + cu, extra_compile_args={"cxx": cxx + ["-DMMCORE_WITH_CUDA"], "nvcc": nvcc}, **kwargs
            )
        ]
    return [cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)]


setup(
    packages=find_packages(include=["mmcore", "mmcore.*"]) + ["mmcore.kernels"],
    package_dir={"mmcore.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
