#!/usr/bin/env bash
# The one prepared script for a GPU machine (shared/GPU.md). Run from anywhere:
#
#     OUT=/some/dir benchmarks/gpu_check.sh
#
# Steps, in order: nvidia-smi; the wheels carried in wheels/ (below); torch / Triton / CUDA versions; build the CUDA
# part of mmcore._C; `mmcore info`; `pytest -m gpu`; compute-sanitizer over `pytest -m "gpu and cuda_kernels"` (when
# such tests exist); every benchmarks/bench_*.py with `--device cuda` (each writes its table and raw numbers under
# $OUT). Every step runs even when an earlier one failed; each step's status is recorded and a summary table ends
# the output (the only part sure to be read back). Full logs: $OUT/NN_<step>.log. Whole run: under 8 minutes
# (GPU_CHECK_BUDGET_S, default 420 s, caps every step's timeout). Nothing is downloaded: pip runs with --no-index,
# Hugging Face libraries offline.
#
# Packages the GPU machine lacks (it has no network) come as wheels in wheels/ at the repository root, installed
# with `pip install --no-index --no-deps wheels/*.whl` before anything else is imported. A session prepares them on
# the CPU machine and carries the git-ignored folder with the device run:
#
#     pip download xformers==0.0.35 --no-deps -d wheels/     # then run this script with carry: ["wheels"]
#
# xformers' compiled xformers._C links the CUDA 12 runtime; where that is missing xformers refuses CUDA tensors,
# `mmcore info` leaves "xformers" out for cuda and its gpu tests skip saying why. A wheel of nvidia-cuda-runtime-cu12
# in wheels/ brings libcudart.so.12, which the wheels step then puts on LD_LIBRARY_PATH (not yet tried on a device).
#
# Environment: OUT (default ./gpu_check_out), PYTHON (default python), GPU_CHECK_BUDGET_S.
# Exit status: 0 when no step failed or timed out, else 1.

set -uo pipefail # no -e: a failing step is recorded and the next one runs

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START_S=$SECONDS

STEP_NAMES=()
STEP_STATUS=()
STEP_SECONDS=()

record() { # name status seconds
  STEP_NAMES+=("$1")
  STEP_STATUS+=("$2")
  STEP_SECONDS+=("$3")
}

# run_step NAME LIMIT_S CMD...: runs CMD under `timeout`, capped by what is left of the budget; output goes to
# the terminal and to $OUT/NN_NAME.log. Sets LAST_RC. Exit 124/137 is a timeout.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START_S)))
  if ((left < 10)); then
    record "$name" "SKIP (budget spent)" 0
    LAST_RC=-1
    return
  fi
  ((limit > left)) && limit=$left
  local log
  log="$OUT/$(printf '%02d' "${#STEP_NAMES[@]}")_${name// /_}.log"
  echo
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  LAST_RC=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  case $LAST_RC in
    0) record "$name" "ok" "$dt" ;;
    124 | 137) record "$name" "TIMEOUT (${limit}s)" "$dt" ;;
    *) record "$name" "FAIL (exit $LAST_RC)" "$dt" ;;
  esac
}

# Replace the status of the last recorded step (for exit codes that are not failures).
restatus() { STEP_STATUS[${#STEP_STATUS[@]} - 1]="$1"; }

# 1. The device.
run_step "nvidia-smi" 30 nvidia-smi

# 2. Wheels carried to this offline machine (see the top of this file), before anything imports them.
if [[ ! -d wheels ]]; then
  record "wheels" "SKIP (no wheels/ folder carried)" 0
elif ! compgen -G "wheels/*.whl" >/dev/null; then
  record "wheels" "SKIP (wheels/ holds no .whl)" 0
else
  run_step "wheels" 120 "$PYTHON" -m pip install --no-index --no-deps wheels/*.whl
  purelib=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [[ -e $purelib/nvidia/cuda_runtime/lib/libcudart.so.12 ]]; then
    export LD_LIBRARY_PATH="$purelib/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    ((LAST_RC == 0)) && restatus "ok (libcudart.so.12 put on LD_LIBRARY_PATH)"
  fi
fi

# 3. Versions.
run_step "versions" 60 "$PYTHON" -c '
import importlib.metadata as md, platform, torch
def v(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return "not installed"
print("python      ", platform.python_version())
print("torch       ", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("triton      ", v("triton"))
print("transformers", v("transformers"))
print("flash-attn  ", v("flash-attn"))
print("xformers    ", v("xformers"))
print("cuda device ", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch")
'
if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc not on PATH"; fi

# 4. Build mmcore._C with its CUDA sources, against the installed torch, offline.
run_step "build" 300 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .

# 5. What loaded and which backends can run.
run_step "mmcore info" 60 "$PYTHON" -m mmcore.cli info

# 6. GPU tests (bf16 / fp16 correctness against the references). Exit 5: nothing collected.
run_step "pytest -m gpu" 180 "$PYTHON" -m pytest -m gpu -q tests
((LAST_RC == 5)) && restatus "ok (no gpu tests)"

# 7. compute-sanitizer over the CUDA kernels' tests, when there are any. The marker must be registered in
# pyproject.toml (--strict-markers makes pytest reject an unknown marker in -m).
SANITIZER=$(command -v compute-sanitizer || true)
[[ -z $SANITIZER && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
collect_log="$OUT/compute-sanitizer_collect.log"
timeout 30 "$PYTHON" -m pytest --collect-only -q -m "gpu and cuda_kernels" tests >"$collect_log" 2>&1
collect_rc=$?
collected=$(grep -c '::' "$collect_log" || true)
if grep -q "Unknown marker" "$collect_log"; then
  record "compute-sanitizer" "SKIP (marker cuda_kernels not registered, so no such tests)" 0
elif ((collect_rc != 0 && collect_rc != 5)); then
  record "compute-sanitizer" "FAIL (collecting the tests: exit $collect_rc, see $(basename "$collect_log"))" 0
elif ((collect_rc == 5 || collected == 0)); then
  record "compute-sanitizer" "SKIP (no 'gpu and cuda_kernels' tests)" 0
elif [[ -z $SANITIZER ]]; then
  record "compute-sanitizer" "SKIP (compute-sanitizer not found)" 0
else
  run_step "compute-sanitizer" 150 "$SANITIZER" --tool memcheck --target-processes all --error-exitcode 1 \
    "$PYTHON" -m pytest -m "gpu and cuda_kernels" -q -x tests
fi

# 8. Benchmarks: every bench script takes --device {cpu,cuda}; each writes $OUT/<bench>.md and .jsonl.
for bench in benchmarks/bench_*.py; do
  [[ -e $bench ]] || continue
  run_step "$(basename "$bench" .py)" 150 "$PYTHON" "$bench" --device cuda
done

# Summary.
failed=0
for status in "${STEP_STATUS[@]}"; do
  [[ $status == FAIL* || $status == TIMEOUT* ]] && failed=$((failed + 1))
done
{
  echo
  echo "=== gpu_check summary: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git describe --always --dirty 2>/dev/null ||
    echo unknown), $((SECONDS - START_S)) s; logs and tables in $OUT"
  printf '%-28s %8s  %s\n' "step" "seconds" "status"
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-28s %8s  %s\n' "${STEP_NAMES[$i]}" "${STEP_SECONDS[$i]}" "${STEP_STATUS[$i]}"
  done
  echo "steps failed or timed out: $failed"
} | tee "$OUT/summary.txt"
((failed == 0))
