#!/usr/bin/env bash
# The one command a GPU session runs first, ON THE GPU MACHINE (no network, no protobuf/GoogleTest/
# OpenBLAS/MPI headers there): unpacks the carried Debian packages of .debs/ (scripts/device_debs.sh)
# under a prefix, finds nvcc and NCCL, builds without MPI, runs the GPU tests (the layer over NCCL
# with one GPU per rank where there are two or more), the rest of the suite that needs no MPI, the
# trainer on the GPU (over NCCL too where there are GPUs for it), then the GPU benchmarks. Logs go
# to $OUT (the device tool brings that folder back); $OUT/summary.txt says what ran, what was
# skipped and why, and what failed.
#   bash scripts/device_check.sh [--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out}
PREFIX=${PREFIX:-/tmp/moe-prefix}
BUILD=${BUILD:-/tmp/moe-build}
BENCH=1
[ "${1:-}" = "--no-bench" ] && BENCH=0
mkdir -p "$OUT" "$PREFIX"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
status=0
# note WHAT RESULT: one line of the summary (and of the output).
note() { printf '%-44s %s\n' "$1" "$2" | tee -a "$SUMMARY"; }
fail() { note "$1" "FAILED: $2"; status=1; }
die() { note "$1" "FAILED: $2"; echo "device_check: $2" >&2; cat "$SUMMARY"; exit 2; }

# ---- Tools: nvcc (PATH, else the CUDA tree), the carried packages, NCCL -------------------------
NVCC=${CUDACXX:-$(command -v nvcc || true)}
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
[ -n "$NVCC" ] || die "nvcc" "not on PATH, not in /usr/local/cuda/bin, CUDACXX unset"
CUDA_ROOT=$(cd "$(dirname "$NVCC")/.." && pwd)
export CUDACXX=$NVCC PATH=$CUDA_ROOT/bin:$PATH
note "nvcc" "$NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*'))"

if [ ! -d .debs ] || [ -z "$(ls .debs/*.deb 2>/dev/null)" ]; then
  die ".debs" "empty; run scripts/device_debs.sh where there is a network and carry .debs"
fi
for deb in .debs/*.deb; do
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$deb" "$PREFIX"
  else
    tmp=$(mktemp -d) && (cd "$tmp" && ar x "$ROOT/$deb" && tar -xf data.tar.* -C "$PREFIX") && rm -rf "$tmp"
  fi
done
ARCH=x86_64-linux-gnu
BLAS_DIR=$PREFIX/usr/lib/$ARCH/openblas-pthread
# Debian points libopenblas.so.0 at the pthread variant through alternatives (maintainer scripts,
# not package files): make the links here.
ln -sf "$BLAS_DIR/libopenblas.so.0" "$PREFIX/usr/lib/$ARCH/libopenblas.so.0"
ln -sf "$BLAS_DIR/libopenblas.so" "$PREFIX/usr/lib/$ARCH/libopenblas.so"
export PATH=$PREFIX/usr/bin:$PATH
export LD_LIBRARY_PATH=$PREFIX/usr/lib/$ARCH:$BLAS_DIR:${LD_LIBRARY_PATH:-}
export CMAKE_PREFIX_PATH=$PREFIX/usr
export OPENBLAS_NUM_THREADS=1
note ".debs" "$(ls .debs/*.deb | wc -l) packages unpacked"

# NCCL: the CUDA tree's, a system one, carried .debs (libnccl-dev), or the one PyTorch's wheels
# bring (the nvidia-nccl Python package: include/ and lib/libnccl.so.2).
NCCL_INC="" NCCL_LIB=""
for dir in "$CUDA_ROOT" /usr "$PREFIX/usr" \
    $(python3 -c 'import nvidia.nccl as n; print(*n.__path__)' 2>/dev/null); do
  inc=$(ls "$dir"/include/nccl.h "$dir"/include/$ARCH/nccl.h 2>/dev/null | head -1)
  lib=$(ls "$dir"/lib64/libnccl.so* "$dir"/lib/libnccl.so* "$dir"/lib/$ARCH/libnccl.so* 2>/dev/null | head -1)
  if [ -n "$inc" ] && [ -n "$lib" ]; then NCCL_INC=$(dirname "$inc") NCCL_LIB=$lib; break; fi
done
[ -n "$NCCL_INC" ] || die "nccl" "no nccl.h + libnccl.so* in the CUDA tree, /usr, .debs or python3's nvidia.nccl"
export LD_LIBRARY_PATH=$(dirname "$NCCL_LIB"):$LD_LIBRARY_PATH
note "nccl" "$NCCL_LIB ($(grep -m1 -o 'NCCL_VERSION_CODE [0-9]*' "$NCCL_INC/nccl.h"))"

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
{
  echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$NVCC" --version | tail -2; cmake --version | head -1; c++ --version | head -1; nproc
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
note "gpus" "$GPUS"

# ---- Build --------------------------------------------------------------------------------------
# Warnings stay warnings there: its compiler is not the one CI holds the code to.
if ! cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_WITH_MPI=OFF -DMOE_WITH_CUDA=ON \
    -DMOE_WERROR=OFF -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$NVCC" \
    -DNCCL_INCLUDE_DIR="$NCCL_INC" -DNCCL_LIBRARY="$NCCL_LIB" \
    -DProtobuf_PROTOC_EXECUTABLE="$PREFIX/usr/bin/protoc" \
    -DOPENBLAS_INCLUDE_DIR="$PREFIX/usr/include/$ARCH/openblas-pthread" -DOPENBLAS_LIBRARY="$BLAS_DIR/libopenblas.so" \
    > "$OUT/configure.log" 2>&1; then
  tail -40 "$OUT/configure.log"; die "configure" "see configure.log"
fi
if ! cmake --build "$BUILD" -j "$(nproc)" > "$OUT/build.log" 2>&1; then
  grep -E 'error|Error' -A5 "$OUT/build.log" | head -60; die "build" "see build.log"
fi
note "build" "ok ($BUILD)"

# ---- Tests --------------------------------------------------------------------------------------
# The GPU tests: every CUDA operation against the host's, the experts, the router, the layer on the
# CUDA device for every feature (W ranks sharing the GPU over loopback; over NCCL with a GPU each).
(cd "$BUILD" && ctest -L gpu --output-on-failure --timeout 300 > "$OUT/ctest_gpu.log" 2>&1)
rc=$?
gpu_line=$(grep -E 'tests passed|tests failed' "$OUT/ctest_gpu.log" | tail -1)
skipped=$(grep -c 'Skipped' "$OUT/ctest_gpu.log" || true)
if [ $rc -eq 0 ]; then note "ctest -L gpu" "$gpu_line; $skipped skipped"; else fail "ctest -L gpu" "$gpu_line"; fi
nccl_layer=$(grep -E 'nccl_two_ranks' "$OUT/ctest_gpu.log" | grep -c 'Passed' || true)
if [ "$GPUS" -ge 2 ]; then
  [ "$nccl_layer" -eq 2 ] && note "layer over NCCL, 2 GPUs" "passed (2 cases)" \
    || fail "layer over NCCL, 2 GPUs" "$nccl_layer of 2 cases passed (ctest_gpu.log)"
else
  note "layer over NCCL" "skipped: $GPUS GPU(s), NCCL needs one per rank"
fi
tail -25 "$OUT/ctest_gpu.log"
(cd "$BUILD" && ctest -LE gpu -E 'fuzz|kill|rank_failure' -j 8 --timeout 600 > "$OUT/ctest_rest.log" 2>&1)
rc=$?
rest_line=$(grep -E 'tests passed|tests failed' "$OUT/ctest_rest.log" | tail -1)
if [ $rc -eq 0 ]; then note "ctest (the rest, no MPI)" "$rest_line"; else fail "ctest (the rest, no MPI)" "$rest_line"; fi

# ---- End to end ---------------------------------------------------------------------------------
# The trainer on layers on the CUDA device, 4 loopback ranks sharing the GPU (pipelined exchanges),
# next to the same run on the CPU (the losses should agree to fp32 noise); then over NCCL with one
# GPU per rank where there are two or more; then moe_simulate.
for dev in cpu cuda; do
  if "$BUILD/launch/moe_train" --config configs/tiny_lm.textproto --backend loopback --ranks 4 \
      --device $dev --pipeline-degree 2 --steps 20 --log-every 5 > "$OUT/train_$dev.log" 2>&1; then
    note "moe_train loopback x4 --device $dev" "ok: $(grep -o 'loss [0-9.]*' "$OUT/train_$dev.log" | tail -1)"
  else
    fail "moe_train loopback x4 --device $dev" "see train_$dev.log"
  fi
  tail -3 "$OUT/train_$dev.log"
done
if [ "$GPUS" -ge 2 ]; then
  ranks=$(( GPUS < 4 ? GPUS : 4 ))
  if "$BUILD/launch/moe_train" --config configs/tiny_lm.textproto --backend nccl --ranks $ranks \
      --device cuda --pipeline-degree 2 --steps 20 --log-every 5 > "$OUT/train_nccl.log" 2>&1; then
    note "moe_train nccl x$ranks --device cuda" "ok: $(grep -o 'loss [0-9.]*' "$OUT/train_nccl.log" | tail -1)"
  else
    fail "moe_train nccl x$ranks --device cuda" "see train_nccl.log"
  fi
  tail -3 "$OUT/train_nccl.log"
else
  note "moe_train nccl" "skipped: $GPUS GPU(s), NCCL needs one per rank"
fi
if "$BUILD/launch/moe_simulate" --config configs/tiny_lm.textproto --ranks 4 --device cuda --steps 10 \
    --topology configs/topologies/dgx_h100_8x8.textproto --out "$OUT/simulate_cuda" \
    > "$OUT/simulate_cuda.log" 2>&1; then
  note "moe_simulate x4 --device cuda" "ok"
else
  fail "moe_simulate x4 --device cuda" "see simulate_cuda.log"
fi
tail -12 "$OUT/simulate_cuda.log"

# ---- Benchmarks ---------------------------------------------------------------------------------
if [ "$BENCH" = 1 ]; then
  if "$BUILD/bench/moe_gpu_bench" > "$OUT/gpu_bench.txt" 2>&1; then note "moe_gpu_bench" "ok"; else fail "moe_gpu_bench" "see gpu_bench.txt"; fi
  cat "$OUT/gpu_bench.txt"
  # The layer (experts on the GPU) against PyTorch's layer on the same GPU; the machine's python3
  # holds torch.
  for p in fp32 bf16; do
    if "$BUILD/bench/moe_layer_bench" --device cuda --precision $p --python python3 \
        --torch-script "$ROOT/bench/torch_layer_bench.py" -n 10 > "$OUT/layer_bench_$p.txt" 2>&1; then
      note "moe_layer_bench --precision $p" "ok"
    else
      fail "moe_layer_bench --precision $p" "see layer_bench_$p.txt"
    fi
    cat "$OUT/layer_bench_$p.txt"
  done
  # The same with routing on the host (the CPU plan): what the device router saves.
  if "$BUILD/bench/moe_layer_bench" --device cuda --precision bf16 --host-routing --no-torch -n 10 \
      > "$OUT/layer_bench_bf16_host_routing.txt" 2>&1; then
    note "moe_layer_bench --host-routing" "ok"
  else
    fail "moe_layer_bench --host-routing" "see layer_bench_bf16_host_routing.txt"
  fi
  cat "$OUT/layer_bench_bf16_host_routing.txt"
else
  note "benchmarks" "skipped (--no-bench)"
fi

echo "== device_check summary"
cat "$SUMMARY"
exit $status
