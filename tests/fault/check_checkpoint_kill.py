#!/usr/bin/env python3
"""kill -9 at random moments of a run that saves a checkpoint after every step, again and again.

Each iteration starts moe_train (resuming when a complete checkpoint exists), kills it with SIGKILL
after a random delay, then checks with an independent verifier (this file: manifest parsed here,
sizes and FNV-1a checksums recomputed) that
  - every complete checkpoint directory (step_N with a manifest) verifies;
  - the newest complete step never goes backwards (a crash never damages the last good one);
  - moe_train --resume never had to skip a damaged checkpoint.
A last run resumes to the end; its final loss must equal an uninterrupted run's (the resumed
training is the same computation). Reports how many kills landed inside a save (a step_N.tmp
directory created by the killed run was left behind).

Iterations cycle through three kinds of kill: after a random delay (startup, resume, a step or a
save, whatever is running; iterations 0 and 2 of every 4); as soon as the run has created a
step_N.tmp directory, so that the save itself is hit on a machine of any speed (a fixed delay alone
missed every save on a slow one; iteration 1); and as soon as the run has completed a save newer
than any before it (iteration 3), so that the job makes progress on a machine of any speed (under
ASan on a slow machine, 20 runs killed at random or mid-save once completed no save at all).
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--train", required=True)
ap.add_argument("--config", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--workdir", required=True)
ap.add_argument("--iterations", type=int, default=20, help="kill -9 this many runs")
ap.add_argument("--steps", type=int, default=1000,
                help="steps of the job (the kills land in the first few dozen; the final resume runs the rest)")
ap.add_argument("--ranks", type=int, default=2)
ap.add_argument("--seed", type=int, default=7)
ap.add_argument("--min-mid-save", type=int, default=1,
                help="fail unless at least this many kills landed inside a save")
a = ap.parse_args()

rng = random.Random(a.seed)
shutil.rmtree(a.workdir, ignore_errors=True)
os.makedirs(a.workdir)
ckpt = os.path.join(a.workdir, "ckpt")
env = dict(os.environ, OPENBLAS_NUM_THREADS="1")

# The config under test, saving after every step.
text = open(a.config).read()
if "checkpoint_every" in text:
    sys.exit("the config must not set train.checkpoint_every (this test sets it)")
text = re.sub(r"\btrain\s*{", "train {\n  checkpoint_every: 1\n", text, count=1)
config = os.path.join(a.workdir, "config.textproto")
open(config, "w").write(text)


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


verified = {}  # path -> (size, mtime_ns) of a file whose bytes matched its manifest entry


def verify(d):
    """None when checkpoint directory d is complete and intact, else what is wrong. A file whose
    size and modification time are unchanged since it last matched is not read again."""
    manifest = os.path.join(d, "manifest.textproto")
    if not os.path.isfile(manifest):
        return "no manifest"
    blocks = re.findall(r"tensors\s*{(.*?)}", open(manifest).read(), flags=re.S)
    if not blocks:
        return "manifest lists no tensors"
    for b in blocks:
        name = re.search(r'file:\s*"([^"]+)"', b).group(1)
        size = int(re.search(r"size_bytes:\s*(\d+)", b).group(1))
        checksum = int(re.search(r"checksum:\s*(\d+)", b).group(1))
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            return f"{name} missing"
        st = os.stat(path)
        if verified.get(path) == (st.st_size, st.st_mtime_ns):
            continue
        data = open(path, "rb").read()
        if len(data) != size:
            return f"{name}: {len(data)} bytes, manifest says {size}"
        if fnv1a64(data) != checksum:
            return f"{name}: checksum mismatch"
        verified[path] = (st.st_size, st.st_mtime_ns)
    return None


def tmp_dirs():
    """Identities of the step_N.tmp directories now present: a directory left by an earlier run keeps
    its identity, one (re)created since has a new inode or change time."""
    found = set()
    try:
        entries = list(os.scandir(ckpt))
    except FileNotFoundError:
        return found
    for e in entries:
        if not (e.name.startswith("step_") and e.name.endswith(".tmp")):
            continue
        try:
            st = e.stat()
        except FileNotFoundError:
            continue
        found.add((e.name, st.st_ino, st.st_ctime_ns))
    return found


def wait_for_save(p, before, deadline_s=60.0):
    """Polls until process p has a save under way (a step_N.tmp directory not in `before`) or exits."""
    end = time.monotonic() + deadline_s
    while p.poll() is None and time.monotonic() < end:
        if tmp_dirs() - before:
            return
        time.sleep(0.001)  # the job's ranks need the cores more than this loop


def wait_for_new_checkpoint(p, newest_before, deadline_s=60.0):
    """Polls until process p has completed a save newer than step `newest_before` (a step_N directory:
    saves are renamed from step_N.tmp when complete) or exits."""
    end = time.monotonic() + deadline_s
    while p.poll() is None and time.monotonic() < end:
        try:
            names = os.listdir(ckpt)
        except FileNotFoundError:
            names = []
        if any(re.fullmatch(r"step_\d+", n) and int(n[5:]) > newest_before for n in names):
            return
        time.sleep(0.001)


def complete_steps():
    steps = []
    for d in glob.glob(os.path.join(ckpt, "step_*")):
        base = os.path.basename(d)
        if not re.fullmatch(r"step_\d+", base) or not os.path.isfile(os.path.join(d, "manifest.textproto")):
            continue
        problem = verify(d)
        if problem:
            sys.exit(f"FAIL: complete-looking checkpoint {base} is damaged: {problem}")
        steps.append(int(base[5:]))
    return sorted(steps)


def command(metrics, resume, directory=ckpt):
    cmd = [a.train, "--config", config, "--data", a.data, "--backend", "loopback", "--ranks", str(a.ranks),
           "--steps", str(a.steps), "--metrics", metrics, "--quiet"]
    return cmd + (["--checkpoint-dir", directory] if directory else []) + (["--resume"] if resume else [])


def last_metrics(path):
    lines = open(path).read().strip().splitlines() if os.path.isfile(path) else []
    return json.loads(lines[-1]) if lines else None


def final_loss(metrics):
    return last_metrics(metrics)["loss"]


# Reference: the same run, uninterrupted and without checkpoints.
ref_metrics = os.path.join(a.workdir, "reference.jsonl")
ref_start = time.monotonic()
ref = subprocess.run(command(ref_metrics, False, None), env=env,
                     capture_output=True, text=True, timeout=600)
ref_seconds = time.monotonic() - ref_start
if ref.returncode != 0:
    sys.exit(f"FAIL: reference run exited {ref.returncode}: {ref.stderr}")
ref_loss = final_loss(ref_metrics)

loop_start = time.monotonic()
newest, mid_save, kills = -1, 0, 0
finished = None  # metrics of a run that reached the last step before being killed
iterations = 0
for it in range(3 * a.iterations):  # a run that ends before its kill does not count
    if kills == a.iterations:
        break
    steps = complete_steps()
    if steps and steps[-1] >= a.steps:
        break
    metrics = os.path.join(a.workdir, f"run_{it}.jsonl")
    iterations += 1
    before = tmp_dirs()
    p = subprocess.Popen(command(metrics, bool(steps)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if it % 4 == 1:
        wait_for_save(p, before)
    elif it % 4 == 3:
        wait_for_new_checkpoint(p, steps[-1] if steps else -1)
    else:
        time.sleep(rng.uniform(0.1, 0.5))
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        kills += 1
    out, err = p.communicate(timeout=60)
    if p.returncode not in (0, -signal.SIGKILL):
        sys.exit(f"FAIL: iteration {it}: moe_train exited {p.returncode}: {err}")
    m = last_metrics(metrics)
    if m is not None and int(m.get("step", 0)) == a.steps - 1:
        finished = metrics
    if "skipping checkpoint" in err:
        sys.exit(f"FAIL: iteration {it}: resume had to skip a damaged checkpoint: {err}")
    if tmp_dirs() - before:
        mid_save += 1
    steps = complete_steps()
    now = steps[-1] if steps else -1
    if now < newest:
        sys.exit(f"FAIL: iteration {it}: newest complete checkpoint went back from step {newest} to {now}")
    newest = now

loop_seconds = time.monotonic() - loop_start

# Resume to the end and compare with the uninterrupted run.
metrics = finished
if metrics is None:
    metrics = os.path.join(a.workdir, "final.jsonl")
    # (--resume needs a complete checkpoint; iteration 3 of every 4 leaves one unless every run of
    # those died before its first save.)
    last = subprocess.run(command(metrics, bool(complete_steps())), env=env, capture_output=True,
                          text=True, timeout=600)
    if last.returncode != 0:
        sys.exit(f"FAIL: the final resume exited {last.returncode}: {last.stderr}")
loss = final_loss(metrics)
if abs(loss - ref_loss) > 1e-6 * max(1.0, abs(ref_loss)):
    sys.exit(f"FAIL: final loss after {kills} kills {loss!r} differs from the uninterrupted run's {ref_loss!r}")
if kills < a.iterations and finished is None:
    sys.exit(f"FAIL: only {kills} of {iterations} runs were killed (wanted {a.iterations})")
if mid_save < a.min_mid_save:
    sys.exit(f"FAIL: only {mid_save} of {kills} kills landed inside a save (need {a.min_mid_save}); "
             "the test would not test the save")
print(f"uninterrupted run without checkpoints: {a.steps} steps in {ref_seconds:.2f} s")
print(f"kill loop: {loop_seconds:.2f} s")
print(f"ok: {kills} kill -9 over {iterations} runs, {mid_save} inside a save; newest complete checkpoint "
      f"never went back (reached step {newest}); final loss {loss:.10f} == uninterrupted {ref_loss:.10f}")
