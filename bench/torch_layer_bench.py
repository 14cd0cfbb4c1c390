"""PyTorch baseline for moe_layer_bench: the same top-k MoE layer (GELU-tanh FFN experts, capacity
1.25, position drop policy, no renormalization), forward + backward with autograd, float32, one
thread (--device cuda: on the GPU, --dtype bf16: bf16 experts). Experts are separate tensors (as an nn.ModuleList of experts would hold them), so the
backward does not materialize a gradient of all experts per expert. Prints two medians on one line
of stdout: milliseconds of one forward (autograd recording, as in training) and of one fwd+bwd."""
import argparse
import math
import time

import torch


def layer(x, wg, w1, b1, w2, b2, k, cap):
    s, e = x.shape[0], wg.shape[1]
    probs = torch.softmax(x @ wg, dim=-1)
    gate, idx = torch.topk(probs, k, dim=-1)
    y = torch.zeros_like(x)
    # Slot-major capacity by position: cumulative count per expert over (slot, token).
    flat = idx.t().reshape(-1)
    onehot = torch.nn.functional.one_hot(flat, e)
    pos = (torch.cumsum(onehot, 0) - 1).gather(1, flat[:, None])[:, 0]
    keep = (pos < cap).reshape(k, s).t()
    for ex in range(e):
        tok, slot = torch.nonzero((idx == ex) & keep, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok].to(w1[ex].dtype)
        h = torch.nn.functional.gelu(xe @ w1[ex] + b1[ex], approximate="tanh")
        out = (h @ w2[ex] + b2[ex]).float()
        y.index_add_(0, tok, out * gate[tok, slot][:, None])
    return y


def main():
    p = argparse.ArgumentParser()
    for n in ("s", "m", "h", "e", "k", "iters"):
        p.add_argument("--" + n, type=int, required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    et = torch.bfloat16 if a.dtype == "bf16" else torch.float32

    def leaf(t, dtype=torch.float32):
        return t.to(device=dev, dtype=dtype).requires_grad_()

    x = leaf(torch.randn(a.s, a.m))
    wg = leaf(torch.randn(a.m, a.e) / math.sqrt(a.m))
    w1 = [leaf(torch.randn(a.m, a.h) / math.sqrt(a.m), et) for _ in range(a.e)]
    b1 = [leaf(torch.zeros(a.h), et) for _ in range(a.e)]
    w2 = [leaf(torch.randn(a.h, a.m) / math.sqrt(a.h), et) for _ in range(a.e)]
    b2 = [leaf(torch.zeros(a.m), et) for _ in range(a.e)]
    dy = torch.randn(a.s, a.m, device=dev)
    cap = max(4, math.ceil(a.k * a.s * 1.25 / a.e))
    warmup = 1 if a.device == "cpu" else 3

    def median_ms(backward):
        times = []
        for i in range(a.iters + warmup):
            if a.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = layer(x, wg, w1, b1, w2, b2, a.k, cap)
            if backward:
                y.backward(dy)
            if a.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter() - t0
            if i >= warmup:
                times.append(t)
            del y
            for t_ in [x, wg] + w1 + b1 + w2 + b2:
                t_.grad = None
        times.sort()
        return times[len(times) // 2] * 1e3

    fwd = median_ms(False)
    print(f"{fwd:.3f} {median_ms(True):.3f}")

if __name__ == "__main__":
    main()
