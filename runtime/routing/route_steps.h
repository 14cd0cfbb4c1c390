// The steps of the device router (runtime/device/cuda/route.cu), one function per thread's work: the
// kernels there are loops of one launch over these, and tests/unit/route_steps_test.cc runs the
// same functions on the CPU in the kernels' order (sequential sums and sorts in place of CUB's
// block scan, segmented sort and reductions) against BuildDispatchPlan, the losses and
// RouterScoreGradients — so the device router's index logic is checked on every build, GPU or not.
// The per-token arithmetic itself is runtime/routing/routing_math.h.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "proto/moe_config.pb.h"
#include "base/host_device.h"
#include "base/rng.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/routing/router.h"
#include "runtime/routing/routing_math.h"

namespace moe::route_steps {

// Per-expert counters: atomicAdd on the device, a plain add in the CPU emulation.
using Count = unsigned long long;
MOE_HD inline void CountOne(Count* c) {
#if defined(__CUDA_ARCH__)
  atomicAdd(c, Count{1});
#else
  ++*c;
#endif
}

// Noisy top-k at training, element i of S x E: eps = CounterNormal(seed, step, token, kRouterNoise,
// expert) and the noisy score, as FinishRouter.
MOE_HD inline void NoiseElement(const float* logits, const float* noise_in, int64_t e,
                                const RouteContext& ctx, int64_t i, float* eps, float* scores) {
  const auto token = static_cast<uint64_t>(ctx.token_offset + i / e);
  const float v = CounterNormal(ctx.seed, ctx.step, token, RngStream::kRouterNoise,
                                static_cast<uint64_t>(i % e));
  eps[i] = v;
  scores[i] = routing::NoisyScore(logits[i], v, noise_in[i]);
}

struct SelectArgs {
  const float* probs;
  const float* bias;  // E or null
  int64_t tokens, experts, k;
  bool random_routing;
  RouteContext ctx;
  int32_t* selected;  // S*k
  uint8_t* alive;     // S*k: not dropped by random routing
  float* key;         // S: slot 0's raw gate (the PROBABILITY priority)
  int32_t* iota;      // S: t
  Count* load;        // E: selected slots per expert
};

// Token t: its k experts, random routing's keep test, its drop-priority key, the experts' load.
MOE_HD inline void SelectToken(const SelectArgs& a, int64_t t) {
  const float* p = a.probs + t * a.experts;
  int32_t top[routing::kMaxRankedExperts];
  const auto k = static_cast<int32_t>(a.k);
  routing::RankTopExperts(p, a.bias, static_cast<int32_t>(a.experts), k, top);
  for (int32_t j = 0; j < k; ++j) {
    a.selected[t * k + j] = top[j];
    a.alive[t * k + j] = 1;
    CountOne(&a.load[top[j]]);
  }
  if (a.random_routing) {
    const double u =
        CounterUniform(a.ctx.seed, a.ctx.step, static_cast<uint64_t>(a.ctx.token_offset + t),
                       RngStream::kRoutingUniform);
    if (!routing::KeepsSecondSlot(p[top[0]], p[top[1]], u)) a.alive[t * k + 1] = 0;
  }
  a.key[t] = p[top[0]];
  a.iota[t] = static_cast<int32_t>(t);
}

// Capacity, for one (group, expert): the group's n tokens from `begin` take their slots in
// placement order — slot-major (every slot 0 before any slot 1), tokens within a slot in
// order[begin .. begin + n) (null: position order). The slot at placement index i (< k·n):
MOE_HD inline int64_t PlacementSlot(const int32_t* order, int64_t begin, int64_t n, int64_t k,
                                    int64_t i) {
  const int64_t j = i / n, at = begin + i % n;
  return (order == nullptr ? at : order[at]) * k + j;
}
// Whether that slot is live (not dropped by random routing) and picked expert e.
MOE_HD inline bool Claims(const int32_t* selected, const uint8_t* alive, int64_t slot, int32_t e) {
  return alive[slot] != 0 && selected[slot] == e;
}
// A claiming slot with `before` earlier claims gets position `before`, or -1 past capacity
// (0 = dropless); after all `claims`, the (group, expert) keeps KeptCount rows.
MOE_HD inline int32_t PositionOrDrop(int64_t before, int64_t capacity) {
  return (capacity == 0 || before < capacity) ? static_cast<int32_t>(before) : -1;
}
MOE_HD inline int32_t KeptCount(int64_t claims, int64_t capacity) {
  return static_cast<int32_t>(capacity == 0 || claims < capacity ? claims : capacity);
}

// CapacityKernel: one block of `lanes` threads per (group, expert) = `block`, walking the group's
// k·n placement slots chunk by chunk — lane l of the chunk at `base` takes placement index
// base + l — with a block-wide exclusive sum of the chunk's claims: a claim's position is `carry`
// (the claims of earlier chunks) plus its `before` in the chunk.
struct CapacityArgs {
  const int32_t* selected;
  const uint8_t* alive;
  const int32_t* order;  // PROBABILITY's drop-priority order, or null
  int64_t tokens, experts, k, groups, capacity;
  int32_t* position;            // S x k
  int32_t* group_expert_count;  // G x E
};
// The block's placement slots (k·n) and its group's first token.
MOE_HD inline int64_t CapacitySlots(const CapacityArgs& a, int64_t block, int64_t* begin) {
  const int64_t g = block / a.experts;
  *begin = routing::GroupBegin(a.tokens, a.groups, g);
  return a.k * (routing::GroupBegin(a.tokens, a.groups, g + 1) - *begin);
}
// Lane's claim at placement index i (1 or 0; 0 past the block's slots) and its slot.
MOE_HD inline int CapacityClaim(const CapacityArgs& a, int64_t block, int64_t begin, int64_t slots,
                                int64_t i, int64_t* slot) {
  *slot = -1;
  if (i >= slots) return 0;
  *slot = PlacementSlot(a.order, begin, slots / a.k, a.k, i);
  return Claims(a.selected, a.alive, *slot, static_cast<int32_t>(block % a.experts)) ? 1 : 0;
}
// A claiming lane's position after the chunk's scan; the block's kept count after the last chunk.
MOE_HD inline void CapacityPlace(const CapacityArgs& a, int64_t slot, int64_t carry,
                                 int64_t before) {
  a.position[slot] = PositionOrDrop(carry + before, a.capacity);
}
MOE_HD inline void CapacityFinish(const CapacityArgs& a, int64_t block, int64_t claims) {
  a.group_expert_count[block] = KeptCount(claims, a.capacity);
}
// The block as the device runs it, on the host: the same chunks of `lanes`, each chunk's lanes
// in lockstep — every claim first, then the exclusive sum, then every placement.
inline void CapacityBlockOnHost(const CapacityArgs& a, int64_t block, int lanes) {
  int64_t begin = 0;
  const int64_t slots = CapacitySlots(a, block, &begin);
  std::vector<int> flag(static_cast<size_t>(lanes));
  std::vector<int64_t> slot(static_cast<size_t>(lanes));
  int64_t carry = 0;
  for (int64_t base = 0; base < slots; base += lanes) {
    for (int l = 0; l < lanes; ++l) {
      flag[static_cast<size_t>(l)] =
          CapacityClaim(a, block, begin, slots, base + l, &slot[static_cast<size_t>(l)]);
    }
    int64_t before = 0;  // the exclusive sum, lane by lane
    for (int l = 0; l < lanes; ++l) {
      if (flag[static_cast<size_t>(l)]) CapacityPlace(a, slot[static_cast<size_t>(l)], carry, before);
      before += flag[static_cast<size_t>(l)];
    }
    carry += before;  // the chunk's total
  }
  CapacityFinish(a, block, carry);
}

// Row bases, in three phases (one block on the device: a thread per expert, then thread 0, then a
// thread per expert again). 1: expert e's rows per group before group g (group_base, G x E,
// relative), the counts as int64, and its total into expert_offset[e + 1].
MOE_HD inline void RowBaseOfExpert(const int32_t* counts, int64_t groups, int64_t experts,
                                   int64_t e, int64_t* group_base, int64_t* counts64,
                                   int64_t* expert_offset) {
  int64_t running = 0;
  for (int64_t g = 0; g < groups; ++g) {
    group_base[g * experts + e] = running;
    counts64[g * experts + e] = counts[g * experts + e];
    running += counts[g * experts + e];
  }
  expert_offset[e + 1] = running;
}
// 2: expert_offset (E + 1) from the totals.
MOE_HD inline void ExpertOffsets(int64_t experts, int64_t* expert_offset) {
  expert_offset[0] = 0;
  for (int64_t e = 0; e < experts; ++e) expert_offset[e + 1] += expert_offset[e];
}
// 3: group_base made absolute: expert, then group, then position.
MOE_HD inline void ShiftRowBase(int64_t groups, int64_t experts, int64_t e,
                                const int64_t* expert_offset, int64_t* group_base) {
  for (int64_t g = 0; g < groups; ++g) group_base[g * experts + e] += expert_offset[e];
}

struct GateArgs {
  const float* probs;
  const int32_t* selected;
  const int32_t* position;
  const int64_t* group_base;
  int64_t tokens, experts, k, groups;
  config::GateNormalization norm;
  float *slot_raw, *slot_gate;
  int32_t *slot_expert, *slot_row;
  int64_t* token_kept;    // S: kept slots per token
  Count *kept, *dropped;  // E
  float scale = 1.0f;     // router.scaling_factor
};

// Token t: its slots' gates and experts, the packed row of each kept slot, its kept count and the
// per-expert kept / dropped counters.
MOE_HD inline void GateToken(const GateArgs& a, int64_t t) {
  const auto k = static_cast<int32_t>(a.k);
  const int64_t first = t * k, g = routing::GroupOf(a.tokens, a.groups, t);
  uint8_t kept[routing::kMaxRankedExperts];
  for (int32_t j = 0; j < k; ++j) kept[j] = a.position[first + j] >= 0 ? 1 : 0;
  routing::TokenGates(a.norm, a.scale, k, a.probs + t * a.experts, a.selected + first, kept,
                      a.slot_raw + first, a.slot_gate + first, a.slot_expert + first);
  int64_t n = 0;
  for (int32_t j = 0; j < k; ++j) {
    const int32_t e = a.selected[first + j];
    if (kept[j] == 0) {
      a.slot_row[first + j] = -1;
      CountOne(&a.dropped[e]);
      continue;
    }
    a.slot_row[first + j] =
        static_cast<int32_t>(a.group_base[g * a.experts + e] + a.position[first + j]);
    CountOne(&a.kept[e]);
    ++n;
  }
  a.token_kept[t] = n;
}

// Token t (after token_row_offset = the exclusive scan of token_kept): its kept slots' rows in
// slot order (token_rows) and each row's token and gate.
MOE_HD inline void LayoutToken(const int32_t* slot_row, const float* slot_gate,
                               const int64_t* token_row_offset, int64_t k, int64_t t,
                               int32_t* row_token, float* row_gate, int32_t* token_rows) {
  int64_t at = token_row_offset[t];
  for (int64_t j = 0; j < k; ++j) {
    const int32_t r = slot_row[t * k + j];
    if (r < 0) continue;
    token_rows[at++] = r;
    row_token[r] = static_cast<int32_t>(t);
    row_gate[r] = slot_gate[t * k + j];
  }
}

// Expert choice (gate EXPERT_CHOICE: no noise, no selection bias, no aux loss). Each (group g,
// expert e) is a segment of the group's n tokens keyed by their prob for e — segment seg = g·E + e
// begins at GroupBegin(g)·E + e·n, so the G·E segments tile S·E keys — which a stable segmented
// sort orders by prob, descending (ties: lower token first, as BuildDispatchPlan's partial sort);
// the first min(C, n) of each are its tokens. seg = G·E gives the end, S·E.
MOE_HD inline int64_t EcSegmentBegin(int64_t tokens, int64_t groups, int64_t experts, int64_t seg) {
  const int64_t g = seg / experts, e = seg % experts;
  const int64_t b = routing::GroupBegin(tokens, groups, g);
  if (g >= groups) return b * experts;
  return b * experts + e * (routing::GroupBegin(tokens, groups, g + 1) - b);
}
// Element i = t·E + e of the S x E probs: its key and its token at its place in segment (g, e).
MOE_HD inline void EcKeyElement(const float* probs, int64_t tokens, int64_t groups, int64_t experts,
                                int64_t i, float* key, int32_t* token) {
  const int64_t t = i / experts, e = i % experts, g = routing::GroupOf(tokens, groups, t);
  const int64_t at = EcSegmentBegin(tokens, groups, experts, g * experts + e) +
                     (t - routing::GroupBegin(tokens, groups, g));
  key[at] = probs[i];
  token[at] = static_cast<int32_t>(t);
}
// Segment seg's offset (int, CUB's) and its kept count min(C, n) (C >= 1 for expert choice).
MOE_HD inline void EcSegment(int64_t tokens, int64_t groups, int64_t experts, int64_t capacity,
                             int64_t seg, int* offsets, int32_t* counts) {
  offsets[seg] = static_cast<int>(EcSegmentBegin(tokens, groups, experts, seg));
  if (seg == groups * experts) return;
  const int64_t g = seg / experts;
  const int64_t n =
      routing::GroupBegin(tokens, groups, g + 1) - routing::GroupBegin(tokens, groups, g);
  counts[seg] = static_cast<int32_t>(n < capacity ? n : capacity);
}

struct EcPlaceArgs {
  const float* probs;         // S x E
  const int32_t* sorted;      // S·E tokens, each segment by prob descending
  const int* offsets;         // G·E + 1
  const int32_t* counts;      // G·E kept per segment
  const int64_t* group_base;  // G·E first packed row (after ShiftRowBase)
  int64_t experts, capacity;
  int32_t* rank;       // S x E: position of token t with expert e, -1 if not taken (preset)
  int32_t* ec_token;   // G·E·C: DispatchPlan::ec_token (preset to -1)
  int32_t* row_token;  // rows
  float* row_gate;     // rows
};
// Position pos = i % C of segment seg = i / C (i < G·E·C): if kept, its token's rank, ec_token, and
// its packed row's token and gate (the unnormalized prob, as BuildExpertChoice).
MOE_HD inline void EcPlace(const EcPlaceArgs& a, int64_t i) {
  const int64_t seg = i / a.capacity, pos = i % a.capacity;
  if (pos >= a.counts[seg]) return;
  const int64_t e = seg % a.experts;
  const int32_t t = a.sorted[a.offsets[seg] + pos];
  a.rank[t * a.experts + e] = static_cast<int32_t>(pos);
  a.ec_token[i] = t;
  const int64_t row = a.group_base[seg] + pos;
  a.row_token[row] = t;
  a.row_gate[row] = a.probs[t * a.experts + e];
}
// Token t: how many experts took it.
MOE_HD inline int64_t EcTokenKept(const int32_t* rank, int64_t experts, int64_t t) {
  int64_t n = 0;
  for (int64_t e = 0; e < experts; ++e) n += rank[t * experts + e] >= 0 ? 1 : 0;
  return n;
}
// Token t (after token_row_offset = the exclusive scan of EcTokenKept): its rows in expert order.
MOE_HD inline void EcLayoutToken(const int32_t* rank, const int64_t* group_base,
                                 const int64_t* token_row_offset, int64_t tokens, int64_t groups,
                                 int64_t experts, int64_t t, int32_t* token_rows) {
  const int64_t g = routing::GroupOf(tokens, groups, t);
  int64_t at = token_row_offset[t];
  for (int64_t e = 0; e < experts; ++e) {
    const int32_t r = rank[t * experts + e];
    if (r >= 0) token_rows[at++] = static_cast<int32_t>(group_base[g * experts + e] + r);
  }
}

// Per-token terms of the losses' per-group sums (summed over a group's tokens, for column c).
struct ZTerm {  // logsumexp(logits[t])²
  const float* logits;
  int64_t e;
  MOE_HD double operator()(int64_t t, int64_t) const {
    const double lse = routing::LogSumExp(logits + t * e, e);
    return lse * lse;
  }
};
struct Top1Term {  // [one of t's first `slots` slots picked c] (1, or k for SWITCH_TOPK)
  const int32_t* selected;
  int64_t k;
  int64_t slots = 1;
  MOE_HD double operator()(int64_t t, int64_t c) const {
    for (int64_t j = 0; j < slots; ++j) {
      if (selected[t * k + j] == c) return 1.0;
    }
    return 0.0;
  }
};
struct ProbTerm {  // probs[t, c]
  const float* probs;
  int64_t e;
  MOE_HD double operator()(int64_t t, int64_t c) const { return probs[t * e + c]; }
};
struct ImportanceTerm {  // Σ_j [selected[t, j] = c] · g°_j
  const float* probs;
  const int32_t* selected;
  int64_t e, k;
  config::GateNormalization norm;
  MOE_HD double operator()(int64_t t, int64_t c) const {
    double v = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      if (selected[t * k + j] != c) continue;
      v += routing::PreCapacityGate(norm, static_cast<int32_t>(k), probs + t * e, selected + t * k,
                                    static_cast<int32_t>(j));
    }
    return v;
  }
};

struct BackwardArgs {
  const float *probs, *logits, *eps, *noise_in, *slot_gate, *slot_raw, *dgate_rows;
  const int32_t *selected, *slot_row;
  // Expert choice (else null): EcPlace's ranks (S x E) and the row bases (G x E); the gates'
  // gradients then come from each token's rows instead of its slots.
  const int32_t* ec_rank;
  const int64_t* group_base;
  const float* to_every_prob;  // G x E or null
  const double* dimportance;   // G x E or null
  double z_weight;
  int64_t tokens, experts, k, groups;
  config::GateNormalization norm;
  bool noisy;
  float *dprobs, *dscores, *dlogits, *dnoise;
  float scale = 1.0f;  // router.scaling_factor
};

// RouterScoreGradients for token t, in the CPU's order: gate gradients into dprobs, the z-loss
// into dlogits, the aux loss into dprobs, the softmax backward, the noise.
MOE_HD inline void RouterBackwardToken(const BackwardArgs& a, int64_t t) {
  const int64_t e = a.experts, row = t * e, first = t * a.k;
  const auto k = static_cast<int32_t>(a.k);
  const int64_t g = routing::GroupOf(a.tokens, a.groups, t);
  const int64_t n =
      routing::GroupBegin(a.tokens, a.groups, g + 1) - routing::GroupBegin(a.tokens, a.groups, g);
  float* dp = a.dprobs + row;
  float* dl = a.dlogits + row;
  for (int64_t i = 0; i < e; ++i) dp[i] = dl[i] = 0.0f;
  if (a.ec_rank != nullptr) {
    for (int64_t i = 0; i < e; ++i) {
      const int32_t r = a.ec_rank[row + i];
      if (r >= 0) dp[i] += a.dgate_rows[a.group_base[g * e + i] + r];
    }
  } else {
    routing::AddGateGradients(a.norm, a.scale, k, a.slot_row + first, a.slot_gate + first,
                              a.slot_raw + first, a.selected + first, a.dgate_rows, dp);
  }
  if (a.z_weight != 0.0) routing::AddZLossGradient(e, a.logits + row, a.z_weight, n, dl);
  if (a.to_every_prob != nullptr) {
    for (int64_t i = 0; i < e; ++i) dp[i] += a.to_every_prob[g * e + i];
  }
  if (a.dimportance != nullptr) {
    routing::AddImportanceGradient(a.norm, k, a.probs + row, a.selected + first,
                                   a.dimportance + g * e, dp);
  }
  routing::SoftmaxBackward(e, a.probs + row, dp, a.dscores + row, dl);
  if (a.noisy) {
    routing::NoiseGradient(e, a.dscores + row, a.eps + row, a.noise_in + row, a.dnoise + row);
  }
}

// DeviceRouter::Backward's per-group loss gradients, packed for one upload: 4-byte words
// [dimportance: G·E doubles | to_every_prob: G·E floats] (G·E·3 words); a part the aux loss does
// not have is left zero and its pointer is null.
struct PackedLossGradients {
  std::vector<int32_t> words;
  int64_t cells = 0;  // G·E
  bool every = false, importance = false;
  double z_weight = 0.0;
  // The parts in a copy of `words` at `base` (the host's, or the device's after the upload).
  const double* dimportance(const void* base) const {
    return importance ? static_cast<const double*>(base) : nullptr;
  }
  const float* to_every_prob(const void* base) const {
    return every ? reinterpret_cast<const float*>(static_cast<const char*>(base) +
                                                  cells * static_cast<int64_t>(sizeof(double)))
                 : nullptr;
  }
};
inline PackedLossGradients PackLossGradients(const config::RouterConfig& cfg,
                                             const std::vector<GroupLossSums>& sums,
                                             LossScale scale, int64_t experts) {
  const auto groups = static_cast<int64_t>(sums.size());
  PackedLossGradients p;
  p.cells = groups * experts;
  p.words.assign(static_cast<size_t>(p.cells * 3), 0);
  auto* dimp = reinterpret_cast<double*>(p.words.data());
  auto* every = reinterpret_cast<float*>(p.words.data() + p.cells * 2);
  for (int64_t g = 0; g < groups; ++g) {
    const GroupLossGradient grad =
        LossGradientFromSums(cfg, sums[static_cast<size_t>(g)], scale, groups);
    p.every = !grad.to_every_prob.empty();
    p.importance = !grad.dimportance.empty();
    p.z_weight = grad.z_weight;
    for (int64_t i = 0; i < experts; ++i) {
      if (p.importance) std::memcpy(dimp + g * experts + i, &grad.dimportance[i], sizeof(double));
      if (p.every) every[g * experts + i] = grad.to_every_prob[i];
    }
  }
  return p;
}

// The forward's summary, the one download per forward, in 8-byte words: int64 [expert_offset E + 1
// | counts G·E | load E | kept E | dropped E], then double [z G | top1 G·E | probs G·E |
// importance G·E]. The device zeroes it, the steps above fill it (RowBaseOfExpert writes
// expert_offset and counts, the counters load/kept/dropped, the group sums the doubles).
struct Summary {
  int64_t e, g;
  int64_t expert_offset() const { return 0; }
  int64_t counts() const { return e + 1; }
  int64_t load() const { return counts() + g * e; }
  int64_t kept() const { return load() + e; }
  int64_t dropped() const { return kept() + e; }
  int64_t z() const { return dropped() + e; }
  int64_t top1() const { return z() + g; }
  int64_t probs() const { return top1() + g * e; }
  int64_t importance() const { return probs() + g * e; }
  int64_t words() const { return importance() + g * e; }
};

// Host: the plan's counts and metrics from a downloaded summary (every field but the per-slot,
// per-row and per-token arrays, which stay on the device). Expert choice (k = 0) fills no counters
// on the device: every selected row is kept, so load and kept per expert are its rows.
inline void PlanFromSummary(const int64_t* w, const Summary& l, int64_t tokens, int64_t k,
                            int64_t capacity, config::GateNormalization norm, bool expert_choice,
                            DispatchPlan* p) {
  const int64_t e = l.e, g = l.g;
  *p = DispatchPlan();
  p->num_tokens = tokens;
  p->num_experts = e;
  p->top_k = k;
  p->num_groups = g;
  p->capacity = capacity;
  p->normalization = norm;
  p->group_begin = GroupBounds(tokens, g);
  p->expert_offset.assign(w + l.expert_offset(), w + l.expert_offset() + e + 1);
  p->group_expert_count.resize(static_cast<size_t>(g * e));
  for (int64_t i = 0; i < g * e; ++i) {
    p->group_expert_count[static_cast<size_t>(i)] = static_cast<int32_t>(w[l.counts() + i]);
  }
  p->expert_choice = expert_choice;
  if (expert_choice) {
    p->load_per_expert.resize(static_cast<size_t>(e));
    for (int64_t i = 0; i < e; ++i)
      p->load_per_expert[i] = p->expert_offset[i + 1] - p->expert_offset[i];
    p->kept_per_expert = p->load_per_expert;
    p->dropped_per_expert.assign(static_cast<size_t>(e), 0);
    return;
  }
  p->load_per_expert.assign(w + l.load(), w + l.load() + e);
  p->kept_per_expert.assign(w + l.kept(), w + l.kept() + e);
  p->dropped_per_expert.assign(w + l.dropped(), w + l.dropped() + e);
  for (int64_t v : p->dropped_per_expert) p->dropped_slots += v;
}

// Host: every group's loss sums from a downloaded summary (the aux loss's only for its kind; k
// slots per token).
inline std::vector<GroupLossSums> LossSumsFromSummary(const int64_t* w, const Summary& l,
                                                      int64_t tokens, config::AuxLossKind aux,
                                                      int64_t k) {
  const int64_t e = l.e, g = l.g;
  const auto doubles = [&](int64_t at, int64_t n) {
    std::vector<double> v(static_cast<size_t>(n));
    std::memcpy(v.data(), w + at, static_cast<size_t>(n) * sizeof(double));
    return v;
  };
  const std::vector<double> z = doubles(l.z(), g);
  std::vector<GroupLossSums> out(static_cast<size_t>(g));
  for (int64_t gr = 0; gr < g; ++gr) {
    GroupLossSums& o = out[static_cast<size_t>(gr)];
    o.tokens = routing::GroupBegin(tokens, g, gr + 1) - routing::GroupBegin(tokens, g, gr);
    o.z = z[static_cast<size_t>(gr)];
    switch (aux) {
      case config::SWITCH:
      case config::GSHARD:
      case config::SWITCH_TOPK:
        o.slots = aux == config::SWITCH_TOPK ? k : 1;
        o.top1 = doubles(l.top1() + gr * e, e);
        o.probs = doubles(l.probs() + gr * e, e);
        break;
      case config::IMPORTANCE_CV:
        o.importance = doubles(l.importance() + gr * e, e);
        break;
      case config::SEQUENCE:  // routes on the host (DeviceRouter::Supports)
      case config::NO_AUX_LOSS:
        break;
    }
  }
  return out;
}

}  // namespace moe::route_steps
