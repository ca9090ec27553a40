#!/usr/bin/env bash
# Download the peers' wheels into .whl/ (git-ignored locally) for a lent GPU, which has no
# network: liger-kernel, cut-cross-entropy and verl are pure-Python wheels, installed there
# with --no-deps by benchmarks/gpu_session.sh (verl's kernels are imported without its
# package __init__, so Ray & co. are not needed). Name .whl in the device tool's `carry`.
#
#   bash benchmarks/fetch_wheels.sh [PYTHON_VERSION]   # default 3.12 (the GPU image's)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation py --platform any -d .whl liger-kernel cut-cross-entropy verl
ls -la .whl
du -sh .whl
