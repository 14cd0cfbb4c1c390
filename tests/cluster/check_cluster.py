#!/usr/bin/env python3
"""moe_train on a real two-node cluster made on this machine by scripts/cluster.sh (network
namespaces with their own hostnames, TCP between them over shaped links, shared memory inside).

Cases (--case):
  equivalence   2 nodes x 2 ranks, links at 10 Gbit/s: tiny_lm's loss curve equals the one-node
                `mpiexec -n 4` run bit for bit, with the node layout taken from the launch (the
                start line says 2 nodes x 2 ranks and an all-to-all across nodes; no
                comm.ranks_per_node in the config); the same with the two-stage all-to-all
                (--ranks-per-node 2: its node stage by direct writes), with its node-deduplicated
                dispatch (--node-dedup) and with redundant experts
                (--redundant-experts 4, placement every 5 steps) against their one-node runs.
  node_failure  2 nodes x 2 ranks; after step 5 node 2's link goes down: ranks 0 and 1 (node 1)
                exit non-zero within the deadline + 6 s, naming the operation and node 2's ranks
                that did not arrive at it ([2, 3], or one of them whose part had crossed);
                then the newest checkpoint resumes on node 1 alone (2 ranks) and trains on.
Exit 77 (ctest: skipped) with the reason where this machine cannot make the namespaces."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

SLACK_SECONDS = 6.0

ap = argparse.ArgumentParser()
ap.add_argument("--case", required=True, choices=["equivalence", "node_failure"])
for name in ("cluster", "tool", "mpiexec", "config", "data", "workdir"):
    ap.add_argument("--" + name, required=True)
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--deadline", type=float, default=3.0)
a = ap.parse_args()

work = os.path.abspath(a.workdir)
shutil.rmtree(work, ignore_errors=True)  # a fresh folder: no checkpoints of an earlier run
os.makedirs(work)
# A cluster of this case's own (names, subnet, state), beside any other.
NAMES = {"equivalence": ("moeqe", 77), "node_failure": ("moeqf", 78)}
name, net = NAMES[a.case]
cluster_env = dict(os.environ, MOE_CLUSTER_NAME=name, MOE_CLUSTER_NET=str(net),
                   MOE_CLUSTER_STATE=os.path.join(work, "cluster"))
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
           OPENBLAS_NUM_THREADS="1")


def cluster(*args):
    return subprocess.run(["bash", a.cluster, *args], env=cluster_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def fail(msg):
    cluster("down")
    sys.exit(f"FAIL [{a.case}]: {msg}")


def run(cmd, label):
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    if r.returncode != 0:
        fail(f"{label} exited {r.returncode}:\n{r.stdout[-3000:]}")
    return r.stdout


def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


made = cluster("up", "2", "--ranks-per-node", "2", "--link-gbit", "10")
if made.returncode == 3:
    print(f"skipped: this machine cannot make the cluster: {made.stderr.strip()}")
    sys.exit(77)
if made.returncode != 0:
    fail(f"cluster.sh up exited {made.returncode}: {made.stderr.strip()}")
prefix = made.stdout.split()
common = ["--config", a.config, "--data", a.data]
try:
    if a.case == "equivalence":
        failures = []
        variants = [("flat", []),
                    ("two-stage", ["--ranks-per-node", "2"]),
                    ("deduplicated", ["--ranks-per-node", "2", "--node-dedup"]),
                    ("redundant experts", ["--redundant-experts", "4", "--rebalance-every", "5"])]
        for label, extra in variants:
            tag = label.replace(" ", "_")
            one = os.path.join(work, f"one_node_{tag}.jsonl")
            two = os.path.join(work, f"two_nodes_{tag}.jsonl")
            args = common + ["--steps", str(a.steps), "--log-every", str(a.steps)] + extra
            run([a.mpiexec, "-n", "4", a.tool, *args, "--metrics", one], f"one node, {label}")
            out = run(prefix + ["-n", "4", a.tool, *args, "--metrics", two], f"two nodes, {label}")
            start = next((line for line in out.splitlines() if "launch:" in line), "")
            print(f"{label}: {start.strip()}")
            if "2 node(s) x 2 ranks" not in start:
                failures.append(f"{label}: the start line does not say 2 nodes x 2 ranks: {start!r}")
            want = {"two-stage": "two-stage all-to-all (2 ranks per node; the node stage by "
                                 "direct writes)",
                    "deduplicated": "two-stage all-to-all (2 ranks per node; the node stage by "
                                    "direct writes; node-deduplicated dispatch)"}.get(
                label, "all-to-all (the group's 4 ranks span nodes, 2 on this one)")
            if want not in start:
                failures.append(f"{label}: the exchange is not '{want}': {start!r}")
            x, y = losses(one), losses(two)
            same = len(x) == a.steps and x == y
            print(f"{label}: {len(y)} losses on 2 nodes x 2 ranks "
                  f"{'identical to' if same else 'DIFFERENT from'} one node's {len(x)} "
                  f"(last {y[-1] if y else float('nan'):.6f})")
            if not same:
                failures.append(f"{label}: the loss curves differ")
            if label == "flat" and not x[-1] < x[0] - 1.0:
                failures.append("the loss did not fall by at least 1 nat")
        if failures:
            fail("; ".join(failures))
        print("equivalence: passed")
    else:
        ckpt = os.path.join(work, "checkpoints")
        metrics = os.path.join(work, f"failure_{os.getpid()}.jsonl")
        cmd = prefix + ["-n", "4", a.tool, *common, "--steps", "100000", "--log-every", "1",
                        "--deadline", str(a.deadline), "--checkpoint-dir", ckpt,
                        "--checkpoint-every", "2", "--metrics", metrics]
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        lines, step5 = [], threading.Event()

        def pump():
            for line in proc.stdout:
                lines.append(line)
                m = re.match(r"step\s+(\d+)/", line)
                if m and int(m.group(1)) >= 5:
                    step5.set()

        threading.Thread(target=pump, daemon=True).start()
        start = time.monotonic()
        while not step5.wait(0.2):
            if proc.poll() is not None or time.monotonic() - start > 120:
                proc.kill()
                fail("the job ended or did not reach step 5 within 120 s:\n" + "".join(lines[-20:]))
        node1 = f"{name}-n1"

        def node1_ranks():
            r = subprocess.run(["ip", "netns", "pids", node1], stdout=subprocess.PIPE, text=True)
            pids = []
            for pid in r.stdout.split():
                try:
                    if os.path.basename(os.readlink(f"/proc/{pid}/exe")) == os.path.basename(a.tool):
                        pids.append(pid)
                except OSError:
                    pass
            return pids

        if len(node1_ranks()) != 2:
            proc.kill()
            fail(f"expected 2 ranks in {node1}, found {node1_ranks()}")
        subprocess.run(["ip", "link", "set", f"{name}-v2", "down"], check=True)
        fault = time.monotonic()
        limit = a.deadline + SLACK_SECONDS
        while node1_ranks() and time.monotonic() - fault < limit + 30:
            time.sleep(0.05)
        elapsed = time.monotonic() - fault
        if node1_ranks():
            proc.kill()
            fail(f"node 1's ranks still run {elapsed:.0f} s after node 2's link went down")
        # mpirun may wait on node 2's daemon behind the dead link: give it a moment, then end it.
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        time.sleep(0.5)
        out = "".join(lines)
        # A survivor names the ranks that did not arrive at the operation it waited in: node 2's
        # (both, or the one whose part had not crossed before the link went down).
        named = re.search(r"[\w-]+ #\d+ deadline [0-9.]+ s exceeded on rank [01]: "
                          r"ranks \[(2|3|2, 3)\] did not arrive", out)
        print(f"node 1's ranks ended {elapsed:.1f} s after the link went down (limit {limit:.0f} "
              f"s); mpirun exit {rc}")
        if not named:
            fail("no survivor named the operation and node 2's ranks:\n" + out[-3000:])
        print(f"named: {named.group(0)}")
        if elapsed > limit:
            fail(f"node 1's ranks took {elapsed:.1f} s > deadline + {SLACK_SECONDS:.0f} s")
        if rc == 0:
            fail("mpirun exited 0 after a node was lost")
        saved = losses(metrics)
        # The remaining node: both ranks in node 1's namespace, from the newest checkpoint.
        resumed = os.path.join(work, "resumed.jsonl")
        out = run(["ip", "netns", "exec", node1, a.mpiexec, "-n", "2", a.tool, *common,
                   "--checkpoint-dir", ckpt, "--resume", "--steps", str(len(saved) + 4),
                   "--log-every", "1", "--metrics", resumed], "the resume on node 1")
        m = re.search(r"resumed at step (\d+)", out)
        after = losses(resumed)
        print(f"resume on node 1 (2 ranks): {m.group(0) if m else 'no resume line'}; "
              f"{len(saved)} steps logged before the failure, {len(after)} after")
        if not m or int(m.group(1)) < 4 or not after:
            fail("the newest checkpoint did not resume on the remaining node:\n" + out[-2000:])
        print("node_failure: passed")
finally:
    cluster("down")
