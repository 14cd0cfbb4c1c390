"""Router replay end to end (train.router_record_dir / router_replay_dir) under mpiexec -n 2:

1. a recorded run and a run replaying its selections have the same loss curve, bit for bit, and
   the replaying run's own record equals the recording;
2. with a perturbed model (model.init_std changed, so every router weight differs) the run routes
   differently on its own, and identically when it replays the recording;
3. a missing recording and a record directory that already holds the steps are refused with the
   field named, before anything is overwritten.

Usage: check_router_replay.py --tool moe_train --mpiexec mpiexec --config tiny_lm.textproto
                              --data corpus.txt --workdir DIR [--steps N]"""
import filecmp
import json
import os
import re
import subprocess
import sys

import train_check


def run(cmd, env, expect_ok=True):
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    if expect_ok and r.returncode != 0:
        print(r.stdout[-3000:])
        sys.exit(f"command failed with exit code {r.returncode}")
    return r


def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


def records(d):
    out = []
    for root, _, files in os.walk(d):
        out += [os.path.relpath(os.path.join(root, f), d) for f in files]
    return sorted(out)


def same_records(a, b):
    ra, rb = records(a), records(b)
    return ra == rb and all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
                            for f in ra)


def main():
    a = train_check.parse_args(__doc__, steps=30)
    train_check.fresh_workdir(a.workdir)
    env = train_check.mpi_env()
    with open(a.config) as f:
        text = f.read()
    perturbed = os.path.join(a.workdir, "perturbed.textproto")
    with open(perturbed, "w") as f:
        f.write(re.sub(r"init_std:\s*[0-9.eE+-]+", "init_std: 0.123", text))
    w = lambda *parts: os.path.join(a.workdir, *parts)  # noqa: E731
    mpi = [a.mpiexec, "-n", "2", a.tool, "--data", a.data, "--steps", str(a.steps), "--quiet"]
    run(mpi + ["--config", a.config, "--router-record-dir", w("A"), "--metrics", w("A.jsonl")], env)
    run(mpi + ["--config", a.config, "--router-replay-dir", w("A"), "--router-record-dir", w("B"),
               "--metrics", w("B.jsonl")], env)
    run(mpi + ["--config", perturbed, "--router-record-dir", w("C"), "--metrics", w("C.jsonl")], env)
    run(mpi + ["--config", perturbed, "--router-replay-dir", w("A"), "--router-record-dir", w("D"),
               "--metrics", w("D.jsonl")], env)
    failures = 0

    def check(ok, what):
        nonlocal failures
        print(("PASS " if ok else "FAIL ") + what, flush=True)
        failures += 0 if ok else 1

    la, lb = losses(w("A.jsonl")), losses(w("B.jsonl"))
    check(len(records(w("A"))) == 2 * a.steps, f"{len(records(w('A')))} files recorded "
          f"(2 ranks x {a.steps} steps)")
    check(la == lb and len(la) == a.steps,
          f"replayed loss curve equals the recorded one bit for bit (last {la[-1]!r})")
    check(same_records(w("A"), w("B")), "the replaying run selected what was recorded")
    check(not same_records(w("A"), w("C")), "the perturbed router alone routes differently")
    check(same_records(w("A"), w("D")), "the perturbed router replaying the recording routes "
          "identically")
    check(losses(w("D.jsonl")) != la, "the perturbed run's losses still differ (its weights)")
    r = run(mpi + ["--config", a.config, "--router-replay-dir", w("missing")], env, expect_ok=False)
    check(r.returncode != 0 and "train.router_replay_dir" in r.stdout,
          "a missing recording is refused naming train.router_replay_dir")
    before = {f: os.path.getmtime(os.path.join(w("A"), f)) for f in records(w("A"))}
    r = run(mpi + ["--config", a.config, "--router-record-dir", w("A")], env, expect_ok=False)
    after = {f: os.path.getmtime(os.path.join(w("A"), f)) for f in records(w("A"))}
    check(r.returncode != 0 and "exists" in r.stdout and before == after,
          "recording over an existing recording is refused and overwrites nothing")
    print(f"{8 - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
