"""Oversized configs are refused up front (runtime/config/memory_model.h): every tool exits with 2
within a second, the message carries the estimate and its largest terms with their fields, and
nothing is written (no output directory, no metrics file).

Usage: check_oversized.py --layer moe_layer --train moe_train --simulate moe_simulate
                          --config tiny_lm.textproto --data corpus.txt --workdir DIR"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time


def main():
    p = argparse.ArgumentParser()
    for name in ("layer", "train", "simulate", "config", "data", "workdir"):
        p.add_argument("--" + name, required=True)
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    w = lambda *parts: os.path.join(a.workdir, *parts)  # noqa: E731
    with open(a.config) as f:
        tiny = f.read()

    def variant(name, **subs):
        text = tiny
        for field, value in subs.items():
            text, n = re.subn(field + r":\s*[0-9.]+", f"{field}: {value}", text)
            assert n == 1, field
        path = w(name + ".textproto")
        with open(path, "w") as f:
            f.write(text)
        return path

    with open(w("huge_layer.textproto"), "w") as f:
        f.write("moe { model_dim: 8 num_experts: 100000000 expert { hidden_dim: 8 } "
                "router { top_k: 1 } }\n")
    # 16 tokens of x: a tiny .npy written by hand (float32, 16 x 8).
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (16, 8), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    with open(w("x.npy"), "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        f.write(b"\x00" * (16 * 8 * 4))
    big_batch = variant("big_batch", global_batch_tokens=2000000000)
    big_groups = variant("big_groups", num_local_groups=4000000, global_batch_tokens=16000000)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    cases = [
        ("moe_layer, 10^8 experts", [a.layer, "--config", w("huge_layer.textproto"), "--input",
                                     w("x.npy"), "--init-seed", "1", "--out", w("layer_out")],
         w("layer_out")),
        ("moe_train, global_batch_tokens 2e9", [a.train, "--config", big_batch, "--data", a.data,
                                                 "--backend", "loopback", "--ranks", "2",
                                                 "--metrics", w("batch.jsonl")], w("batch.jsonl")),
        ("moe_train, num_local_groups 4e6", [a.train, "--config", big_groups, "--data", a.data,
                                              "--backend", "loopback", "--ranks", "1",
                                              "--metrics", w("groups.jsonl")], w("groups.jsonl")),
        ("moe_simulate, global_batch_tokens 2e9", [a.simulate, "--config", big_batch, "--data",
                                                    a.data, "--ranks", "4", "--out",
                                                    w("sim_out")], w("sim_out")),
    ]
    failures = 0
    for name, cmd, written in cases:
        t0 = time.monotonic()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        seconds = time.monotonic() - t0
        out = r.stdout + r.stderr
        ok = (r.returncode == 2 and seconds < 1.0 and "needs an estimated" in out and
              "largest:" in out and "[" in out and not os.path.exists(written))
        failures += 0 if ok else 1
        print(f"{'PASS' if ok else 'FAIL'} {name}: exit {r.returncode} in {seconds:.2f} s, "
              f"{'nothing written' if not os.path.exists(written) else 'WROTE ' + written}")
        print("    " + out.strip().splitlines()[0][:400] if out.strip() else "    (no output)")
    print(f"{len(cases) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
