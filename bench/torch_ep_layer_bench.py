"""PyTorch expert-parallel MoE layer baseline on CPU ranks (torch.distributed, gloo backend).

Measures the layer the way DeepSpeed-MoE / Tutel / FastMoE run expert parallelism: every rank
holds its own S tokens, a replicated router and E/W experts; tokens are scattered into a padded
(E, C, M) dispatch buffer, exchanged with an autograd-aware all_to_all_single, run through the
local GELU-tanh FFN experts, sent back with a second all_to_all_single and combined with the gate
weights (top-k, no renormalization, capacity C per expert per source rank, slot-major position
drop policy). Everything is float32 with autograd recording; the backward goes through both
all-to-alls and the router.

Launch (one process per rank is spawned from here, each with one intra-op thread):

    python3 bench/torch_ep_layer_bench.py --ranks W --s S --m M --h H --e E --k K --iters N \
        [--capacity-factor 1.25] [--warmup 2] [--port 29533] [--check]

Timing: after --warmup iterations, each of --iters iterations is preceded by a barrier and timed
with perf_counter on every rank; the slowest rank's time (all_reduce MAX) counts for that
iteration. Rank 0 prints one JSON line on stdout with the median forward time (separate loop,
forward only) and the median forward+backward time in milliseconds.

--check: instead of timing, runs one forward (and backward) on W ranks and compares the outputs
(and the gradients) with a single-process computation of the same layer on rank 0; prints
{"check":"ok","max_abs_diff":...,"max_rel_grad_diff":...} (both must be < 1e-4; the gradient
difference is scaled by max(1, max |reference gradient|)) or exits with status 1.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.nn.functional import all_to_all_single

# Seeds: the router and every expert have their own fixed seed so any rank can rebuild them;
# tokens and the upstream gradient are seeded per rank.
ROUTER_SEED = 1234
X_SEED = 1000
DY_SEED = 2000
EXPERT_SEED = 3000
CHECK_TOL = 1e-4


def capacity(k, s, e, factor):
    return max(4, math.ceil(k * s * factor / e))


def randn(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def make_expert(e, m, h):
    """Weights of global expert e as separate leaf tensors (w1, b1, w2, b2)."""
    g = torch.Generator().manual_seed(EXPERT_SEED + e)
    w1 = (torch.randn(m, h, generator=g) / math.sqrt(m)).requires_grad_()
    b1 = torch.zeros(h).requires_grad_()
    w2 = (torch.randn(h, m, generator=g) / math.sqrt(h)).requires_grad_()
    b2 = torch.zeros(m).requires_grad_()
    return [w1, b1, w2, b2]


def expert_ffn(rows, w):
    w1, b1, w2, b2 = w
    return torch.nn.functional.gelu(rows @ w1 + b1, approximate="tanh") @ w2 + b2


def route(x, wg, k, cap):
    """Top-k routing with slot-major position drop policy.

    Returns, for the kept (token, slot) pairs in slot-major order: token index, expert index,
    position within the expert, and gate weight (differentiable w.r.t. x and wg).
    """
    s, e = x.shape[0], wg.shape[1]
    probs = torch.softmax(x @ wg, dim=-1)
    gate, idx = torch.topk(probs, k, dim=-1)
    # Slot-major order: all slot-0 tokens in token order, then slot 1, ...
    flat_e = idx.t().reshape(-1)
    flat_t = torch.arange(s).repeat(k)
    flat_j = torch.arange(k).repeat_interleave(s)
    onehot = torch.nn.functional.one_hot(flat_e, e)
    pos = (torch.cumsum(onehot, 0) - 1).gather(1, flat_e[:, None])[:, 0]
    keep = pos < cap
    tok, exp, slot, pos = flat_t[keep], flat_e[keep], flat_j[keep], pos[keep]
    return tok, exp, pos, gate[tok, slot]


def ep_forward(x, wg, local_experts, k, cap, world):
    """Expert-parallel layer forward on this rank; returns y (S x M)."""
    s, m = x.shape
    e = wg.shape[1]
    nloc = e // world
    tok, exp, pos, g = route(x, wg, k, cap)
    dest = exp * cap + pos
    # Dispatch buffer (E*C, M): row e*C+pos holds the token; differentiable w.r.t. x.
    send = torch.zeros(e * cap, m).index_add_(0, dest, x.index_select(0, tok))
    # Rank p receives from every source rank the (L, C, M) block of its local experts.
    recv = all_to_all_single(torch.empty(e * cap, m), send)
    recv = recv.reshape(world, nloc, cap, m)
    outs = []
    for l, w in enumerate(local_experts):
        rows = recv[:, l].reshape(world * cap, m)
        outs.append(expert_ffn(rows, w).reshape(world, cap, m))
    out = torch.stack(outs, dim=1).reshape(e * cap, m)
    back = all_to_all_single(torch.empty(e * cap, m), out)
    # Combine: y[t] = sum_j gate[t, j] * back[idx[t, j] * C + pos[t, j]].
    contrib = back.index_select(0, dest) * g[:, None]
    return torch.zeros(s, m).index_add_(0, tok, contrib)


def reference_forward(x, wg, experts, k, cap):
    """Single-process layer on one source rank's tokens (capacity per source rank)."""
    tok, exp, pos, g = route(x, wg, k, cap)
    y = torch.zeros_like(x)
    for ex, w in enumerate(experts):
        sel = exp == ex
        if not bool(sel.any()):
            continue
        t = tok[sel]
        y = y.index_add(0, t, expert_ffn(x.index_select(0, t), w) * g[sel][:, None])
    return y


def max_abs(a, b):
    """Max |a - b|; a gradient that was never produced (None) counts as zeros."""
    if b is None:
        b = torch.zeros_like(a)
    return float((a - b).abs().max()) if a.numel() else 0.0


def max_rel(a, b):
    """Max |a - b| scaled by max(1, max |b|): gradients of weights grow with the token count."""
    if b is None:
        b = torch.zeros_like(a)
    return max_abs(a, b) / max(1.0, float(b.abs().max()) if b.numel() else 0.0)


def run_check(a, rank, world, x, wg, local, dy, cap):
    y = ep_forward(x, wg, local, a.k, cap, world)
    (y * dy).sum().backward()
    # Router gradient of the whole (all-rank) loss: sum of the per-rank contributions.
    wg_grad = wg.grad.clone()
    dist.all_reduce(wg_grad)

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return parts

    xs, ys, dys, dxs = gather(x.detach()), gather(y.detach()), gather(dy), gather(x.grad)
    loc_grads = [gather(p.grad) for w in local for p in w]
    ok = torch.zeros(1)
    if rank == 0:
        nloc = a.e // world
        experts = [make_expert(ex, a.m, a.h) for ex in range(a.e)]
        wg_ref = (randn((a.m, a.e), ROUTER_SEED) / math.sqrt(a.m)).requires_grad_()
        xr = [t.clone().requires_grad_() for t in xs]
        yr = [reference_forward(xr[r], wg_ref, experts, a.k, cap) for r in range(world)]
        sum((yr[r] * dys[r]).sum() for r in range(world)).backward()
        diff = max(max_abs(ys[r], yr[r].detach()) for r in range(world))
        gdiff = max(max_rel(dxs[r], xr[r].grad) for r in range(world))
        gdiff = max(gdiff, max_rel(wg_grad, wg_ref.grad))
        for r in range(world):
            for l in range(nloc):
                for p in range(4):
                    got = loc_grads[l * 4 + p][r]
                    gdiff = max(gdiff, max_rel(got, experts[r * nloc + l][p].grad))
        passed = diff < CHECK_TOL and gdiff < CHECK_TOL
        if passed:
            print(json.dumps({"check": "ok", "max_abs_diff": diff, "max_rel_grad_diff": gdiff},
                             separators=(",", ":")),
                  flush=True)
            ok.fill_(1)
        else:
            print(f"check failed: max_abs_diff={diff} max_rel_grad_diff={gdiff} "
                  f"(tolerance {CHECK_TOL})", file=sys.stderr, flush=True)
    dist.broadcast(ok, 0)
    return bool(ok.item())


def run_bench(a, rank, world, x, wg, local, dy, cap):
    params = [x, wg] + [p for w in local for p in w]

    def step(backward):
        for p in params:
            p.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        y = ep_forward(x, wg, local, a.k, cap, world)
        if backward:
            (y * dy).sum().backward()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        return dt.item() * 1e3

    for _ in range(a.warmup):
        step(True)
    fwd_bwd = statistics.median(step(True) for _ in range(a.iters))
    fwd = statistics.median(step(False) for _ in range(a.iters))
    if rank == 0:
        print(json.dumps({
            "impl": "torch_gloo", "ranks": world, "s": a.s, "m": a.m, "h": a.h, "e": a.e,
            "k": a.k, "capacity": cap, "fwd_ms": round(fwd, 3), "fwd_bwd_ms": round(fwd_bwd, 3),
            "iters": a.iters, "threads_per_rank": 1, "torch": torch.__version__,
        }, separators=(",", ":")), flush=True)
    return True


def worker(rank, a):
    world = a.ranks
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(a.port)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        nloc = a.e // world
        cap = capacity(a.k, a.s, a.e, a.capacity_factor)
        x = randn((a.s, a.m), X_SEED + rank).requires_grad_()
        wg = (randn((a.m, a.e), ROUTER_SEED) / math.sqrt(a.m)).requires_grad_()
        local = [make_expert(rank * nloc + l, a.m, a.h) for l in range(nloc)]
        dy = randn((a.s, a.m), DY_SEED + rank)
        run = run_check if a.check else run_bench
        ok = run(a, rank, world, x, wg, local, dy, cap)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, required=True, help="number of ranks W (processes)")
    p.add_argument("--s", type=int, required=True, help="tokens per rank")
    p.add_argument("--m", type=int, required=True, help="model dim")
    p.add_argument("--h", type=int, required=True, help="expert hidden dim")
    p.add_argument("--e", type=int, required=True, help="total experts (multiple of --ranks)")
    p.add_argument("--k", type=int, required=True, help="experts per token")
    p.add_argument("--iters", type=int, required=True, help="timed iterations")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--check", action="store_true",
                   help="compare with a single-process computation instead of timing")
    a = p.parse_args()
    for n in ("ranks", "s", "m", "h", "e", "k", "iters"):
        if getattr(a, n) < 1:
            p.error(f"--{n} must be >= 1 (got {getattr(a, n)})")
    if a.e % a.ranks != 0:
        p.error(f"--e ({a.e}) must be a multiple of --ranks ({a.ranks})")
    if a.k > a.e:
        p.error(f"--k ({a.k}) must not exceed --e ({a.e})")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if not a.capacity_factor > 0:
        p.error("--capacity-factor must be > 0")
    if not 0 < a.port < 65536:
        p.error("--port must be in 1..65535")
    try:
        mp.spawn(worker, args=(a,), nprocs=a.ranks, join=True)
    except Exception as ex:  # a rank failed; spawn has terminated the others
        print(f"torch_ep_layer_bench: {type(ex).__name__}: {ex}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
