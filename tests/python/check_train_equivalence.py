#!/usr/bin/env python3
"""examples/python/train_tiny.py under `mpiexec -n 2` equals one process with 2 local groups.

    check_train_equivalence.py --mpiexec MPIEXEC [--steps N] [--workdir DIR]

Runs the example twice (one process with --local-groups 2; mpiexec -n 2 with one group per rank:
expert parallel through the module's MPI communicator) and compares the loss of every step:
max |difference| <= 1e-6. Also checks that training learns (the last 5 steps' mean loss at least
0.5 below the first 5 steps'). Exit 0 on success.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "..", "examples", "python", "train_tiny.py")


def run(cmd, env):
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    print(p.stdout, end="")
    if p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(cmd)} exited {p.returncode}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="train_tiny_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    common = [EXAMPLE, "--steps", str(args.steps), "--log-every", "20"]
    one, two = os.path.join(work, "one.json"), os.path.join(work, "mpi2.json")
    run([sys.executable] + common + ["--local-groups", "2", "--log-json", one], env)
    run([args.mpiexec, "-n", "2", sys.executable] + common + ["--log-json", two], env)
    a, b = json.load(open(one)), json.load(open(two))
    assert a["ranks"] == 1 and b["ranks"] == 2, (a["ranks"], b["ranks"])
    la = [s["loss"] for s in a["steps"]]
    lb = [s["loss"] for s in b["steps"]]
    assert len(la) == len(lb) == args.steps
    diff = max(abs(x - y) for x, y in zip(la, lb))
    raux = max(abs(x["router_loss"] - y["router_loss"]) for x, y in zip(a["steps"], b["steps"]))
    first, last = sum(la[:5]) / 5, sum(la[-5:]) / 5
    print(f"loss curve, 1 process x 2 groups vs mpiexec -n 2: max |diff| {diff:.3g} "
          f"(router losses {raux:.3g}); loss {first:.4f} -> {last:.4f}")
    ok = diff <= 1e-6 and raux <= 1e-6 and last < first - 0.5
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
