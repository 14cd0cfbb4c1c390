"""The expert-parallel layer of this runtime beside PyTorch's, on the same shapes and rank counts,
in one run: for each rank count W and shape, `mpirun -n W moe_ep_layer_bench` (the CPU layer over
MPI: router, Dispatch, experts, Combine, forward + backward; once with each exchange transport,
the all-to-all and direct writes) and `torch_ep_layer_bench.py` (the
same layer in PyTorch on W gloo processes, all_to_all_single for dispatch and combine — what
DeepSpeed-MoE, Tutel and FastMoE do on CPU ranks). One thread per rank on both sides. Prints a
table of the medians (slowest rank per call), torch / ours, and each layer over the floor both
share: the experts' GEMMs alone on the rows our experts receive (moe_ep_layer_bench measures it in
the same run, every rank at once) — a layer cannot be faster than its own expert GEMMs; with --json, one BenchResult line
per measurement of ours with the PyTorch time as its baseline.

    python3 bench/ep_layer_vs_torch.py --build build --ranks 2,4 --shapes small,fine-grained"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPES = {  # per rank: S tokens, model M, expert hidden H; E experts in all, top-k
    "small": dict(s=1024, m=256, h=1024, e=8, k=2),
    "medium": dict(s=2048, m=512, h=1024, e=16, k=2),
    "fine-grained": dict(s=1024, m=256, h=256, e=64, k=6),
}


def run(cmd, env):
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=1800)
    if r.returncode != 0:
        sys.exit(f"ep_layer_vs_torch: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r.stdout


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default="build", help="the CMake build directory")
    p.add_argument("--ranks", default="2,4", help="rank counts, e.g. 2,4")
    p.add_argument("--shapes", default="small,fine-grained", help=",".join(SHAPES))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--mpirun", default="mpirun")
    p.add_argument("--python", default=sys.executable, help="a Python with torch")
    p.add_argument("--json", help="append BenchResult lines here")
    a = p.parse_args()
    ranks = [int(r) for r in a.ranks.split(",")]
    shapes = a.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            sys.exit(f"ep_layer_vs_torch: --shapes: unknown shape '{s}' (one of {', '.join(SHAPES)})")
    if any(w < 1 for w in ranks) or a.iters < 1:
        sys.exit("ep_layer_vs_torch: --ranks and --iters must be >= 1")
    tool = os.path.join(a.build, "bench", "moe_ep_layer_bench")
    if not os.access(tool, os.X_OK):
        sys.exit(f"ep_layer_vs_torch: {tool} not found; build the project first (--build)")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1")
    print(f"# ep_layer_vs_torch: forward + backward of one expert-parallel MoE layer (GELU-tanh FFN "
          f"experts, top-k, capacity factor 1.25), 1 thread per rank, OPENBLAS_CORETYPE="
          f"{env.get('OPENBLAS_CORETYPE', 'unset')}, {os.cpu_count()} cores; median of {a.iters} "
          f"calls, slowest rank")
    print(f"# {'shape':13s} {'W':>2s} {'S/rank':>6s} {'M':>4s} {'H':>5s} {'E':>3s} {'k':>2s} | "
          f"{'a2a ms':>9s} {'direct ms':>9s} {'torch ms':>9s} {'torch/a2a':>9s} "
          f"{'torch/direct':>12s} | {'floor ms':>8s} {'direct/fl':>9s} {'torch/fl':>8s}")
    rows = []
    for w in ranks:
        for name in shapes:
            sh = SHAPES[name]
            if sh["e"] % w:
                print(f"  {name:13s} {w:2d}  (skipped: {sh['e']} experts on {w} ranks)")
                continue
            ours = {}
            for transport in ("alltoall", "direct"):
                with tempfile.TemporaryDirectory() as tmp:
                    ours_json = os.path.join(tmp, "ours.jsonl")
                    run([a.mpirun, "-n", str(w), tool, "--backend", "mpi", "--shape", name, "-n",
                         str(a.iters), "--exchange-transport", transport, "-J", ours_json], env)
                    with open(ours_json) as f:
                        for r in map(json.loads, f):
                            r["op"] = r["op"].split("/")[0] + "_" + transport + "/" + name
                            ours[r["op"].split("/")[0]] = r
            out = run([a.python, os.path.join(here, "torch_ep_layer_bench.py"), "--ranks", str(w),
                       "--iters", str(a.iters)] +
                      [x for key in ("s", "m", "h", "e", "k") for x in (f"--{key}", str(sh[key]))],
                      env)
            torch_row = json.loads(out.strip().splitlines()[-1])
            a2a_ms = ours["ep_layer_fwd_bwd_alltoall"]["timeMedianUs"] / 1e3
            direct_ms = ours["ep_layer_fwd_bwd_direct"]["timeMedianUs"] / 1e3
            floor_ms = ours["ep_layer_gemm_floor_direct"]["timeMedianUs"] / 1e3
            torch_ms = torch_row["fwd_bwd_ms"]
            print(f"  {name:13s} {w:2d} {sh['s']:6d} {sh['m']:4d} {sh['h']:5d} {sh['e']:3d} "
                  f"{sh['k']:2d} | {a2a_ms:9.1f} {direct_ms:9.1f} {torch_ms:9.1f} "
                  f"{torch_ms / a2a_ms:9.2f} {torch_ms / direct_ms:12.2f} | {floor_ms:8.1f} "
                  f"{direct_ms / floor_ms:9.2f} {torch_ms / floor_ms:8.2f}", flush=True)
            for transport in ("alltoall", "direct"):
                for op, t in (("ep_layer_fwd", torch_row["fwd_ms"]),
                              ("ep_layer_fwd_bwd", torch_ms)):
                    row = dict(ours[op + "_" + transport])
                    row["baseline"] = "torch_gloo_" + op
                    row["baselineTimeUs"] = t * 1e3
                    rows.append(row)
    if a.json:
        with open(a.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
