#!/usr/bin/env python3
"""Under mpirun: the Python module's expert-parallel Layer and Dispatcher over MPI.

    mpiexec -n W python3 mpi_layer_check.py

Every rank draws the whole batch (same seed), runs its share through Layer(comm=mpi_world()) and
the whole batch through a local Layer with W routing groups (what one process computes). Checked:
this rank's y and dx rows, the gradients of the experts it holds, and the router's gradient summed
over the ranks, all within 1e-6 · max(1, max |one process's value|); and Dispatcher's combine of
dispatched rows through identity experts equals x times the token's kept gate sum. Exit 0 when
every rank passed.
"""

import sys

import numpy as np

import moe_runtime

sys.dont_write_bytecode = True

M, E, S = 16, 8, 32
CFG = """
moe {{ model_dim: 16 num_experts: 8 expert {{ hidden_dim: 24 activation: GELU_TANH }}
      num_shared_experts: 1
      router {{ top_k: 2 capacity_factor_eval: 1.25 min_capacity: 2 num_local_groups: {groups}
               aux_loss: SWITCH aux_loss_weight: 0.01 z_loss_weight: 0.001 }} }}
parallel {{ dropless_exchange: {dropless} }}
"""


def check(name, got, want, tol=1e-6):
    """Max abs error relative to max(1, max |want|), which must be <= tol."""
    if not got.size:
        return 0.0
    err = float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))
    if not err <= tol:
        raise AssertionError(f"{name}: max scaled error {err:.3g} > {tol}")
    return err


def main():
    comm = moe_runtime.mpi_world(deadline_seconds=120)
    w, r = comm.size, comm.rank
    rng = np.random.default_rng(3)
    x = rng.standard_normal((S * w, M)).astype(np.float32)
    dy = rng.standard_normal((S * w, M)).astype(np.float32)
    rows = slice(r * S, (r + 1) * S)
    worst = 0.0
    failures = []
    for dropless in ("false", "true"):
        try:
            ep = moe_runtime.Layer(CFG.format(groups=1, dropless=dropless), seed=7, comm=comm)
            one = moe_runtime.Layer(CFG.format(groups=w, dropless=dropless), seed=7)
            y, routing = ep.forward(np.ascontiguousarray(x[rows]), token_offset=r * S)
            y1, routing1 = one.forward(x)
            worst = max(worst, check("y", y, y1[rows]))
            assert np.array_equal(routing["experts"], routing1["experts"][rows]), "routing differs"
            dx, g = ep.backward(np.ascontiguousarray(dy[rows]), aux_scale=1.0 / w, z_scale=1.0 / w)
            dx1, g1 = one.backward(dy)
            worst = max(worst, check("dx", dx, dx1[rows]))
            for name, grad in g.items():
                if name.startswith("expert_"):
                    worst = max(worst, check(name, grad, g1[name]))
                else:  # replicated: this rank's tokens only; the sum over ranks is one process's
                    total = grad.copy()
                    comm.allreduce(total)
                    worst = max(worst, check(name, total, g1[name]))
            d = moe_runtime.Dispatcher(CFG.format(groups=1, dropless=dropless), comm=comm)
            probs = np.exp(x[rows] @ ep.parameters()["router"]).astype(np.float32)
            probs /= probs.sum(axis=1, keepdims=True)
            h = d.dispatch(np.ascontiguousarray(x[rows]), np.ascontiguousarray(probs))
            back = d.combine(h, np.ascontiguousarray(h.rows))
            worst = max(worst, check("dispatch+combine", back, x[rows] * h.gates.sum(axis=1, keepdims=True)))
        except AssertionError as e:
            failures.append(f"dropless={dropless}: {e}")
    status = np.array([len(failures)], dtype=np.int64)
    comm.allreduce(status)
    for f in failures:
        print(f"rank {r}: FAIL {f}", flush=True)
    if r == 0:
        print(f"mpi_layer_check: {w} ranks, worst scaled error {worst:.3g}: "
              f"{'PASS' if status[0] == 0 else 'FAIL'}", flush=True)
    return 0 if status[0] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
