#!/usr/bin/env python3
"""The MoE layer from Python: what the module's surface costs, against the same layer in PyTorch.

    PYTHONPATH=build/python python3 bench/python_layer_bench.py [--s 1024 --m 256 --h 1024 --e 8 --k 2]

Times forward + backward (median of --iters after a warm-up, one thread everywhere) of
  1. moe_runtime.Layer on NumPy arrays (the C++ layer with the module's array and GIL handling),
  2. moe_runtime.torch.MoELayer through autograd (loss = sum(y * dy) + aux + z),
  3. bench/torch_layer_bench.py's PyTorch layer of the same shape (experts as separate tensors),
and prints one line per row with its ratio to row 1: the module's overhead (2 / 1) and what a
PyTorch user gains by swapping their layer for MoELayer (3 / 2). Layer: GELU-tanh FFN experts,
capacity factor 1.25, top-k softmax router.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

import moe_runtime
from moe_runtime.torch import MoELayer

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_layer_bench  # noqa: E402


def median_ms(fn, iters, warmup=1):
    times = []
    for i in range(iters + warmup):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--s", type=int, default=1024)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--e", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    moe_runtime.set_blas_threads(1)
    cfg = (f"moe {{ model_dim: {a.m} num_experts: {a.e} expert {{ hidden_dim: {a.h} activation: GELU_TANH }} "
           f"router {{ top_k: {a.k} capacity_factor_train: 1.25 normalization: NONE }} }}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.s, a.m)).astype(np.float32)
    dy = rng.standard_normal((a.s, a.m)).astype(np.float32)

    layer = moe_runtime.Layer(cfg, seed=1)

    def raw():
        layer.forward(x, train=True)
        layer.backward(dy)

    module = MoELayer(cfg, seed=1)
    xt, dyt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)

    def wrapped():
        module.zero_grad(set_to_none=True)
        xt.grad = None
        y = module(xt)
        ((y * dyt).sum() + module.aux_loss + module.z_loss).backward()

    torch.manual_seed(0)
    leaf = lambda t: t.requires_grad_()  # noqa: E731
    wg = leaf(torch.randn(a.m, a.e) / a.m ** 0.5)
    w1 = [leaf(torch.randn(a.m, a.h) / a.m ** 0.5) for _ in range(a.e)]
    b1 = [leaf(torch.zeros(a.h)) for _ in range(a.e)]
    w2 = [leaf(torch.randn(a.h, a.m) / a.h ** 0.5) for _ in range(a.e)]
    b2 = [leaf(torch.zeros(a.m)) for _ in range(a.e)]
    cap = max(4, -(-a.k * a.s * 5 // (4 * a.e)))
    xr = torch.from_numpy(x.copy()).requires_grad_()

    def plain_torch():
        for t in [xr, wg] + w1 + b1 + w2 + b2:
            t.grad = None
        torch_layer_bench.layer(xr, wg, w1, b1, w2, b2, a.k, cap).backward(dyt)

    t_raw = median_ms(raw, a.iters)
    t_mod = median_ms(wrapped, a.iters)
    t_torch = median_ms(plain_torch, a.iters)
    core = os.environ.get("OPENBLAS_CORETYPE", "(auto)")
    print(f"S={a.s} M={a.m} H={a.h} E={a.e} k={a.k}, forward+backward, one thread "
          f"(OPENBLAS_CORETYPE={core}, torch {torch.__version__}), median of {a.iters}:")
    print(f"  moe_runtime.Layer (NumPy)        {t_raw:9.2f} ms  1.00")
    print(f"  moe_runtime.torch.MoELayer       {t_mod:9.2f} ms  {t_mod / t_raw:.2f}  (module overhead)")
    print(f"  PyTorch layer (same shape)       {t_torch:9.2f} ms  {t_torch / t_raw:.2f}  "
          f"(PyTorch / MoELayer = {t_torch / t_mod:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
