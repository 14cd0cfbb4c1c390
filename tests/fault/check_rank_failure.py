#!/usr/bin/env python3
"""A rank of a running moe_train job fails mid-training; the job must end by itself.

Cases (--case):
  mpi_kill9     mpiexec -n 4; rank 2 gets SIGKILL from outside after step 5 was reported
  mpi_sigstop   mpiexec -n 4; rank 2 gets SIGSTOP (stalls without dying)
  mpi_stall     mpiexec -n 4 --inject-fault stall@2:5 (stuck forever inside a step)
  mpi_exit      mpiexec -n 4 --inject-fault exit@2:5 (the process ends mid-step)
  loop_stall    --backend loopback --ranks 4 --inject-fault stall@2:5 (a thread stuck forever)
  loop_exit     --backend loopback --ranks 4 --inject-fault exit@2:5 (a thread stops calling)
Checks: the job exits non-zero, within the deadline plus a slack after the fault, with a message
naming the failed rank (our deadline message "ranks [2] did not arrive" where the survivors
detect it, mpiexec's own report where mpiexec sees the process die first), and no process of the
job is left running afterwards.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time

SLACK_SECONDS = 6.0

ap = argparse.ArgumentParser()
ap.add_argument("--case", required=True)
ap.add_argument("--train", required=True)
ap.add_argument("--config", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--mpiexec", default="")
ap.add_argument("--workdir", required=True)
ap.add_argument("--deadline", type=float, default=3.0)
a = ap.parse_args()

os.makedirs(a.workdir, exist_ok=True)
tag = os.path.join(os.path.abspath(a.workdir), f"{a.case}_{os.getpid()}.jsonl")  # unique in every rank's argv
args = ["--config", a.config, "--data", a.data, "--steps", "100000", "--log-every", "1",
        "--deadline", str(a.deadline), "--metrics", tag]
mpi = a.case.startswith("mpi_")
if mpi:
    if not a.mpiexec:
        print("skipped: no mpiexec in this build")
        sys.exit(77)
    cmd = [a.mpiexec, "-n", "4", a.train, "--backend", "mpi", *args]
else:
    cmd = [a.train, "--backend", "loopback", "--ranks", "4", *args]
kind = a.case.split("_", 1)[1]
if kind in ("stall", "exit"):
    cmd += ["--inject-fault", f"{kind}@2:5"]

env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1", OPENBLAS_NUM_THREADS="1")


def job_processes():
    """pid -> (state, env) of live processes whose command line holds this run's tag."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tag.encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/environ", "rb") as f:
                penv = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if os.path.basename(os.readlink(f"/proc/{pid}/exe")) != os.path.basename(a.train):
            continue
        if state != "Z":
            found[int(pid)] = (state, penv)
    return found


proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True)
out_lines, err_lines = [], []
step5 = threading.Event()


def pump(stream, sink, watch):
    for line in stream:
        sink.append(line)
        if watch and line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 5:
            step5.set()


threads = [threading.Thread(target=pump, args=(proc.stdout, out_lines, True), daemon=True),
           threading.Thread(target=pump, args=(proc.stderr, err_lines, False), daemon=True)]
for t in threads:
    t.start()


def fail(msg):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in job_processes():
        os.kill(pid, signal.SIGKILL)
    sys.exit(f"FAIL [{a.case}]: {msg}\n--- stdout tail:\n{''.join(out_lines[-5:])}--- stderr:\n{''.join(err_lines)}")


if kind in ("kill9", "sigstop"):
    if not step5.wait(60):
        fail("the job did not reach step 5 within 60 s")
    ranks = {int(e.get(b"OMPI_COMM_WORLD_RANK", b"-1")): pid for pid, (_, e) in job_processes().items()}
    if 2 not in ranks:
        fail(f"cannot find rank 2 among the job's processes {ranks}")
    fault_time = time.monotonic()
    os.kill(ranks[2], signal.SIGKILL if kind == "kill9" else signal.SIGSTOP)
else:
    fault_time = None
    start = time.monotonic()
    while fault_time is None and time.monotonic() - start < 60:
        if any("fault injected on rank 2" in line for line in list(err_lines)):
            fault_time = time.monotonic()
        elif proc.poll() is not None:
            break
        time.sleep(0.01)
    if fault_time is None:
        fail("the injected fault never fired")

limit = a.deadline + SLACK_SECONDS
try:
    rc = proc.wait(timeout=limit + 30)
except subprocess.TimeoutExpired:
    fail(f"the job still runs {limit + 30:.0f} s after the fault: a hang")
elapsed = time.monotonic() - fault_time
for t in threads:
    t.join(5)
stderr = "".join(err_lines)

if rc == 0:
    fail("the job exited 0 after a rank failed")
if elapsed > limit:
    fail(f"the job took {elapsed:.1f} s after the fault to end (deadline {a.deadline} s + slack {SLACK_SECONDS} s)")
if kind in ("sigstop", "stall") or a.case == "loop_exit":
    # The survivors noticed: our message names the operation, its deadline and the failed rank
    # ("ranks [2] did not arrive", or "ranks [2] did not complete it" when rank 2 stalled
    # mid-transfer, or "ranks [2] did not signal" for a direct exchange's fence; a survivor stuck
    # in an earlier operation may be listed beside it).
    named = [m for m in re.finditer(r"(alltoall|alltoallv|allreduce|allgather|broadcast|barrier|symmetric fence) #\d+ deadline "
                                    r"[0-9.]+ s exceeded on rank \d+: ranks \[([0-9, ]+)\] did not", stderr)
             if "2" in m.group(2).split(", ")]
    if not named:
        fail("no survivor's deadline message names rank 2")
else:
    # mpiexec saw the process die before the deadline; its report names rank 2.
    if "rank 2" not in stderr and ",2]" not in stderr:
        fail("mpiexec's report does not name rank 2")

# No process of the job is left (zombies waiting for their reaper do not count).
end = time.monotonic() + 5
left = job_processes()
while left and time.monotonic() < end:
    time.sleep(0.1)
    left = job_processes()
if left:
    fail(f"processes of the job still alive after it ended: {sorted(left)}")

print(f"ok [{a.case}]: exit {rc}, {elapsed:.2f} s after the fault (deadline {a.deadline} s), no process left")
