#!/usr/bin/env python3
"""Self-checks of the PyTorch reference (moe_reference.py) on hand-computed cases, and of its RNG
port against base/rng.h (bit for bit).

  test_reference_selfcheck.py [--rng-dump PATH]

--rng-dump: the `reference_rng_dump` binary (tests/reference/rng_dump.cc). Without it the test
compiles rng_dump.cc with g++ (or c++) when one is found, else skips only the RNG comparison.
Exit 0 when all checks pass, 1 otherwise, 77 when torch is not importable.
"""

import argparse
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover
    print(f"SKIP: PyTorch/NumPy not importable by {sys.executable} ({exc})")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True  # keep the source tree clean when ctest runs this
sys.path.insert(0, HERE)
import moe_reference as ref  # noqa: E402

FAILURES = []
CHECKS = [0]


def check(cond, what):
    CHECKS[0] += 1
    if not cond:
        FAILURES.append(what)
        print(f"FAIL {what}")


def close(a, b, what, tol=1e-6):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = a.shape == b.shape and (a.size == 0 or float(np.max(np.abs(a - b))) <= tol)
    check(ok, f"{what}: got {a.tolist()} want {b.tolist()}")


def cfg_of(m, e, h, router, act="RELU", kind="FFN", bias=False, shared=0, shared_h=0, seed=5):
    r = {"capacity_factor_train": 1.0, "capacity_factor_eval": 1.0, "min_capacity": 0,
         "aux_loss": "NO_AUX_LOSS", "aux_loss_weight": 0.0}
    r.update(router)
    return ref.LayerConfig({
        "moe": {"model_dim": m, "num_experts": e,
                "expert": {"hidden_dim": h, "activation": act, "kind": kind, "bias": bias},
                "router": r, "num_shared_experts": shared, "shared_hidden_dim": shared_h},
        "seed": str(seed)})


def identity_experts(cfg, scales):
    """Expert e: w1 = I, w2 = scales[e] * I (M = H), so FFN_e(x) = scales[e] * relu(x)."""
    w = {}
    m = cfg.model_dim
    for e, sc in enumerate(scales):
        w[f"expert_{e}_w1"] = np.eye(m, dtype=np.float32)
        w[f"expert_{e}_w2"] = (sc * np.eye(m)).astype(np.float32)
    return w


def softmax(v):
    v = np.asarray(v, dtype=np.float64)
    ex = np.exp(v - v.max())
    return ex / ex.sum()


# ---------------------------------------------------------------------------------------------

def test_top1_capacity_drop():
    # 2 experts, top-1, C = max(1, ceil(1 * 2 * 0.1 / 2)) = 1: both tokens pick expert 0; the
    # second (POSITION) is dropped.
    cfg = cfg_of(2, 2, 2, {"gate": "TOP1", "capacity_factor_eval": 0.1, "min_capacity": 1})
    w = {"router": np.array([[1, 0], [0, 0]], np.float32), **identity_experts(cfg, [1, 2])}
    x = np.array([[1, 0], [1, 0]], np.float32)
    r = ref.run_layer(cfg, x, w)
    g = math.e / (math.e + 1)
    check(r["metrics"]["capacity"] == 1, "top1 capacity == 1")
    check(r["routing_expert"].tolist() == [[0], [-1]], f"top1 drop routing {r['routing_expert']}")
    close(r["routing_gate"], [[g], [0]], "top1 drop gates")
    close(r["y"], [[g, 0], [0, 0]], "top1 drop y")
    check(r["metrics"]["dropped_slots"] == 1, "top1 dropped_slots")
    check(r["metrics"]["tokens_per_expert"] == [1, 0], "top1 tokens_per_expert")
    check(r["metrics"]["dropped_per_expert"] == [1, 0], "top1 dropped_per_expert")

    # PROBABILITY: token 1 has the larger top-1 prob, so it is kept and token 0 dropped.
    cfg_p = cfg_of(2, 2, 2, {"gate": "TOP1", "capacity_factor_eval": 0.1, "min_capacity": 1,
                             "drop_policy": "PROBABILITY"})
    x2 = np.array([[1, 0], [2, 0]], np.float32)
    r = ref.run_layer(cfg_p, x2, w)
    check(r["routing_expert"].tolist() == [[-1], [0]], f"probability policy {r['routing_expert']}")
    close(r["routing_gate"], [[0], [math.exp(2) / (math.exp(2) + 1)]], "probability gates")

    # Dropless (cf <= 0): nothing dropped, C reported as 0.
    cfg_d = cfg_of(2, 2, 2, {"gate": "TOP1", "capacity_factor_eval": 0.0, "min_capacity": 1})
    r = ref.run_layer(cfg_d, x, w)
    check(r["metrics"]["capacity"] == 0 and r["routing_expert"].tolist() == [[0], [0]],
          "dropless keeps both")


def test_reroute_and_bias():
    # E = 3, k = 1, C = 1: both tokens rank e0 first; token 1 ranks e2 before e1, so its
    # overflowing slot goes to e2 with gate probs[1, 2].
    router = {"gate": "TOP1", "capacity_factor_eval": 0.1, "min_capacity": 1,
              "reroute_overflow": True}
    cfg = cfg_of(3, 3, 3, router)
    w = {"router": np.eye(3, dtype=np.float32), **identity_experts(cfg, [1, 2, 3])}
    x = np.array([[2, 1, 0], [2, 0, 1]], np.float32)
    r = ref.run_layer(cfg, x, w)
    p1 = softmax([2, 0, 1])
    check(r["routing_expert"].tolist() == [[0], [2]], f"reroute routing {r['routing_expert']}")
    close(r["routing_gate"][1], [p1[2]], "rerouted gate = probs of the new expert")
    close(r["y"][1], 3 * p1[2] * np.array([2, 0, 1]), "rerouted y")
    check(r["metrics"]["tokens_per_expert"] == [1, 0, 1], "reroute tokens_per_expert")
    check(r["metrics"]["dropped_slots"] == 0, "reroute dropped nothing")
    # No room anywhere else: E = 2, both experts full -> dropped.
    x3 = np.array([[2, 1, 0], [2, 1, 0], [2, 0, 1]], np.float32)
    r = ref.run_layer(cfg_of(3, 3, 3, dict(router, capacity_factor_eval=0.01)), x3, w)
    # S = 3: C = max(1, ceil(3 * 0.01 / 3)) = 1: t0 -> e0, t1 -> e1 (rerouted), t2 -> e2.
    check(r["routing_expert"].tolist() == [[0], [1], [2]], f"reroute chain {r['routing_expert']}")
    x4 = np.array([[2, 1, 0]] * 4, np.float32)
    r = ref.run_layer(cfg, x4, w)
    check(r["routing_expert"].tolist() == [[0], [1], [2], [-1]], f"reroute full {r['routing_expert']}")
    check(r["metrics"]["dropped_per_expert"] == [1, 0, 0], "reroute drop counted for the selected expert")

    # Aux-loss-free bias: selection by probs + bias, gate = unbiased prob.
    cfg_b = cfg_of(3, 3, 3, {"gate": "TOP1", "capacity_factor_train": 0.0, "bias_update_rate": 0.5})
    bias = np.array([0.0, 0.9, 0.0], np.float32)
    r = ref.run_layer(cfg_b, x, w, router_bias=bias, train=True)
    p0 = softmax([2, 1, 0])
    check(r["routing_expert"].tolist() == [[1], [1]], f"bias selection {r['routing_expert']}")
    close(r["routing_gate"][:, 0], [p0[1], p1[1]], "bias gates are unbiased probs")
    # load [0, 2, 0], mean 2/3: bias += 0.5 * sign(mean - load) = [+0.5, -0.5, +0.5].
    close(r["router_bias"], [0.5, 0.4, 0.5], "bias update")


def test_expert_choice():
    # S = 4, E = 2, C = max(1, ceil(4 * 0.5 / 2)) = 1. logits = [a, -a], probs0 = sigmoid(2a).
    cfg = cfg_of(2, 2, 2, {"gate": "EXPERT_CHOICE", "capacity_factor_eval": 0.5, "min_capacity": 1})
    w = {"router": np.array([[1, -1], [0, 0]], np.float32), **identity_experts(cfg, [1, 2])}
    x = np.array([[0.5, 0], [2, 0], [-1, 0], [-3, 0]], np.float32)
    r = ref.run_layer(cfg, x, w)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    check(r["routing_expert"].tolist() == [[1], [3]], f"expert choice picks {r['routing_expert']}")
    close(r["routing_gate"], [[sig(4)], [sig(6)]], "expert choice gates")
    close(r["y"], [[0, 0], [sig(4) * 2, 0], [0, 0], [0, 0]], "expert choice y (relu kills x<0)")
    check(r["metrics"]["tokens_per_expert"] == [1, 1] and r["metrics"]["capacity"] == 1, "ec metrics")
    # Two groups of 3 and 2 (S = 5, G = 2), cf <= 0: C = ceil(5 / 2) = 3; group 1 has an empty slot.
    cfg2 = cfg_of(2, 2, 2, {"gate": "EXPERT_CHOICE", "capacity_factor_eval": 0.0,
                            "num_local_groups": 2})
    x5 = np.array([[0.5, 0], [2, 0], [-1, 0], [-3, 0], [1, 0]], np.float32)
    r = ref.run_layer(cfg2, x5, w)
    check(r["routing_expert"].tolist() == [[1, 0, 2], [2, 0, 1], [4, 3, -1], [3, 4, -1]],
          f"ec groups {r['routing_expert'].tolist()}")
    check(r["routing_gate"][2, 2] == 0 and r["routing_gate"][3, 2] == 0, "ec empty gates are 0")


def test_topk_normalizations():
    rng = np.random.default_rng(3)
    m, e = 6, 5
    w = {"router": rng.standard_normal((m, e)).astype(np.float32)}
    w.update(identity_experts(cfg_of(m, e, m, {}), [1] * e))
    x = rng.standard_normal((10, m)).astype(np.float32)
    logits = x.astype(np.float64) @ w["router"].astype(np.float64)
    for norm in ("NONE", "TOPK_SOFTMAX"):
        cfg = cfg_of(m, e, m, {"gate": "TOPK", "top_k": 3, "normalization": norm,
                               "capacity_factor_eval": 0.0})
        r = ref.run_layer(cfg, x, w)
        for t in range(10):
            top = np.argsort(-logits[t], kind="stable")[:3]
            check(r["routing_expert"][t].tolist() == top.tolist(), f"top3 selection token {t}")
            want = softmax(logits[t])[top] if norm == "NONE" else softmax(logits[t][top])
            close(r["routing_gate"][t], want, f"{norm} gates token {t}")
        if norm == "TOPK_SOFTMAX":
            close(r["routing_gate"].sum(axis=1), np.ones(10), "TOPK_SOFTMAX gates sum to 1")

    # RENORM_AFTER_CAPACITY: E = 3, k = 2, C = 1. t0 ranks e0 > e1, t1 ranks e0 > e2.
    # Slot-major: t0.s0 -> e0, t1.s0 -> e0 full, dropped; t0.s1 -> e1; t1.s1 -> e2.
    base = {"gate": "TOPK", "top_k": 2, "capacity_factor_eval": 0.5, "min_capacity": 1}
    w3 = {"router": np.eye(3, dtype=np.float32)}
    x3 = np.array([[2, 1, 0], [2, 0, 1]], np.float32)
    p0, p1 = softmax([2, 1, 0]), softmax([2, 0, 1])
    for norm, want in (
            ("NONE", [[p0[0], p0[1]], [0, p1[2]]]),
            ("TOPK_SOFTMAX", [[p0[0] / (p0[0] + p0[1]), p0[1] / (p0[0] + p0[1])],
                              [0, p1[2] / (p1[0] + p1[2])]]),
            ("RENORM_AFTER_CAPACITY", [[p0[0] / (p0[0] + p0[1]), p0[1] / (p0[0] + p0[1])],
                                       [0, 1.0]])):
        cfg = cfg_of(3, 3, 3, dict(base, normalization=norm))
        w3.update(identity_experts(cfg, [1, 1, 1]))
        r = ref.run_layer(cfg, x3, w3)
        check(r["routing_expert"].tolist() == [[0, 1], [-1, 2]], f"{norm} drop routing")
        close(r["routing_gate"], want, f"{norm} gates after the drop")


def test_losses():
    # E = 2, k = 1, NONE: t0 probs [p, 1-p] picks e0, t1 probs [q, 1-q] picks e1.
    w = {"router": np.array([[1, 0], [0, 1]], np.float32)}
    x = np.array([[1.5, 0], [0, 0.5]], np.float32)
    p = softmax([1.5, 0])[0]
    q = softmax([0, 0.5])[0]
    lse = [math.log(math.exp(1.5) + 1), math.log(1 + math.exp(0.5))]
    cfg = cfg_of(2, 2, 2, {"gate": "TOP1", "aux_loss": "IMPORTANCE_CV", "capacity_factor_eval": 0})
    w.update(identity_experts(cfg, [1, 1]))
    r = ref.run_layer(cfg, x, w)
    imp = np.array([p, 1 - q])
    cv = imp.var() / imp.mean() ** 2
    close(r["metrics"]["aux_loss"], cv, "IMPORTANCE_CV value", 1e-12)
    close(r["metrics"]["aux_loss"], ((p - 1 + q) / (p + 1 - q)) ** 2, "IMPORTANCE_CV closed form", 1e-12)
    close(r["metrics"]["z_loss"], (lse[0] ** 2 + lse[1] ** 2) / 2, "z-loss value", 1e-12)
    # SWITCH with f = [1/2, 1/2] and E = 2: aux = 2 * (P0 + P1) / 2 = 1.
    cfg_s = cfg_of(2, 2, 2, {"gate": "TOP1", "aux_loss": "SWITCH", "capacity_factor_eval": 0})
    r = ref.run_layer(cfg_s, x, w)
    close(r["metrics"]["aux_loss"], 1.0, "SWITCH aux with balanced f", 1e-12)
    # Two groups of one token each: per-group aux = 2 * p (resp. 2 * (1 - q)); mean over groups.
    cfg_g = cfg_of(2, 2, 2, {"gate": "TOP1", "aux_loss": "SWITCH", "capacity_factor_eval": 0,
                             "num_local_groups": 2})
    r = ref.run_layer(cfg_g, x, w)
    close(r["metrics"]["aux_loss"], (2 * p + 2 * (1 - q)) / 2, "SWITCH per-group mean", 1e-12)
    # IMPORTANCE_CV per group: each group has one nonzero importance -> cv = 1 each.
    cfg_gc = cfg_of(2, 2, 2, {"gate": "TOP1", "aux_loss": "IMPORTANCE_CV",
                              "capacity_factor_eval": 0, "num_local_groups": 2})
    r = ref.run_layer(cfg_gc, x, w)
    close(r["metrics"]["aux_loss"], 1.0, "IMPORTANCE_CV per group", 1e-12)


def test_groups_and_capacity():
    check(ref.group_bounds(7, 3) == [0, 3, 5, 7], "group bounds 7/3 larger first")
    check(ref.group_bounds(9, 4) == [0, 3, 5, 7, 9], "group bounds 9/4")
    cfg = cfg_of(2, 4, 2, {"gate": "TOPK", "top_k": 2, "capacity_factor_eval": 1.3,
                           "min_capacity": 0, "num_local_groups": 4})
    # S_g = ceil(9 / 4) = 3: C = ceil(2 * 3 * 1.3 / 4) = ceil(1.95) = 2.
    check(ref.compute_capacity(cfg, 9, False) == 2, "capacity with ceil(S/G)")
    cfg2 = cfg_of(2, 4, 2, {"gate": "TOPK", "top_k": 2, "capacity_factor_train": 0.1,
                            "min_capacity": 4})
    check(ref.compute_capacity(cfg2, 9, True) == 4, "min_capacity")
    cfg3 = cfg_of(2, 4, 2, {"gate": "EXPERT_CHOICE", "capacity_factor_eval": 0.5, "min_capacity": 4,
                            "num_local_groups": 2})
    check(ref.compute_capacity(cfg3, 5, False) == 3, "expert choice C capped at the group size")


def test_random_routing_and_noise():
    rng = np.random.default_rng(11)
    m, e, s = 4, 4, 400
    cfg = cfg_of(m, e, m, {"gate": "TOPK", "top_k": 2, "random_routing": True,
                           "capacity_factor_eval": 0.0}, seed=99)
    w = {"router": rng.standard_normal((m, e)).astype(np.float32)}
    w.update(identity_experts(cfg, [1] * e))
    x = rng.standard_normal((s, m)).astype(np.float32)
    r = ref.run_layer(cfg, x, w, step=3, token_offset=17)
    probs = r["probs32"].astype(np.float64)
    kept2 = 0
    expect = 0.0
    for t in range(s):
        top = np.argsort(-probs[t], kind="stable")[:2]
        g2n = probs[t, top[1]] / (probs[t, top[0]] + probs[t, top[1]])
        u = ref.counter_uniform(99, 3, 17 + t, ref.STREAM_ROUTING_UNIFORM)
        check((r["routing_expert"][t, 1] >= 0) == (u < 2 * g2n), f"random routing token {t}")
        kept2 += r["routing_expert"][t, 1] >= 0
        expect += min(1.0, 2 * g2n)
    check(abs(kept2 - expect) < 4 * math.sqrt(s), f"random routing keep rate {kept2} vs {expect:.1f}")
    # Draws depend on the global token only: the second half alone, offset by 200, routes the same.
    r2 = ref.run_layer(cfg, x[200:], w, step=3, token_offset=217)
    check(np.array_equal(r2["routing_expert"], r["routing_expert"][200:]), "token_offset invariance")
    # Noise eps: a normal draw per (token, expert); mean ~ 0, var ~ 1.
    eps = np.array([[ref.counter_normal(5, 0, t, ref.STREAM_ROUTER_NOISE, j) for j in range(4)]
                    for t in range(2000)], dtype=np.float64)
    check(abs(eps.mean()) < 0.05 and abs(eps.var() - 1) < 0.08,
          f"normal draws mean {eps.mean():.3f} var {eps.var():.3f}")


def test_gradient_finite_differences():
    # The reference's autograd gradient against central differences of its own float64 objective,
    # with decisions fixed (small step, large margins). Checks the graph wiring (gates, losses).
    rng = np.random.default_rng(5)
    m, e, h, s = 5, 4, 6, 12
    for gate, norm, aux, extra in (
            ("TOPK", "RENORM_AFTER_CAPACITY", "IMPORTANCE_CV", {"capacity_factor_train": 0.75}),
            ("TOPK", "TOPK_SOFTMAX", "SWITCH", {"reroute_overflow": True, "capacity_factor_train": 0.5}),
            ("NOISY_TOPK", "TOPK_SOFTMAX", "SWITCH", {"capacity_factor_train": 0.75}),
            ("EXPERT_CHOICE", "NONE", "NO_AUX_LOSS", {"capacity_factor_train": 1.0}),
            ("TOPK", "TOPK_SOFTMAX", "SWITCH_TOPK",
             {"score_function": "SIGMOID", "scaling_factor": 2.5, "drop_policy": "EXPERT_SCORE",
              "capacity_factor_train": 0.75}),
            ("TOPK", "NONE", "SWITCH",
             {"score_function": "SIGMOID", "num_expert_groups": 2, "groups_per_token": 1,
              "drop_policy": "TOKEN_ORDER", "capacity_factor_train": 0.75}),
            ("TOPK", "RENORM_AFTER_CAPACITY", "IMPORTANCE_CV",
             {"score_function": "SIGMOID", "scaling_factor": 1.5, "capacity_factor_train": 0.75})):
        router = {"gate": gate, "top_k": 2, "normalization": norm, "aux_loss": aux,
                  "aux_loss_weight": 0.3, "z_loss_weight": 0.2, "min_capacity": 1,
                  "num_local_groups": 2}
        router.update(extra)
        cfg = cfg_of(m, e, h, router, act="GELU_TANH", kind="SWIGLU", bias=True, shared=1)
        w = {n: (rng.standard_normal(shp) * 0.7).astype(np.float32) for n, shp in cfg.weight_shapes()}
        for attempt in range(50):
            x = rng.standard_normal((s, m)).astype(np.float32)
            dy = rng.standard_normal((s, m)).astype(np.float32)
            r = ref.run_layer(cfg, x, w, grad_output=dy, train=True, step=2)
            if r["min_margin"] > 2e-3:
                break
        step = 2.0 ** -12

        def objective(xx, ww):
            rr = ref.run_layer(cfg, xx, ww, grad_output=dy, train=True, step=2)
            check(np.array_equal(rr["routing_expert"], r["routing_expert"]), f"{gate} fd plan fixed")
            return rr["objective"]

        for (t, c) in ((0, 0), (5, 3), (s - 1, m - 1)):
            xp, xm = x.copy(), x.copy()
            xp[t, c] += step
            xm[t, c] -= step
            hh = float(xp[t, c]) - float(xm[t, c])
            fd = (objective(xp, w) - objective(xm, w)) / hh
            close(r["dx"][t, c], fd, f"{gate} dx[{t},{c}] vs finite difference", 2e-4 * max(1, abs(fd)))
        for name in ("router", "expert_1_w1", "shared_0_w3") + (("router_noise",) if gate == "NOISY_TOPK" else ()):
            wp = dict(w)
            wm = dict(w)
            wp[name] = w[name].copy()
            wm[name] = w[name].copy()
            wp[name][1, 2] += step
            wm[name][1, 2] -= step
            hh = float(wp[name][1, 2]) - float(wm[name][1, 2])
            fd = (objective(x, wp) - objective(x, wm)) / hh
            close(r["grads"][name][1, 2], fd, f"{gate} grad {name}[1,2] vs finite difference",
                  2e-4 * max(1, abs(fd)))


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-np.asarray(v, dtype=np.float64)))


def test_sigmoid_and_scaling():
    # E = 3, k = 2, router = I so logits = x; experts FFN_e(x) = relu(x).
    x = np.array([[2, 1, 0], [0, -1, 0.5]], np.float32)
    for norm in ("NONE", "TOPK_SOFTMAX"):
        for c in (1.0, 2.5):
            cfg = cfg_of(3, 3, 3, {"gate": "TOPK", "top_k": 2, "normalization": norm,
                                   "score_function": "SIGMOID", "scaling_factor": c,
                                   "capacity_factor_eval": 0.0})
            w = {"router": np.eye(3, dtype=np.float32), **identity_experts(cfg, [1, 1, 1])}
            r = ref.run_layer(cfg, x, w)
            check(r["routing_expert"].tolist() == [[0, 1], [2, 0]], f"sigmoid selection {norm}")
            s0, s1 = sigmoid(x[0]), sigmoid(x[1])
            want = np.array([[s0[0], s0[1]], [s1[2], s1[0]]])
            if norm == "TOPK_SOFTMAX":
                want = want / want.sum(axis=1, keepdims=True)
            want = want * c
            close(r["routing_gate"], want, f"sigmoid {norm} gates scaled by {c}")
            relu = np.maximum(x.astype(np.float64), 0)
            close(r["y"], [want[0, 0] * relu[0] + want[0, 1] * relu[0],
                           want[1, 0] * relu[1] + want[1, 1] * relu[1]], f"sigmoid {norm} y x {c}")
            close(r["probs32"], 1 / (1 + np.exp(-x.astype(np.float64))), "sigmoid probs32", 1e-6)
    # Drops: the routing of test_topk_normalizations (C = 1), with sigmoid scores and c = 2.
    x3 = np.array([[2, 1, 0], [2, 0, 1]], np.float32)
    s0, s1 = sigmoid(x3[0]), sigmoid(x3[1])
    base = {"gate": "TOPK", "top_k": 2, "capacity_factor_eval": 0.5, "min_capacity": 1,
            "score_function": "SIGMOID", "scaling_factor": 2.0}
    for norm, want in (
            ("NONE", [[s0[0], s0[1]], [0, s1[2]]]),
            ("TOPK_SOFTMAX", [[s0[0] / (s0[0] + s0[1]), s0[1] / (s0[0] + s0[1])],
                              [0, s1[2] / (s1[0] + s1[2])]]),
            ("RENORM_AFTER_CAPACITY", [[s0[0] / (s0[0] + s0[1]), s0[1] / (s0[0] + s0[1])],
                                       [0, 1.0]])):
        cfg = cfg_of(3, 3, 3, dict(base, normalization=norm))
        w = {"router": np.eye(3, dtype=np.float32), **identity_experts(cfg, [1, 1, 1])}
        r = ref.run_layer(cfg, x3, w)
        check(r["routing_expert"].tolist() == [[0, 1], [-1, 2]], f"sigmoid {norm} drop routing")
        close(r["routing_gate"], 2.0 * np.array(want), f"sigmoid {norm} gates after the drop x 2")
    # TOP1 sigmoid, softmax with a scale.
    cfg = cfg_of(3, 3, 3, {"gate": "TOP1", "score_function": "SIGMOID", "capacity_factor_eval": 0})
    r = ref.run_layer(cfg, x3, w)
    close(r["routing_gate"], [[s0[0]], [s1[0]]], "sigmoid TOP1 gate = sigmoid(logit)")
    cfg = cfg_of(3, 3, 3, {"gate": "TOP1", "scaling_factor": 1.5, "capacity_factor_eval": 0})
    r = ref.run_layer(cfg, x3, w)
    close(r["routing_gate"], [[1.5 * softmax(x3[0])[0]], [1.5 * softmax(x3[1])[0]]],
          "softmax TOP1 gate x 1.5")
    # SWITCH with sigmoid: P = s / sum s per token; f from slot 0 (both tokens pick e0).
    cfg = cfg_of(3, 3, 3, {"gate": "TOP1", "score_function": "SIGMOID", "capacity_factor_eval": 0,
                           "aux_loss": "SWITCH"})
    r = ref.run_layer(cfg, x3, w)
    pn = (s0 / s0.sum() + s1 / s1.sum()) / 2
    close(r["metrics"]["aux_loss"], 3 * pn[0], "SWITCH with sigmoid scores normalized", 1e-12)
    # IMPORTANCE_CV with sigmoid uses unscaled pre-capacity gates.
    cfg = cfg_of(3, 3, 3, {"gate": "TOPK", "top_k": 2, "score_function": "SIGMOID",
                           "scaling_factor": 3.0, "capacity_factor_eval": 0,
                           "aux_loss": "IMPORTANCE_CV", "normalization": "TOPK_SOFTMAX"})
    r = ref.run_layer(cfg, x3, w)
    imp = np.zeros(3)
    imp[[0, 1]] += s0[[0, 1]] / s0[[0, 1]].sum()
    imp[[0, 2]] += s1[[0, 2]] / s1[[0, 2]].sum()
    close(r["metrics"]["aux_loss"], imp.var() / imp.mean() ** 2, "IMPORTANCE_CV sigmoid", 1e-12)
    for gate in ("NOISY_TOPK", "EXPERT_CHOICE"):
        try:
            cfg_of(3, 3, 3, {"gate": gate, "score_function": "SIGMOID"})
            check(False, f"SIGMOID with {gate} refused")
        except ValueError:
            check(True, "")


def test_group_limited_selection():
    import itertools
    rng = np.random.default_rng(17)
    for e, ng, gp, k, sig in ((8, 4, 2, 4, False), (8, 4, 1, 2, True), (12, 4, 3, 3, True),
                              (12, 3, 2, 4, False), (8, 4, 4, 4, True)):
        m_dim, s = 6, 40
        cfg = cfg_of(m_dim, e, m_dim, {"gate": "TOPK", "top_k": k, "num_expert_groups": ng,
                                       "groups_per_token": gp, "capacity_factor_eval": 0,
                                       "score_function": "SIGMOID" if sig else "SOFTMAX"})
        w = {"router": rng.standard_normal((m_dim, e)).astype(np.float32)}
        w.update(identity_experts(cfg, [1] * e))
        x = rng.standard_normal((s, m_dim)).astype(np.float32)
        bias = rng.uniform(-0.05, 0.05, e).astype(np.float32)
        r = ref.run_layer(cfg, x, w, router_bias=bias)
        check(r["min_margin"] > 1e-7, f"group-limited draw has no near-ties ({r['min_margin']})")
        sc = r["probs32"].astype(np.float64) + bias.astype(np.float64)
        gs, mm = e // ng, k // gp
        for t in range(s):
            gscore = [np.sort(sc[t, g * gs:(g + 1) * gs])[::-1][:mm].sum() for g in range(ng)]
            best = max(itertools.combinations(range(ng), gp),
                       key=lambda sub: sum(gscore[g] for g in sub))
            allowed = [g * gs + i for g in best for i in range(gs)]
            want = sorted(allowed, key=lambda ex: -sc[t, ex])[:k]
            check(r["routing_expert"][t].tolist() == want,
                  f"group-limited E{e} NG{ng} GP{gp} k{k} token {t}: "
                  f"{r['routing_expert'][t].tolist()} vs {want}")
        if gp == ng:  # every group kept: plain top-k
            plain = ref.run_layer(cfg_of(m_dim, e, m_dim, {
                "gate": "TOPK", "top_k": k, "capacity_factor_eval": 0,
                "score_function": "SIGMOID" if sig else "SOFTMAX"}), x, w, router_bias=bias)
            check(np.array_equal(plain["routing_expert"], r["routing_expert"]),
                  "all groups kept = plain top-k")


def test_token_order_and_expert_score():
    # E = 3, k = 2, C = 1, router = I: t0 ranks e0 > e1, t1 ranks e1 > e2.
    x = np.array([[2, 1, 0], [0, 2, 1]], np.float32)
    base = {"gate": "TOPK", "top_k": 2, "capacity_factor_eval": 0.5, "min_capacity": 1}
    want = {"POSITION": [[0, -1], [1, 2]],      # slot-major: t1.s0 claims e1 before t0.s1
            "TOKEN_ORDER": [[0, 1], [-1, 2]],   # token-major: t0.s1 claims e1 first
            "EXPERT_SCORE": [[0, -1], [1, 2]]}  # e1: probs[1, 1] > probs[0, 1]
    for pol, routing in want.items():
        cfg = cfg_of(3, 3, 3, dict(base, drop_policy=pol))
        w = {"router": np.eye(3, dtype=np.float32), **identity_experts(cfg, [1, 1, 1])}
        r = ref.run_layer(cfg, x, w)
        check(r["routing_expert"].tolist() == routing, f"{pol} routing {r['routing_expert'].tolist()}")
    # EXPERT_SCORE keeps the first token of e1 when its score is the larger one.
    x2 = np.array([[0, 2, 1], [2, 1, 0]], np.float32)
    cfg = cfg_of(3, 3, 3, dict(base, drop_policy="EXPERT_SCORE"))
    r = ref.run_layer(cfg, x2, w)
    check(r["routing_expert"].tolist() == [[1, 2], [0, -1]],
          f"EXPERT_SCORE by score {r['routing_expert'].tolist()}")

    rng = np.random.default_rng(23)
    m_dim, e, k, s = 5, 4, 3, 33
    for pol in ("TOKEN_ORDER", "EXPERT_SCORE"):
        for rr in (False, True):
            kk = 2 if rr else k
            cfg = cfg_of(m_dim, e, m_dim, {"gate": "TOPK", "top_k": kk, "drop_policy": pol,
                                           "capacity_factor_eval": 0.5, "min_capacity": 1,
                                           "num_local_groups": 3, "random_routing": rr})
            w = {"router": rng.standard_normal((m_dim, e)).astype(np.float32)}
            w.update(identity_experts(cfg, [1] * e))
            x = rng.standard_normal((s, m_dim)).astype(np.float32)
            r = ref.run_layer(cfg, x, w, step=1)
            plan, probs = r["plan"], r["probs32"]
            cap = plan["capacity"]
            check(plan["dropped_slots"] > 0, f"{pol} rr={rr} case drops something")
            b = plan["bounds"]
            alive0 = ref.run_layer(cfg_of(m_dim, e, m_dim, dict(
                {"gate": "TOPK", "top_k": kk, "capacity_factor_eval": 0.0, "num_local_groups": 3,
                 "random_routing": rr})), x, w, step=1)["plan"]["alive"]
            for gr in range(3):
                for ex in range(e):
                    claims = [(t, j) for t in range(b[gr], b[gr + 1]) for j in range(kk)
                              if alive0[t, j] and plan["selected"][t, j] == ex]
                    if pol == "TOKEN_ORDER":
                        keep = claims[:cap]
                    else:
                        keep = sorted(claims, key=lambda tj: (-probs[tj[0], ex], tj[0]))[:cap]
                        keep = sorted(keep)
                    got = [(t, j) for (t, j) in claims if plan["alive"][t, j]]
                    check(got == keep, f"{pol} rr={rr} group {gr} expert {ex} keeps {got} want {keep}")
                    check([int(plan["position"][t, j]) for t, j in got] == list(range(len(got))),
                          f"{pol} positions in token order group {gr} expert {ex}")


def test_switch_topk():
    rng = np.random.default_rng(29)
    m_dim, e, k, s = 5, 6, 3, 14
    for sig in (False, True):
        cfg = cfg_of(m_dim, e, m_dim, {"gate": "TOPK", "top_k": k, "aux_loss": "SWITCH_TOPK",
                                       "capacity_factor_eval": 0.5, "num_local_groups": 2,
                                       "score_function": "SIGMOID" if sig else "SOFTMAX"})
        w = {"router": rng.standard_normal((m_dim, e)).astype(np.float32)}
        w.update(identity_experts(cfg, [1] * e))
        x = rng.standard_normal((s, m_dim)).astype(np.float32)
        r = ref.run_layer(cfg, x, w)
        logits = x.astype(np.float64) @ w["router"].astype(np.float64)
        if sig:
            p = sigmoid(logits)
            p = p / p.sum(axis=1, keepdims=True)
        else:
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p = p / p.sum(axis=1, keepdims=True)
        sel = r["plan"]["selected"]
        aux = 0.0
        for lo, hi in ((0, 7), (7, 14)):
            f = np.array([(sel[lo:hi] == i).any(axis=1).sum() for i in range(e)]) / (hi - lo)
            aux += (e / k) * (f * p[lo:hi].mean(axis=0)).sum()
        close(r["metrics"]["aux_loss"], aux / 2, f"SWITCH_TOPK sigmoid={sig}", 1e-9)


def test_rng(rng_dump):
    # A few known values computed by hand from the SplitMix64 definition.
    check(ref.splitmix64(0) == 0xE220A8397B1DCDAF, "splitmix64(0)")
    check(ref.splitmix64(1) == 0x910A2DEC89025CC1, "splitmix64(1)")
    if rng_dump is None:
        print("note: no C++ rng dump available (no --rng-dump and no compiler): "
              "skipping the bit-for-bit RNG comparison")
        return
    out = subprocess.run([rng_dump], capture_output=True, text=True, check=True).stdout.split("\n")
    lines = [ln.split() for ln in out if ln.strip()]
    check(len(lines) >= 300, f"rng dump has {len(lines)} lines")
    bad = 0
    for f in lines:
        seed, step, index, stream, sub, h, ub, nb = (int(v, 16) for v in f)
        got_h = ref.counter_hash(seed, step, index, stream, sub)
        got_u = struct.unpack("<Q", struct.pack("<d", ref.counter_uniform(seed, step, index, stream, sub)))[0]
        got_n = struct.unpack("<I", struct.pack("<f", ref.counter_normal(seed, step, index, stream, sub)))[0]
        if (got_h, got_u, got_n) != (h, ub, nb):
            bad += 1
            if bad <= 5:
                print(f"  rng mismatch at {f[:5]}: hash {got_h:x}/{h:x} uniform {got_u:x}/{ub:x} "
                      f"normal {got_n:x}/{nb:x}")
    check(bad == 0, f"RNG bit-identical to base/rng.h ({bad} of {len(lines)} keys differ)")
    print(f"rng: {len(lines) - bad} of {len(lines)} keys bit-identical (hash, uniform, normal)")


def build_rng_dump(tmp):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    exe = os.path.join(tmp, "rng_dump")
    subprocess.run([cxx, "-std=c++20", "-O2", "-I" + ROOT, os.path.join(HERE, "rng_dump.cc"), "-o", exe],
                   check=True)
    return exe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rng-dump", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tests = [test_top1_capacity_drop, test_reroute_and_bias, test_expert_choice,
             test_topk_normalizations, test_losses, test_groups_and_capacity,
             test_random_routing_and_noise, test_gradient_finite_differences,
             test_sigmoid_and_scaling, test_group_limited_selection,
             test_token_order_and_expert_score, test_switch_topk]
    for t in tests:
        before = len(FAILURES)
        t()
        print(f"{'ok  ' if len(FAILURES) == before else 'FAIL'} {t.__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        dump = a.rng_dump or build_rng_dump(tmp)
        before = len(FAILURES)
        test_rng(dump)
        print(f"{'ok  ' if len(FAILURES) == before else 'FAIL'} test_rng")
    print(f"{CHECKS[0] - len(FAILURES)} checks passed, {len(FAILURES)} failed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
