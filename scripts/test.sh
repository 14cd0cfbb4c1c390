#!/usr/bin/env bash
# Builds everything and runs every test (ctest). Usage: bash scripts/test.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
JOBS=$(nproc)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD" -j "$JOBS"
# One BLAS thread per process: tests start several ranks on few cores.
export OPENBLAS_NUM_THREADS=1
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"
