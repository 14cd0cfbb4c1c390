#!/usr/bin/env python3
"""Validates the host step-time model (runtime/sim/cost_model.h, "The step on one shared-memory host")
against real runs on this machine: for each backend (mpi, loopback) and rank count (1, 2, 4)

  1. alpha, beta of the all-to-all and of the float64 all-reduce are fitted from moe_comm_bench
     sweeps of that backend at that rank count (not from any training step time);
  2. moe_simulate --ranks N runs the job on loopback threads (same seed -> the same routing, traffic
     and load as the MPI run), calibrates the per-rank compute from separate 1-rank runs, and
     predicts the step time from the measured traffic / load and the fitted call costs;
  3. moe_train runs the job for real (mpiexec -n N ... --backend mpi, or --backend loopback --ranks N)
     and its --metrics step_seconds (median over the steps after the warm-up, evaluation steps left
     out; the lowest of --repeats runs) is the measured step time.

Prints a markdown table (and writes OUT/validation.json). Set OPENBLAS_NUM_THREADS=1 and
OPENBLAS_CORETYPE=Haswell for reproducible figures; the MPI runs use --oversubscribe with
mpi_yield_when_idle (as the project's MPI tests do).

  python3 tests/simulate/validate_cost_model.py --build build --out /tmp/validate

--mpiexec takes a whole launch prefix, e.g. the one scripts/cluster.sh prints, to validate the model
on a multi-node cluster: the sweeps then measure the cluster's links, and the model is calibrated
by them.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys


def run(cmd, env, quiet=True):
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return r


def measured_step(metrics_path, warmup):
    steps = [json.loads(line) for line in open(metrics_path) if line.strip()]
    times = [m["step_seconds"] for i, m in enumerate(steps) if i >= warmup and not m.get("eval_loss")]
    return statistics.median(times), len(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--config", default="configs/tiny_lm.textproto")
    ap.add_argument("--data", default="data/corpus.txt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", default="mpi,loopback")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="moe_train runs per case; the quietest is kept")
    ap.add_argument("--mpiexec", default="mpiexec", help="the MPI launch command (a prefix may hold flags)")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tool = lambda name: os.path.join(a.build, "launch", name)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    rows = []
    for backend in a.backends.split(","):
        for n in [int(x) for x in a.ranks.split(",")]:
            tag = f"{backend}_{n}"
            launch = shlex.split(a.mpiexec) + ["-n", str(n)] if backend == "mpi" else []
            where = ["--backend", "mpi"] if backend == "mpi" else ["--backend", "loopback", "--ranks", str(n)]
            bench = {}
            for op, sizes in (("alltoall", ["-d", "float32", "-b", "1K", "-e", "1M"]),
                              ("allreduce", ["-d", "float64", "-b", "8", "-e", "1M"])):
                path = os.path.join(a.out, f"bench_{tag}_{op}.jsonl")
                if os.path.exists(path):
                    os.remove(path)
                run(launch + [tool("moe_comm_bench"), *where, "--op", op, *sizes, "-f", "2", "-n", "50", "-w", "5",
                              "-c", "0", "-J", path], env)
                bench[op] = path
            sim_out = os.path.join(a.out, f"sim_{tag}")
            run([tool("moe_simulate"), "--config", a.config, "--data", a.data, "--ranks", str(n), "--steps",
                 str(a.steps), "--warmup", str(a.warmup), "--cores", str(a.cores), "--bench-alltoall",
                 bench["alltoall"], "--bench-allreduce", bench["allreduce"], "--out", sim_out], env)
            pred = json.load(open(os.path.join(sim_out, "host_predicted.json")))
            # The quietest of --repeats runs (lowest median step): other load on the machine only adds.
            meas, used = None, 0
            for i in range(a.repeats):
                metrics = os.path.join(a.out, f"train_{tag}_{i}.jsonl")
                run(launch + [tool("moe_train"), *where, "--config", a.config, "--data", a.data, "--steps",
                              str(a.steps), "--quiet", "--metrics", metrics], env)
                m, u = measured_step(metrics, a.warmup)
                if meas is None or m < meas:
                    meas, used = m, u
            p = pred["predicted"]
            row = {"backend": backend, "ranks": n, "predicted_seconds": p["step_seconds"], "measured_seconds": meas,
                   "error_percent": 100.0 * (p["step_seconds"] - meas) / meas, "steps_measured": used,
                   "alltoall_alpha_us": pred["alltoall"]["alpha_seconds"] * 1e6,
                   "alltoall_beta_gbps": pred["alltoall"]["beta_bytes_per_second"] / 1e9,
                   "allreduce_alpha_us": pred["allreduce"]["alpha_seconds"] * 1e6,
                   "allreduce_beta_gbps": pred["allreduce"]["beta_bytes_per_second"] / 1e9,
                   "breakdown": p, "calibration": pred["calibration"]}
            rows.append(row)
            print(f"{backend} {n}: predicted {p['step_seconds'] * 1e3:.2f} ms, measured {meas * 1e3:.2f} ms "
                  f"({row['error_percent']:+.1f}%)", file=sys.stderr)
    json.dump({"cores": a.cores, "rows": rows}, open(os.path.join(a.out, "validation.json"), "w"), indent=1)
    print("| backend | ranks | a2a α (µs) | a2a β (GB/s) | all-reduce α (µs) | compute (ms) | wait + oversub. (ms) "
          "| a2a calls (ms) | all-reduces (ms) | predicted (ms) | measured (ms) | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        b = r["breakdown"]
        print(f"| {r['backend']} | {r['ranks']} | {r['alltoall_alpha_us']:.1f} | {r['alltoall_beta_gbps']:.2f} | "
              f"{r['allreduce_alpha_us']:.1f} | {b['compute_mean_seconds'] * 1e3:.2f} | "
              f"{(b['wait_seconds'] + b['oversubscription_seconds']) * 1e3:.2f} | "
              f"{b['alltoall_seconds'] * 1e3:.2f} ({b['alltoall_calls']}) | "
              f"{b['allreduce_seconds'] * 1e3:.2f} ({b['allreduce_calls']}) | {r['predicted_seconds'] * 1e3:.2f} | "
              f"{r['measured_seconds'] * 1e3:.2f} | {r['error_percent']:+.0f}% |")


if __name__ == "__main__":
    main()
