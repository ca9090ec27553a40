#!/usr/bin/env bash
# Download the wheels a lent GPU lacks into .whl/ (git-ignored locally); the GPU has no network.
# Peers for the loss benchmark: liger-kernel, cut-cross-entropy, verl (pure Python; verl's
# kernels are imported without its package __init__, so Ray & co. are not needed). For the
# trainer and its tests: deepspeed (built here into a pure-Python wheel) with hjson and
# pydantic, datasets with dill and multiprocess, and the reward grader (mathruler, pylatexenc).
# benchmarks/gpu_session.sh installs them with --no-deps; name .whl in the device tool's `carry`.
#
#   bash benchmarks/fetch_wheels.sh [PYTHON_VERSION]   # default 3.12 (the GPU image's)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
BIN=(--no-deps --only-binary=:all: --python-version "$PYV" -d .whl
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform any)
$PY -m pip download -q "${BIN[@]}" liger-kernel cut-cross-entropy verl hjson pydantic pydantic-core \
  annotated-types typing-inspection datasets dill multiprocess mathruler
# sdist-only packages: build pure-Python wheels here
$PY -m pip wheel -q --no-deps -w .whl deepspeed pylatexenc
ls -la .whl
du -sh .whl
