#!/usr/bin/env python3
"""moe_simulate --padding account against --padding materialize on the same config and ranks.

The accounted run moves and computes only the real rows of the capacity exchange but records what
the padded exchange moves: every per-exchange and per-step traffic matrix must be identical, no
counts exchange may appear, and the per-step losses must agree (the padding rows add exact zeros;
only the order of the weight-gradient sums may differ, so within 1e-6).
"""
import argparse
import json
import os
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--simulate", required=True)
ap.add_argument("--config", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

runs = {}
for mode in ("materialize", "account"):
    out = os.path.join(args.out, mode)
    cmd = [args.simulate, "--config", args.config, "--ranks", "4", "--steps", "6",
           "--data", args.data, "--padding", mode, "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    if mode == "account" and "capacity padding accounted" not in r.stdout:
        sys.exit("the accounted run did not say so:\n" + r.stdout)
    with open(os.path.join(out, "measured.json")) as f:
        runs[mode] = json.load(f)

a, b = runs["materialize"], runs["account"]
assert a["allreduce_bytes"] == b["allreduce_bytes"], (a["allreduce_bytes"], b["allreduce_bytes"])
for sa, sb in zip(a["per_step"], b["per_step"]):
    assert abs(sa["loss"] - sb["loss"]) <= 1e-6, (sa["step"], sa["loss"], sb["loss"])
    assert sa["bytes_src_dst"] == sb["bytes_src_dst"], sa["step"]
    key = lambda e: (e["kind"], e["backward"], e["chunk"], e["chunks"], e["bytes_src_dst"])
    ea, eb = [key(e) for e in sa["exchanges"]], [key(e) for e in sb["exchanges"]]
    assert ea == eb, (sa["step"], len(ea), len(eb))
    assert all(e["kind"] != "counts" for e in sb["exchanges"]), "a counts exchange was recorded"
    assert sum(sum(row) for row in sa["bytes_src_dst"]) > 0
print(f"padding accounted: {len(a['per_step'])} steps, every traffic matrix identical, "
      f"final loss {a['final_loss']:.9f} vs {b['final_loss']:.9f}")
