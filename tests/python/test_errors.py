"""Bad inputs to the Python module raise clear Python exceptions, never crash the interpreter."""

import numpy as np
import pytest

import moe_runtime

CFG = "moe { model_dim: 8 num_experts: 4 expert { hidden_dim: 16 } router { top_k: 2 } }"


def layer():
    return moe_runtime.Layer(CFG, seed=1)


def x(rows=6, cols=8, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((rows, cols)).astype(dtype)


def test_float64_is_refused_with_the_rule():
    with pytest.raises(TypeError, match=r"x must be a float32 array, got dtype float64"):
        layer().forward(x(dtype=np.float64))


def test_non_contiguous_is_refused():
    with pytest.raises(ValueError, match="C-contiguous"):
        layer().forward(np.asfortranarray(x()))
    with pytest.raises(ValueError, match="C-contiguous"):
        layer().forward(x(rows=6, cols=16)[:, ::2])


def test_wrong_shapes():
    with pytest.raises(ValueError, match=r"columns must equal moe.model_dim=8"):
        layer().forward(x(cols=7))
    with pytest.raises(ValueError, match="must be 2-D"):
        layer().forward(np.zeros(8, np.float32))
    l = layer()
    y, _ = l.forward(x())
    with pytest.raises(ValueError, match=r"rows must equal the forward's tokens=6"):
        l.backward(np.zeros((5, 8), np.float32))


def test_bad_config_field_names_the_field():
    with pytest.raises(ValueError, match=r"moe.num_experts=0 must be > 0"):
        moe_runtime.Layer("moe { model_dim: 8 num_experts: 0 expert { hidden_dim: 16 } }")
    with pytest.raises(ValueError, match=r"top_k"):
        moe_runtime.Layer("moe { model_dim: 8 num_experts: 4 expert { hidden_dim: 16 } "
                          "router { top_k: 9 } }")
    with pytest.raises(ValueError, match="no_such_field"):
        moe_runtime.Layer("moe { no_such_field: 1 }")
    with pytest.raises(FileNotFoundError):
        moe_runtime.Layer("does/not/exist.textproto")


def test_backward_needs_a_forward_and_runs_once():
    l = layer()
    with pytest.raises(RuntimeError, match="needs a forward"):
        l.backward(x())
    y, _ = l.forward(x())
    l.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match="once per forward"):
        l.backward(np.ones_like(y))


def test_parameters_by_name():
    l = layer()
    with pytest.raises(KeyError, match="no parameter named 'expert_9_w1'"):
        l.set_parameter("expert_9_w1", np.zeros((8, 16), np.float32))
    with pytest.raises(ValueError, match="rows"):
        l.set_parameter("expert_0_w1", np.zeros((7, 16), np.float32))
    with pytest.raises(ValueError, match="float32 vector of 16"):
        l.set_parameter("expert_0_b1", np.zeros(15, np.float32))
    with pytest.raises(ValueError, match="router_bias"):
        l.router_bias = np.zeros(3, np.float32)


def test_world_sizes():
    comms = moe_runtime.loopback_world(3)
    with pytest.raises(ValueError, match=r"moe.num_experts=4 must be divisible by the communicator's 3 ranks"):
        moe_runtime.Layer(CFG, comm=comms[0])
    with pytest.raises(ValueError, match="ranks=0"):
        moe_runtime.loopback_world(0)
    with pytest.raises(ValueError, match="deadline"):
        moe_runtime.loopback_world(2, deadline_seconds=0)


def test_dispatcher_inputs():
    with pytest.raises(ValueError, match="gate=SOFT"):
        moe_runtime.Dispatcher("moe { model_dim: 8 num_experts: 4 expert { hidden_dim: 16 } "
                               "router { gate: SOFT } }")
    d = moe_runtime.Dispatcher(CFG)
    with pytest.raises(ValueError, match=r"probs has shape \(6, 3\)"):
        d.dispatch(x(), np.full((6, 3), 0.25, np.float32))
    with pytest.raises(ValueError, match=r"rows must equal x's rows=6"):
        d.dispatch(x(), np.full((5, 4), 0.25, np.float32))
    h = d.dispatch(x(), np.full((6, 4), 0.25, np.float32))
    with pytest.raises(ValueError, match="received rows"):
        d.combine(h, np.zeros((h.rows.shape[0] + 1, 8), np.float32))
    with pytest.raises(RuntimeError, match="combine the handle's forward first"):
        d.dispatch_backward(h, x())
    with pytest.raises(ValueError, match="read-only"):
        h.rows[0, 0] = 1.0


def test_allreduce_dtypes():
    (c,) = moe_runtime.loopback_world(1)
    with pytest.raises(TypeError, match="int8"):
        c.allreduce(np.zeros(3, np.int8))
    with pytest.raises(ValueError, match="op='prod'"):
        c.allreduce(np.zeros(3, np.float32), op="prod")


def test_torch_layer_refuses_float64_and_wrong_width():
    torch = pytest.importorskip("torch")
    from moe_runtime.torch import MoELayer

    m = MoELayer(CFG)
    with pytest.raises(TypeError, match="float32"):
        m(torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="moe.model_dim=8"):
        m(torch.zeros(4, 7))
