#!/usr/bin/env python3
"""A small byte-level language model in PyTorch whose MoE blocks are moe_runtime's MoELayer.

    PYTHONPATH=build/python python3 examples/python/train_tiny.py               # one process
    PYTHONPATH=build/python mpirun -n 2 python3 examples/python/train_tiny.py   # expert parallel

Each token predicts the next byte of data/corpus.txt from the previous --context bytes (one
embedding per position, summed), through --layers blocks of [LayerNorm -> MoE -> residual], a final
LayerNorm and a linear head; AdamW over every parameter. Under mpirun every rank takes its share
of each step's tokens, holds num_experts / ranks experts of every MoE layer (the library's
all-to-all dispatch and combine move the rows), and averages gradients with
moe_runtime.torch.allreduce_gradients. One process with --local-groups N routes its tokens in N
groups exactly as N ranks with one group each do, so both runs compute the same loss curve.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import moe_runtime
from moe_runtime.torch import MoELayer, allreduce_gradients

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "data", "corpus.txt")


def moe_config(args, groups):
    return f"""
moe {{
  model_dim: {args.model_dim}
  num_experts: {args.experts}
  expert {{ hidden_dim: {args.hidden_dim} activation: GELU_TANH }}
  router {{
    gate: TOPK
    top_k: 2
    normalization: RENORM_AFTER_CAPACITY
    capacity_factor_train: 1.25
    capacity_factor_eval: 2.0
    min_capacity: 2
    num_local_groups: {groups}
    aux_loss: SWITCH
    aux_loss_weight: 0.01
    z_loss_weight: 0.001
  }}
}}
seed: {args.seed}
"""


class TinyByteLM(torch.nn.Module):
    def __init__(self, args, comm):
        super().__init__()
        m = args.model_dim
        self.context = args.context
        self.embed = torch.nn.ModuleList(torch.nn.Embedding(256, m) for _ in range(args.context))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(m) for _ in range(args.layers))
        self.moe = torch.nn.ModuleList(
            MoELayer(moe_config(args, args.local_groups), seed=args.seed * 100 + i, comm=comm)
            for i in range(args.layers))
        self.norm_f = torch.nn.LayerNorm(m)
        self.head = torch.nn.Linear(m, 256)

    def forward(self, ctx_bytes, token_offset):
        # ctx_bytes: (tokens, context) int64, the previous bytes of each token.
        h = sum(e(ctx_bytes[:, j]) for j, e in enumerate(self.embed))
        router_loss = torch.zeros(())
        for norm, moe in zip(self.norms, self.moe):
            h = h + moe(norm(h), token_offset=token_offset)
            router_loss = router_loss + moe.aux_loss + moe.z_loss
        return self.head(self.norm_f(h)), router_loss


def batch(data, step, tokens, context, seed):
    """The step's global batch: `tokens` positions drawn from (seed, step), the same on every rank."""
    rng = np.random.default_rng([seed, step])
    pos = rng.integers(context, len(data) - 1, size=tokens)
    ctx = np.stack([data[pos - 1 - j] for j in range(context)], axis=1).astype(np.int64)
    return torch.from_numpy(ctx), torch.from_numpy(data[pos].astype(np.int64))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step, all ranks together")
    ap.add_argument("--context", type=int, default=8)
    ap.add_argument("--model-dim", type=int, default=32)
    ap.add_argument("--hidden-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--local-groups", type=int, default=1,
                    help="routing groups per process (moe.router.num_local_groups)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenBLAS threads per process")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--log-json", help="write the loss of every step to this file (rank 0)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    moe_runtime.set_blas_threads(args.threads)
    comm = moe_runtime.world()  # the MPI communicator under mpirun, else None
    rank, ranks = (comm.rank, comm.size) if comm is not None else (0, 1)
    if args.tokens % (ranks * args.local_groups) != 0:
        sys.exit(f"train_tiny: --tokens={args.tokens} must be divisible by ranks x --local-groups "
                 f"= {ranks * args.local_groups}")
    with open(args.data, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)

    torch.manual_seed(args.seed)  # the same dense weights on every rank
    model = TinyByteLM(args, comm)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    share = args.tokens // ranks
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        ctx, target = batch(data, step, args.tokens, args.context, args.seed)
        ctx, target = ctx[rank * share:(rank + 1) * share], target[rank * share:(rank + 1) * share]
        logits, router_loss = model(ctx, token_offset=rank * share)
        ce = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        (ce + router_loss).backward()
        allreduce_gradients(model, comm)
        opt.step()
        # The step's loss over every rank's tokens (float64 sums, the same on every rank).
        ce_sum = torch.nn.functional.cross_entropy(logits.detach().double(), target, reduction="sum")
        stats = np.array([ce_sum.item(), router_loss.item()], dtype=np.float64)
        if comm is not None:
            comm.allreduce(stats)
        loss = stats[0] / args.tokens
        losses.append({"step": step, "loss": loss, "router_loss": stats[1] / ranks})
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            rate = (step + 1) * args.tokens / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss:.4f}  router {stats[1] / ranks:.5f}  "
                  f"{rate:,.0f} tokens/s  ({ranks} rank{'s' if ranks > 1 else ''})", flush=True)
    if rank == 0 and args.log_json:
        with open(args.log_json, "w") as f:
            json.dump({"ranks": ranks, "local_groups": args.local_groups, "steps": losses}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
