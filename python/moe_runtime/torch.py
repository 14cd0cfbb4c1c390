"""PyTorch surface of moe_runtime: ``MoELayer``, an ``nn.Module`` over the library's layer.

Pure Python over ``moe_runtime.Layer`` (any torch with ``torch.from_numpy``). CPU, float32:

    from moe_runtime.torch import MoELayer
    moe = MoELayer(config_text, seed=0)           # comm=moe_runtime.world() for expert parallel
    y = moe(x)                                    # x: (..., model_dim) float32
    loss = task_loss(y) + moe.aux_loss + moe.z_loss
    loss.backward()                               # gradients to x and every parameter

- The parameters are ``nn.Parameter``s named as the ``moe_layer`` tool's weight files (``router``,
  ``expert_3_w1``, ``shared_0_b2``, ...) whose storage *is* the library's: an optimizer's in-place
  update is what the next forward computes with. (A parameter whose ``.data`` was replaced is
  copied into the library at the next forward.)
- ``aux_loss`` and ``z_loss`` are the router losses weighted by ``router.aux_loss_weight`` and
  ``router.z_loss_weight``: add them to the objective and their gradients flow (the library takes
  their upstream gradients as its loss scales); leave them out and none flows.
- One backward per forward: the library keeps the last forward's routing only.
- Expert parallel (``comm`` given): each rank holds ``num_experts / size`` experts, marked
  ``expert_parallel = True``; ``allreduce_gradients(model, comm)`` averages the replicated
  parameters' gradients over the ranks and scales the expert shards' by ``1 / size`` (they already
  hold every rank's tokens), as DDP with Megatron's expert parallelism does.
"""

import numpy as np
import torch

from . import _core

__all__ = ["MoELayer", "MoEFunction", "allreduce_gradients", "broadcast_parameters"]


class MoEFunction(torch.autograd.Function):
    """y, aux_loss, z_loss = MoEFunction.apply(module, x, *module's parameters)."""

    @staticmethod
    def forward(ctx, module, x, *params):
        layer = module.layer
        module._sync_parameters()
        xn = x.detach()
        if xn.dtype != torch.float32:
            raise TypeError(f"MoELayer: x must be float32, got {xn.dtype}")
        xn = xn.contiguous().numpy()
        y, routing = layer.forward(xn, train=module.training, step=module._next_step(),
                                   token_offset=module._token_offset)
        ctx.module = module
        ctx.forward_id = layer.forward_id
        module.routing = routing
        aux = torch.tensor(layer.aux_loss_weight * routing["aux_loss"], dtype=torch.float32)
        z = torch.tensor(layer.z_loss_weight * routing["z_loss"], dtype=torch.float32)
        return torch.from_numpy(y), aux, z

    @staticmethod
    def backward(ctx, grad_y, grad_aux, grad_z):
        module = ctx.module
        layer = module.layer
        if layer.forward_id != ctx.forward_id:
            raise RuntimeError(
                "MoELayer: backward of a forward that is not the layer's last (the library keeps "
                "one forward's routing): run forward and backward in turn, or use one MoELayer "
                "per call site")
        dy = grad_y.detach().to(torch.float32).contiguous().numpy()
        aux_scale = float(grad_aux) if grad_aux is not None else 0.0
        z_scale = float(grad_z) if grad_z is not None else 0.0
        dx, grads = layer.backward(dy, aux_scale=aux_scale, z_scale=z_scale)
        out = [None, torch.from_numpy(dx)]
        for name in module._names:
            out.append(torch.from_numpy(grads[name]))
        return tuple(out)


class MoELayer(torch.nn.Module):
    """A sparse MoE layer computed by the moe_runtime library.

    config: textproto text (or a file name) with a ``moe { ... }`` section (and optionally
    ``compute``, ``parallel``, ``seed``). seed: the weights' initialization (the same values on
    every rank, by name). comm: a ``moe_runtime.Communicator`` for expert parallelism, or None.

    forward(x, step=None, token_offset=None) takes x of shape (..., model_dim). In training mode
    the step counts forwards unless given (it drives noisy gates and random routing), and
    token_offset (default 0) is the global index of this call's first token.
    """

    def __init__(self, config, seed=0, comm=None):
        super().__init__()
        self.layer = _core.Layer(config, seed=seed, comm=comm)
        self.comm = comm
        self.model_dim = self.layer.model_dim
        self.num_experts = self.layer.num_experts
        self.routing = None
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self._step = 0
        self._step_override = None
        self._token_offset = 0
        self._arrays = self.layer.parameters()
        self._names = list(self._arrays.keys())
        for name in self._names:
            p = torch.nn.Parameter(torch.from_numpy(self._arrays[name]))
            p.expert_parallel = comm is not None and name.startswith("expert_")
            self.register_parameter(name, p)

    def _sync_parameters(self):
        # A parameter whose storage was replaced (p.data = ..., load_state_dict into new tensors)
        # no longer shares the library's memory: copy it in.
        for name in self._names:
            p = getattr(self, name)
            a = self._arrays[name]
            if p.data_ptr() != a.ctypes.data or p.dtype != torch.float32:
                a[...] = p.detach().to(torch.float32).cpu().numpy().reshape(a.shape)

    def _next_step(self):
        if self._step_override is not None:
            return self._step_override
        step = self._step
        if self.training:
            self._step += 1
        return step

    def forward(self, x, step=None, token_offset=None):
        if x.shape[-1] != self.model_dim:
            raise ValueError(f"MoELayer: x has shape {tuple(x.shape)}, its last dimension must "
                             f"equal moe.model_dim={self.model_dim}")
        shape = x.shape
        self._step_override = step
        self._token_offset = 0 if token_offset is None else int(token_offset)
        params = [getattr(self, n) for n in self._names]
        y, aux, z = MoEFunction.apply(self, x.reshape(-1, self.model_dim), *params)
        self.aux_loss, self.z_loss = aux, z
        return y.reshape(shape)

    @property
    def metrics(self):
        """The last forward's metrics (drops, loads, capacity, unweighted losses)."""
        return self.layer.metrics

    def extra_repr(self):
        return (f"model_dim={self.model_dim}, num_experts={self.num_experts}, "
                f"local_experts={self.layer.num_local_experts}, device={self.layer.device}")


def _replicated_and_experts(module):
    # Every replicated parameter takes part in the all-reduce, with a zero gradient where this
    # rank's backward gave it none, so all ranks reduce buffers of the same layout.
    replicated, experts = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "expert_parallel", False):
            if p.grad is not None:
                experts.append(p)
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        replicated.append(p)
    return replicated, experts


def allreduce_gradients(module, comm):
    """Averages gradients over the ranks of ``comm`` (data parallel around expert parallel).

    Replicated parameters: their gradients are summed over the ranks in one all-reduce (float32,
    the same bits on every rank) and divided by the rank count. Expert shards
    (``expert_parallel``): divided by the rank count only — their gradients already hold the
    tokens of every rank. With each rank's loss a mean over its own tokens, the result is the
    gradient of the mean over all ranks' tokens.
    """
    if comm is None or comm.size == 1:
        return
    w = float(comm.size)
    replicated, experts = _replicated_and_experts(module)
    if replicated:
        flat = np.concatenate([p.grad.detach().to(torch.float32).reshape(-1).numpy()
                               for p in replicated])
        comm.allreduce(flat)
        offset = 0
        for p in replicated:
            n = p.grad.numel()
            p.grad.copy_(torch.from_numpy(flat[offset:offset + n]).reshape(p.grad.shape))
            offset += n
            p.grad.div_(w)
    for p in experts:
        p.grad.div_(w)


def broadcast_parameters(module, comm, root=0):
    """Copies the replicated parameters (not the expert shards) of rank ``root`` to every rank."""
    if comm is None or comm.size == 1:
        return
    with torch.no_grad():
        for p in module.parameters():
            if getattr(p, "expert_parallel", False):
                continue
            a = p.detach().contiguous().numpy().copy()
            comm.broadcast(a, root)
            p.copy_(torch.from_numpy(a).reshape(p.shape))
