#!/usr/bin/env python3
"""PyTorch reference implementation of one MoE layer call (the test oracle).

Implements exactly docs/SEMANTICS.md, independently of the C++ runtime:

* Routing *decisions* (top-k selection and its ties, group-limited selection, random routing's
  u < 2*g2n test, capacity order by probability or by expert score, expert choice's top-C) are
  made on float32 router probabilities computed the way the C++ float32 path computes them
  (x32 @ Wg32, softmax as subtract-max / exp / multiply by 1/sum, or the sigmoid 1 / (1 + exp(-v))
  of score_function SIGMOID), so both sides take the same decisions.
* All the forward/backward math (logits, probs, gates, experts, losses) is float64 torch, and the
  gradients come from torch autograd, treating selection, drops and the noise eps as constants.
  That checks the C++ hand-written backward independently.
* Randomness is a bit-identical port of base/rng.h (SplitMix64 chain).

Use as a library (`run_layer(...)`) or from the command line:

  moe_reference.py --config-json OUT/config.json --input x.npy --weights DIR
                   [--router-bias b.npy] [--grad-output dy.npy] [--train] [--step N]
                   [--token-offset N] --out DIR

which writes the same files as the C++ `moe_layer` tool: y.npy, routing_expert.npy,
routing_gate.npy, metrics.json, and with --grad-output dx.npy and grad_<weight>.npy, and with
--train and a bias update rate router_bias.npy.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# Randomness: port of base/rng.h.

MASK64 = (1 << 64) - 1
STREAM_ROUTING_UNIFORM = 1
STREAM_ROUTER_NOISE = 2


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def counter_hash(seed, step, index, stream, sub=0):
    h = splitmix64(seed & MASK64)
    h = splitmix64(h ^ (step & MASK64))
    h = splitmix64(h ^ (index & MASK64))
    h = splitmix64(h ^ (stream & MASK64))
    h = splitmix64(h ^ (sub & MASK64))
    return h


def uniform_from_hash(h):
    return float(h >> 11) * (1.0 / 9007199254740992.0)


def normal_from_hashes(h1, h2):
    """Box-Muller in double, rounded to float32 (returned as a numpy float32)."""
    u1 = 1.0 - uniform_from_hash(h1)
    u2 = uniform_from_hash(h2)
    r = math.sqrt(-2.0 * math.log(u1))
    return np.float32(r * math.cos(6.283185307179586 * u2))


def counter_uniform(seed, step, index, stream, sub=0):
    return uniform_from_hash(counter_hash(seed, step, index, stream, sub))


def counter_normal(seed, step, index, stream, sub=0):
    return normal_from_hashes(counter_hash(seed, step, index, stream, 2 * sub),
                              counter_hash(seed, step, index, stream, 2 * sub + 1))


# --------------------------------------------------------------------------------------------
# Config.

ENUMS = {
    "activation": ["RELU", "GELU_TANH", "SILU"],
    "kind": ["FFN", "SWIGLU"],
    "gate": ["TOP1", "TOPK", "NOISY_TOPK", "EXPERT_CHOICE", "SOFT"],
    "normalization": ["NONE", "TOPK_SOFTMAX", "RENORM_AFTER_CAPACITY"],
    "drop_policy": ["POSITION", "PROBABILITY", "EXPERT_SCORE", "TOKEN_ORDER"],
    "aux_loss": ["NO_AUX_LOSS", "SWITCH", "GSHARD", "IMPORTANCE_CV", "SWITCH_TOPK", "SEQUENCE"],
    "score_function": ["SOFTMAX", "SIGMOID"],
    "aux_loss_scope": ["LOCAL", "GLOBAL"],
}

EXPERT_DEFAULTS = {"hidden_dim": None, "activation": "GELU_TANH", "kind": "FFN", "bias": True}
ROUTER_DEFAULTS = {
    "gate": "TOPK", "top_k": 2, "normalization": "NONE", "random_routing": False,
    "capacity_factor_train": 1.25, "capacity_factor_eval": 2.0, "min_capacity": 4,
    "drop_policy": "POSITION", "num_local_groups": 1, "reroute_overflow": False,
    "aux_loss": "SWITCH", "aux_loss_weight": 0.01, "z_loss_weight": 0.0, "bias_update_rate": 0.0,
    "score_function": "SOFTMAX", "scaling_factor": 1.0, "num_expert_groups": 1,
    "groups_per_token": 1, "aux_sequence_length": 0, "aux_loss_scope": "LOCAL",
    "slots_per_expert": 1,
}


def _enum(field, value):
    if isinstance(value, int):
        return ENUMS[field][value]
    if value not in ENUMS[field]:
        raise ValueError(f"unknown {field} {value!r}")
    return value


class LayerConfig:
    """The parts of MoeConfig (protobuf JSON, snake_case, enums as names) that one layer needs.

    Missing fields get the proto defaults and the same kind-dependent resolution as
    runtime/config/config.cc ResolveConfig (TOP1 -> k = 1, NOISY_TOPK -> TOPK_SOFTMAX, EXPERT_CHOICE ->
    NO_AUX_LOSS), so a hand-written dict works too.
    """

    def __init__(self, cfg):
        moe = cfg["moe"]
        self.seed = int(cfg.get("seed", 1234))  # uint64 is a JSON string in protobuf JSON
        self.model_dim = int(moe["model_dim"])
        self.num_experts = int(moe["num_experts"])
        ex = dict(EXPERT_DEFAULTS)
        ex.update(moe.get("expert", {}))
        self.hidden_dim = int(ex["hidden_dim"])
        self.activation = _enum("activation", ex["activation"])
        self.kind = _enum("kind", ex["kind"])
        self.bias = bool(ex["bias"])
        r_in = moe.get("router", {})
        r = dict(ROUTER_DEFAULTS)
        r.update(r_in)
        self.gate = _enum("gate", r["gate"])
        if self.gate == "TOP1" and "top_k" not in r_in:
            r["top_k"] = 1
        if self.gate == "NOISY_TOPK" and "normalization" not in r_in:
            r["normalization"] = "TOPK_SOFTMAX"
        if self.gate in ("EXPERT_CHOICE", "SOFT") and "aux_loss" not in r_in:
            r["aux_loss"] = "NO_AUX_LOSS"
        self.top_k = 1 if self.gate == "TOP1" else int(r["top_k"])
        # Every other router field by its default's type (enums by name).
        for name, default in ROUTER_DEFAULTS.items():
            if name in ("gate", "top_k"):
                continue
            kind = _enum if name in ENUMS else type(default)
            setattr(self, name, kind(name, r[name]) if kind is _enum else kind(r[name]))
        self.num_shared_experts = int(moe.get("num_shared_experts", 0))
        shd = int(moe.get("shared_hidden_dim", 0))
        self.shared_hidden_dim = shd if shd > 0 else self.hidden_dim
        if self.gate == "EXPERT_CHOICE" and self.aux_loss != "NO_AUX_LOSS":
            raise ValueError("EXPERT_CHOICE needs aux_loss NO_AUX_LOSS")
        if self.random_routing and self.top_k != 2:
            raise ValueError("random_routing needs top_k = 2")
        if self.aux_loss == "SEQUENCE" and self.aux_sequence_length < 1:
            raise ValueError("aux_loss SEQUENCE needs aux_sequence_length >= 1")
        if self.aux_loss_scope == "GLOBAL" and self.aux_loss not in ("SWITCH", "GSHARD",
                                                                     "SWITCH_TOPK"):
            raise ValueError("aux_loss_scope GLOBAL needs aux_loss SWITCH, GSHARD or SWITCH_TOPK")
        if self.expert_choice and self.scaling_factor != 1.0:
            raise ValueError("EXPERT_CHOICE needs scaling_factor 1")
        if self.score_function == "SIGMOID" and self.gate not in ("TOP1", "TOPK"):
            raise ValueError("score_function SIGMOID needs gate TOP1 or TOPK")
        if self.num_expert_groups > 1:
            ng, gp = self.num_expert_groups, self.groups_per_token
            if self.num_experts % ng != 0:
                raise ValueError("num_expert_groups must divide num_experts")
            if not 1 <= gp <= ng:
                raise ValueError("groups_per_token must be in 1..num_expert_groups")
            if self.top_k % gp != 0 or self.top_k > gp * (self.num_experts // ng):
                raise ValueError("top_k must be a multiple of groups_per_token and at most "
                                 "groups_per_token * E / NG")
            if self.reroute_overflow or self.expert_choice:
                raise ValueError("num_expert_groups > 1 needs token choice without reroute")
        if self.drop_policy in ("EXPERT_SCORE", "TOKEN_ORDER") and (self.reroute_overflow or
                                                                    self.expert_choice):
            raise ValueError(f"drop_policy {self.drop_policy} needs token choice without reroute")

    @property
    def expert_choice(self):
        return self.gate == "EXPERT_CHOICE"

    def weight_shapes(self):
        """(name, shape) of every parameter, in the C++ MoeLayerParams::ForEach order."""
        m, e, h, hs = self.model_dim, self.num_experts, self.hidden_dim, self.shared_hidden_dim
        out = [("router", (m, e * self.slots_per_expert if self.gate == "SOFT" else e))]
        if self.gate == "NOISY_TOPK":
            out.append(("router_noise", (m, e)))

        def ffn(prefix, hid):
            out.append((prefix + "_w1", (m, hid)))
            if self.bias:
                out.append((prefix + "_b1", (hid,)))
            out.append((prefix + "_w2", (hid, m)))
            if self.bias:
                out.append((prefix + "_b2", (m,)))
            if self.kind == "SWIGLU":
                out.append((prefix + "_w3", (m, hid)))

        for i in range(e):
            ffn(f"expert_{i}", h)
        for i in range(self.num_shared_experts):
            ffn(f"shared_{i}", hs)
        return out


def load_config(path):
    with open(path) as f:
        return LayerConfig(json.load(f))


def load_weights(cfg, directory):
    weights = {}
    for name, shape in cfg.weight_shapes():
        arr = np.load(os.path.join(directory, name + ".npy"))
        if tuple(arr.shape) != tuple(shape) and arr.size == int(np.prod(shape)) and len(shape) == 1:
            arr = arr.reshape(shape)
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{name}.npy has shape {arr.shape}, expected {shape}")
        weights[name] = arr.astype(np.float32)
    return weights


# --------------------------------------------------------------------------------------------
# Float32 decision path (mirrors runtime/routing/router.cc).

def _softmax32(a):
    """Row softmax in float32 like moe::SoftmaxRows: max, exp(a - max), sequential sum, * (1/sum)."""
    a = np.asarray(a, dtype=np.float32)
    mx = a.max(axis=1, keepdims=True)
    ex = np.exp(a - mx).astype(np.float32)
    s = ex[:, 0].copy()
    for c in range(1, a.shape[1]):
        s = (s + ex[:, c]).astype(np.float32)
    inv = (np.float32(1.0) / s).astype(np.float32)
    return (ex * inv[:, None]).astype(np.float32)


def _sigmoid32(a):
    """Element-wise sigmoid in float32 like the C++: 1.0f / (1.0f + std::exp(-v))."""
    a = np.asarray(a, dtype=np.float32)
    with np.errstate(over="ignore"):
        ex = np.exp(-a).astype(np.float32)
    return (np.float32(1.0) / (np.float32(1.0) + ex).astype(np.float32)).astype(np.float32)


def _softplus32(v):
    v = np.asarray(v, dtype=np.float32)
    with np.errstate(over="ignore"):
        sp = np.log1p(np.exp(v)).astype(np.float32)
    return np.where(v > np.float32(20.0), v, sp).astype(np.float32)


def group_bounds(s, g):
    q, r = divmod(s, g)
    begin = [0]
    for i in range(g):
        begin.append(begin[-1] + q + (1 if i < r else 0))
    return begin


def compute_capacity(cfg, s, train):
    cf = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
    g = cfg.num_local_groups
    s_g = (s + g - 1) // g
    e = cfg.num_experts
    if cfg.expert_choice:
        if cf <= 0:
            return s_g
        c = int(math.ceil(float(s_g) * cf / float(e)))
        return min(s_g, max(cfg.min_capacity, c))
    if cf <= 0:
        return 0
    c = math.ceil(float(cfg.top_k) * float(s_g) * cf / float(e))
    return min(s_g, max(cfg.min_capacity, c))  # capped at the group size (routing unchanged)


def _rank(scores_row):
    """Expert indices by score descending, ties by lower index."""
    return np.argsort(-scores_row, kind="stable")


class Margins:
    """Smallest gap of every float comparison a routing decision depends on (for near-tie checks)."""

    def __init__(self):
        self.value = math.inf
        self.where = ""

    def add(self, gap, where):
        gap = float(gap)
        if gap < self.value:
            self.value = gap
            self.where = where


def select_group_limited(cfg, sc, margins, t=0):
    """Group-limited top-k of one token's float32 selection scores `sc` (E): the experts form NG
    contiguous groups; group score = float32 sum of its top m = k / GP scores (from the highest);
    the GP best groups (ties lower group index) are kept and the k best experts among them chosen
    (ties lower expert index), best first. Returns the k expert indices."""
    e, k = cfg.num_experts, cfg.top_k
    ng, gp = cfg.num_expert_groups, cfg.groups_per_token
    gs = e // ng
    m = k // gp
    sc = np.asarray(sc, dtype=np.float32)
    gscore = np.zeros(ng, dtype=np.float32)
    for grp in range(ng):
        vals = sc[grp * gs:(grp + 1) * gs]
        order = _rank(vals)
        srt = vals[order]
        acc = np.float32(0.0)
        for i in range(m):
            acc = np.float32(acc + srt[i])
        gscore[grp] = acc
        if gs > m:
            margins.add(srt[m - 1] - srt[m], f"group top-m token {t} expert group {grp}")
    gorder = _rank(gscore)
    if ng > gp:
        gsrt = gscore[gorder]
        margins.add(gsrt[gp - 1] - gsrt[gp], f"group choice token {t}")
    allowed = np.zeros(e, dtype=bool)
    for grp in gorder[:gp]:
        allowed[grp * gs:(grp + 1) * gs] = True
    masked = np.where(allowed, sc.astype(np.float64), -np.inf)
    order = np.argsort(-masked, kind="stable")
    srt = masked[order]
    n_allowed = int(allowed.sum())
    for i in range(min(k, n_allowed - 1)):
        margins.add(srt[i] - srt[i + 1], f"selection token {t} rank {i}")
    return order[:k]


def plan_token_choice(cfg, probs32, bias32, s, train, step, token_offset, margins):
    e, k, g = cfg.num_experts, cfg.top_k, cfg.num_local_groups
    cap = compute_capacity(cfg, s, train)
    rank_len = e if cfg.reroute_overflow else k
    scores = (probs32 + bias32[None, :]).astype(np.float32)  # selection score, float32
    ranking = np.zeros((s, rank_len), dtype=np.int64)
    for t in range(s):
        if cfg.num_expert_groups > 1:
            ranking[t] = select_group_limited(cfg, scores[t], margins, t)
            continue
        order = _rank(scores[t])
        ranking[t] = order[:rank_len]
        srt = scores[t][order]
        for i in range(min(rank_len, e - 1)):
            margins.add(srt[i] - srt[i + 1], f"selection token {t} rank {i}")
    selected = ranking[:, :k].copy()
    final = selected.copy()
    alive = np.ones((s, k), dtype=bool)

    if cfg.random_routing:
        for t in range(s):
            r0 = probs32[t, selected[t, 0]]
            r1 = probs32[t, selected[t, 1]]
            g2 = np.float32(r1 / np.float32(r0 + r1))
            u = counter_uniform(cfg.seed, step, token_offset + t, STREAM_ROUTING_UNIFORM)
            two_g2 = 2.0 * float(g2)
            margins.add(abs(u - two_g2), f"random routing token {t}")
            if not (u < two_g2):
                alive[t, 1] = False

    bounds = group_bounds(s, g)
    position = -np.ones((s, k), dtype=np.int64)
    for gr in range(g):
        b, end = bounds[gr], bounds[gr + 1]
        order = list(range(b, end))
        if cfg.drop_policy == "PROBABILITY":
            key = np.array([probs32[t, selected[t, 0]] for t in order], dtype=np.float32)
            idx = np.argsort(-key, kind="stable")
            order = [order[i] for i in idx]
            if cap > 0:
                srt = key[idx]
                for i in range(len(srt) - 1):
                    margins.add(srt[i] - srt[i + 1], f"probability order group {gr} rank {i}")
        count = np.zeros(e, dtype=np.int64)
        if cfg.drop_policy == "TOKEN_ORDER":
            # Token-major: every (group, expert) keeps the first C slots in token order.
            for t in order:
                for j in range(k):
                    if not alive[t, j]:
                        continue
                    ex = final[t, j]
                    if cap > 0 and count[ex] >= cap:
                        alive[t, j] = False
                        continue
                    position[t, j] = count[ex]
                    count[ex] += 1
            continue
        if cfg.drop_policy == "EXPERT_SCORE":
            # Every (group, expert) keeps the C claims with the largest raw score probs32[t, e]
            # (ties lower token index); positions in token order.
            claims = [[] for _ in range(e)]
            for t in order:
                for j in range(k):
                    if alive[t, j]:
                        claims[final[t, j]].append((t, j))
            for ex in range(e):
                cl = claims[ex]
                if cap > 0 and len(cl) > cap:
                    key = np.array([probs32[t, ex] for t, _ in cl], dtype=np.float32)
                    idx = np.argsort(-key, kind="stable")
                    srt = key[idx]
                    margins.add(srt[cap - 1] - srt[cap], f"expert score group {gr} expert {ex}")
                    keep = np.zeros(len(cl), dtype=bool)
                    keep[idx[:cap]] = True
                else:
                    keep = np.ones(len(cl), dtype=bool)
                for (t, j), kp in zip(cl, keep):
                    if not kp:
                        alive[t, j] = False
                        continue
                    position[t, j] = count[ex]
                    count[ex] += 1
            continue
        for j in range(k):
            for t in order:
                if not alive[t, j]:
                    continue
                ex = final[t, j]
                if cap > 0 and count[ex] >= cap:
                    target = -1
                    if cfg.reroute_overflow:
                        for q in range(k, e):
                            cand = ranking[t, q]
                            if cand in final[t] or count[cand] >= cap:
                                continue
                            target = cand
                            break
                    if target < 0:
                        alive[t, j] = False
                        continue
                    ex = target
                    final[t, j] = ex
                position[t, j] = count[ex]
                count[ex] += 1

    dropped_per_expert = np.zeros(e, dtype=np.int64)
    kept_per_expert = np.zeros(e, dtype=np.int64)
    for t in range(s):
        for j in range(k):
            if alive[t, j]:
                kept_per_expert[final[t, j]] += 1
            else:
                dropped_per_expert[selected[t, j]] += 1
    load = np.bincount(selected.reshape(-1), minlength=e).astype(np.int64)
    return {
        "capacity": cap, "selected": selected, "final": final, "alive": alive,
        "position": position, "bounds": bounds,
        "kept_per_expert": kept_per_expert, "dropped_per_expert": dropped_per_expert,
        "dropped_slots": int((~alive).sum()), "load": load,
    }


def plan_expert_choice(cfg, probs32, s, train, margins):
    e, g = cfg.num_experts, cfg.num_local_groups
    cap = compute_capacity(cfg, s, train)
    bounds = group_bounds(s, g)
    ec_token = -np.ones((g * e, cap), dtype=np.int64)
    taken = np.zeros((s, e), dtype=bool)
    kept = np.zeros(e, dtype=np.int64)
    for gr in range(g):
        b, end = bounds[gr], bounds[gr + 1]
        n = end - b
        take = min(cap, n)
        for ex in range(e):
            col = probs32[b:end, ex]
            order = np.argsort(-col, kind="stable")
            srt = col[order]
            for i in range(min(take, n - 1)):
                margins.add(srt[i] - srt[i + 1], f"expert choice group {gr} expert {ex} rank {i}")
            for pos in range(take):
                t = b + int(order[pos])
                ec_token[gr * e + ex, pos] = t
                taken[t, ex] = True
            kept[ex] += take
    return {"capacity": cap, "ec_token": ec_token, "taken": taken, "bounds": bounds,
            "kept_per_expert": kept, "dropped_per_expert": np.zeros(e, dtype=np.int64),
            "dropped_slots": 0, "load": kept.copy()}


# --------------------------------------------------------------------------------------------
# Float64 autograd path.

def _act(name, h):
    if name == "RELU":
        return torch.clamp(h, min=0.0)
    if name == "GELU_TANH":
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * h * h)))
    if name == "SILU":
        return h * torch.sigmoid(h)
    raise ValueError(name)


def _ffn(cfg, p, prefix, x):
    h = x @ p[prefix + "_w1"]
    if cfg.bias:
        h = h + p[prefix + "_b1"]
    if cfg.kind == "SWIGLU":
        a = (h * torch.sigmoid(h)) * (x @ p[prefix + "_w3"])
    else:
        a = _act(cfg.activation, h)
    y = a @ p[prefix + "_w2"]
    if cfg.bias:
        y = y + p[prefix + "_b2"]
    return y


def _float64_leaves(cfg, x32, weights, need_grad):
    """x and the config's weights as float64 autograd leaves."""
    dt = torch.float64
    X = torch.tensor(x32, dtype=dt, requires_grad=need_grad)
    P = {name: torch.tensor(np.asarray(w, dtype=np.float32), dtype=dt, requires_grad=need_grad)
         for name, w in weights.items() if name in dict(cfg.weight_shapes())}
    return X, P


def run_layer(cfg, x, weights, router_bias=None, grad_output=None, train=False, step=0,
              token_offset=0):
    """One MoE layer call. `cfg` is a LayerConfig (or a MoeConfig JSON dict); `x` S x M float32;
    `weights` a dict name -> float32 array. Returns a dict with y, routing_expert, routing_gate,
    metrics, and (with grad_output) dx and grads, and (training with a bias rate) router_bias, plus
    `min_margin` / `min_margin_where`: the smallest gap of any float comparison the routing
    decisions depended on."""
    if isinstance(cfg, dict):
        cfg = LayerConfig(cfg)
    x32 = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    s, m = x32.shape
    if m != cfg.model_dim:
        raise ValueError(f"x has {m} columns, model_dim is {cfg.model_dim}")
    if s < cfg.num_local_groups:
        raise ValueError(f"S={s} < num_local_groups={cfg.num_local_groups}")
    if cfg.gate == "SOFT":
        return run_soft_layer(cfg, x32, weights, grad_output)
    e, k = cfg.num_experts, cfg.top_k
    bias32 = (np.zeros(e, dtype=np.float32) if router_bias is None
              else np.asarray(router_bias, dtype=np.float32).reshape(e))
    noisy = cfg.gate == "NOISY_TOPK" and train

    # ---- float32 decisions
    wg32 = weights["router"].astype(np.float32)
    logits32 = torch.from_numpy(x32) @ torch.from_numpy(wg32)
    logits32 = logits32.numpy().astype(np.float32)
    eps32 = None
    if noisy:
        wn32 = weights["router_noise"].astype(np.float32)
        n32 = (torch.from_numpy(x32) @ torch.from_numpy(wn32)).numpy().astype(np.float32)
        eps32 = np.zeros((s, e), dtype=np.float32)
        for t in range(s):
            for j in range(e):
                eps32[t, j] = counter_normal(cfg.seed, step, token_offset + t, STREAM_ROUTER_NOISE, j)
        scores32 = (logits32 + (eps32 * _softplus32(n32)).astype(np.float32)).astype(np.float32)
    else:
        scores32 = logits32
    sigmoid = cfg.score_function == "SIGMOID"
    probs32 = _sigmoid32(scores32) if sigmoid else _softmax32(scores32)
    margins = Margins()
    if cfg.expert_choice:
        plan = plan_expert_choice(cfg, probs32, s, train, margins)
    else:
        plan = plan_token_choice(cfg, probs32, bias32, s, train, step, token_offset, margins)

    # ---- float64 math with autograd
    dt = torch.float64
    need_grad = grad_output is not None
    X, P = _float64_leaves(cfg, x32, weights, need_grad)
    logits = X @ P["router"]
    if noisy:
        nin = X @ P["router_noise"]
        sp = torch.where(nin > 20.0, nin, torch.log1p(torch.exp(torch.clamp(nin, max=20.0))))
        scores = logits + torch.tensor(eps32, dtype=dt) * sp
    else:
        scores = logits
    probs = torch.sigmoid(scores) if sigmoid else torch.softmax(scores, dim=1)
    # The balance losses' per-token distribution: probs, or the sigmoid scores normalized per token.
    pdist = probs / probs.sum(dim=1, keepdim=True) if sigmoid else probs
    scale = cfg.scaling_factor

    outs = torch.stack([_ffn(cfg, P, f"expert_{i}", X) for i in range(e)])  # E x S x M
    y = torch.zeros((s, m), dtype=dt)
    for i in range(cfg.num_shared_experts):
        y = y + _ffn(cfg, P, f"shared_{i}", X)
    tok = torch.arange(s)

    if cfg.expert_choice:
        taken = torch.tensor(plan["taken"], dtype=dt)
        gmat = probs * taken * scale  # S x E
        y = y + torch.einsum("se,esm->sm", gmat, outs)
        cap = plan["capacity"]
        routing_expert = plan["ec_token"].astype(np.int32)
        routing_gate = np.zeros(routing_expert.shape, dtype=np.float32)
        pr = probs.detach().numpy()
        for row in range(routing_expert.shape[0]):
            ex = row % e
            for pos in range(cap):
                t = routing_expert[row, pos]
                if t >= 0:
                    routing_gate[row, pos] = np.float32(pr[t, ex] * scale)
    else:
        final = torch.tensor(plan["final"], dtype=torch.long)
        alive = torch.tensor(plan["alive"], dtype=dt)
        raw = probs.gather(1, final)  # S x k
        if cfg.normalization == "NONE":
            gates = raw
        elif cfg.normalization == "TOPK_SOFTMAX":
            gates = raw / raw.sum(dim=1, keepdim=True)
        else:
            denom = (raw * alive).sum(dim=1, keepdim=True)
            has = denom > 0
            gates = raw / torch.where(has, denom, torch.ones_like(denom))
        gates = gates * alive * scale
        sel = outs[final, tok[:, None]]  # S x k x M
        y = y + (gates[:, :, None] * sel).sum(dim=1)
        routing_expert = np.where(plan["alive"], plan["final"], -1).astype(np.int32)
        routing_gate = gates.detach().numpy().astype(np.float32)

    # ---- losses, per group, averaged
    bounds = plan["bounds"]
    g = cfg.num_local_groups
    aux_total = torch.zeros((), dtype=dt)
    z_total = torch.zeros((), dtype=dt)
    if not cfg.expert_choice:
        selected = torch.tensor(plan["selected"], dtype=torch.long)
    # The slots f counts: the first choice (SWITCH, GSHARD) or all k (SWITCH_TOPK, SEQUENCE).
    f_slots = k if cfg.aux_loss in ("SWITCH_TOPK", "SEQUENCE") else 1
    f_global = None
    if cfg.aux_loss_scope == "GLOBAL":  # f over every token of the call (one process = the world)
        f_global = torch.bincount(selected[:, :f_slots].reshape(-1), minlength=e).to(dt) / s
    for gr in range(g):
        b, end = bounds[gr], bounds[gr + 1]
        n = end - b
        lse = torch.logsumexp(logits[b:end], dim=1)
        z_total = z_total + (lse * lse).mean()
        if cfg.aux_loss in ("SWITCH", "GSHARD", "SWITCH_TOPK"):
            f = (torch.bincount(selected[b:end, :f_slots].reshape(-1), minlength=e).to(dt) / n
                 if f_global is None else f_global)
            pm = pdist[b:end].mean(dim=0)
            aux_total = aux_total + (e / f_slots) * (f * pm).sum()
        elif cfg.aux_loss == "SEQUENCE":
            # DeepSeek-V3: per sequence of L consecutive tokens of the group (the last maybe
            # shorter), f_i = E/(k T) #{t selecting i}, P_i = mean_t P[t, i]; mean over sequences.
            L = cfg.aux_sequence_length
            starts = list(range(b, end, L))
            seq_total = torch.zeros((), dtype=dt)
            for q0 in starts:
                q1 = min(q0 + L, end)
                T = q1 - q0
                f = torch.bincount(selected[q0:q1].reshape(-1), minlength=e).to(dt) * e / (k * T)
                seq_total = seq_total + (f * pdist[q0:q1].mean(dim=0)).sum()
            aux_total = aux_total + seq_total / len(starts)
        elif cfg.aux_loss == "IMPORTANCE_CV":
            rs = probs[b:end].gather(1, selected[b:end])
            if cfg.normalization == "NONE":
                g0 = rs
            else:
                g0 = rs / rs.sum(dim=1, keepdim=True)
            imp = torch.zeros(e, dtype=dt).index_add(0, selected[b:end].reshape(-1), g0.reshape(-1))
            mean = imp.mean()
            if mean.item() > 0:
                var = ((imp - mean) ** 2).mean()
                aux_total = aux_total + var / (mean * mean)
    aux = aux_total / g
    z = z_total / g

    result = {
        "y": y.detach().numpy().astype(np.float32),
        "routing_expert": routing_expert,
        "routing_gate": routing_gate,
        "metrics": {
            "aux_loss": float(aux.item()),
            "z_loss": float(z.item()),
            "dropped_slots": int(plan["dropped_slots"]),
            "tokens_per_expert": [int(v) for v in plan["kept_per_expert"]],
            "dropped_per_expert": [int(v) for v in plan["dropped_per_expert"]],
            "capacity": int(plan["capacity"]),
            "total_slots": int(plan["kept_per_expert"].sum()) if cfg.expert_choice else s * k,
        },
        "min_margin": margins.value,
        "min_margin_where": margins.where,
        "plan": plan,
        "probs32": probs32,
    }

    if need_grad:
        dy = torch.tensor(np.asarray(grad_output, dtype=np.float32), dtype=dt)
        if tuple(dy.shape) != (s, m):
            raise ValueError(f"grad output has shape {tuple(dy.shape)}, expected {(s, m)}")
        objective = (y * dy).sum() + cfg.aux_loss_weight * aux + cfg.z_loss_weight * z
        result["objective"] = float(objective.item())
        objective.backward()
        result["dx"] = X.grad.numpy().astype(np.float32)
        grads = {}
        for name, shape in cfg.weight_shapes():
            gr_ = P[name].grad
            grads[name] = (np.zeros(shape, dtype=np.float32) if gr_ is None
                           else gr_.numpy().astype(np.float32))
        result["grads"] = grads

    if train and cfg.bias_update_rate > 0:
        load = plan["load"].astype(np.float64)
        mean = load.sum() / e
        new_bias = np.zeros(e, dtype=np.float32)
        for i in range(e):
            d = mean - load[i]
            sign = 1.0 if d > 0 else (-1.0 if d < 0 else 0.0)
            new_bias[i] = np.float32(float(bias32[i]) + cfg.bias_update_rate * sign)
        result["router_bias"] = new_bias
    return result


def run_soft_layer(cfg, x32, weights, grad_output=None):
    """Soft MoE (gate SOFT, docs/SEMANTICS.md): per local group X_g, logits = X_g Phi (S_g x E*p);
    D = softmax over the group's tokens (per slot column), C = softmax over the slots (per token);
    slot inputs D^T X_g, slot j of expert e (column e*p + j) through FFN_e, y_g = C Y + shared.
    All in float64 with autograd; no routing decisions, no drops, no losses."""
    s, m = x32.shape
    e, p, g = cfg.num_experts, cfg.slots_per_expert, cfg.num_local_groups
    dt = torch.float64
    need_grad = grad_output is not None
    X, P = _float64_leaves(cfg, x32, weights, need_grad)
    logits = X @ P["router"]
    bounds = group_bounds(s, g)
    ys, cs, ds = [], [], []
    for gr in range(g):
        b, end = bounds[gr], bounds[gr + 1]
        lg = logits[b:end]
        d = torch.softmax(lg, dim=0)
        c = torch.softmax(lg, dim=1)
        xs = d.T @ X[b:end]  # E*p x M
        outs = torch.cat([_ffn(cfg, P, f"expert_{i}", xs[i * p:(i + 1) * p]) for i in range(e)])
        ys.append(c @ outs)
        cs.append(c)
        ds.append(d)
    y = torch.cat(ys)
    for i in range(cfg.num_shared_experts):
        y = y + _ffn(cfg, P, f"shared_{i}", X)
    result = {
        "y": y.detach().numpy().astype(np.float32),
        "routing_gate": torch.cat(cs).detach().numpy().astype(np.float32),
        "routing_dispatch": torch.cat(ds).detach().numpy().astype(np.float32),
        "metrics": {
            "aux_loss": 0.0, "z_loss": 0.0, "dropped_slots": 0,
            "tokens_per_expert": [g * p] * e, "dropped_per_expert": [0] * e,
            "capacity": p, "total_slots": g * e * p,
        },
        "min_margin": math.inf,
        "min_margin_where": "",
        "plan": {"capacity": p},
    }
    if need_grad:
        dy = torch.tensor(np.asarray(grad_output, dtype=np.float32), dtype=dt)
        if tuple(dy.shape) != (s, m):
            raise ValueError(f"grad output has shape {tuple(dy.shape)}, expected {(s, m)}")
        objective = (y * dy).sum()
        result["objective"] = float(objective.item())
        objective.backward()
        result["dx"] = X.grad.numpy().astype(np.float32)
        result["grads"] = {name: (np.zeros(shape, dtype=np.float32) if P[name].grad is None
                                  else P[name].grad.numpy().astype(np.float32))
                           for name, shape in cfg.weight_shapes()}
    return result


def write_outputs(cfg, result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "y.npy"), result["y"])
    if "routing_expert" in result:
        np.save(os.path.join(out_dir, "routing_expert.npy"), result["routing_expert"])
    if "routing_dispatch" in result:
        np.save(os.path.join(out_dir, "routing_dispatch.npy"), result["routing_dispatch"])
    np.save(os.path.join(out_dir, "routing_gate.npy"), result["routing_gate"])
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result["metrics"], f)
        f.write("\n")
    if "dx" in result:
        np.save(os.path.join(out_dir, "dx.npy"), result["dx"])
        for name, arr in result["grads"].items():
            np.save(os.path.join(out_dir, "grad_" + name + ".npy"), arr)
    if "router_bias" in result:
        np.save(os.path.join(out_dir, "router_bias.npy"), result["router_bias"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--router-bias")
    ap.add_argument("--grad-output")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--token-offset", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = load_config(a.config_json)
    x = np.load(a.input)
    weights = load_weights(cfg, a.weights)
    bias = np.load(a.router_bias).reshape(-1) if a.router_bias else None
    dy = np.load(a.grad_output) if a.grad_output else None
    res = run_layer(cfg, x, weights, router_bias=bias, grad_output=dy, train=a.train,
                    step=a.step, token_offset=a.token_offset)
    write_outputs(cfg, res, a.out)
    print(f"min decision margin {res['min_margin']:.3g} ({res['min_margin_where']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
