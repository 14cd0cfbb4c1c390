"""moe_runtime.Layer against the moe_layer tool (bit for bit) and the PyTorch reference (1e-5).

Every CPU case of tests/reference/check_against_reference.py (every gate kind: TOP1, TOPK, noisy,
expert choice, Soft MoE, sigmoid scores, group-limited, shared experts, SwiGLU, bias updates, ...)
and 20 random configs (seeded; four of each gate kind, with random sizes, groups, experts,
activations, score functions, normalizations, drop policies, aux losses and capacities) run there
first: the tool on the case's files, the reference on the same inputs (redrawn away from
routing near-ties), tool vs reference checked. Then Layer runs on the same files — the config
file, the tool's weight files, x, dy, the router bias, train/step/token offset — and must equal
the tool's y, routing, losses, dx, every gradient and the updated bias bit for bit, and the
reference within max abs error <= 1e-5 * max(1, max |ref|).
"""

import json
import os
import sys

import numpy as np
import pytest

import moe_runtime

pytest.importorskip("torch")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import check_against_reference as cross  # noqa: E402

ref = cross.ref
TOOL = os.environ.get("MOE_LAYER_TOOL", "")


def random_case(i):
    """Config i of the random sweep: gate kind i % 5, everything else drawn from (seed, i)."""
    rng = np.random.default_rng([20261204, i])

    def pick(xs):
        return xs[int(rng.integers(len(xs)))]

    gate = ["TOP1", "TOPK", "NOISY_TOPK", "EXPERT_CHOICE", "SOFT"][i % 5]
    g = pick([1, 1, 2, 3])
    kw = dict(gate=gate, E=pick([3, 4, 6, 8]), M=pick([4, 8, 12]), H=pick([6, 8, 16]), G=g,
              S=int(rng.integers(8, 24)) * g + int(rng.integers(g)),
              act=pick(["GELU_TANH", "RELU", "SILU"]), kind=pick(["FFN", "SWIGLU"]),
              bias=bool(rng.integers(2)), shared=pick([0, 0, 1]), train=bool(rng.integers(2)),
              step=int(rng.integers(10)), offset=int(rng.integers(100)), zw=pick([0.0, 0.01, 0.1]),
              cf_train=pick([0.5, 0.75, 1.25]), cf_eval=pick([0.6, 1.0, 2.0]),
              seed=int(rng.integers(1 << 30)))
    if gate in ("TOP1", "TOPK", "NOISY_TOPK"):
        e = kw["E"]
        k = 1 if gate == "TOP1" else pick([2, 3] if gate == "NOISY_TOPK" else [1, 2, 3])
        kw.update(k=min(k, e), policy=pick(["POSITION", "PROBABILITY", "TOKEN_ORDER", "EXPERT_SCORE"]),
                  aux=pick(["SWITCH", "SWITCH_TOPK", "IMPORTANCE_CV"]), aw=pick([0.01, 0.1]))
        if gate == "NOISY_TOPK":
            kw.update(norm="TOPK_SOFTMAX")
        else:
            kw.update(norm=pick(["NONE", "RENORM_AFTER_CAPACITY", "TOPK_SOFTMAX"]),
                      score=pick(["SOFTMAX", "SIGMOID"]), rbias=bool(rng.integers(2)))
            # Rerouting is defined for the slot-major drop policies only.
            kw["reroute"] = bool(rng.integers(2)) and kw["policy"] in ("POSITION", "PROBABILITY")
            if kw["rbias"] and kw["train"]:
                kw["rate"] = 0.01
    elif gate == "EXPERT_CHOICE":
        kw.update(aux="NO_AUX_LOSS", aw=0.0)
    else:
        kw.update(aux="NO_AUX_LOSS", aw=0.0, slots=pick([1, 2, 3]), zw=0.0)
    return cross.case(f"random{i}_{gate.lower()}", **kw)


CASES = list(cross.CASES) + [random_case(i) for i in range(20)]


def exact(label, got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{label}: shape {got.shape} != {want.shape}"
    assert np.array_equal(got, want), (
        f"{label}: {int((got != want).sum())} entries differ, max |diff| "
        f"{float(np.max(np.abs(got.astype(np.float64) - want))):.3g}")


def close(label, got, want):
    err, why = cross.scaled_err(got, want)
    assert not why and err <= cross.TOL, f"{label}: scaled error {err:.3g} {why}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_layer_equals_tool_and_reference(index, tmp_path):
    if not TOOL or not os.access(TOOL, os.X_OK):
        pytest.skip("MOE_LAYER_TOOL does not name the moe_layer binary")
    c = CASES[index]
    ok, summary = cross.run_case(TOOL, str(tmp_path), c, index, verbose=False)
    assert ok, f"the tool vs the reference: {summary}"
    case_dir = tmp_path / c["name"]
    out = case_dir / "out"
    x = np.load(case_dir / "x.npy")
    dy = np.load(case_dir / "dy.npy")
    bias = np.load(case_dir / "router_bias.npy") if c["rbias"] else None

    layer = moe_runtime.Layer(str(case_dir / "layer.textproto"))
    layer.load_weights(str(out / "weights"))
    if bias is not None:
        layer.router_bias = bias
    y, routing = layer.forward(x, train=c["train"], step=c["step"], token_offset=c["offset"])
    exact("y", y, np.load(out / "y.npy"))
    if c["gate"] == "SOFT":
        exact("combine weights", routing["combine_weights"], np.load(out / "routing_gate.npy"))
        exact("dispatch weights", routing["dispatch_weights"], np.load(out / "routing_dispatch.npy"))
    else:
        key = "tokens" if c["gate"] == "EXPERT_CHOICE" else "experts"
        exact("routing experts", routing[key], np.load(out / "routing_expert.npy"))
        exact("routing gates", routing["gates"], np.load(out / "routing_gate.npy"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert routing["aux_loss"] == float(metrics.get("aux_loss", 0.0))
    assert routing["z_loss"] == float(metrics.get("z_loss", 0.0))
    assert layer.metrics["dropped_slots"] == int(metrics.get("dropped_slots", 0))

    # The reference on the same inputs and weights.
    cfg = ref.load_config(str(out / "config.json"))
    res = ref.run_layer(cfg, x, ref.load_weights(cfg, str(out / "weights")), router_bias=bias,
                        grad_output=dy if c["grad"] else None, train=c["train"], step=c["step"],
                        token_offset=c["offset"])
    close("y vs reference", y, res["y"])
    if c["grad"]:
        dx, grads = layer.backward(dy)
        exact("dx", dx, np.load(out / "dx.npy"))
        close("dx vs reference", dx, res["dx"])
        assert sorted(grads) == sorted(res["grads"]), (sorted(grads), sorted(res["grads"]))
        for name, g in grads.items():
            exact(f"grad_{name}", g, np.load(out / f"grad_{name}.npy"))
            close(f"grad_{name} vs reference", g.reshape(res["grads"][name].shape), res["grads"][name])
    if (out / "router_bias.npy").exists():
        layer.update_router_bias()
        exact("updated router bias", layer.router_bias, np.load(out / "router_bias.npy").reshape(-1))
