#!/usr/bin/env bash
# Full check on a machine with an NVIDIA GPU: builds genkernels with its CUDA module into .venv
# (as scripts/setup.sh does), runs the whole test suite (the CUDA tests run on the GPU), runs the
# CUDA tests under compute-sanitizer memcheck and racecheck, and benchmarks every op on the GPU.
#
# Everything goes to benchmarks/results/<gpu-name>-<date>/: one log per step, bench.json, and
# summary.md with the result of each step. A failed step does not stop the next ones, but nothing
# runs without a successful setup; the exit status is non-zero if any step failed.
#
#   GENKERNELS_TORCH      torch requirement (default torch==2.13.0; pick the build for your CUDA),
#                         or "system" to use the torch python3 already has (scripts/setup.sh)
#   GENKERNELS_WHEELS     a folder of wheels to install from instead of an index (no network)
#   GENKERNELS_EMULATION  ON (default) to also build and test the CPU emulation of the kernels
#   GENKERNELS_WERROR     ON (default) to treat warnings as errors
#   GPU_CHECK_STEPS       the steps after setup (default: cuda tests memcheck racecheck bench), so
#                         that a machine lent with a time limit per command can run a few at a
#                         time (the build folder makes setup quick after the first)
#   GPU_CHECK_TESTS       a pytest -k expression that narrows the tests step (default: all tests)
#
# On a machine with torch and no network, for example:
#   GENKERNELS_TORCH=system GENKERNELS_WHEELS=.whl GENKERNELS_EMULATION=OFF \
#     GPU_CHECK_STEPS="cuda tests bench" GPU_CHECK_TESTS=cuda scripts/gpu-check.sh
# with .whl holding what that python3 lacks of the tests' requirements (diffusers, say).
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=()  # one markdown table row per step
FAILED=0
selected=" ${GPU_CHECK_STEPS:-cuda tests memcheck racecheck bench} "
wanted() { [[ $selected == *" $1 "* ]]; }
test_filter=()
[ -n "${GPU_CHECK_TESTS:-}" ] && test_filter=(-k "$GPU_CHECK_TESTS")
# Before any output exists: what is being checked.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain 2>/dev/null)" ] && commit="$commit (with uncommitted changes)"

# record NAME RESULT SECONDS LOG
record() {
  STEPS+=("| $1 | $2 | $3 s | $([ -n "$4" ] && echo "[$4]($4)") |")
  echo "== $1: $2${4:+ (log: $OUT/$4)}"
  case $2 in pass | skipped*) ;; *) FAILED=1 ;; esac
}

# step NAME LOG COMMAND...: runs COMMAND with its output in LOG and records the result.
step() {
  local name=$1 log=$2 start=$SECONDS status
  shift 2
  echo "== $name ..."
  "$@" >"$OUT/$log" 2>&1
  status=$?
  if [ "$status" -eq 0 ]; then
    record "$name" pass $((SECONDS - start)) "$log"
  else
    record "$name" "**FAIL** (exit $status)" $((SECONDS - start)) "$log"
    tail -n 20 "$OUT/$log" | sed 's/^/   | /'
  fi
  return "$status"
}

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
OUT="benchmarks/results/${slug}-$(date +%Y-%m-%d)"
mkdir -p "$OUT"
echo "genkernels GPU check: results in $OUT"

if [ -n "$gpu_name" ]; then
  step gpu nvidia-smi.txt nvidia-smi
else
  echo "nvidia-smi found no GPU" >"$OUT/nvidia-smi.txt"
  record gpu "**FAIL** (nvidia-smi found no GPU)" 0 nvidia-smi.txt
fi

# setup.sh creates or reuses .venv, installs torch and the build requirements, and builds.
built=
step setup setup.log env GENKERNELS_CUDA=ON GENKERNELS_EMULATION="${GENKERNELS_EMULATION:-ON}" \
  GENKERNELS_WERROR="${GENKERNELS_WERROR:-ON}" GK_EXTRA_PACKAGES="pytest pytest-benchmark scipy diffusers scikit-learn" \
  bash scripts/setup.sh && built=yes
PY=.venv/bin/python

sanitizer=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  [ -z "$sanitizer" ] && [ -x "$candidate" ] && sanitizer=$candidate
done

if [ -z "$built" ]; then
  for name in cuda tests memcheck racecheck bench; do
    wanted "$name" && record "$name" "not run (setup failed)" 0 ""
  done
else
  # Without a usable GPU the CUDA tests would skip and the run would look clean.
  wanted cuda && step cuda cuda.log "$PY" -c '
import json, sys, genkernels
info = genkernels.info()
print(json.dumps(info, indent=2))
if not (info["cuda_available"] and info["modules"]["_C_cuda"]):
    sys.exit("torch cannot use the GPU or genkernels._C_cuda is missing: the CUDA tests would be skipped")'
  wanted tests && step tests tests.log "$PY" -m pytest tests -q -p no:cacheprovider "${test_filter[@]}"
  # The tests that run kernels on the GPU (the nvcc build test launches nothing). API errors are
  # not reported: torch and the module probe the runtime with calls that may fail by design.
  cuda_tests=(-m pytest tests -q -p no:cacheprovider -k "cuda and not cuda_build")
  for tool in memcheck racecheck; do
    if ! wanted "$tool"; then
      continue
    elif [ -n "$sanitizer" ]; then
      step "$tool" "$tool.log" "$sanitizer" --tool "$tool" --error-exitcode 1 --report-api-errors no \
        "$PY" "${cuda_tests[@]}"
    else
      record "$tool" "skipped (compute-sanitizer not found on PATH or in \$CUDA_HOME/bin)" 0 ""
    fi
  done
  wanted bench && step bench bench.log "$PY" -m genkernels bench --device cuda --json "$OUT/bench.json"
fi

{
  echo "# GPU check: ${gpu_name:-no GPU found}"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- Commit: $commit"
  echo "- Torch: $([ -n "$built" ] && "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "${GENKERNELS_TORCH:-torch==2.13.0}")"
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
  echo "- Driver: ${driver:-unknown}"
  echo "- compute-sanitizer: ${sanitizer:-not found}"
  echo
  echo "| Step | Result | Time | Log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${STEPS[@]}"
  echo
  if [ "$FAILED" -eq 0 ]; then echo "All steps passed."; else echo "**Some steps failed.**"; fi
} >"$OUT/summary.md"
echo "genkernels GPU check: summary in $OUT/summary.md"
exit "$FAILED"
