"""End-to-end check of moe_train: a 4-process MPI run and a 1-process run with 4 local groups (the
same config otherwise) must give the same loss curve, and the loss must fall. A second 4-process
run with pipelined exchanges (--pipeline-degree 3: three chunks per all-to-all, several
MPI_Ialltoallv in flight) must give the same curve too, and a third with the two-stage all-to-all
(--ranks-per-node 2: 2 nodes of 2 ranks) the same curve as the flat run, bit for bit, and a fourth
with the all-to-all transport (--exchange-transport alltoall) the same curve as the flat run's
direct writes (the default on one node), bit for bit.

Usage: check_mpi_train.py --tool moe_train --mpiexec mpiexec --config tiny_lm.textproto
                          --data corpus.txt --workdir DIR [--steps N]"""
import argparse
import json
import os
import subprocess
import sys


def run(cmd, env):
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    print(r.stdout[-3000:], flush=True)
    if r.returncode != 0:
        sys.exit(f"command failed with exit code {r.returncode}")


def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


def main():
    p = argparse.ArgumentParser()
    for name in ("tool", "mpiexec", "config", "data", "workdir"):
        p.add_argument("--" + name, required=True)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
               OPENBLAS_NUM_THREADS="1")
    mpi_metrics = os.path.join(a.workdir, "mpi4.jsonl")
    one_metrics = os.path.join(a.workdir, "one_g4.jsonl")
    pipe_metrics = os.path.join(a.workdir, "mpi4_pipeline3.jsonl")
    hier_metrics = os.path.join(a.workdir, "mpi4_ranks_per_node2.jsonl")
    a2a_metrics = os.path.join(a.workdir, "mpi4_alltoall.jsonl")
    common = ["--config", a.config, "--data", a.data, "--steps", str(a.steps), "--quiet"]
    run([a.mpiexec, "-n", "4", a.tool] + common + ["--metrics", mpi_metrics], env)
    run([a.mpiexec, "-n", "4", a.tool] + common + ["--pipeline-degree", "3", "--metrics", pipe_metrics],
        env)
    run([a.mpiexec, "-n", "4", a.tool] + common + ["--ranks-per-node", "2", "--metrics",
                                                   hier_metrics], env)
    run([a.mpiexec, "-n", "4", a.tool] + common + ["--exchange-transport", "alltoall", "--metrics",
                                                   a2a_metrics], env)
    run([a.tool, "--backend", "loopback", "--ranks", "1", "--local-groups", "4"] + common +
        ["--metrics", one_metrics], env)
    x, y, z = losses(mpi_metrics), losses(one_metrics), losses(pipe_metrics)
    failures = 0
    if len(x) != a.steps or len(y) != a.steps or len(z) != a.steps:
        print(f"FAIL: expected {a.steps} steps, got {len(x)}, {len(y)} and {len(z)}")
        failures += 1
    diff = max(abs(u - v) for u, v in zip(x, y))
    pipe_diff = max(abs(u - v) for u, v in zip(z, y))
    print(f"loss: first {x[0]:.4f}, last {x[-1]:.4f}; max |4 MPI ranks - 1 rank with G=4| = {diff:.2e}; "
          f"pipelined (degree 3): {pipe_diff:.2e}")
    if diff > 1e-5 or pipe_diff > 1e-5:
        print("FAIL: the loss curves differ by more than 1e-5")
        failures += 1
    if not x[-1] < x[0] - 1.0:
        print("FAIL: the loss did not fall by at least 1 nat")
        failures += 1
    # Runs that move the same rows another way: the flat run's losses, bit for bit.
    for label, path, what in (
            ("two-stage all-to-all (--ranks-per-node 2)", hier_metrics, "the two-stage exchange"),
            ("all-to-all transport (--exchange-transport alltoall)", a2a_metrics, "the transport")):
        same = losses(path) == x
        print(f"{label}: {'identical' if same else 'DIFFERENT'} to the flat run's {len(x)} losses "
              f"(direct writes)")
        if not same:
            print(f"FAIL: {what} changed the loss curve")
            failures += 1
    print(f"{4 - min(failures, 4)} passed, {min(failures, 4)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
