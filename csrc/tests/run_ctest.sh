#!/usr/bin/env bash
# Configure, build and run the C++ tests (CMakeLists.txt at the repo root) against the torch of the active
# python. Usage: csrc/tests/run_ctest.sh [build_dir]   (default: build/cmake under the repo root; a relative
# build_dir is taken from the current directory). Environment: PYTHON (default: python), MAX_JOBS (parallel
# compile jobs, as for setup.py; default: all cores), CMAKE_BUILD_TYPE (default: Release).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${1:-$root/build/cmake}"
python="${PYTHON:-python}"
prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
jobs="${MAX_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"

# The generator can only be chosen when the build directory is configured for the first time.
generator=()
if [[ ! -f "$build/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi

cmake -S "$root" -B "$build" ${generator[@]+"${generator[@]}"} -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" \
  -DCMAKE_PREFIX_PATH="$prefix" -DPython3_EXECUTABLE="$(command -v "$python")"
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure
