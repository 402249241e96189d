#!/usr/bin/env bash
# The one prepared script for a GPU machine (shared/GPU.md). Run from anywhere:
#
#     OUT=/some/dir benchmarks/gpu_check.sh
#
# Steps, in order: nvidia-smi; the wheels carried in wheels/ (below); torch / Triton / CUDA versions; build
# mmcore._C; `mmcore info`; the benchmarks of the open issues (packed attention, Kosmos-2, COSA) with `--device
# cuda`; `pytest -m gpu`; compute-sanitizer over `pytest -m "gpu and cuda_kernels"` (when such tests exist); the
# other benchmarks (BENCHES below). Every step runs even
# when an earlier one failed; each step's status is recorded and a summary table ends the output (the only part
# sure to be read back). Whole run: GPU_CHECK_BUDGET_S (default 560 s) caps every step's timeout; a step that would
# start with under 10 s left is skipped. Nothing is downloaded: pip runs with --no-index, Hugging Face offline.
#
# Output. The device tool brings back at most 8 files from $OUT, so the step logs and the benchmarks' tables
# (<bench>.md, <bench>.jsonl) are written to a work folder (GPU_CHECK_WORK, default ./gpu_check_out) and, when OUT
# is set, packed after every step into $OUT/gpu_check.tar.gz, with the summary so far in $OUT/summary.txt: a run
# cut off at its time limit still returns what it finished.
#
# GPU_CHECK_STEPS (space-separated step names, default all) runs a subset, e.g. a second call on a still-warm
# machine: GPU_CHECK_STEPS="bench_cross_entropy bench_decoding". Names: nvidia-smi wheels versions build info
# pytest sanitizer and the bench_* names.
#
# Packages the GPU machine lacks (it has no network) come as wheels in wheels/ at the repository root (git-ignored),
# installed with `pip install --no-index --no-deps wheels/*.whl` before anything else is imported. Only pure-Python
# wheels can travel (shared/GPU.md): flash-attn and xformers are compiled against another torch and CUDA. Prepare on
# the CPU machine and carry the folder with the device run (carry: ["wheels"]):
#
#     pip download liger-kernel --no-deps -d wheels/    # the fused linear cross-entropy peer of bench_cross_entropy
#
# Environment: OUT, GPU_CHECK_WORK, GPU_CHECK_STEPS, GPU_CHECK_BUDGET_S, PYTHON (default python3, the GPU image's
# interpreter that holds torch, else python). Exit status: 0 when no step failed or timed out, else 1.

set -uo pipefail # no -e: a failing step is recorded and the next one runs

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULT_DIR="${OUT:-}"
WORK="${GPU_CHECK_WORK:-$PWD/gpu_check_out}"
mkdir -p "$WORK"
[[ -n $RESULT_DIR ]] && mkdir -p "$RESULT_DIR"
export OUT="$WORK" # the benchmarks write their tables to $OUT
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-560}"
STEPS="${GPU_CHECK_STEPS:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
START_S=$SECONDS

# Benchmarks in order of importance, with each one's time limit in seconds (model builds, compilation, checks and
# timing included): packed attention (issue 3), Kosmos-2 (issue 5), COSA (issue 6), then the kernels' own.
BENCHES=(
  "bench_packed_attention 190"
  "bench_kosmos2 150"
  "bench_cosa 80"
  "bench_cross_entropy 45"
  "bench_decoding 45"
  "bench_decode_logits 45"
  "bench_grounding 45"
)

STEP_NAMES=()
STEP_STATUS=()
STEP_SECONDS=()

wanted() { [[ -z $STEPS || " $STEPS " == *" $1 "* ]]; }

failures() { # prints how many recorded steps failed or timed out
  local failed=0 status
  for status in "${STEP_STATUS[@]}"; do
    [[ $status == FAIL* || $status == TIMEOUT* ]] && failed=$((failed + 1))
  done
  echo "$failed"
}

summary() { # prints the summary table of the steps so far
  echo "=== gpu_check summary: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git describe --always --dirty 2>/dev/null ||
    echo unknown), $((SECONDS - START_S)) s; logs and tables in $WORK${RESULT_DIR:+ (packed: $RESULT_DIR/gpu_check.tar.gz)}"
  printf '%-28s %8s  %s\n' "step" "seconds" "status"
  local i
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-28s %8s  %s\n' "${STEP_NAMES[$i]}" "${STEP_SECONDS[$i]}" "${STEP_STATUS[$i]}"
  done
  echo "steps failed or timed out: $(failures)"
}

# Copies what exists so far to $OUT (when set): the summary, and the work folder as one archive (written beside,
# then renamed, so a cut-off run leaves the previous complete archive).
pack() {
  [[ -n $RESULT_DIR ]] || return 0
  summary >"$RESULT_DIR/summary.txt"
  tar -czf "$WORK.tar.gz.part" -C "$WORK" . 2>/dev/null && mv -f "$WORK.tar.gz.part" "$RESULT_DIR/gpu_check.tar.gz"
}

record() { # name status seconds
  STEP_NAMES+=("$1")
  STEP_STATUS+=("$2")
  STEP_SECONDS+=("$3")
  pack
}

# run_step NAME LIMIT_S CMD...: runs CMD under `timeout`, capped by what is left of the budget; output goes to
# the terminal and to $WORK/NN_NAME.log. Sets LAST_RC. Exit 124/137 is a timeout.
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
  log="$WORK/$(printf '%02d' "${#STEP_NAMES[@]}")_${name// /_}.log"
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
restatus() {
  STEP_STATUS[${#STEP_STATUS[@]} - 1]="$1"
  pack
}

# run_benches "NAME LIMIT"...: each benchmark with --device cuda; each writes <bench>.md and .jsonl to the work
# folder.
run_benches() {
  local entry bench limit
  for entry in "$@"; do
    read -r bench limit <<<"$entry"
    wanted "$bench" || continue
    if [[ ! -e benchmarks/$bench.py ]]; then
      record "$bench" "FAIL (benchmarks/$bench.py not found)" 0
      continue
    fi
    run_step "$bench" "$limit" "$PYTHON" "benchmarks/$bench.py" --device cuda
  done
}

# 1. The device.
wanted nvidia-smi && run_step "nvidia-smi" 30 nvidia-smi

# 2. Wheels carried to this offline machine (see the top of this file), before anything imports them.
if ! wanted wheels; then
  :
elif [[ ! -d wheels ]]; then
  record "wheels" "SKIP (no wheels/ folder carried)" 0
elif ! compgen -G "wheels/*.whl" >/dev/null; then
  record "wheels" "SKIP (wheels/ holds no .whl)" 0
else
  run_step "wheels" 120 "$PYTHON" -m pip install --no-index --no-deps wheels/*.whl
fi

# 3. Versions.
wanted versions && run_step "versions" 60 bash -c '"$0" -c "
import importlib.metadata as md, platform, torch
def v(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return \"not installed\"
print(\"python      \", platform.python_version())
print(\"torch       \", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version())
for dist in (\"triton\", \"transformers\", \"timm\", \"flash-attn\", \"xformers\", \"liger-kernel\"):
    print(f\"{dist:<12}\", v(dist))
print(\"cuda device \", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none visible to torch\")
" && { command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not on PATH"; }' "$PYTHON"

# 4. Build mmcore._C against the installed torch, offline (setup.py adds the CUDA sources when torch has CUDA).
wanted build && run_step "build" 240 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .

# 5. What loaded and which backends can run.
wanted info && run_step "mmcore info" 60 "$PYTHON" -m mmcore.cli info

# 6. The benchmarks of the open issues' targets first (packed attention, Kosmos-2, COSA): they check their own
# results before timing, so they come before the full GPU test run.
run_benches "${BENCHES[@]:0:3}"

# 7. GPU tests (bf16 / fp16 correctness against the references), in 4 processes when pytest-xdist is there (Triton
# compiles each kernel variant once per process, and compilation dominates). Exit 5: nothing collected.
if wanted pytest; then
  XDIST=()
  "$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
  run_step "pytest -m gpu" 180 "$PYTHON" -m pytest -m gpu -q "${XDIST[@]}" tests
  ((LAST_RC == 5)) && restatus "ok (no gpu tests)"
  # COSA's timm Swin encoder: timm needs a torchvision that imports beside torch, which the CPU machines and CI
  # lack (tests/models/test_cosa_swin.py skips there); the GPU image has both.
  if "$PYTHON" -c "import timm" 2>/dev/null; then
    run_step "pytest swin (timm)" 60 "$PYTHON" -m pytest -q tests/models/test_cosa_swin.py
  fi
fi

# 8. compute-sanitizer over the CUDA kernels' tests, when there are any. The marker must be registered in
# pyproject.toml (--strict-markers makes pytest reject an unknown marker in -m).
if wanted sanitizer; then
  SANITIZER=$(command -v compute-sanitizer || true)
  [[ -z $SANITIZER && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
  collect_log="$WORK/compute-sanitizer_collect.log"
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
fi

# 9. The other benchmarks.
run_benches "${BENCHES[@]:3}"
for bench in benchmarks/bench_*.py; do # a benchmark missing from BENCHES is not silently left out
  name=$(basename "$bench" .py)
  [[ " ${BENCHES[*]} " == *" $name "* ]] || record "$name" "SKIP (not in gpu_check.sh's BENCHES)" 0
done

echo
summary | tee "$WORK/summary.txt"
pack
(($(failures) == 0))
