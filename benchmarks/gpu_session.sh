#!/usr/bin/env bash
# One stage of a GPU benchmark session, sized for the lent-GPU tool (one command <= 10 min).
#
#   bash benchmarks/gpu_session.sh [--dry-run] STAGE [SHAPE]
#
#   tests   the test suite on the GPU (gpu-marked tests included), log + junit xml
#   loss    python -m benchmarks.loss on SHAPE (default gpu-7b: the targets' shape first, 16k
#           tokens, then 2k-32k), largest micro-batch per provider
#   step    python -m benchmarks.step on the Qwen2.5-VL-3B shape, largest micro-batch per side
#
# Each stage stops starting new work after STAGE_BUDGET_S (default 480 s) and is killed at
# STAGE_HARD_S (default 540 s), so it ends in under 9 minutes; the three together take under
# 20 minutes of device time. Results are rewritten after every workload to
# benchmarks/results/<device>-<date>.{json,md,png} and mirrored to $OUT (what the tool brings
# back), so a stage cut short still returns its partial numbers.
#
# Peers that the GPU image lacks travel as wheels in .whl/ (made here by
# benchmarks/fetch_wheels.sh; name .whl in the tool's `carry`); they are installed with
# --no-deps into a temporary target first.
#
# --dry-run (or DRY_RUN=1) runs every stage on the CPU with tiny shapes: the same commands,
# budgets, wheel install, result files and mirroring, the largest-micro-batch search against a
# simulated memory capacity; only CUDA is left out. Its files go to $OUT or
# /tmp/papo-gpu-session-dry-run, never to benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
STAGE=${1:-}
SHAPE=${2:-}
PY=${PYTHON:-python3}
BUDGET=${STAGE_BUDGET_S:-480}
HARD=${STAGE_HARD_S:-540}
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  MIRROR=${OUT:-/tmp/papo-gpu-session-dry-run}
  RESULTS="$MIRROR/results"
else
  MIRROR=${OUT:-}
  RESULTS=benchmarks/results
fi
[ -n "$MIRROR" ] && mkdir -p "$MIRROR"
LOG=${MIRROR:-/tmp}/${STAGE:-none}.log

usage() { sed -n '2,12p' "$0"; exit 2; }
case "$STAGE" in tests|loss|step) ;; *) usage ;; esac

say() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# --- wheels of the peers (liger-kernel, cut-cross-entropy, verl), if carried
WHL=${WHEELS_DIR:-.whl}
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d /tmp/papo-site.XXXX)
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    say "installed wheels: $(ls "$WHL" | tr '\n' ' ')"
  else
    say "wheel install failed; peers that need them become unavailable cells"
  fi
else
  say "no .whl/ wheels carried: peers missing from the image become unavailable cells"
fi

# --- what we run on
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")
EOF
if [ "$DRY" != 1 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible: use --dry-run on a CPU machine"; exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee -a "$LOG"

run() {  # run CMD... under the hard limit, output to the log
  say "run: $*"
  timeout -k 15 "$HARD" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "exit $rc"
  return "$rc"
}

MIRROR_ARGS=()
[ -n "$MIRROR" ] && MIRROR_ARGS=(--mirror-dir "$MIRROR")

case "$STAGE" in
  tests)
    if [ "$DRY" = 1 ]; then
      # the benchmark tests plus a collection of the whole suite
      run $PY -m pytest -q -p no:cacheprovider --benchmark-disable tests/test_benchmarks_loss.py \
        tests/test_benchmarks_step.py --junitxml="${MIRROR}/tests-junit.xml"
      rc=$?
      run $PY -m pytest -q -p no:cacheprovider --collect-only -q tests >/dev/null || rc=$?
    else
      run $PY -m pytest -q -p no:cacheprovider -m "gpu or not slow" --benchmark-disable \
        --junitxml="${MIRROR:-/tmp}/tests-junit.xml" tests
      rc=$?
    fi
    ;;
  loss)
    if [ "$DRY" = 1 ]; then
      run $PY -m benchmarks.loss --shape "${SHAPE:-cpu-tiny}" --reps 2 --time-budget-s "$BUDGET" \
        --providers eager,compile,torch:stats,torch:fused,triton:fused:workspace,cpp:fused:fused,liger,cce,verl,verl_torch,floor \
        --max-tokens --simulated-capacity-mb 160 --max-tokens-limit 2048 --max-tokens-budget-s 40 --drop-slower-than 8 \
        --max-tokens-providers eager,torch:fused,triton:fused:workspace,liger \
        --out-dir "$RESULTS" "${MIRROR_ARGS[@]}" --csv
    else
      # the slow paths (torch backend on CUDA, the in-register fused strategy) are measured at
      # 16k only: with them, the 2026-11-25 H100 run spent its whole budget on 16k and 2k
      run $PY -m benchmarks.loss --shape "${SHAPE:-gpu-7b}" --tokens 16384,2048,4096,8192,32768 \
        --reps 5 --max-tokens --drop-slower-than 8 --time-budget-s "$BUDGET" --out-dir "$RESULTS" \
        "${MIRROR_ARGS[@]}" --csv \
        --max-tokens-providers triton:fused:workspace,triton:fused:fused,eager,compile,liger,cce,torch:fused
    fi
    rc=$?
    ;;
  step)
    if [ "$DRY" = 1 ]; then
      run $PY -m benchmarks.step --model "${SHAPE:-tiny}" --reps 2 --max-batch --max-batch-limit 16 \
        --simulated-capacity-mb 1200 --time-budget-s "$BUDGET" --out-dir "$RESULTS" "${MIRROR_ARGS[@]}"
    else
      run $PY -m benchmarks.step --model "${SHAPE:-3b}" --reps 5 --max-batch --time-budget-s "$BUDGET" \
        --out-dir "$RESULTS" "${MIRROR_ARGS[@]}"
    fi
    rc=$?
    ;;
esac
say "stage $STAGE done (rc=$rc); files: $(ls "${MIRROR:-$RESULTS}" 2>/dev/null | tr '\n' ' ')"
exit "$rc"
