"""moe_runtime.torch.MoELayer: the library's layer as an nn.Module with autograd.

The library computes in float32 only, so torch.autograd.gradcheck (float64) does not apply: the
gradients are checked against central finite differences in float32 (step 1e-2 on a smooth,
drop-free case, skipping a coordinate whose step changes the selected experts; tolerance 2e-3 absolute + 2e-2 relative, set by float32 rounding of the
loss over the step), and against the library's own backward bit for bit.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_runtime  # noqa: E402
from moe_runtime.torch import MoELayer, allreduce_gradients  # noqa: E402
from ranks import run_ranks  # noqa: E402

SMOOTH = """
moe { model_dim: 6 num_experts: 4 expert { hidden_dim: 8 activation: GELU_TANH }
      num_shared_experts: 1 shared_hidden_dim: 4
      router { top_k: 2 capacity_factor_train: 4.0 capacity_factor_eval: 4.0
               aux_loss: SWITCH aux_loss_weight: 0.1 z_loss_weight: 0.01 } }
"""
SOFT = """
moe { model_dim: 6 num_experts: 4 expert { hidden_dim: 8 activation: GELU_TANH }
      router { gate: SOFT slots_per_expert: 2 } }
"""


def inputs(s=10, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, m, generator=g), torch.randn(s, m, generator=g)


def test_forward_equals_layer_and_parameters_share_memory():
    m = MoELayer(SMOOTH, seed=5)
    x, _ = inputs()
    y = m(x)
    ref = moe_runtime.Layer(SMOOTH, seed=5)
    want, routing = ref.forward(x.numpy())
    assert np.array_equal(y.detach().numpy(), want)
    assert np.array_equal(m.routing["experts"], routing["experts"])
    names = [n for n, _ in m.named_parameters()]
    assert names == ref.parameter_names
    # An in-place update of a parameter is what the library computes with next.
    with torch.no_grad():
        m.expert_0_w1.mul_(2.0)
    ref.set_parameter("expert_0_w1", ref.parameters()["expert_0_w1"] * 2.0)
    assert np.array_equal(m(x).detach().numpy(), ref.forward(x.numpy())[0])
    # A replaced tensor is copied in at the next forward.
    m.router.data = torch.zeros_like(m.router)
    ref.set_parameter("router", np.zeros((6, 4), np.float32))
    assert np.array_equal(m(x).detach().numpy(), ref.forward(x.numpy())[0])


@pytest.mark.parametrize("aux_w,z_w", [(1.0, 1.0), (0.0, 0.0), (3.0, 0.5)])
def test_router_losses_carry_their_upstream_gradients(aux_w, z_w):
    m = MoELayer(SMOOTH, seed=2)
    x, r = inputs(seed=1)
    x.requires_grad_(True)
    y = m(x)
    loss = (y * r).sum() + aux_w * m.aux_loss + z_w * m.z_loss
    loss.backward()
    ref = moe_runtime.Layer(SMOOTH, seed=2)
    ref.forward(x.detach().numpy())
    dx, grads = ref.backward(r.numpy(), aux_scale=aux_w, z_scale=z_w)
    assert np.array_equal(x.grad.numpy(), dx)
    for name, p in m.named_parameters():
        assert np.array_equal(p.grad.numpy(), grads[name]), name
    assert m.aux_loss.item() == pytest.approx(0.1 * m.routing["aux_loss"], rel=1e-6)
    assert m.z_loss.item() == pytest.approx(0.01 * m.routing["z_loss"], rel=1e-6)


def finite_difference_check(config, train=False):
    torch.manual_seed(0)
    m = MoELayer(config, seed=3)
    m.train(train)
    x, r = inputs(seed=4)
    x = x.clone().requires_grad_(True)

    def objective():
        y = m(x, step=0)
        return (y * r).sum() + m.aux_loss + m.z_loss

    def selection():
        return m.routing.get("experts")

    objective().backward()
    base = selection()
    analytic = {"x": x.grad.clone()}
    analytic.update({n: p.grad.clone() for n, p in m.named_parameters()})
    tensors = {"x": x}
    tensors.update(dict(m.named_parameters()))
    rng = np.random.default_rng(7)
    eps, checked = 1e-2, 0
    for name, t in tensors.items():
        flat = t.data.view(-1)
        for i in rng.choice(flat.numel(), size=min(4, flat.numel()), replace=False):
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + eps
                up = objective().item()
                same = base is None or np.array_equal(selection(), base)
                flat[i] = old - eps
                down = objective().item()
                same = same and (base is None or np.array_equal(selection(), base))
                flat[i] = old
            if not same:
                continue  # the step crossed a routing decision: not differentiable there
            numeric = (up - down) / (2 * eps)
            got = analytic[name].view(-1)[i].item()
            assert abs(got - numeric) <= 2e-3 + 2e-2 * abs(numeric), (name, int(i), got, numeric)
            checked += 1
    return checked


def test_finite_differences_token_choice():
    assert finite_difference_check(SMOOTH) > 20


def test_finite_differences_soft_moe():
    assert finite_difference_check(SOFT) > 10


def test_backward_of_a_stale_forward_is_refused():
    m = MoELayer(SMOOTH)
    x, _ = inputs()
    y1 = m(x)
    m(x)
    with pytest.raises(RuntimeError, match="not the layer's last"):
        y1.sum().backward()


def test_expert_parallel_gradients_average_like_one_process():
    """Two loopback ranks (threads), each its half of the tokens, equal one process with two groups."""
    cfg1 = SMOOTH.replace("aux_loss: SWITCH", "aux_loss: SWITCH num_local_groups: 2")
    x, r = inputs(s=12, seed=9)
    one = MoELayer(cfg1, seed=4)
    y = one(x)
    ((y * r).sum() / 12 + one.aux_loss + one.z_loss).backward()
    want = {n: p.grad for n, p in one.named_parameters()}

    def rank(c):
        m = MoELayer(SMOOTH, seed=4, comm=c)
        rows = slice(6 * c.rank, 6 * c.rank + 6)
        yy = m(x[rows], token_offset=6 * c.rank)
        ((yy * r[rows]).sum() / 6 + m.aux_loss + m.z_loss).backward()
        allreduce_gradients(m, c)
        grads = {n: p.grad for n, p in m.named_parameters()}
        grads["y"] = yy.detach()
        return grads

    got = run_ranks(2, rank)
    assert torch.allclose(torch.cat([got[0]["y"], got[1]["y"]]), y.detach(), atol=1e-6)
    for rk in range(2):
        for name, g in got[rk].items():
            if name == "y":
                continue
            assert torch.allclose(g, want[name], atol=1e-6, rtol=1e-5), (rk, name)
    assert sorted(n for n in got[0] if n.startswith("expert_0_"))
    assert not any(n.startswith("expert_0_") for n in got[1])
