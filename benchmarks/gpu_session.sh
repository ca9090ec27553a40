#!/usr/bin/env bash
# A staged GPU benchmark session sized for one short GPU window (about 8 minutes of one H200).
#
#   bash benchmarks/gpu_session.sh [--dry-run] [STAGE ...]
#
# With no STAGE it runs the stages still "pending" in benchmarks/gpu_stages.json, in that
# file's order (most valuable first): tests, loss16k, maxbatch, bconst16k, token16k, sweep,
# memory, step7b, within SESSION_BUDGET_S (default 300 s: an 8-minute window less the machine's
# start and the transfers). A stage starts while at least MIN_STAGE_S (45 s) are left and gets
# its own budget or what is left, whichever is less; the stages after that stay pending. A
# stage is killed at its budget; the benchmarks inside stop starting new work ~20 s before that
# and keep what they measured (a stage cut short is "partial": the next window reruns it).
#
# Before the stages (GPU only) the C++ extension is built with its CUDA kernels (the epilogues of
# strategy="workspace_cuda", csrc/cuda/) for this GPU's architecture alone, unless the checkout
# already holds such a build: the machine starts bare each window. It counts against the session
# budget (~1 min on 16 cores; at most BUILD_BUDGET_S, default 150 s; GPU_ARCH=9.0 overrides the
# architecture read from the device); its log is
# results/<gpu>-<date>-build-log.txt. A failed build is logged, and the stages run on: the CUDA
# epilogue tests then fail (PAPO_REQUIRE_CUDA_EPILOGUE=1) and the workspace_cuda cells are
# "unavailable" with the reason.
#
# After every stage $OUT holds four files (what the device tool brings back):
#   results.tar.gz   results/<gpu>-<date>.{json,md} (one section per stage), plots, test logs
#   gpu_stages.json  the stage record updated with this window's outcomes: extract the tarball
#                    into benchmarks/ and commit both, so the next window starts where this
#                    one stopped
#   summary.md       the targets table (benchmarks/targets.py) and each stage's outcome
#   session.log      everything printed
#
# Peers that the GPU image lacks (liger-kernel, cut-cross-entropy, verl) travel as wheels in
# .whl/ (benchmarks/fetch_wheels.sh; name .whl in the tool's `carry`); they are installed, with
# --no-deps into a temporary target, only before the stage that uses them (token16k).
#
# --dry-run (or DRY_RUN=1) runs every stage on the CPU with tiny shapes (head "tiny", the tiny
# step model, a simulated memory capacity for the largest-batch searches): the same stages,
# bookkeeping and files, into $OUT or /tmp/papo-gpu-session-dry-run; benchmarks/gpu_stages.json
# is read, never written. DRY_SKIP=compile,cce (a comma list) leaves providers out of a dry run;
# DRY_QUICK=1 keeps each largest-batch search to one trial (tests/test_gpu_session.py).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PY=${PYTHON:-python3}
SESSION_BUDGET=${SESSION_BUDGET_S:-300}
MIN_STAGE=${MIN_STAGE_S:-45}
RECORD=benchmarks/gpu_stages.json
ALL_STAGES="tests loss16k maxbatch bconst16k token16k sweep memory step7b"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
  MIRROR=${OUT:-/tmp/papo-gpu-session-dry-run}
else
  MIRROR=${OUT:-/tmp/papo-gpu-session}
fi
usage() { sed -n '2,30p' "$0"; exit 2; }
for s in "$@"; do
  case " $ALL_STAGES " in *" $s "*) ;; *) echo "unknown stage '$s'; stages: $ALL_STAGES" >&2; usage ;; esac
done

mkdir -p "$MIRROR"
WORK=$(mktemp -d /tmp/papo-gpu-work.XXXX)
trap 'rm -rf "$WORK"' EXIT
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
LOG="$MIRROR/session.log"
: > "$LOG"
cp "$RECORD" "$MIRROR/gpu_stages.json"

say() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# --- what we run on
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")
EOF
if [ "$DRY" != 1 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible: use --dry-run on a CPU machine"; exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
  --format=csv 2>&1 | tee -a "$LOG"
SLUG=$($PY -c "from benchmarks._harness import environment
env = environment('cuda' if '$DRY' != '1' else 'cpu'); print(env['slug'] + '-' + env['date'])")
# The committed files this run adds to (an earlier window of the same day, the CSV history), so
# that extracting the tarball over benchmarks/ keeps them.
for f in "benchmarks/results/$SLUG.json" benchmarks/results/loss.csv; do
  [ -f "$f" ] && cp "$f" "$RESULTS/"
done

# --- shapes: the 7B head on the GPU, the tiny head on the CPU
if [ "$DRY" = 1 ]; then
  SHAPE=cpu-tiny; N16=256; SWEEP=64,128; MEM_N=64,128,256; STEP_MODEL=tiny; REPS=1; STEP_REPS=1
  LOSS_EXTRA=(--no-isolate --simulated-capacity-mb 200 --max-tokens-limit 1024)
  STEP_EXTRA=(--no-isolate --max-batch-limit 4 --simulated-capacity-mb 1200)
  if [ "${DRY_QUICK:-0}" = 1 ]; then
    LOSS_EXTRA=(--no-isolate --simulated-capacity-mb 200 --max-tokens-limit "$N16")
    STEP_EXTRA=(--no-isolate --batch 2 --max-batch-limit 2 --simulated-capacity-mb 1200)
  fi
  BUDGET_SCALE=${DRY_BUDGET_SCALE:-1}
else
  SHAPE=gpu-7b; N16=16384; SWEEP=2048,4096,8192,32768; MEM_N=2048,8192,32768,65536; STEP_MODEL=7b-short
  REPS=5; STEP_REPS=3
  LOSS_EXTRA=(--max-tokens-limit 524288)
  STEP_EXTRA=(--max-batch-limit 256)
  BUDGET_SCALE=1
fi

budget_of() {  # the most seconds a stage may take on the GPU (its usual time is less)
  case "$1" in
    tests) echo 60 ;; loss16k) echo 150 ;; maxbatch) echo 120 ;; bconst16k) echo 75 ;;
    token16k) echo 100 ;; sweep) echo 120 ;; memory) echo 100 ;; step7b) echo 170 ;;
  esac
}

providers() {  # the comma list minus DRY_SKIP's entries
  local out=() p
  IFS=, read -ra all <<< "$1"
  for p in "${all[@]}"; do
    case ",${DRY_SKIP:-}," in *",$p,"*) ;; *) out+=("$p") ;; esac
  done
  (IFS=,; echo "${out[*]}")
}

loss() {  # one benchmarks.loss run into the session's results, within the stage's budget
  local section=$1; shift
  $PY -m benchmarks.loss --shape "$SHAPE" --section "$section" --out-dir "$RESULTS" \
    --time-budget-s "$((STAGE_BUDGET - 20))" --reserve-s 10 "${LOSS_EXTRA[@]}" "$@"
}

install_wheels() {
  local whl=${WHEELS_DIR:-.whl} site
  if ls "$whl"/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/papo-site.XXXX)
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl; then
      export PYTHONPATH="$site:$PYTHONPATH"
      say "installed wheels: $(ls "$whl" | tr '\n' ' ')"
    else
      say "wheel install failed; peers that need them become unavailable cells"
    fi
  else
    say "no .whl/ wheels carried: peers missing from the image become unavailable cells"
  fi
}

build_extension() {  # the extension with CUDA kernels for this GPU, into the checkout (build_ext --inplace)
  if $PY -c "import sys; from papo_kernels import extension as E; sys.exit(0 if E.cuda_archs() else 1)" \
      >/dev/null 2>&1; then
    say "build: papo_kernels._C with CUDA kernels is there already"
    return 0
  fi
  local arch t0=$SECONDS rc
  arch=${GPU_ARCH:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  say "build: papo_kernels._C with CUDA kernels for compute capability $arch (PAPO_BUILD_CUDA=1)"
  PAPO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" NVCC_THREADS=${NVCC_THREADS:-4} \
    timeout -k 10 "${BUILD_BUDGET_S:-150}" $PY setup.py build_ext --inplace --build-temp /tmp/papo-cuda-build \
    > "$RESULTS/$SLUG-build-log.txt" 2>&1
  rc=$?
  grep -E "CUDA sources|CUDA build failed" "$RESULTS/$SLUG-build-log.txt" | tee -a "$LOG"
  say "build: rc=$rc in $((SECONDS - t0)) s; kernels for: $($PY -c "from papo_kernels import extension as E; \
print(E.cuda_archs() or 'none')" 2>&1 | tail -1)"
}

stage_tests() {
  local files="tests/test_triton_kernels.py tests/test_workspace_ring.py tests/test_gemm.py tests/test_cuda_epilogue.py"
  if [ "$DRY" = 1 ]; then  # the selection must collect; running it needs CUDA
    $PY -m pytest -q -p no:cacheprovider --collect-only -m gpu $files
    return $?
  fi
  # a build without CUDA kernels fails the CUDA epilogue tests here instead of skipping them
  PAPO_REQUIRE_CUDA_EPILOGUE=1 $PY -m pytest -q -p no:cacheprovider -m gpu --durations=8 \
    --junitxml="$RESULTS/$SLUG-tests-junit.xml" $files 2>&1 | tee "$RESULTS/$SLUG-tests-log.txt"
  local rc=${PIPESTATUS[0]}
  # which fp32-output GEMM paths this torch runs (in-place out_dtype addmm for dW, or slices)
  $PY - <<'EOF' 2>&1 | tee -a "$RESULTS/$SLUG-tests-log.txt"
import torch, papo_kernels as pk
from papo_kernels import _gemm
g = torch.Generator(device="cuda").manual_seed(0)
n, h, v = 2048, 512, 20000
a = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_()
b = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_()
w = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).bfloat16().requires_grad_()
t = torch.randint(0, v, (n,), device="cuda", generator=g)
for backend in ("triton", "torch"):
    _gemm.reset_paths()
    loss, _ = pk.fused_two_view_loss(a, b, w, t, lambda s, i: ((s.logp_a - 0.01 * s.kl_ba).sum(), {}),
                                     backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    print(f"fp32-output GEMM paths, backend={backend}: {_gemm.paths()}")
print("allow_bf16_reduced_precision_reduction:",
      torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
EOF
  return "$rc"
}

stage_loss16k() {
  loss loss-16k --tokens "$N16" --workloads two_view/fwd_bwd --reps "$REPS" --csv \
    --providers "$(providers triton:fused:workspace,triton:fused:workspace_cuda,triton:fused:workspace:ring2s,triton:fused:workspace:v1,triton:stats:workspace,torch:fused,compile,floor)"
}

stage_maxbatch() {
  # compile last: its first call compiles (~40 s), the others' searches take ~10-20 s each
  loss loss-maxbatch --tokens "$N16" --max-tokens-only --max-tokens-budget-s 30 \
    --providers "$(providers triton:fused:workspace,eager,compile)"
}

stage_bconst16k() {
  loss loss-bconst-16k --tokens "$N16" --workloads two_view/fwd_bwd --detached-b --reps "$REPS" --csv \
    --providers "$(providers triton:fused:workspace,triton:fused:workspace:v1,triton:stats:workspace,torch:fused,compile,floor)"
}

stage_token16k() {
  install_wheels
  loss loss-token-16k --tokens "$N16" --workloads token_stats/fwd_bwd,token_stats/fwd --reps "$REPS" --csv \
    --providers "$(providers triton:fused:workspace,triton:stats:workspace,triton:stats:workspace_cuda,triton:stats:workspace:v1,triton:stats:inregister,torch:stats,torch:fused,compile,cce,verl,floor)"
}

stage_sweep() {
  loss loss-sweep --tokens "$SWEEP" --workloads two_view/fwd_bwd --reps 3 --csv \
    --providers "$(providers triton:fused:workspace,triton:fused:workspace:v1,compile,floor)"
}

stage_memory() {
  local half=$((STAGE_BUDGET / 2))
  STAGE_BUDGET=$half loss loss-memory-rings --tokens "$N16" --workloads two_view/fwd_bwd --reps 2 \
    --providers "$(providers triton:fused:workspace,triton:fused:workspace:ring2k,triton:fused:workspace:ring8k,triton:fused:workspace:v1,floor)"
  local rc=$?
  STAGE_BUDGET=$half loss loss-memory-n --tokens "$MEM_N" --workloads two_view/fwd_bwd --reps 1 \
    --providers "$(providers triton:fused:workspace,floor)" || rc=$?
  return "$rc"
}

stage_step7b() {
  $PY -m benchmarks.step --model "$STEP_MODEL" --section step-7b --reps "$STEP_REPS" --max-batch \
    --time-budget-s "$((STAGE_BUDGET - 20))" --reserve-s 10 --out-dir "$RESULTS" "${STEP_EXTRA[@]}"
}

record() {  # STAGE STATUS RC SECONDS: this window's outcome into $MIRROR/gpu_stages.json
  $PY - "$MIRROR/gpu_stages.json" "$@" "$SLUG" <<'EOF'
import json, sys, datetime, subprocess
path, stage, status, rc, seconds, slug = sys.argv[1:7]
doc = json.load(open(path))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
for s in doc["stages"]:
    if s["name"] == stage:
        s.update(status=status, rc=int(rc), seconds=int(seconds), results=f"benchmarks/results/{slug}.json",
                 ran=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit or "unknown")
json.dump(doc, open(path, "w"), indent=1)
EOF
}

cut_short() {  # did a benchmark of this stage stop at its time budget?
  $PY - "$RESULTS/$SLUG.json" "$1" <<'EOF'
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(1)
prefix = {"loss16k": "loss-16k", "maxbatch": "loss-maxbatch", "bconst16k": "loss-bconst", "token16k": "loss-token",
          "sweep": "loss-sweep", "memory": "loss-memory", "step7b": "step-7b"}.get(sys.argv[2])
if prefix is None:
    sys.exit(1)
for key, sec in doc.items():
    if key.startswith(prefix) and isinstance(sec, dict):
        rows = sec.get("cells", sec.get("rows", []))
        if sec.get("partial") or sec.get("budget_reached") or any("time budget" in str(r.get("reason", "")) + str(r.get("max_tokens", ""))
                                     for r in rows):
            sys.exit(0)
sys.exit(1)
EOF
}

pack() {  # everything so far into $OUT (atomic replace: a kill mid-way keeps the last pack)
  tar -czf "$MIRROR/results.tar.gz.tmp" -C "$WORK" results && mv "$MIRROR/results.tar.gz.tmp" "$MIRROR/results.tar.gz"
  {
    echo "# GPU session $SLUG ($([ "$DRY" = 1 ] && echo dry run || echo GPU))"
    echo
    if ls "$RESULTS/$SLUG.json" >/dev/null 2>&1; then
      $PY -m benchmarks.targets "$RESULTS/$SLUG.json"
    else
      echo "(no benchmark results yet)"
    fi
    echo
    echo "| stage | status | rc | seconds |"
    echo "|---|---|---|---|"
    $PY -c "import json,sys; [print(f\"| {s['name']} | {s['status']} | {s.get('rc', '')} | {s.get('seconds', '')} |\") for s in json.load(open(sys.argv[1]))['stages']]" "$MIRROR/gpu_stages.json"
  } > "$MIRROR/summary.md" 2>>"$LOG"
}

# --- which stages, in which order
if [ $# -gt 0 ]; then
  STAGES="$*"
else
  STAGES=$($PY -c "import json; print(' '.join(s['name'] for s in json.load(open('$RECORD'))['stages'] if s['status'] != 'done'))")
fi
say "stages to run: ${STAGES:-none} (session budget ${SESSION_BUDGET} s)"

START=$SECONDS
overall=0
if [ "$DRY" != 1 ] && [ -n "$STAGES" ]; then
  build_extension
  pack
fi
for stage in $STAGES; do
  STAGE_BUDGET=$(( $(budget_of "$stage") * BUDGET_SCALE ))
  left=$((SESSION_BUDGET - (SECONDS - START)))
  if [ "$left" -lt "$MIN_STAGE" ]; then
    say "stage $stage: ${left} s left (< ${MIN_STAGE} s): stays pending"
    continue
  fi
  [ "$STAGE_BUDGET" -gt "$left" ] && STAGE_BUDGET=$left
  say "stage $stage: start (budget ${STAGE_BUDGET} s)"
  t0=$SECONDS
  timeout -k 10 "$STAGE_BUDGET" bash -c "$(declare -f say providers loss install_wheels stage_$stage); \
    $(declare -p PY SHAPE N16 SWEEP MEM_N STEP_MODEL REPS STEP_REPS LOSS_EXTRA STEP_EXTRA RESULTS SLUG DRY LOG \
      STAGE_BUDGET); \
    export PYTHONPATH='$PYTHONPATH' PYTHONUNBUFFERED=1 DRY_SKIP='${DRY_SKIP:-}' WHEELS_DIR='${WHEELS_DIR:-.whl}'; \
    stage_$stage" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  took=$((SECONDS - t0))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ] || { [ "$rc" = 0 ] && cut_short "$stage"; }; then
    status=partial
  elif [ "$rc" = 0 ]; then
    status=done
  else
    status=failed; overall=1
  fi
  record "$stage" "$status" "$rc" "$took"
  pack
  say "stage $stage: $status (rc=$rc, ${took} s)"
done
pack
say "session done in $((SECONDS - START)) s; files in $MIRROR: $(ls "$MIRROR" | tr '\n' ' ')"
echo
cat "$MIRROR/summary.md"
exit "$overall"
