"""Runs a function on every rank of a loopback world, one Python thread per rank."""

import threading

import moe_runtime


def run_ranks(ranks, fn, deadline_seconds=60):
    """[fn(comm) for each rank's comm], run concurrently; re-raises the first rank's failure."""
    comms = moe_runtime.loopback_world(ranks, deadline_seconds=deadline_seconds)
    out, errors = [None] * ranks, []

    def body(c):
        try:
            out[c.rank] = fn(c)
        except Exception as e:  # reported below, with its rank
            errors.append((c.rank, e))

    threads = [threading.Thread(target=body, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, e = min(errors, key=lambda re: re[0])
        raise AssertionError(f"rank {rank}: {type(e).__name__}: {e}") from e
    return out
