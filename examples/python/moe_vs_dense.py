#!/usr/bin/env python3
"""Does MoE pay off? Trains train_gpt.py's GPT with four feed-forwards and plots held-out loss.

    PYTHONPATH=build/python python3 examples/python/moe_vs_dense.py --out build/moe_vs_dense

The four models differ only in their feed-forwards (every block):
  dense H        a dense GELU MLP of hidden H (--hidden)
  MoE 8 x H/2 top-2   8 experts of hidden H/2, top-2: the dense model's FFN FLOPs per token
  MoE 8 x H top-1     8 experts of hidden H, top-1: the same FLOPs again
  dense 4H       a dense MLP with the top-2 MoE's total FFN parameters (8 x H/2 = 4H)
Each model's learning rate is tuned the same way: every rate of --lrs trains seed 0 for
--tune-steps steps (the same schedule shape, shortened) and the lowest held-out loss wins; where
that is the grid's largest (smallest) rate the grid grows by x3 that way, twice at most. Then
every model trains --seeds seeds for --steps steps on the same tokens (the batches are drawn from
the step and the seed, so seed s gives every model the same data). Runs go --jobs at a time, one
torch/OpenBLAS thread each. Out: the runs' JSON-lines logs, results.json, table.md (final
held-out loss: mean and min-max over seeds), and moe_vs_dense.png / .svg (held-out loss vs
tokens and vs wall-clock, mean with the seeds' range shaded).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def models(h):
    return [
        ("dense H", ["--ffn", "dense", "--hidden", str(h)]),
        ("MoE 8 x H/2 top-2", ["--ffn", "moe", "--experts", "8", "--top-k", "2", "--hidden", str(h // 2)]),
        ("MoE 8 x H top-1", ["--ffn", "moe", "--experts", "8", "--top-k", "1", "--hidden", str(h)]),
        ("dense 4H", ["--ffn", "dense", "--hidden", str(4 * h)]),
    ]


def slug(name):
    return name.replace(" ", "").replace("/", "_").lower()


def finished(log, steps):
    """True when `log` holds a run's last step (a rerun of the script skips it)."""
    if not os.path.exists(log):
        return False
    _, recs = read_log(log)
    return bool(recs) and recs[-1]["step"] == steps - 1 and "heldout_loss" in recs[-1]


def run_all(jobs, parallel, env):
    """jobs: [(log path, steps, argv)]; runs the unfinished ones `parallel` at a time; a failed run
    stops everything."""
    pending = [(log, argv) for log, steps, argv in jobs if not finished(log, steps)]
    running = []
    while pending or running:
        while pending and len(running) < parallel:
            log, argv = pending.pop(0)
            if os.path.exists(log):
                os.remove(log)
            out = open(log + ".out", "w")
            running.append((subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env), log, out))
        time.sleep(0.5)
        for item in list(running):
            proc, log, out = item
            if proc.poll() is None:
                continue
            out.close()
            running.remove(item)
            if proc.returncode != 0:
                for p, _, _ in running:
                    p.kill()
                with open(log + ".out") as f:
                    sys.exit(f"moe_vs_dense: {' '.join(proc.args)} failed ({proc.returncode}):\n{f.read()[-2000:]}")
            print(f"  done: {os.path.basename(log)}", flush=True)


def read_log(path):
    meta, recs = None, []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("meta"):
                meta = r
            else:
                recs.append(r)
    return meta, recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default=None, help="passed to train_gpt.py")
    ap.add_argument("--hidden", type=int, default=256, help="H")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--tune-steps", type=int, default=750)
    ap.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--eval-sequences", type=int, default=512)
    ap.add_argument("--extra", default="", help="more train_gpt.py flags for every run")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    train = [sys.executable, os.path.join(HERE, "train_gpt.py"), "--threads", "1",
             "--eval-every", str(args.eval_every), "--eval-sequences", str(args.eval_sequences),
             "--log-every", "1000000"]
    if args.corpus:
        train += ["--corpus", args.corpus]
    train += args.extra.split()
    lrs = [float(x) for x in args.lrs.split(",")]
    started = time.time()

    # 1. The learning rate of each model: seed 0, --tune-steps steps, every rate of the grid; while
    # a model's best rate is at an end of its grid, the grid grows by x3 past that end (at most 2
    # times), so that every model's rate is an interior optimum or the search says it is not.
    def tune_log(name, lr):
        return os.path.join(args.out, f"tune-{slug(name)}-lr{lr:g}.jsonl")

    def tune_job(name, flags, lr):
        log = tune_log(name, lr)
        return (log, args.tune_steps, train + flags + ["--seed", "0", "--lr", str(lr), "--steps",
                                                       str(args.tune_steps), "--log", log])

    grids = {name: list(lrs) for name, _ in models(args.hidden)}
    print(f"moe_vs_dense: tuning the learning rate ({args.tune_steps} steps a run)", flush=True)
    best, scores, edge = {}, {}, {}
    for round_ in range(3):
        run_all([tune_job(name, flags, lr) for name, flags in models(args.hidden) for lr in grids[name]],
                args.jobs, env)
        grew = False
        for name, _ in models(args.hidden):
            scores[name] = {}
            for lr in grids[name]:
                _, recs = read_log(tune_log(name, lr))
                scores[name][lr] = [r for r in recs if "heldout_loss" in r][-1]["heldout_loss"]
            best[name] = min(scores[name], key=scores[name].get)
            g = sorted(grids[name])
            edge[name] = best[name] in (g[0], g[-1])
            if edge[name] and round_ < 2:
                grids[name] = g + [float(f"{g[-1] * 3:.3g}")] if best[name] == g[-1] else \
                    [float(f"{g[0] / 3:.3g}")] + g
                grew = True
        if not grew:
            break
    for name, _ in models(args.hidden):
        print(f"  {name}: lr {best[name]:g}{' (an end of its grid)' if edge[name] else ''} (held-out at "
              f"{args.tune_steps} steps: " + ", ".join(f"{lr:g} -> {v:.4f}" for lr, v in
                                                      sorted(scores[name].items())) + ")", flush=True)

    # 2. Every model, --seeds seeds, --steps steps, at its rate.
    runs = []
    for name, flags in models(args.hidden):
        for seed in range(1, args.seeds + 1):
            log = os.path.join(args.out, f"{slug(name)}-lr{best[name]:g}-seed{seed}.jsonl")
            runs.append((log, args.steps, train + flags + ["--seed", str(seed), "--lr", str(best[name]),
                                               "--steps", str(args.steps), "--log", log]))
    print(f"moe_vs_dense: training ({len(runs)} runs of {args.steps} steps)", flush=True)
    run_all(runs, args.jobs, env)

    results = []
    for name, _ in models(args.hidden):
        seeds = []
        for seed in range(1, args.seeds + 1):
            meta, recs = read_log(os.path.join(args.out, f"{slug(name)}-lr{best[name]:g}-seed{seed}.jsonl"))
            evals = [r for r in recs if "heldout_loss" in r]
            seeds.append({"seed": seed, "final_heldout": evals[-1]["heldout_loss"],
                          "final_train": sum(r["loss"] for r in recs[-50:]) / len(recs[-50:]),
                          "wall_s": recs[-1]["wall_s"], "tokens": recs[-1]["tokens"],
                          "curve": [(r["tokens"], r["wall_s"], r["heldout_loss"]) for r in evals]})
        finals = [s["final_heldout"] for s in seeds]
        results.append({"model": name, "lr": best[name], "params": meta["params"],
                        "active_params": meta["active_params"], "flops_per_token": meta["flops_per_token"],
                        "heldout_mean": sum(finals) / len(finals), "heldout_min": min(finals),
                        "heldout_max": max(finals),
                        "tokens_per_s": sum(s["tokens"] / s["wall_s"] for s in seeds) / len(seeds),
                        "seeds": seeds})
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "train_flags": train[2:], "results": results,
                   "tuning": {name: {f"{lr:g}": v for lr, v in sorted(sc.items())} for name, sc in scores.items()},
                   "seconds": time.time() - started}, f, indent=1)

    lines = ["| model | parameters (total / active per token) | MFLOP per token | lr | held-out loss "
             f"after {args.steps} steps: mean (min-max of {args.seeds} seeds) | tokens/s (1 thread) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['params']:,} / {r['active_params']:,} | "
                     f"{r['flops_per_token'] / 1e6:.2f} | {r['lr']:g} | {r['heldout_mean']:.4f} "
                     f"({r['heldout_min']:.4f}-{r['heldout_max']:.4f}) | {r['tokens_per_s']:,.0f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    plot(results, args.out)
    print(f"moe_vs_dense: {time.time() - started:.0f} s; {args.out}/moe_vs_dense.png, table.md, results.json")
    return 0


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        curves = [np.array(s["curve"]) for s in r["seeds"]]
        n = min(len(c) for c in curves)
        tokens = curves[0][:n, 0]
        loss = np.stack([c[:n, 2] for c in curves])
        wall = np.stack([c[:n, 1] for c in curves]).mean(axis=0)
        label = f"{r['model']} ({r['flops_per_token'] / 1e6:.1f} MFLOP/token)"
        for ax, x in ((axes[0], tokens / 1e6), (axes[1], wall / 60)):
            line, = ax.plot(x, loss.mean(axis=0), label=label)
            ax.fill_between(x, loss.min(axis=0), loss.max(axis=0), color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("training tokens (millions)")
    axes[1].set_xlabel("wall-clock (minutes, one thread per run)")
    for ax in axes:
        ax.set_ylabel("held-out loss (nats per byte)")
        ax.grid(alpha=0.3)
        lo = min(r["heldout_min"] for r in results)
        ax.set_ylim(lo - 0.05, lo + 0.6)
    axes[0].legend(fontsize=8)
    fig.suptitle("Byte-level GPT on the fortunes corpus: MoE vs dense feed-forwards")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "moe_vs_dense.png"), dpi=110)
    fig.savefig(os.path.join(out, "moe_vs_dense.svg"))


if __name__ == "__main__":
    sys.exit(main())
