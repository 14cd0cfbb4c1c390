"""Shared by the moe_train end-to-end checks (tests/train/check_*.py): their arguments, the
environment of an mpiexec run as root on few cores, and the fresh work folder."""
import argparse
import os
import shutil


def parse_args(description, steps=None):
    """--tool --mpiexec --config --data --workdir (required), and --steps when given a default."""
    p = argparse.ArgumentParser(description=description)
    for name in ("tool", "mpiexec", "config", "data", "workdir"):
        p.add_argument("--" + name, required=True)
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps)
    return p.parse_args()


def fresh_workdir(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def mpi_env():
    """Open MPI as root, oversubscribed and yielding while idle; one BLAS thread per rank."""
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
                OPENBLAS_NUM_THREADS="1")
