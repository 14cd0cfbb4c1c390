#!/usr/bin/env python3
"""Cross-check of the C++ `moe_layer` tool against the PyTorch reference (moe_reference.py).

For every case (fixed seeds, deterministic): writes layer.textproto, x.npy, dy.npy and maybe
router_bias.npy, runs `moe_layer ... --init-seed N --out OUT`, runs the reference (in this
process) on OUT/config.json and OUT/weights, and compares:
  routing_expert and the integer metrics exactly; routing_gate, y, dx, every grad_*, aux and z
  losses and the updated router bias within max abs error <= 1e-5 * max(1, max|ref|).

Inputs are redrawn (next seed) when any routing decision of the case sits within 1e-4 of a tie
(float32 GEMM summation order differs between torch and OpenBLAS, which could flip it).

  check_against_reference.py --tool PATH/moe_layer [--workdir DIR] [--only NAME[,NAME]] [-v]
                             [--device cuda]

--device cuda runs the tool's device-resident GPU layer (routing still exact: the router is fp32
and the plan is built by the same host code) with the tolerance 1e-4 (GPU GEMMs sum in another
order and fuse multiply-adds).

Prints one line per case and finally "N passed, N failed". Exit 0 when all pass, 1 on any
failure, 77 (ctest SKIP_RETURN_CODE) when torch cannot be imported or, with --device cuda, when
the tool reports no CUDA device or a build without CUDA.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

try:
    import numpy as np
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover
    print(f"SKIP: PyTorch/NumPy not importable by {sys.executable} ({exc}); "
          "install python3-torch to run the reference cross-check")
    sys.exit(77)

sys.dont_write_bytecode = True  # keep the source tree clean when ctest runs this
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_reference as ref  # noqa: E402

MARGIN = 1e-4      # smallest allowed gap of a float comparison that drives a routing decision
TOL = 1e-5         # max abs error <= TOL * max(1, max |ref|)
MAX_REDRAWS = 30
TOL_CUDA = 1e-4    # --device cuda


class NoGpu(Exception):
    """The tool reported that it cannot run on a GPU here."""

BASE = dict(S=32, M=8, H=12, E=4, gate="TOPK", k=2, norm="NONE", rr=False, cf_train=1.0,
            cf_eval=1.5, min_cap=1, policy="POSITION", G=1, reroute=False, aux="SWITCH",
            aw=0.01, zw=0.0, rate=0.0, act="GELU_TANH", kind="FFN", bias=True, shared=0,
            shared_h=0, train=False, step=0, offset=0, grad=True, rbias=False, xscale=1.5,
            seed=1234, defaults=False, score="SOFTMAX", scale=1.0, ng=1, gp=1, seqlen=0,
            scope="LOCAL", slots=1)

# Router fields added later: (case key, proto field, default). Written to the textproto and the
# case's config only when the case differs from the default, so the older cases read as before.
NEW_ROUTER_FIELDS = (("score", "score_function", "SOFTMAX"), ("scale", "scaling_factor", 1.0),
                     ("ng", "num_expert_groups", 1), ("gp", "groups_per_token", 1),
                     ("seqlen", "aux_sequence_length", 0), ("scope", "aux_loss_scope", "LOCAL"),
                     ("slots", "slots_per_expert", 1))


def case(name, **kw):
    c = dict(BASE)
    unknown = set(kw) - set(c)
    if unknown:
        raise KeyError(f"case {name}: unknown keys {unknown}")
    c.update(kw)
    c["name"] = name
    return c


CASES = [
    # --- TOP1 (Switch)
    case("top1_eval_drops", gate="TOP1", k=1, cf_eval=1.0),
    case("top1_train_relu_drops", gate="TOP1", k=1, train=True, cf_train=0.5, act="RELU", zw=0.05),
    case("top1_train_dropless", gate="TOP1", k=1, train=True, cf_train=0.0, S=24),
    case("top1_probability", gate="TOP1", k=1, train=True, cf_train=0.75, policy="PROBABILITY", S=20),
    case("top1_reroute", gate="TOP1", k=1, train=True, cf_train=0.75, reroute=True, E=5),
    case("top1_groups3_uneven", gate="TOP1", k=1, S=31, G=3, cf_eval=1.0, act="SILU"),
    case("top1_default_router_fields", gate="TOP1", k=1, defaults=True, S=40, E=8),
    # --- TOPK
    case("top2_none", cf_eval=0.75),
    case("top2_topk_softmax", norm="TOPK_SOFTMAX", cf_eval=0.75, M=12, H=8),
    case("top2_renorm_heavy_drops", norm="RENORM_AFTER_CAPACITY", train=True, cf_train=0.4),
    case("top2_random_routing_train", rr=True, train=True, step=3, cf_train=1.0),
    case("top2_random_routing_eval_renorm", rr=True, norm="RENORM_AFTER_CAPACITY", cf_eval=0.75,
         step=11),
    case("top2_rr_topk_softmax_offset", rr=True, norm="TOPK_SOFTMAX", train=True, step=7,
         offset=100, cf_train=0.75, E=6),
    case("top2_rr_reroute_gshard", rr=True, reroute=True, aux="GSHARD", train=True, cf_train=0.6,
         E=6, step=2),
    case("top3_E8_probability_renorm", k=3, E=8, norm="RENORM_AFTER_CAPACITY",
         policy="PROBABILITY", train=True, cf_train=0.6, S=24),
    case("top3_E8_reroute_topk_softmax", k=3, E=8, norm="TOPK_SOFTMAX", reroute=True, train=True,
         cf_train=0.5, S=40),
    case("top2_reroute_renorm_prob_groups", reroute=True, norm="RENORM_AFTER_CAPACITY",
         policy="PROBABILITY", G=2, S=33, cf_eval=0.75, E=5),
    case("topk_k_equals_E", k=4, E=4, cf_eval=0.75),
    case("topk_k_equals_E_reroute", k=2, E=2, reroute=True, cf_eval=0.6, S=16),
    case("topk_k1", k=1, E=3, cf_eval=0.8, norm="TOPK_SOFTMAX"),
    case("top2_cf_fractional_groups4", cf_eval=0.7, G=4, S=9, E=3, min_cap=0),
    case("top2_min_capacity_large", min_cap=100, cf_eval=0.1, S=16),
    case("top2_forward_only", grad=False, cf_eval=0.75, norm="TOPK_SOFTMAX"),
    # --- NOISY_TOPK (Shazeer)
    case("noisy_train_k2", gate="NOISY_TOPK", norm="TOPK_SOFTMAX", train=True, step=1, cf_train=0.75),
    case("noisy_eval_k2", gate="NOISY_TOPK", norm="TOPK_SOFTMAX", cf_eval=0.75),
    case("noisy_train_k3_groups_prob", gate="NOISY_TOPK", norm="TOPK_SOFTMAX", k=3, E=6, G=2, S=40,
         offset=64, step=5, policy="PROBABILITY", train=True, cf_train=0.6),
    case("noisy_train_reroute_zloss", gate="NOISY_TOPK", norm="TOPK_SOFTMAX", reroute=True, E=5,
         train=True, cf_train=0.6, zw=0.1, step=9),
    # --- EXPERT_CHOICE
    case("ec_eval", gate="EXPERT_CHOICE", aux="NO_AUX_LOSS", cf_eval=1.0),
    case("ec_train_groups2", gate="EXPERT_CHOICE", aux="NO_AUX_LOSS", train=True, cf_train=2.0, G=2,
         S=30),
    case("ec_dropless_uneven_groups", gate="EXPERT_CHOICE", aux="NO_AUX_LOSS", train=True,
         cf_train=0.0, G=3, S=20, E=3),
    case("ec_min_capacity", gate="EXPERT_CHOICE", aux="NO_AUX_LOSS", min_cap=5, cf_eval=0.5, S=24),
    case("ec_zloss_shared_swiglu", gate="EXPERT_CHOICE", aux="NO_AUX_LOSS", zw=0.2, shared=1,
         kind="SWIGLU", cf_eval=1.5, E=6, S=36, G=2),
    # --- aux losses
    case("aux_cv_none", aux="IMPORTANCE_CV", aw=0.1, cf_eval=0.75),
    case("aux_cv_topk_softmax_groups", aux="IMPORTANCE_CV", aw=0.1, norm="TOPK_SOFTMAX", G=2, S=34),
    case("aux_cv_renorm_reroute_k3", aux="IMPORTANCE_CV", aw=0.1, norm="RENORM_AFTER_CAPACITY",
         k=3, E=6, reroute=True, train=True, cf_train=0.5),
    case("aux_none_zloss", aux="NO_AUX_LOSS", zw=0.1, cf_eval=0.75),
    case("aux_switch_zloss_groups4", aux="SWITCH", aw=0.1, zw=0.05, G=4, S=50, E=8, cf_eval=1.0),
    # --- aux-loss-free bias
    case("bias_selection_eval", rbias=True, cf_eval=0.75),
    case("bias_update_train", rbias=True, rate=0.01, train=True, cf_train=0.75),
    case("bias_update_zero_start_reroute", rate=0.05, reroute=True, train=True, cf_train=0.6, E=6),
    case("bias_update_top1_groups", gate="TOP1", k=1, rbias=True, rate=0.02, train=True, G=2,
         S=27, cf_train=1.0),
    # --- experts
    case("swiglu_bias", kind="SWIGLU", cf_eval=0.75),
    case("swiglu_nobias_topk_softmax", kind="SWIGLU", bias=False, norm="TOPK_SOFTMAX", H=6),
    case("ffn_silu_nobias", act="SILU", bias=False, train=True, cf_train=0.75),
    case("ffn_relu_shared2_hidden6", act="RELU", shared=2, shared_h=6, cf_eval=0.75),
    case("shared1_swiglu", kind="SWIGLU", shared=1, norm="RENORM_AFTER_CAPACITY", train=True,
         cf_train=0.6),
    # --- larger mixes
    case("big_mix_rr_prob_renorm", S=64, M=16, H=16, E=8, G=4, rr=True, policy="PROBABILITY",
         norm="RENORM_AFTER_CAPACITY", train=True, cf_train=0.75, zw=0.01, step=4, offset=256,
         shared=1, shared_h=8),
    case("big_mix_top3_reroute_cv", S=48, M=4, H=4, E=8, k=3, G=3, reroute=True,
         aux="IMPORTANCE_CV", aw=0.05, norm="TOPK_SOFTMAX", cf_eval=0.6, act="SILU", rbias=True),
    # --- sigmoid scores (score_function SIGMOID) and scaling_factor
    case("sigmoid_top2_none_drops", score="SIGMOID", cf_eval=0.75),
    case("sigmoid_top2_topk_softmax_drops", score="SIGMOID", norm="TOPK_SOFTMAX", train=True,
         cf_train=0.6),
    case("sigmoid_top3_renorm_drops", score="SIGMOID", k=3, E=6, norm="RENORM_AFTER_CAPACITY",
         train=True, cf_train=0.5),
    case("sigmoid_scale2p5_topk_softmax", score="SIGMOID", scale=2.5, norm="TOPK_SOFTMAX",
         cf_eval=0.75, zw=0.05),
    case("sigmoid_top1_drops", score="SIGMOID", gate="TOP1", k=1, train=True, cf_train=0.75),
    case("softmax_scale1p5_top2", scale=1.5, norm="TOPK_SOFTMAX", cf_eval=0.75),
    case("softmax_scale1p5_top1_renorm", gate="TOP1", k=1, scale=1.5,
         norm="RENORM_AFTER_CAPACITY", train=True, cf_train=0.75),
    case("sigmoid_rr_probability", score="SIGMOID", rr=True, policy="PROBABILITY", train=True,
         step=5, cf_train=0.75, norm="RENORM_AFTER_CAPACITY"),
    case("sigmoid_reroute_bias", score="SIGMOID", reroute=True, rbias=True, train=True,
         cf_train=0.6, E=6, rate=0.01, scale=2.0),
    case("sigmoid_importance_cv", score="SIGMOID", aux="IMPORTANCE_CV", aw=0.1,
         norm="TOPK_SOFTMAX", cf_eval=0.75, scale=2.0),
    case("sigmoid_importance_cv_none_groups", score="SIGMOID", aux="IMPORTANCE_CV", aw=0.1,
         G=2, S=34, cf_eval=0.75),
    case("sigmoid_zloss_switch", score="SIGMOID", zw=0.1, aw=0.1, cf_eval=0.75),
    case("sigmoid_gshard_groups", score="SIGMOID", aux="GSHARD", aw=0.1, G=3, S=31,
         norm="TOPK_SOFTMAX", cf_eval=0.75),
    # --- group-limited top-k (num_expert_groups, groups_per_token)
    case("grouped_E8_ng4_gp2_k4", E=8, ng=4, gp=2, k=4, norm="TOPK_SOFTMAX", cf_eval=0.75),
    case("grouped_E8_ng4_gp1_k2", E=8, ng=4, gp=1, k=2, cf_eval=0.75, train=True, cf_train=0.75),
    case("grouped_bias_sigmoid", E=8, ng=4, gp=2, k=4, score="SIGMOID", rbias=True,
         norm="TOPK_SOFTMAX", train=True, cf_train=0.6, rate=0.01),
    case("grouped_local_groups2", E=8, ng=4, gp=2, k=4, G=2, S=40, norm="RENORM_AFTER_CAPACITY",
         train=True, cf_train=0.5, aux="SWITCH_TOPK", aw=0.1),
    case("grouped_E12_ng3_gp2_k2_rr", E=12, ng=3, gp=2, k=2, rr=True, train=True, step=6,
         cf_train=0.75, policy="PROBABILITY"),
    # --- drop policies TOKEN_ORDER and EXPERT_SCORE
    case("token_order_k2_eval", policy="TOKEN_ORDER", cf_eval=0.6),
    case("token_order_k3_train", policy="TOKEN_ORDER", k=3, E=6, train=True, cf_train=0.5,
         norm="TOPK_SOFTMAX"),
    case("token_order_rr_renorm", policy="TOKEN_ORDER", rr=True, train=True, step=2,
         cf_train=0.6, norm="RENORM_AFTER_CAPACITY"),
    case("token_order_groups3", policy="TOKEN_ORDER", G=3, S=31, k=3, E=6, cf_eval=0.6),
    case("token_order_dropless", policy="TOKEN_ORDER", train=True, cf_train=0.0),
    case("expert_score_k2_eval", policy="EXPERT_SCORE", cf_eval=0.6),
    case("expert_score_k3_train", policy="EXPERT_SCORE", k=3, E=6, train=True, cf_train=0.5,
         norm="TOPK_SOFTMAX"),
    case("expert_score_rr_renorm", policy="EXPERT_SCORE", rr=True, train=True, step=8,
         cf_train=0.6, norm="RENORM_AFTER_CAPACITY"),
    case("expert_score_groups2_renorm", policy="EXPERT_SCORE", G=2, S=34, k=3, E=6,
         norm="RENORM_AFTER_CAPACITY", cf_eval=0.5),
    case("expert_score_top1_bias", policy="EXPERT_SCORE", gate="TOP1", k=1, rbias=True,
         train=True, cf_train=0.75),
    case("expert_score_dropless", policy="EXPERT_SCORE", train=True, cf_train=0.0, k=3, E=6),
    case("expert_score_sigmoid_scale", policy="EXPERT_SCORE", score="SIGMOID", scale=2.5,
         norm="TOPK_SOFTMAX", cf_eval=0.6),
    # --- SWITCH_TOPK aux loss
    case("switch_topk_softmax_k2", aux="SWITCH_TOPK", aw=0.1, cf_eval=0.75),
    case("switch_topk_softmax_k3_groups", aux="SWITCH_TOPK", aw=0.1, k=3, E=6, G=2, S=34,
         norm="TOPK_SOFTMAX", train=True, cf_train=0.6),
    case("switch_topk_sigmoid_k2", aux="SWITCH_TOPK", aw=0.1, score="SIGMOID", cf_eval=0.75,
         norm="TOPK_SOFTMAX"),
    case("switch_topk_sigmoid_k3_zloss", aux="SWITCH_TOPK", aw=0.1, score="SIGMOID", k=3, E=6,
         train=True, cf_train=0.6, zw=0.05),
    case("switch_topk_sigmoid_k2_rr", aux="SWITCH_TOPK", aw=0.1, score="SIGMOID", rr=True,
         train=True, step=4, cf_train=0.6),
    # --- DeepSeek-V3-like router
    # --- Soft MoE (no routing decisions: C and D compared as floats)
    case("soft_p1", gate="SOFT", aux="NO_AUX_LOSS", aw=0.0),
    case("soft_p2_groups2_shared", gate="SOFT", aux="NO_AUX_LOSS", aw=0.0, slots=2, G=2, S=30,
         shared=1),
    case("soft_p3_groups3_swiglu_uneven", gate="SOFT", aux="NO_AUX_LOSS", slots=3, G=3, S=31,
         kind="SWIGLU", E=3, train=True),
    case("soft_p2_relu_nobias_xscale", gate="SOFT", aux="NO_AUX_LOSS", slots=2, act="RELU",
         bias=False, xscale=3.0, E=6, M=12),
    case("soft_forward_only", gate="SOFT", aux="NO_AUX_LOSS", slots=2, grad=False),
    # --- sequence-wise and global-batch balance losses
    case("sequence_softmax_k2", aux="SEQUENCE", seqlen=8, aw=0.1, cf_eval=0.75),
    case("sequence_sigmoid_uneven_tail", aux="SEQUENCE", seqlen=7, aw=0.1, score="SIGMOID",
         norm="TOPK_SOFTMAX", train=True, cf_train=0.75, S=30),
    case("sequence_groups3_k3", aux="SEQUENCE", seqlen=4, aw=0.2, k=3, E=6, G=3, S=31,
         cf_eval=0.75),
    case("sequence_longer_than_group", aux="SEQUENCE", seqlen=64, aw=0.1, G=2, cf_eval=0.75),
    case("global_switch_groups3", scope="GLOBAL", aux="SWITCH", aw=0.1, G=3, S=33, cf_eval=0.75),
    case("global_switch_topk_sigmoid_groups4", scope="GLOBAL", aux="SWITCH_TOPK", aw=0.1,
         score="SIGMOID", G=4, S=40, E=8, k=3, cf_eval=0.75, train=True, cf_train=0.75),
    case("global_gshard_one_group", scope="GLOBAL", aux="GSHARD", aw=0.1, cf_eval=0.75),
    case("deepseek_v3_like", score="SIGMOID", norm="TOPK_SOFTMAX", scale=2.5, E=8, ng=4, gp=2,
         k=4, rbias=True, policy="EXPERT_SCORE", aux="SWITCH_TOPK", aw=0.1, shared=1, G=2, S=40,
         train=True, cf_train=1.0, rate=0.001, kind="SWIGLU"),
]


def textproto(c, seed):
    if c["defaults"]:
        router = f"gate: {c['gate']}"
    else:
        r = [f"gate: {c['gate']}"]
        if c["gate"] != "TOP1":
            r.append(f"top_k: {c['k']}")
        r += [
            f"normalization: {c['norm']}",
            f"random_routing: {'true' if c['rr'] else 'false'}",
            f"capacity_factor_train: {c['cf_train']!r}",
            f"capacity_factor_eval: {c['cf_eval']!r}",
            f"min_capacity: {c['min_cap']}",
            f"drop_policy: {c['policy']}",
            f"num_local_groups: {c['G']}",
            f"reroute_overflow: {'true' if c['reroute'] else 'false'}",
            f"aux_loss: {c['aux']}",
            f"aux_loss_weight: {c['aw']!r}",
            f"z_loss_weight: {c['zw']!r}",
            f"bias_update_rate: {c['rate']!r}",
        ]
        for key, field, default in NEW_ROUTER_FIELDS:
            if c[key] != default:
                r.append(f"{field}: {c[key]!r}" if isinstance(c[key], float) else
                         f"{field}: {c[key]}")
        router = "\n    ".join(r)
    return (
        f"# case {c['name']}\n"
        f"moe {{\n"
        f"  model_dim: {c['M']}\n"
        f"  num_experts: {c['E']}\n"
        f"  expert {{ hidden_dim: {c['H']} activation: {c['act']} kind: {c['kind']} "
        f"bias: {'true' if c['bias'] else 'false'} }}\n"
        f"  router {{\n    {router}\n  }}\n"
        f"  num_shared_experts: {c['shared']}\n"
        f"  shared_hidden_dim: {c['shared_h']}\n"
        f"}}\n"
        f"seed: {seed}\n")


def case_config(c, seed):
    """The MoeConfig JSON the case's textproto means (unset fields left to LayerConfig's defaults)."""
    router = {"gate": c["gate"]}
    if not c["defaults"]:
        if c["gate"] != "TOP1":
            router["top_k"] = c["k"]
        router.update(normalization=c["norm"], random_routing=c["rr"],
                      capacity_factor_train=c["cf_train"], capacity_factor_eval=c["cf_eval"],
                      min_capacity=c["min_cap"], drop_policy=c["policy"], num_local_groups=c["G"],
                      reroute_overflow=c["reroute"], aux_loss=c["aux"], aux_loss_weight=c["aw"],
                      z_loss_weight=c["zw"], bias_update_rate=c["rate"])
        for key, field, default in NEW_ROUTER_FIELDS:
            if c[key] != default:
                router[field] = c[key]
    return {"moe": {"model_dim": c["M"], "num_experts": c["E"],
                    "expert": {"hidden_dim": c["H"], "activation": c["act"], "kind": c["kind"],
                               "bias": c["bias"]},
                    "router": router, "num_shared_experts": c["shared"],
                    "shared_hidden_dim": c["shared_h"]},
            "seed": str(seed)}


def scaled_err(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf"), f"shape {got.shape} != {want.shape}"
    if want.size == 0:
        return 0.0, ""
    err = float(np.max(np.abs(got - want)))
    scale = max(1.0, float(np.max(np.abs(want))))
    return err / scale, ""


def run_tool(tool, c, case_dir, x_path, dy_path, bias_path, init_seed, device):
    out = os.path.join(case_dir, "out")
    if os.path.isdir(out):
        shutil.rmtree(out)
    cmd = [tool, "--config", os.path.join(case_dir, "layer.textproto"), "--input", x_path,
           "--init-seed", str(init_seed), "--out", out, "--device", device]
    if c["grad"]:
        cmd += ["--grad-output", dy_path]
    if c["train"]:
        cmd += ["--train"]
    if c["step"]:
        cmd += ["--step", str(c["step"])]
    if c["offset"]:
        cmd += ["--token-offset", str(c["offset"])]
    if bias_path:
        cmd += ["--router-bias", bias_path]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p, out, cmd


def run_case(tool, workdir, c, index, verbose, device="cpu"):
    tol = TOL_CUDA if device == "cuda" else TOL
    case_dir = os.path.join(workdir, c["name"])
    os.makedirs(case_dir, exist_ok=True)
    config_seed = 1000 + index
    init_seed = 7 + index
    with open(os.path.join(case_dir, "layer.textproto"), "w") as f:
        f.write(textproto(c, config_seed))
    x_path = os.path.join(case_dir, "x.npy")
    dy_path = os.path.join(case_dir, "dy.npy")
    bias_path = os.path.join(case_dir, "router_bias.npy") if c["rbias"] else None

    redraws = 0
    for attempt in range(MAX_REDRAWS + 1):
        rng = np.random.default_rng([c["seed"], index, attempt])
        x = (rng.standard_normal((c["S"], c["M"])) * c["xscale"]).astype(np.float32)
        dy = rng.standard_normal((c["S"], c["M"])).astype(np.float32)
        bias = rng.uniform(-0.1, 0.1, size=c["E"]).astype(np.float32) if c["rbias"] else None
        np.save(x_path, x)
        np.save(dy_path, dy)
        if bias_path:
            np.save(bias_path, bias)
        p, out, cmd = run_tool(tool, c, case_dir, x_path, dy_path, bias_path, init_seed, device)
        if p.returncode != 0 and device == "cuda" and ("no CUDA device" in p.stderr or
                                                       "needs a CUDA build" in p.stderr):
            raise NoGpu(p.stderr.strip())
        if p.returncode != 0:
            return False, (f"moe_layer failed (rc {p.returncode}): {' '.join(cmd)}\n"
                           f"{p.stderr.strip()}")
        # The reference runs on the config the case means; the tool's resolved config.json must
        # say the same (this checks the C++ default resolution too).
        cfg = ref.LayerConfig(case_config(c, config_seed))
        tool_cfg = ref.load_config(os.path.join(out, "config.json"))
        if vars(tool_cfg) != vars(cfg):
            diff = {k: (v, vars(tool_cfg).get(k)) for k, v in vars(cfg).items()
                    if vars(tool_cfg).get(k) != v}
            return False, f"the tool's config.json differs from the case (want, got): {diff}"
        weights = ref.load_weights(cfg, os.path.join(out, "weights"))
        res = ref.run_layer(cfg, x, weights, router_bias=bias, grad_output=dy if c["grad"] else None,
                            train=c["train"], step=c["step"], token_offset=c["offset"])
        if res["min_margin"] >= MARGIN:
            break
        if verbose:
            print(f"  {c['name']}: redraw, margin {res['min_margin']:.2g} at "
                  f"{res['min_margin_where']}")
        redraws += 1
    else:
        return False, f"no input without near-ties in {MAX_REDRAWS + 1} draws"

    problems = []
    errs = {}

    def close(label, got, want):
        e, why = scaled_err(got, want)
        errs[label] = e
        if why or not e <= tol:
            problems.append(f"{label}: scaled max abs err {e:.3g} {why}".rstrip())

    # Routing (Soft MoE: its combine and dispatch weights).
    if c["gate"] == "SOFT":
        close("gate", np.load(os.path.join(out, "routing_gate.npy")), res["routing_gate"])
        close("dispatch", np.load(os.path.join(out, "routing_dispatch.npy")),
              res["routing_dispatch"])
        got_re = res["routing_expert"] = np.zeros(0)
    else:
        got_re = np.load(os.path.join(out, "routing_expert.npy"))
    if got_re.shape != res["routing_expert"].shape or not np.array_equal(got_re, res["routing_expert"]):
        diff = ("shape " + str(got_re.shape) + " vs " + str(res["routing_expert"].shape)
                if got_re.shape != res["routing_expert"].shape
                else f"{int((got_re != res['routing_expert']).sum())} entries differ, first at "
                     f"{tuple(int(v) for v in np.argwhere(got_re != res['routing_expert'])[0])}")
        problems.append(f"routing_expert differs: {diff}")
    if c["gate"] != "SOFT":
        close("gate", np.load(os.path.join(out, "routing_gate.npy")), res["routing_gate"])
    close("y", np.load(os.path.join(out, "y.npy")), res["y"])

    # Metrics.
    with open(os.path.join(out, "metrics.json")) as f:
        got_m = json.load(f)
    want_m = res["metrics"]
    for key in ("dropped_slots", "capacity", "total_slots"):
        if int(got_m.get(key, 0)) != want_m[key]:
            problems.append(f"metrics.{key}: {got_m.get(key, 0)} != {want_m[key]}")
    for key in ("tokens_per_expert", "dropped_per_expert"):
        got_l = [int(v) for v in got_m.get(key, [])]
        want_l = list(want_m[key])
        if got_l != want_l and not (not got_l and not any(want_l)):
            problems.append(f"metrics.{key}: {got_l} != {want_l}")
    close("aux", float(got_m.get("aux_loss", 0.0)), want_m["aux_loss"])
    close("z", float(got_m.get("z_loss", 0.0)), want_m["z_loss"])

    # Gradients.
    if c["grad"]:
        close("dx", np.load(os.path.join(out, "dx.npy")), res["dx"])
        worst_name, worst = "", 0.0
        for name, want in res["grads"].items():
            path = os.path.join(out, f"grad_{name}.npy")
            if not os.path.exists(path):
                problems.append(f"missing {os.path.basename(path)}")
                continue
            got = np.load(path).reshape(want.shape) if np.load(path).size == want.size else np.load(path)
            e, why = scaled_err(got, want)
            if why or not e <= tol:
                problems.append(f"grad_{name}: scaled max abs err {e:.3g} {why}".rstrip())
            if e >= worst:
                worst, worst_name = e, name
        errs["grad"] = worst
        errs["grad_worst"] = worst_name

    # Aux-loss-free bias update.
    if "router_bias" in res:
        path = os.path.join(out, "router_bias.npy")
        if not os.path.exists(path):
            problems.append("missing router_bias.npy")
        else:
            close("bias", np.load(path).reshape(-1), res["router_bias"])

    plan = res["plan"]
    summary = (f"C={plan['capacity']} dropped={want_m['dropped_slots']} "
               f"margin={res['min_margin']:.1e} redraws={redraws} "
               + " ".join(f"{k}={v:.1e}" for k, v in errs.items() if isinstance(v, float)))
    if problems:
        return False, summary + "\n    " + "\n    ".join(problems)
    return True, summary


def main():
    ap = argparse.ArgumentParser(description="Cross-check moe_layer against the PyTorch reference.")
    ap.add_argument("--tool", required=True, help="path of the moe_layer binary")
    ap.add_argument("--workdir", default=None, help="where case files go (default: a temp dir)")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="the tool's --device (cuda: the device-resident layer)")
    a = ap.parse_args()
    if not os.path.isfile(a.tool) or not os.access(a.tool, os.X_OK):
        print(f"moe_layer tool not found or not executable: {a.tool}")
        print("0 passed, 1 failed")
        return 1
    workdir = a.workdir
    temp_workdir = workdir is None
    if temp_workdir:
        import tempfile
        workdir = tempfile.mkdtemp(prefix="moe_refcheck_")
    os.makedirs(workdir, exist_ok=True)
    torch.set_num_threads(1)
    only = set(filter(None, a.only.split(",")))
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    if only - set(names):
        print(f"unknown case names: {sorted(only - set(names))}")
        return 2

    passed = failed = 0
    for i, c in enumerate(CASES):
        if only and c["name"] not in only:
            continue
        if a.device == "cuda" and (c["gate"] == "SOFT" or c["scope"] == "GLOBAL"):
            # The device layer refuses these (CPU layer only); the CPU run covers them.
            print(f"SKIP {c['name']}: runs on the CPU layer only", flush=True)
            continue
        try:
            ok, msg = run_case(a.tool, workdir, c, i, a.verbose, a.device)
        except NoGpu as exc:
            print(f"SKIP: moe_layer --device cuda cannot run here: {exc}")
            if temp_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            return 77
        except Exception as exc:  # report and go on with the other cases
            import traceback
            ok, msg = False, f"exception: {exc!r}\n{traceback.format_exc()}"
        print(f"{'PASS' if ok else 'FAIL'} {c['name']}: {msg}", flush=True)
        if ok:
            passed += 1
        else:
            failed += 1
    if temp_workdir and failed == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        print(f"case files are in {workdir}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
