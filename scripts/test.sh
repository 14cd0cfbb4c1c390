#!/usr/bin/env bash
# Builds everything and runs every test. Usage: bash scripts/test.sh [--quick] [build-dir]
#   1. the main suite: Release build, ctest (unit, PyTorch cross-checks, communicator conformance,
#      MPI jobs, fault injection, benchmarks' correctness);
#   2. the same suite under AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize.sh);
#   3. the libFuzzer targets: corpus replay, then 60 s of fuzzing per target (scripts/fuzz.sh).
# --quick runs only the main suite. On 2 cores the whole run takes about 20 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [ "${1:-}" = "--quick" ]; then
  QUICK=1
  shift
fi
BUILD=${1:-build}
JOBS=$(nproc)
start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD" -j "$JOBS"
# One BLAS thread per process: tests start several ranks on few cores.
export OPENBLAS_NUM_THREADS=1
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"
echo "test: main suite passed in $(( $(date +%s) - start )) s"
if [ "$QUICK" = 1 ]; then
  exit 0
fi
bash scripts/sanitize.sh
echo "test: sanitizer suite passed ($(( $(date +%s) - start )) s so far)"
bash scripts/fuzz.sh "${MOE_FUZZ_SECONDS:-60}"
echo "test: all passed in $(( $(date +%s) - start )) s"
