#!/usr/bin/env bash
# Builds the whole project with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only) and runs
# every test: leak detection on for the in-process tests, off for those that start MPI processes
# (Open MPI's own allocations are reported as leaks). Usage: bash scripts/sanitize.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-asan}
FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
# The Python module is left out: an ASan extension would need the sanitizer runtime preloaded into
# the interpreter.
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_WITH_CUDA=OFF -DMOE_WITH_PYTHON=OFF \
  -DCMAKE_CXX_FLAGS="$FLAGS" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
cmake --build "$BUILD" -j "$(nproc)"
export OPENBLAS_NUM_THREADS=1 UBSAN_OPTIONS=print_stacktrace=1
USES_MPI="mpi|MPI|Mpi|simulate|cluster"
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)" -E "$USES_MPI"
ASAN_OPTIONS=detect_leaks=0 ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)" -R "$USES_MPI"
