#!/usr/bin/env python3
"""A small GPT (decoder-only transformer) on a byte corpus, its feed-forwards dense or moe_runtime MoE.

    python3 scripts/make_corpus.py --out build/corpus                     # the corpus, once
    PYTHONPATH=build/python python3 examples/python/train_gpt.py --ffn moe --experts 8 --top-k 2
    PYTHONPATH=build/python mpirun -n 2 python3 examples/python/train_gpt.py --ffn moe   # expert parallel

The model: byte embeddings plus learned positions, --layers pre-LayerNorm blocks [x + attention(
LN(x)) with a causal mask (torch.nn.MultiheadAttention); x + FFN(LN(x))], a final LayerNorm and a
byte head. The FFN is a dense GELU MLP of --hidden (`--ffn dense`) or moe_runtime's MoELayer
(`--ffn moe`): --experts experts of --hidden each, top-k routing with capacity (GShard), a Switch
load-balancing loss and a z-loss. AdamW with linear warm-up and cosine decay to 10%.

Under mpirun each rank takes its share of every step's sequences and holds experts / ranks experts
of every MoE layer (the library's all-to-all dispatch and combine move the tokens); the attention
and the other replicated weights average their gradients over the ranks. One process with
--local-groups N routes its tokens in N groups exactly as N ranks with one group each do, so both
runs follow the same loss curve.

Every --eval-every steps the held-out loss is measured on a fixed set of held-out sequences. A
progress line (tokens/s, loss, held-out loss, ETA) goes to stdout, every step's record to --log as
JSON lines. --ckpt DIR saves the model and optimizer (one file per rank) every --save-every steps
and at the end; a later run with the same --ckpt resumes from it and continues the same curve.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

import moe_runtime
from moe_runtime.torch import MoELayer, allreduce_gradients

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CORPUS = os.path.join(HERE, "..", "..", "build", "corpus")
CORPUS_HINT = ("make it with `python3 scripts/make_corpus.py --out DIR` (it needs the Debian package "
               "'fortunes', which scripts/setup.sh installs)")


def load_corpus(directory):
    """train and held-out bytes of `directory` (make_corpus.py's train.txt and heldout.txt)."""
    out = []
    for name in ("train.txt", "heldout.txt"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise SystemExit(f"train_gpt: --corpus: {path} does not exist; {CORPUS_HINT}")
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        if data.size == 0:
            raise SystemExit(f"train_gpt: --corpus: {path} is empty; {CORPUS_HINT}")
        out.append(data)
    return out


def moe_config(args, groups):
    norm = "RENORM_AFTER_CAPACITY" if args.top_k > 1 else "NONE"  # top-1 keeps its probability
    return f"""
moe {{
  model_dim: {args.model_dim}
  num_experts: {args.experts}
  expert {{ hidden_dim: {args.hidden} activation: GELU_TANH }}
  router {{
    gate: TOPK
    top_k: {args.top_k}
    normalization: {norm}
    capacity_factor_train: {args.capacity_factor}
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


class DenseFfn(torch.nn.Module):
    def __init__(self, m, h):
        super().__init__()
        self.w1 = torch.nn.Linear(m, h)
        self.w2 = torch.nn.Linear(h, m)

    def forward(self, x, token_offset=0):
        return self.w2(torch.nn.functional.gelu(self.w1(x), approximate="tanh"))


class Block(torch.nn.Module):
    def __init__(self, args, ffn):
        super().__init__()
        m = args.model_dim
        self.ln1 = torch.nn.LayerNorm(m)
        self.attn = torch.nn.MultiheadAttention(m, args.heads, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(m)
        self.ffn = ffn

    def forward(self, h, mask, token_offset):
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.ffn(self.ln2(h), token_offset=token_offset)


class Gpt(torch.nn.Module):
    def __init__(self, args, comm):
        super().__init__()
        m = args.model_dim
        self.embed = torch.nn.Embedding(256, m)
        self.pos = torch.nn.Parameter(torch.randn(args.context, m) * 0.02)
        ffns = []
        for i in range(args.layers):
            if args.ffn == "dense":
                ffns.append(DenseFfn(m, args.hidden))
            else:
                ffns.append(MoELayer(moe_config(args, args.local_groups), seed=args.seed * 100 + i,
                                     comm=comm))
        self.blocks = torch.nn.ModuleList(Block(args, f) for f in ffns)
        self.norm_f = torch.nn.LayerNorm(m)
        self.head = torch.nn.Linear(m, 256)
        t = args.context
        self.register_buffer("mask", torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1),
                             persistent=False)

    def forward(self, seqs, token_offset):
        # seqs: (batch, context) int64 bytes; returns logits (batch, context, 256) and the
        # weighted router losses of the MoE layers (0 for dense).
        h = self.embed(seqs) + self.pos[: seqs.shape[1]]
        router_loss = torch.zeros(())
        for block in self.blocks:
            h = block(h, self.mask, token_offset)
            if isinstance(block.ffn, MoELayer):
                router_loss = router_loss + block.ffn.aux_loss + block.ffn.z_loss
        return self.head(self.norm_f(h)), router_loss


def sequences(data, rng, count, context):
    """`count` windows of context + 1 bytes at positions drawn from `rng`: (inputs, targets)."""
    pos = rng.integers(0, len(data) - context - 1, size=count)
    win = np.stack([data[p:p + context + 1] for p in pos]).astype(np.int64)
    return torch.from_numpy(win[:, :-1]), torch.from_numpy(win[:, 1:])


def learning_rate(args, step):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def parameter_counts(model, ranks, args):
    """(total, active per token) parameters of the whole model (all ranks' experts together)."""
    total = active = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if getattr(p, "expert_parallel", False) or (".ffn.expert_" in name):
            # This process holds num_experts / ranks experts; a token runs top_k of them.
            experts_here = args.experts // ranks
            total += n * ranks
            active += n * args.top_k / experts_here if experts_here else 0
        else:
            total += n
            active += n
    return int(total), int(active)


def flops_per_token(args):
    """Forward + backward model FLOPs per token: the FFNs by the library's accounting, attention
    (projections and the causal scores) and the head by the same rule (2 per multiply-add, ×3)."""
    m, t = args.model_dim, args.context
    if args.ffn == "moe":
        ffn = moe_runtime.layer_flops(moe_config(args, 1), tokens=1, expert_rows=args.top_k)["total"]
    else:  # a dense FFN is one expert that every token runs
        dense = argparse.Namespace(**{**vars(args), "experts": 1, "top_k": 1})
        ffn = moe_runtime.layer_flops(moe_config(dense, 1), tokens=1, expert_rows=1)["experts"]
    attn = 3.0 * (2.0 * 4 * m * m + 2.0 * 2 * m * (t + 1) / 2)  # q,k,v,o; scores and values, causal
    head = 3.0 * 2.0 * m * 256
    return args.layers * (ffn + attn) + head


# Settings that may change between a run and its resumption (the rest must match the checkpoint).
RUN_ONLY = ("corpus", "ckpt", "log", "save_every", "stop_after", "log_every", "threads", "eval_every",
            "eval_sequences")


def checkpoint_path(args, rank, ranks):
    return os.path.join(args.ckpt, f"rank{rank}-of-{ranks}.pt")


def save_checkpoint(args, rank, ranks, model, opt, step, wall, tokens):
    os.makedirs(args.ckpt, exist_ok=True)
    path = checkpoint_path(args, rank, ranks)
    state = {"step": step, "wall": wall, "tokens": tokens, "model": model.state_dict(),
             "opt": opt.state_dict(), "args": {k: v for k, v in vars(args).items() if k not in RUN_ONLY},
             "moe_steps": [b.ffn._step for b in model.blocks if isinstance(b.ffn, MoELayer)]}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash while saving leaves the previous checkpoint


def load_checkpoint(args, rank, ranks, model, opt):
    path = checkpoint_path(args, rank, ranks)
    if not os.path.isfile(path):
        others = [n for n in os.listdir(args.ckpt) if n.endswith(".pt")] if os.path.isdir(args.ckpt) else []
        if others:
            raise SystemExit(f"train_gpt: --ckpt {args.ckpt} holds {', '.join(sorted(others))}, "
                             f"not {os.path.basename(path)}: resume with as many ranks as saved it")
        return 0, 0.0, 0
    state = torch.load(path)
    saved = state["args"]
    mine = {k: v for k, v in vars(args).items() if k in saved}
    diff = [f"{k}={saved[k]} (now {mine[k]})" for k in saved if saved[k] != mine.get(k)]
    if diff:
        raise SystemExit(f"train_gpt: --ckpt {path} was saved with other settings: {', '.join(diff)}")
    model.load_state_dict(state["model"])  # copies into the MoE layers' shared storage
    opt.load_state_dict(state["opt"])
    moes = [b.ffn for b in model.blocks if isinstance(b.ffn, MoELayer)]
    for layer, s in zip(moes, state["moe_steps"]):
        layer._step = s
    return state["step"], state["wall"], state["tokens"]


def evaluate(model, heldout, args, comm, rank, ranks):
    """Mean held-out loss per byte over a fixed set of sequences, in calls of --batch sequences of
    which every rank takes its share (so that the routing groups are those of one process with
    --local-groups = ranks)."""
    model.eval()
    rng = np.random.default_rng(12345)
    inputs, targets = sequences(heldout, rng, args.eval_sequences, args.context)
    share = args.batch // ranks
    total = 0.0
    with torch.no_grad():
        for first in range(0, args.eval_sequences, args.batch):
            lo, hi = first + rank * share, first + (rank + 1) * share
            logits, _ = model(inputs[lo:hi], token_offset=lo * args.context)
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, 256).double(), targets[lo:hi].reshape(-1), reduction="sum").item()
    model.train()
    s = np.array([total], dtype=np.float64)
    if comm is not None:
        comm.allreduce(s)
    return s[0] / (args.eval_sequences * args.context)


def format_seconds(s):
    s = int(max(0, s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="directory of train.txt and heldout.txt")
    ap.add_argument("--ffn", choices=("dense", "moe"), default="moe")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of the dense FFN / of each expert")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--model-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step, all ranks together")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--local-groups", type=int, default=1,
                    help="routing groups per process (moe.router.num_local_groups)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenBLAS threads per process")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-sequences", type=int, default=256)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--log", help="JSON lines: one record per step (rank 0)")
    ap.add_argument("--ckpt", help="checkpoint directory: resume from it, save to it")
    ap.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="leave after this step (saving a checkpoint), as if interrupted; 0: run to --steps")
    args = ap.parse_args(argv)
    rules = [(args.experts >= 1, "--experts must be >= 1"),
             (1 <= args.top_k <= args.experts, "--top-k must be in [1, --experts]"),
             (args.model_dim % args.heads == 0, "--model-dim must be a multiple of --heads"),
             (args.steps >= 1 and args.batch >= 1 and args.context >= 1,
              "--steps, --batch and --context must be >= 1"),
             (args.lr > 0, "--lr must be > 0"),
             (args.eval_sequences >= args.batch and args.eval_sequences % args.batch == 0,
              "--eval-sequences must be a positive multiple of --batch")]
    for ok, rule in rules:
        if not ok:
            raise SystemExit(f"train_gpt: {rule}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    moe_runtime.set_blas_threads(args.threads)
    comm = moe_runtime.world()  # the MPI communicator under mpirun, else None
    rank, ranks = (comm.rank, comm.size) if comm is not None else (0, 1)
    if args.batch % (ranks * args.local_groups):
        raise SystemExit(f"train_gpt: --batch={args.batch} must be divisible by ranks x --local-groups"
                         f" = {ranks * args.local_groups}")
    if args.ffn == "moe" and args.experts % ranks:
        raise SystemExit(f"train_gpt: --experts={args.experts} must be divisible by ranks = {ranks}")
    train, heldout = load_corpus(args.corpus)

    torch.manual_seed(args.seed)  # the same replicated weights on every rank
    model = Gpt(args, comm)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos"]
    keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "pos")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": keep, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    first, wall0, tokens = (0, 0.0, 0)
    if args.ckpt:
        first, wall0, tokens = load_checkpoint(args, rank, ranks, model, opt)
    total, active = parameter_counts(model, ranks, args)
    fpt = flops_per_token(args)
    if rank == 0:
        print(f"train_gpt: {args.ffn} FFN, {total:,} parameters ({active:,} active per token), "
              f"{fpt / 1e6:.2f} MFLOP per token (fwd+bwd), {ranks} rank{'s' if ranks > 1 else ''}, "
              f"corpus {len(train):,} + {len(heldout):,} bytes"
              + (f", resuming at step {first}" if first else ""), flush=True)
    log = open(args.log, "a" if first else "w") if (rank == 0 and args.log) else None
    if log and not first:
        log.write(json.dumps({"meta": True, "ffn": args.ffn, "experts": args.experts,
                              "top_k": args.top_k, "hidden": args.hidden, "lr": args.lr,
                              "seed": args.seed, "ranks": ranks, "params": total,
                              "active_params": active, "flops_per_token": fpt}) + "\n")
    share = args.batch // ranks
    last = min(args.steps, args.stop_after) if args.stop_after else args.steps
    start = time.perf_counter()
    step = first
    for step in range(first, last):
        lr = learning_rate(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([args.seed, step])
        inputs, targets = sequences(train, rng, args.batch, args.context)
        lo = rank * share
        logits, router_loss = model(inputs[lo:lo + share], token_offset=lo * args.context)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets[lo:lo + share].reshape(-1))
        opt.zero_grad()
        (ce + router_loss).backward()
        allreduce_gradients(model, comm)
        opt.step()
        stats = np.array([ce.item() * share, router_loss.item()], dtype=np.float64)
        if comm is not None:
            comm.allreduce(stats)
        loss = stats[0] / args.batch
        tokens += args.batch * args.context
        rec = {"step": step, "tokens": tokens, "loss": loss, "router_loss": stats[1] / ranks,
               "lr": lr}
        done = step + 1 == last
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            rec["heldout_loss"] = evaluate(model, heldout, args, comm, rank, ranks)
        wall = wall0 + time.perf_counter() - start
        rec["wall_s"] = wall
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if rank == 0 and (step % args.log_every == 0 or done or "heldout_loss" in rec):
            rate = (step + 1 - first) * args.batch * args.context / (time.perf_counter() - start)
            eta = (args.steps - step - 1) * args.batch * args.context / rate
            held = f"  held-out {rec['heldout_loss']:.4f}" if "heldout_loss" in rec else ""
            print(f"step {step + 1:5d}/{args.steps}  loss {loss:.4f}{held}  {rate:,.0f} tokens/s  "
                  f"ETA {format_seconds(eta)}", flush=True)
        if args.ckpt and (done or (args.save_every and (step + 1) % args.save_every == 0)):
            save_checkpoint(args, rank, ranks, model, opt, step + 1, wall, tokens)
    if log:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
