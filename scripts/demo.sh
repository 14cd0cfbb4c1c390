#!/usr/bin/env bash
# Sets up the machine, builds, and runs a demo of the main job: `mpirun -n 4 moe_train` trains a
# byte-level MoE language model (8 experts over 4 ranks, top-2, capacity 1.25) on the shipped corpus.
# Then one MoE layer call (GShard top-2, 2 local groups, a shared expert) is checked against the
# PyTorch reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
# Only what the demo runs (scripts/test.sh builds the rest, tests and CUDA objects included).
cmake --build build -j "$(nproc)" --target moe_train moe_layer
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # mpirun as root (containers)
export OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=1   # 4 ranks on a small machine
echo "== mpirun -n 4 moe_train --config configs/tiny_lm.textproto =="
mpirun -n 4 build/launch/moe_train --config configs/tiny_lm.textproto --metrics build/demo_train.jsonl --log-every 25

OUT=build/demo
mkdir -p "$OUT"
/usr/bin/python3 - "$OUT" <<'PY'
import sys
import numpy as np
rng = np.random.default_rng(0)
np.save(f"{sys.argv[1]}/x.npy", rng.standard_normal((512, 64)).astype(np.float32))
np.save(f"{sys.argv[1]}/dy.npy", rng.standard_normal((512, 64)).astype(np.float32))
PY
./build/launch/moe_layer --config configs/layer_gshard_top2.textproto --input "$OUT/x.npy" \
  --init-seed 1 --grad-output "$OUT/dy.npy" --train --out "$OUT/layer"
echo "== metrics (per expert: kept tokens, dropped slots) =="
cat "$OUT/layer/metrics.json"
/usr/bin/python3 tests/reference/moe_reference.py --config-json "$OUT/layer/config.json" \
  --input "$OUT/x.npy" --weights "$OUT/layer/weights" --grad-output "$OUT/dy.npy" --train \
  --out "$OUT/reference"
/usr/bin/python3 - "$OUT" <<'PY'
import sys, glob, os
import numpy as np
out = sys.argv[1]
same = (np.load(f"{out}/layer/routing_expert.npy") == np.load(f"{out}/reference/routing_expert.npy")).all()
print(f"routing identical to the PyTorch reference: {bool(same)}")
def err(name):
    a, b = np.load(f"{out}/layer/{name}"), np.load(f"{out}/reference/{name}")
    return np.abs(a - b).max() / max(1.0, np.abs(b).max())
grads = sorted(os.path.basename(p) for p in glob.glob(f"{out}/layer/grad_*.npy"))
print(f"max |ours - torch| / max(1, |torch|): y {err('y.npy'):.1e}, dx {err('dx.npy'):.1e}, "
      f"worst of {len(grads)} weight gradients {max(err(g) for g in grads):.1e}")
PY
