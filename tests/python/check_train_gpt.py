#!/usr/bin/env python3
"""examples/python/train_gpt.py, small and fast: it learns, expert parallel equals one process, and
a resumed run equals an uninterrupted one.

    check_train_gpt.py --mpiexec MPIEXEC [--workdir DIR]

A corpus is made by scripts/make_corpus.py from data/corpus.txt cut into documents. Then, with
tiny dimensions (2 blocks, model 32, 4 experts of 32, top-2, context 32, 8 sequences a step):
1. one process with 2 local groups, 40 steps: the loss falls by at least 1.0 nat from the first 5
   steps to the last 5, and the held-out loss at step 40 is below the one at step 20;
2. `mpiexec -n 2` (expert parallel, one group per rank): every step's loss and both held-out
   losses within 2e-5 of run 1 (the replicated layers' gradients are summed in another order);
3. run 1 again stopped after step 20 (checkpoint) and resumed to 40: steps 21-40 bit-identical to
   run 1; the same for a dense FFN.
Exit 0 on success.
"""

import argparse
import json
import os
import sys
import tempfile

from check_train_equivalence import run  # runs a command, prints its output, exits on failure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
EXAMPLE = os.path.join(ROOT, "examples", "python", "train_gpt.py")


def records(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if not r.get("meta")]


def make_corpus(work, env):
    with open(os.path.join(ROOT, "data", "corpus.txt")) as f:
        lines = f.read().split("\n")
    src = os.path.join(work, "fortunes-like")
    with open(src, "w") as f:
        for i in range(0, len(lines), 4):
            f.write("\n".join(lines[i:i + 4]) + "\n%\n")
    run([sys.executable, os.path.join(ROOT, "scripts", "make_corpus.py"), "--source", src,
         "--out", os.path.join(work, "corpus"), "--heldout-every", "5"], env)
    return os.path.join(work, "corpus")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="train_gpt_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    corpus = make_corpus(work, env)
    common = [EXAMPLE, "--corpus", corpus, "--model-dim", "32", "--heads", "2", "--layers", "2",
              "--context", "32", "--batch", "8", "--hidden", "32", "--experts", "4", "--top-k", "2",
              "--steps", "40", "--warmup", "5", "--eval-every", "20", "--eval-sequences", "16",
              "--log-every", "10"]
    log = lambda name: os.path.join(work, name + ".jsonl")
    for name in ("one", "mpi2", "resumed", "dense", "dense-resumed"):
        for p in (log(name), os.path.join(work, name + ".ckpt")):
            if os.path.isdir(p):
                for f in os.listdir(p):
                    os.remove(os.path.join(p, f))
            elif os.path.exists(p):
                os.remove(p)

    run([sys.executable] + common + ["--local-groups", "2", "--log", log("one")], env)
    run([args.mpiexec, "-n", "2", sys.executable] + common + ["--log", log("mpi2")], env)
    resume = common + ["--local-groups", "2", "--log", log("resumed"), "--ckpt", log("resumed")[:-6] + ".ckpt"]
    run([sys.executable] + resume + ["--stop-after", "20"], env)
    run([sys.executable] + resume, env)
    dense = common + ["--ffn", "dense"]
    run([sys.executable] + dense + ["--log", log("dense")], env)
    dres = dense + ["--log", log("dense-resumed"), "--ckpt", log("dense-resumed")[:-6] + ".ckpt"]
    run([sys.executable] + dres + ["--stop-after", "20"], env)
    run([sys.executable] + dres, env)

    one, two, res = records(log("one")), records(log("mpi2")), records(log("resumed"))
    den, dres_r = records(log("dense")), records(log("dense-resumed"))
    ok = True

    def check(cond, what):
        nonlocal ok
        print(("ok    " if cond else "FAIL  ") + what)
        ok = ok and cond

    la = [r["loss"] for r in one]
    first, last = sum(la[:5]) / 5, sum(la[-5:]) / 5
    held = [r["heldout_loss"] for r in one if "heldout_loss" in r]
    check(len(la) == 40 and last < first - 1.0, f"loss falls: {first:.4f} -> {last:.4f}")
    check(len(held) == 2 and held[1] < held[0], f"held-out falls: {held}")
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two))
    hdiff = max(abs(a["heldout_loss"] - b["heldout_loss"]) for a, b in zip(one, two) if "heldout_loss" in a)
    check(len(two) == 40 and diff <= 2e-5 and hdiff <= 2e-5,
          f"mpiexec -n 2 = 1 process x 2 groups: max |diff| loss {diff:.3g}, held-out {hdiff:.3g} (<= 2e-5)")
    for name, full, resumed in (("moe", one, res), ("dense", den, dres_r)):
        same = len(resumed) == 40 and all(
            a["loss"] == b["loss"] and a.get("heldout_loss") == b.get("heldout_loss")
            for a, b in zip(full[20:], resumed[20:]))
        check(same, f"{name}: stopped at 20 and resumed = uninterrupted, steps 21-40 bit for bit")
    dl = [r["loss"] for r in den]
    check(sum(dl[-5:]) / 5 < sum(dl[:5]) / 5 - 1.0, "dense: loss falls")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
