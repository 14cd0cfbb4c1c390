"""Redundant experts end to end (parallel.num_redundant_experts, parallel.rebalance_every).

1. Equivalence: 4 ranks with R redundant experts, the placement recomputed every 5 steps (weights
   and AdamW moments moving between ranks), against 1 rank with 4 local groups and no replicas —
   the same model: loss curves within 1e-5 and the final parameters (the checkpoints, keyed by
   logical expert): the MoE layers' (routers, experts: what the replicas change) within 1e-5, the
   rest within 1e-4 — those differ between 4 ranks and 1 rank at R = 0 already (AdamW divides by
   sqrt(v) on rarely seen embedding rows, which amplifies the order of the world's gradient sum:
   2.9e-6 for E = 8, 1.5e-5 for E = 7, the same with and without replicas). R = 1, 2, 4 (E = 7, 6, 8 so that E + R divides over 4 ranks) on
   loopback threads, and R = 4 under mpiexec -n 4.
2. Resharding: a run saved with R = 2 on 4 ranks at step 10 resumes with R = 0 on 2 ranks (2 local
   groups each) and continues the reference's curve: at step 20 the parameters equal the
   reference's within 1e-5. (Longer continuations reach steps where a near-tie in routing flips
   between world layouts in the sanitizer build, R = 0 or not.)

Usage: check_redundant_experts.py --tool moe_train --mpiexec mpiexec --config tiny_lm.textproto
                                   --data corpus.txt --workdir DIR"""
import array
import ast
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import train_check

TOL = 1e-5


def run(cmd, env):
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    print(r.stdout[-1500:], flush=True)
    if r.returncode != 0:
        sys.exit(f"command failed with exit code {r.returncode}")
    return r.stdout


def losses(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def latest_checkpoint(root):
    dirs = sorted(d for d in glob.glob(os.path.join(root, "*"))
                  if os.path.exists(os.path.join(d, "manifest.textproto")))
    if not dirs:
        sys.exit(f"no checkpoint in {root}")
    return dirs[-1]


def read_npy(path):
    """The float32 values of a .npy file (the checkpoint's format; no numpy needed)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        sys.exit(f"{path}: not a .npy file")
    major = data[6]
    (hlen,) = struct.unpack("<H" if major == 1 else "<I", data[8:10] if major == 1 else data[8:12])
    start = (10 if major == 1 else 12) + hlen
    header = ast.literal_eval(data[(10 if major == 1 else 12):start].decode("latin1"))
    if header["descr"] != "<f4":
        sys.exit(f"{path}: dtype {header['descr']}, expected <f4")
    values = array.array("f")
    values.frombytes(data[start:])
    return values


def parameters(root):
    d = latest_checkpoint(root)
    out = {}
    for path in glob.glob(os.path.join(d, "*.npy")):
        name = os.path.basename(path)[:-4]
        if name.endswith(".adam_m") or name.endswith(".adam_v"):
            continue
        out[name] = read_npy(path)
    return out


def worst_difference(a, b):
    """Largest |a - b| over the MoE layers' tensors and over the others."""
    if sorted(a) != sorted(b):
        sys.exit(f"checkpoints hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    worst = [0.0, 0.0]
    for k in a:
        if len(a[k]) != len(b[k]):
            sys.exit(f"{k}: {len(a[k])} values against {len(b[k])}")
        i = 0 if "_moe_" in k else 1
        worst[i] = max([worst[i]] + [abs(x - y) for x, y in zip(a[k], b[k])])
    return worst


def params_ok(diff):
    return diff[0] <= TOL and diff[1] <= 10 * TOL


def main():
    a = train_check.parse_args(__doc__)
    train_check.fresh_workdir(a.workdir)
    env = train_check.mpi_env()
    with open(a.config) as f:
        base = f.read()
    failures = []

    def config(experts):
        path = os.path.join(a.workdir, f"e{experts}.textproto")
        text = re.sub(r"num_experts: \d+", f"num_experts: {experts}", base)
        text = re.sub(r"eval_every: \d+", "eval_every: 0", text)
        with open(path, "w") as f:
            f.write(text)
        return path

    def train(tag, experts, steps, launcher, extra):
        metrics = os.path.join(a.workdir, tag + ".jsonl")
        ckpt = os.path.join(a.workdir, tag + "_ckpt")
        out = run(launcher + ["--config", config(experts), "--data", a.data, "--steps", str(steps),
                              "--metrics", metrics, "--checkpoint-dir", ckpt, "--log-every", "10"]
                  + extra, env)
        return losses(metrics), ckpt, out

    loopback = lambda n: [a.tool, "--backend", "loopback", "--ranks", str(n)]
    mpi4 = [a.mpiexec, "-n", "4", a.tool, "--backend", "mpi"]
    steps = 30
    refs = {}
    for experts, r, launcher, tag in ((7, 1, loopback(4), "loopback"), (6, 2, loopback(4), "loopback"),
                                      (8, 4, loopback(4), "loopback"), (8, 4, mpi4, "mpi")):
        if experts not in refs:
            refs[experts] = train(f"ref_e{experts}", experts, steps, loopback(1),
                                  ["--local-groups", "4"])
        ref_curve, ref_ckpt, _ = refs[experts]
        curve, ckpt, out = train(f"{tag}_e{experts}_r{r}", experts, steps, launcher,
                                 ["--redundant-experts", str(r), "--rebalance-every", "5"])
        loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(curve, ref_curve))
        param_diff = worst_difference(parameters(ckpt), parameters(ref_ckpt))
        rebalanced = sum(1 for m in curve if m.get("rebalanced"))
        before = sum(m.get("rank_load_imbalance_without_replicas", 0) for m in curve) / len(curve)
        after = sum(m.get("rank_load_imbalance", 0) for m in curve) / len(curve)
        print(f"{tag} E={experts} R={r}: {len(curve)} steps, {rebalanced} rebalances; max |loss - "
              f"1 rank G=4| = {loss_diff:.2e}, max |parameter difference| MoE layers "
              f"{param_diff[0]:.2e}, other {param_diff[1]:.2e}; "
              f"EP rank load max/mean {before:.3f} without replicas, {after:.3f} with", flush=True)
        if len(curve) != steps or loss_diff > TOL or not params_ok(param_diff):
            failures.append(f"{tag} E={experts} R={r}")
        if rebalanced != steps // 5:
            failures.append(f"{tag} E={experts} R={r}: {rebalanced} rebalances, expected {steps // 5}")

    # Resharding: saved with R = 2 on 4 ranks at step 10, resumed with R = 0 on 2 ranks.
    ref20, ref20_ckpt, _ = train("ref_e6_20", 6, 20, loopback(1), ["--local-groups", "4"])
    _, saved, _ = train("reshard_r2_w4", 6, 10, loopback(4),
                        ["--redundant-experts", "2", "--rebalance-every", "5"])
    resumed_dir = os.path.join(a.workdir, "reshard_r0_w2_ckpt")
    shutil.copytree(saved, resumed_dir)
    metrics = os.path.join(a.workdir, "reshard_r0_w2.jsonl")
    run(loopback(2) + ["--config", config(6), "--data", a.data, "--steps", "20", "--metrics",
                       metrics, "--checkpoint-dir", resumed_dir, "--resume", "--local-groups", "2",
                       "--quiet"], env)
    tail = losses(metrics)
    loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(tail, ref20[10:]))
    param_diff = worst_difference(parameters(resumed_dir), parameters(ref20_ckpt))
    print(f"resharding R=2 on 4 ranks -> R=0 on 2 ranks at step 10: {len(tail)} more steps, max "
          f"|loss - reference| = {loss_diff:.2e}, max |parameter difference| at step 20: MoE "
          f"layers {param_diff[0]:.2e}, other {param_diff[1]:.2e}", flush=True)
    if len(tail) != 10 or loss_diff > TOL or not params_ok(param_diff):
        failures.append("resharding")
    print("FAILED: " + ", ".join(failures) if failures else "all passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
