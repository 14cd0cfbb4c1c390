#!/usr/bin/env python3
"""moe_simulate end to end: outputs exist, the traffic comes per exchange from the executors, and the
simulated final loss equals moe_train's on 4 loopback ranks and (with --mpiexec) on 4 MPI ranks.
With --compute-topology (slow GPUs: the experts cost as much as the exchanges) also the pipelined
exchange (parallel.pipeline_degree 2): chunked exchanges in issue order D0 D1 C0 C1 per layer and
direction, and a predicted overlap > 0, where pipeline degree 1 predicts none. Also the two-stage
exchange on 2-rank nodes with and without parallel.node_dedup: the same loss, the deduplicated
dispatches predicted cheaper."""
import argparse, json, os, re, subprocess, sys

ap = argparse.ArgumentParser()
ap.add_argument("--simulate", required=True)
ap.add_argument("--train", required=True)
ap.add_argument("--config", required=True)
ap.add_argument("--topology", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--mpiexec", default="", help="also compare with mpiexec -n 4 moe_train --backend mpi")
ap.add_argument("--compute-topology", default="", help="also check the pipelined prediction on this topology")
a = ap.parse_args()
os.makedirs(a.out, exist_ok=True)
common = ["--config", a.config, "--ranks", "4", "--steps", "20", "--data", a.data]
subprocess.run([a.simulate, *common, "--topology", a.topology, "--out", a.out], check=True)
for name in ("measured.json", "expert_load.svg", "rank_time.svg", "predicted.json"):
    path = os.path.join(a.out, name)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        sys.exit(f"missing or empty: {path}")
measured = json.load(open(os.path.join(a.out, "measured.json")))
predicted = json.load(open(os.path.join(a.out, "predicted.json")))
assert measured["ranks"] == 4 and measured["steps"] == 20 and len(measured["per_step"]) == 20
assert len(measured["per_step"][0]["bytes_src_dst"]) == 4
# tiny_lm (2 layers, capacity exchange): per step 2 layers x (forward + backward) x (dispatch +
# combine) = 8 exchanges of equal shape; the per-exchange matrices add up to bytes_src_dst.
for step in measured["per_step"]:
    ex = step["exchanges"]
    assert [e["kind"] for e in ex].count("dispatch") == 4 and [e["kind"] for e in ex].count("combine") == 4, ex
    assert sum(e["backward"] for e in ex) == 4
    total = [[sum(e["bytes_src_dst"][i][j] for e in ex) for j in range(4)] for i in range(4)]
    assert total == step["bytes_src_dst"], (total, step["bytes_src_dst"])
    assert all(len(e["seconds"]) == 4 for e in ex)
assert len(measured["allreduce_bytes"]) == 3
assert predicted["flat"]["step_seconds"] > 0 and predicted["hierarchical"]["step_seconds"] > 0
# Pipeline degree 1: one chunk per exchange, nothing overlaps.
assert predicted["pipeline_degree"] == 1
assert all(e["chunk"] == 0 and e["chunks"] == 1 for step in measured["per_step"] for e in step["exchanges"])
assert predicted["flat"]["overlap_seconds"] == 0 and predicted["hierarchical"]["overlap_seconds"] == 0, predicted
for name in ("expert_load.svg", "rank_time.svg"):
    assert open(os.path.join(a.out, name)).read().lstrip().startswith("<svg"), name
metrics = os.path.join(a.out, "train_metrics.jsonl")
subprocess.run([a.train, "--backend", "loopback", *common, "--quiet", "--metrics", metrics], check=True)
train_loss = json.loads(open(metrics).read().strip().splitlines()[-1])["loss"]
sim_loss = measured["final_loss"]
if abs(train_loss - sim_loss) > 1e-12 * max(1.0, abs(train_loss)):
    sys.exit(f"final loss differs: moe_simulate {sim_loss!r} vs moe_train {train_loss!r}")
mpi_note = ""
if a.mpiexec:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
               OPENBLAS_NUM_THREADS="1")
    mpi_metrics = os.path.join(a.out, "train_mpi4_metrics.jsonl")
    subprocess.run([a.mpiexec, "-n", "4", a.train, "--backend", "mpi", *common, "--quiet", "--metrics", mpi_metrics],
                   check=True, env=env)
    mpi_loss = json.loads(open(mpi_metrics).read().strip().splitlines()[-1])["loss"]
    # Gradients are all-reduced in float64 (exact for 4 float32 terms), so MPI and loopback agree bit for bit.
    if abs(mpi_loss - sim_loss) > 1e-12 * max(1.0, abs(mpi_loss)):
        sys.exit(f"final loss differs: moe_simulate {sim_loss!r} vs mpiexec -n 4 moe_train {mpi_loss!r}")
    mpi_note = f" == mpiexec -n 4 moe_train {mpi_loss!r}"
if a.compute_topology:
    # The same job in 2 pipeline chunks, and in 1, predicted on slow GPUs (5 steps each).
    piped = {}
    for d in (1, 2):
        cfg = os.path.join(a.out, f"pipeline_{d}.textproto")
        open(cfg, "w").write(open(a.config).read() + f"\nparallel {{ pipeline_degree: {d} }}\n")
        out = os.path.join(a.out, f"pipeline_{d}")
        subprocess.run([a.simulate, "--config", cfg, "--ranks", "4", "--steps", "5", "--data", a.data,
                        "--topology", a.compute_topology, "--out", out], check=True, stdout=subprocess.DEVNULL)
        piped[d] = (json.load(open(os.path.join(out, "measured.json"))),
                    json.load(open(os.path.join(out, "predicted.json"))))
    m2, p2 = piped[2]
    for step in m2["per_step"]:
        ex = step["exchanges"]
        # 2 layers x (forward, backward), each D0 D1 C0 C1 with one direction.
        assert [(e["kind"][0], e["chunk"]) for e in ex] == [("d", 0), ("d", 1), ("c", 0), ("c", 1)] * 4, ex
        assert all(e["chunks"] == 2 for e in ex)
        assert [e["backward"] for e in ex] == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    # Layer 0's forward routing precedes any expert compute: its rows are those of pipeline degree 1,
    # now in two chunks.
    first = lambda m, k: [e["bytes_src_dst"] for e in m["per_step"][0]["exchanges"][:k]]
    one = first(piped[1][0], 1)[0]
    two = first(m2, 2)
    assert [[two[0][i][j] + two[1][i][j] for j in range(4)] for i in range(4)] == one, (one, two)
    for kind in ("flat", "hierarchical"):
        p, q = p2[kind], piped[1][1][kind]
        assert q["overlap_seconds"] == 0, q
        assert 0 < p["overlap_seconds"] <= p["experts_seconds"], p
        parts = p["dispatch_seconds"] + p["combine_seconds"] + p["experts_seconds"] + p["other_seconds"]
        assert abs(parts - p["overlap_seconds"] - p["step_seconds"]) <= 1e-6 * p["step_seconds"], p
    print(f"ok: pipeline degree 2 on {p2['topology']}: overlap {p2['flat']['overlap_seconds'] * 1e6:.1f} us of "
          f"{p2['flat']['step_seconds'] * 1e6:.1f} us (degree 1: {piped[1][1]['flat']['step_seconds'] * 1e6:.1f} us)")
# The two-stage exchange on 2-rank nodes, without and with the node-deduplicated dispatch (5 steps
# each, the target's nodes of 2): the same losses, and the deduplicated dispatches predicted cheaper
# (fewer bytes cross nodes), the combines the same.
two_stage = {}
for dedup in (False, True):
    cfg = os.path.join(a.out, f"two_stage_dedup{int(dedup)}.textproto")
    text = open(a.config).read()
    text = re.sub(r"comm \{", "comm { ranks_per_node: 2", text) if re.search(r"^comm \{", text, re.M) \
        else text + "\ncomm { ranks_per_node: 2 }\n"
    if dedup:
        text += "\nparallel { node_dedup: true }\n"
    open(cfg, "w").write(text)
    out = os.path.join(a.out, f"two_stage_dedup{int(dedup)}")
    subprocess.run([a.simulate, "--config", cfg, "--ranks", "4", "--steps", "5", "--data", a.data,
                    "--topology", a.topology, "--gpus-per-node", "2", "--out", out], check=True,
                   stdout=subprocess.DEVNULL)
    two_stage[dedup] = (json.load(open(os.path.join(out, "measured.json"))),
                        json.load(open(os.path.join(out, "predicted.json")))["hierarchical"])
assert two_stage[False][0]["final_loss"] == two_stage[True][0]["final_loss"], two_stage
plain, dedup = two_stage[False][1], two_stage[True][1]
assert 0 < dedup["dispatch_seconds"] < plain["dispatch_seconds"], (plain, dedup)
assert abs(dedup["combine_seconds"] - plain["combine_seconds"]) <= 1e-9 * plain["combine_seconds"], (plain, dedup)
print(f"ok: node-deduplicated dispatch predicted {dedup['dispatch_seconds'] * 1e6:.1f} us per step against "
      f"{plain['dispatch_seconds'] * 1e6:.1f} us two-stage, the same loss")
# A bad topology is a clear error with exit code 2.
bad = os.path.join(a.out, "bad_topology.textproto")
open(bad, "w").write('name: "bad" nodes: 1 gpus_per_node: 4 intra_bandwidth_gbps: 0 inter_bandwidth_gbps: 1 gpu_tflops: 1\n')
r = subprocess.run([a.simulate, *common, "--topology", bad, "--out", a.out], capture_output=True, text=True)
if r.returncode != 2 or "intra_bandwidth_gbps" not in r.stderr:
    sys.exit(f"bad topology: expected exit 2 naming intra_bandwidth_gbps, got {r.returncode}: {r.stderr}")
print(f"ok: final loss {sim_loss!r} == moe_train {train_loss!r}{mpi_note}")
