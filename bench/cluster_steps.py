#!/usr/bin/env python3
"""Step times and inter-node bytes of one training job on a multi-node launch, for each exchange
(flat all-to-all, two-stage, node-deduplicated dispatch) and each routing (unlimited top-k, and
group-limited top-k over num_expert_groups = nodes with groups_per_token 1 and 2).

Runs moe_train through a launch prefix (the one scripts/cluster.sh prints), reads its --metrics
(step_seconds, inter_node_bytes, forward_dispatch_inter_node_bytes: every rank's bytes summed) and
prints a markdown table: median step time over the steps after --warmup and rank 0's time inside
the exchanges (alltoall_seconds), inter-node bytes per token of the whole step and of the forward
dispatches alone, and the final loss.

  scripts/cluster.sh up 2 --ranks-per-node 2 --link-gbit 1
  OPENBLAS_NUM_THREADS=1 python3 bench/cluster_steps.py --prefix "$(scripts/cluster.sh prefix)" \\
      --ranks 4 --ranks-per-node 2 --config configs/cluster_lm.textproto
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile


def routed_config(text, groups, per_token):
    """The config with the router's expert groups set (groups 0: left as it is)."""
    if groups == 0:
        return text
    if re.search(r"\b(num_expert_groups|groups_per_token)\b", text):
        sys.exit("the config already sets num_expert_groups / groups_per_token: pass one without them")
    at = text.index("router {") + len("router {")
    return text[:at] + f" num_expert_groups: {groups} groups_per_token: {per_token}" + text[at:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", required=True, help="the launch prefix (scripts/cluster.sh prefix)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--build", default="build")
    ap.add_argument("--config", default="configs/cluster_lm.textproto")
    ap.add_argument("--data", default="data/corpus.txt")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--routings", default="top-k,groups1,groups2",
                    help="top-k (unlimited), groupsG (groups_per_token G over one group per node)")
    ap.add_argument("--exchanges", default="flat,two-stage,dedup")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    if a.ranks % a.ranks_per_node:
        sys.exit("--ranks must be a multiple of --ranks-per-node")
    nodes = a.ranks // a.ranks_per_node
    base = open(a.config).read()
    tokens = int(re.search(r"global_batch_tokens:\s*(\d+)", base).group(1))
    flags = {"flat": [], "two-stage": ["--ranks-per-node", str(a.ranks_per_node)],
             "dedup": ["--ranks-per-node", str(a.ranks_per_node), "--node-dedup"]}
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for routing in a.routings.split(","):
            per_token = 0 if routing == "top-k" else int(routing.removeprefix("groups"))
            config = os.path.join(tmp, f"{routing}.textproto")
            open(config, "w").write(routed_config(base, nodes if per_token else 0, per_token))
            for exchange in a.exchanges.split(","):
                metrics = os.path.join(tmp, f"{routing}_{exchange}.jsonl")
                cmd = shlex.split(a.prefix) + ["-x", "OPENBLAS_NUM_THREADS", "-n", str(a.ranks),
                                               os.path.join(a.build, "launch", "moe_train"), "--config", config,
                                               "--data", a.data, "--steps", str(a.steps), "--quiet",
                                               "--metrics", metrics] + flags[exchange]
                r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                if r.returncode != 0:
                    sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
                steps = [json.loads(line) for line in open(metrics) if line.strip()][a.warmup:]
                med = lambda key, scale=1.0: statistics.median(float(s.get(key, 0)) * scale for s in steps)
                row = {"routing": routing, "exchange": exchange, "steps": len(steps),
                       "step_ms": med("step_seconds", 1e3),
                       "exchange_ms": med("alltoall_seconds", 1e3),
                       "inter_node_bytes_per_token": med("inter_node_bytes") / tokens,
                       "forward_dispatch_inter_node_bytes_per_token": med("forward_dispatch_inter_node_bytes") / tokens,
                       "final_loss": steps[-1]["loss"]}
                rows.append(row)
                print(f"{routing} {exchange}: {row['step_ms']:.0f} ms ({row['exchange_ms']:.0f} in exchanges), "
                      f"{row['inter_node_bytes_per_token']:.0f} B/token "
                      f"({row['forward_dispatch_inter_node_bytes_per_token']:.0f} in forward dispatches)", file=sys.stderr)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    print("| routing | exchange | step (ms, median) | in exchanges (ms, rank 0) | inter-node bytes / token (step) "
          "| of which forward dispatch | final loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['routing']} | {r['exchange']} | {r['step_ms']:.0f} | {r['exchange_ms']:.0f} | "
              f"{r['inter_node_bytes_per_token']:.0f} | {r['forward_dispatch_inter_node_bytes_per_token']:.0f} | "
              f"{r['final_loss']:.6f} |")


if __name__ == "__main__":
    main()
