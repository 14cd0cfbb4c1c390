#!/usr/bin/env bash
# Run ON THE GPU MACHINE (no network, no protobuf/GoogleTest/OpenBLAS/MPI headers there): unpacks
# the carried Debian packages of .debs/ (scripts/device_debs.sh) under a prefix, builds without MPI,
# runs the GPU tests and the rest of the suite that needs no MPI, then the GPU benchmark. Logs and
# the benchmark table go to $OUT (the device tool brings that folder back).
#   bash scripts/device_check.sh [--no-bench]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out}
PREFIX=${PREFIX:-/tmp/moe-prefix}
BUILD=${BUILD:-/tmp/moe-build}
BENCH=1
[ "${1:-}" = "--no-bench" ] && BENCH=0
mkdir -p "$OUT" "$PREFIX"

if [ ! -d .debs ] || [ -z "$(ls .debs/*.deb 2>/dev/null)" ]; then
  echo "device_check: .debs/ is empty; run scripts/device_debs.sh where there is a network and carry .debs" >&2
  exit 2
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

{
  echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -2; cmake --version | head -1; c++ --version | head -1; nproc
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# Warnings stay warnings there: its compiler is not the one CI holds the code to.
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_WITH_MPI=OFF -DMOE_WITH_CUDA=ON -DMOE_WERROR=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DProtobuf_PROTOC_EXECUTABLE="$PREFIX/usr/bin/protoc" \
  -DOPENBLAS_INCLUDE_DIR="$PREFIX/usr/include/$ARCH/openblas-pthread" -DOPENBLAS_LIBRARY="$BLAS_DIR/libopenblas.so" \
  > "$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" > "$OUT/build.log" 2>&1 || { grep -E 'error|Error' -A5 "$OUT/build.log" | head -60; exit 1; }
echo "device_check: built"

status=0
(cd "$BUILD" && ctest -L gpu --output-on-failure --timeout 300 > "$OUT/ctest_gpu.log" 2>&1) || status=1
tail -25 "$OUT/ctest_gpu.log"
(cd "$BUILD" && ctest -LE gpu -E 'fuzz|kill|rank_failure' -j 8 --timeout 600 > "$OUT/ctest_rest.log" 2>&1) || status=1
grep -E 'tests passed|tests failed' "$OUT/ctest_rest.log" || tail -20 "$OUT/ctest_rest.log"

# End to end: the trainer on layers on the CUDA device, 4 loopback ranks sharing the GPU (pipelined
# exchanges), next to the same run on the CPU (the losses should agree to fp32 noise), and
# moe_simulate on them.
for dev in cpu cuda; do
  "$BUILD/launch/moe_train" --config configs/tiny_lm.textproto --backend loopback --ranks 4 \
    --device $dev --pipeline-degree 2 --steps 20 --log-every 5 > "$OUT/train_$dev.log" 2>&1 || status=1
  tail -3 "$OUT/train_$dev.log"
done
"$BUILD/launch/moe_simulate" --config configs/tiny_lm.textproto --ranks 4 --device cuda --steps 10 \
  --topology configs/topologies/dgx_h100_8x8.textproto --out "$OUT/simulate_cuda" \
  > "$OUT/simulate_cuda.log" 2>&1 || status=1
tail -12 "$OUT/simulate_cuda.log"

if [ "$BENCH" = 1 ]; then
  "$BUILD/bench/moe_gpu_bench" > "$OUT/gpu_bench.txt" 2>&1 || status=1
  cat "$OUT/gpu_bench.txt"
  # The layer (experts on the GPU) against PyTorch's layer on the same GPU; the machine's python3
  # holds torch.
  for p in fp32 bf16; do
    "$BUILD/bench/moe_layer_bench" --device cuda --precision $p --python python3 \
      --torch-script "$ROOT/bench/torch_layer_bench.py" -n 10 > "$OUT/layer_bench_$p.txt" 2>&1 || status=1
    cat "$OUT/layer_bench_$p.txt"
  done
  # The same with routing on the host (the CPU plan): what the device router saves.
  "$BUILD/bench/moe_layer_bench" --device cuda --precision bf16 --host-routing --no-torch -n 10 \
    > "$OUT/layer_bench_bf16_host_routing.txt" 2>&1 || status=1
  cat "$OUT/layer_bench_bf16_host_routing.txt"
fi
exit $status
