"""moe_runtime: the MoE runtime's layer and expert-parallel exchange from Python.

The C++ library does the work; this package is a thin surface over it:

- ``Layer(config, seed=0, comm=None)``: one MoE layer (the config's ``moe`` section, textproto text
  or a file name). ``forward(x)`` returns ``(y, routing)``; ``backward(dy)`` returns ``(dx, grads)``
  with the gradients by the ``moe_layer`` tool's weight names; ``parameters()`` gives writable
  views of the weights. With ``comm`` the layer is expert-parallel over that communicator's ranks
  (each holds ``num_experts / size`` experts).
- ``Dispatcher(config, comm=None)``: the exchange alone. ``dispatch(x, probs)`` routes by the
  config's gate and capacity and sends each kept row to its expert's rank (``handle.rows``,
  ``handle.segments``); run your experts on the rows, then ``combine(handle, out)`` brings them back
  summed by gate.
- ``mpi_world()``: this process's communicator under ``mpirun``; ``loopback_world(n)``: ``n``
  communicators for ranks as threads of one process.
- ``layer_flops(config, tokens, expert_rows)``: one layer call's model FLOPs (forward + backward)
  by the library's accounting, as a dict (router, experts, shared, soft_mix, total).
- ``moe_runtime.torch``: ``MoELayer``, a ``torch.nn.Module`` over ``Layer``.

Arrays are float32 and C-contiguous (others are refused with the rule); library errors arrive as
``ValueError`` (bad config field, shape or size), ``FileNotFoundError``, ``TimeoutError`` (a
collective's deadline), ``NotImplementedError`` or ``RuntimeError``, with the library's message.
"""

import ctypes
import os


def _load_mpi_globally():
    # Open MPI opens its components with dlopen; they resolve symbols of libmpi, which an
    # extension module loads privately (RTLD_LOCAL). Loading it globally first is what mpi4py does.
    for name in ("libmpi.so.40", "libmpi.so"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


_load_mpi_globally()

from ._core import (  # noqa: E402
    Communicator,
    Dispatcher,
    Handle,
    Layer,
    has_mpi,
    layer_flops,
    loopback_world,
    mpi_world,
    set_blas_threads,
)

__all__ = [
    "Communicator",
    "Dispatcher",
    "Handle",
    "Layer",
    "has_mpi",
    "launched_by_mpirun",
    "layer_flops",
    "loopback_world",
    "mpi_world",
    "set_blas_threads",
    "world",
]


def launched_by_mpirun():
    """True when this process is a rank of a job mpirun (or another PMI launcher) started."""
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def world(deadline_seconds=300.0):
    """``mpi_world()`` under mpirun, else ``None`` (one process holds every expert)."""
    return mpi_world(deadline_seconds) if launched_by_mpirun() else None
