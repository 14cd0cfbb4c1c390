// The device router's steps (runtime/routing/route_steps.h) run on the CPU in the order of
// runtime/device/cuda/route.cu's kernels — sequential loops for each launch, a sequential exclusive count
// for CUB's block scan, std::stable_sort per group for CUB's stable segmented sort, sequential
// sums for its block reductions, the summary words for the download — against the CPU path:
// BuildDispatchPlan's whole plan, ComputeRouterLosses and RouterScoreGradients must come out
// identical, for 400 random routers (top-1 to top-4 of up to 12 experts, 1 to 4 groups, the three
// normalizations, both drop policies, random routing, noisy top-k, every aux loss, capacity and
// dropless, with and without the selection bias, with exact ties), and for 300 random
// expert-choice routers (per-(group, expert) segments stably sorted by prob). This checks the
// device router's index logic on every build; the GPU test checks the kernels themselves.
#include "runtime/routing/route_steps.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "runtime/config/config.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/routing/router.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

using route_steps::Count;

// What the emulated forward keeps for the backward.
struct Emulated {
  DispatchPlan plan;  // every field, as DeviceRouter::Forward + Fetch give it
  RouterLosses losses;
  std::vector<GroupLossSums> sums;
  std::vector<int32_t> selected, slot_row;
  std::vector<float> slot_gate, slot_raw;
  std::vector<int64_t> group_base;  // G x E
  std::vector<int32_t> ec_rank;     // expert choice: S x E
};

// RowBaseKernel's three phases: the row bases (G x E) returned, expert_offset and the counts into
// the summary words.
std::vector<int64_t> EmulateRowBases(const std::vector<int32_t>& counts, int64_t g, int64_t e,
                                     const route_steps::Summary& l, int64_t* words) {
  std::vector<int64_t> group_base(static_cast<size_t>(g * e));
  int64_t* expert_offset = words + l.expert_offset();
  for (int64_t ex = 0; ex < e; ++ex) {
    route_steps::RowBaseOfExpert(counts.data(), g, e, ex, group_base.data(), words + l.counts(),
                                 expert_offset);
  }
  route_steps::ExpertOffsets(e, expert_offset);
  for (int64_t ex = 0; ex < e; ++ex) {
    route_steps::ShiftRowBase(g, e, ex, expert_offset, group_base.data());
  }
  return group_base;
}

// GroupSumKernel: sequential sums per (group, column) into the summary's doubles at `at`.
template <typename Term>
void EmulateGroupSums(int64_t s, int64_t g, int64_t cols, const Term& term, int64_t* words,
                      int64_t at) {
  for (int64_t blk = 0; blk < g * cols; ++blk) {
    const int64_t gr = blk / cols, c = blk % cols;
    double v = 0.0;
    for (int64_t t = routing::GroupBegin(s, g, gr); t < routing::GroupBegin(s, g, gr + 1); ++t) {
      v += term(t, c);
    }
    std::memcpy(words + at + blk, &v, sizeof(double));
  }
}

// What Fetch derives on the host: each packed row's expert.
std::vector<int32_t> RowExperts(const DispatchPlan& p) {
  std::vector<int32_t> out(static_cast<size_t>(p.num_rows()), -1);
  for (int64_t ex = 0; ex < p.num_experts; ++ex) {
    for (int64_t r = p.expert_offset[ex]; r < p.expert_offset[ex + 1]; ++r) {
      out[r] = static_cast<int32_t>(ex);
    }
  }
  return out;
}

// The packed rows' and tokens' arrays of an emulated forward, and its row bases.
struct RowArrays {
  std::vector<int32_t> row_token;
  std::vector<float> row_gate;
  std::vector<int32_t> token_rows;
  std::vector<int64_t> token_row_offset;
  std::vector<int64_t> group_base;
};

// The host's share after the download (the plan's counts and metrics, the losses) and what Fetch
// adds: the per-row and per-token arrays.
Emulated FromDownload(const std::vector<int64_t>& words, const route_steps::Summary& l, int64_t s,
                      int64_t k, int64_t capacity, const config::RouterConfig& rc, RowArrays rows) {
  Emulated out;
  route_steps::PlanFromSummary(words.data(), l, s, k, capacity, rc.normalization(),
                               rc.gate() == config::EXPERT_CHOICE, &out.plan);
  out.sums = route_steps::LossSumsFromSummary(words.data(), l, s, rc.aux_loss(), k);
  out.losses = LossesFromSums(out.sums);
  DispatchPlan& p = out.plan;
  p.row_token = std::move(rows.row_token);
  p.row_gate = std::move(rows.row_gate);
  p.token_rows = std::move(rows.token_rows);
  p.token_row_offset = std::move(rows.token_row_offset);
  p.row_expert = RowExperts(p);
  out.group_base = std::move(rows.group_base);
  return out;
}

// The device's CapacityKernel block size (route.cu's kBlockThreads).
constexpr int kDeviceLanes = 256;

// DeviceRouter::Forward after the softmax, step by step; `lanes`: CapacityKernel's block size.
Emulated EmulateForward(const config::RouterConfig& rc, int64_t e, const RouterOutput& router,
                        const std::vector<float>& bias, const RouteContext& ctx,
                        int lanes = kDeviceLanes) {
  const int64_t s = router.probs.rows(), k = TopK(rc), g = rc.num_local_groups();
  const int64_t capacity = ComputeCapacity(rc, e, s, g, ctx.train);
  const route_steps::Summary l{e, g};
  std::vector<int64_t> words(static_cast<size_t>(l.words()), 0);
  const auto counter = [&](int64_t at) { return reinterpret_cast<Count*>(words.data() + at); };
  const float* probs = router.probs.data();

  // SelectKernel.
  std::vector<int32_t> selected(static_cast<size_t>(s * k)), iota(static_cast<size_t>(s));
  std::vector<uint8_t> alive(static_cast<size_t>(s * k));
  std::vector<float> key(static_cast<size_t>(s));
  const route_steps::SelectArgs sa{probs,
                                   bias.empty() ? nullptr : bias.data(),
                                   s,
                                   e,
                                   k,
                                   rc.random_routing(),
                                   ctx,
                                   selected.data(),
                                   alive.data(),
                                   key.data(),
                                   iota.data(),
                                   counter(l.load())};
  for (int64_t t = 0; t < s; ++t) route_steps::SelectToken(sa, t);

  // PROBABILITY: each group's tokens stably sorted by key, descending.
  std::vector<int32_t> order = iota;
  const bool by_probability = rc.drop_policy() == config::PROBABILITY;
  if (by_probability) {
    for (int64_t gr = 0; gr < g; ++gr) {
      std::stable_sort(order.begin() + routing::GroupBegin(s, g, gr),
                       order.begin() + routing::GroupBegin(s, g, gr + 1),
                       [&](int32_t a, int32_t b) { return key[a] > key[b]; });
    }
  }

  // CapacityKernel: each (group, expert) block as the device runs it — chunks of `lanes` lanes,
  // an exclusive sum per chunk — with the device's block size, and with small blocks whose chunks
  // end inside a group (the carry from chunk to chunk).
  std::vector<int32_t> position(static_cast<size_t>(s * k), -1), counts(static_cast<size_t>(g * e));
  const route_steps::CapacityArgs ca{selected.data(), alive.data(),
                                     by_probability ? order.data() : nullptr,
                                     s, e, k, g, capacity, position.data(), counts.data()};
  for (int64_t blk = 0; blk < g * e; ++blk) route_steps::CapacityBlockOnHost(ca, blk, lanes);

  const std::vector<int64_t> group_base = EmulateRowBases(counts, g, e, l, words.data());
  const int64_t* expert_offset = words.data() + l.expert_offset();

  // GateKernel, the per-token scan, LayoutKernel.
  std::vector<float> slot_raw(static_cast<size_t>(s * k)), slot_gate(static_cast<size_t>(s * k));
  std::vector<int32_t> slot_expert(static_cast<size_t>(s * k)),
      slot_row(static_cast<size_t>(s * k));
  std::vector<int64_t> token_kept(static_cast<size_t>(s));
  const route_steps::GateArgs ga{probs,
                                 selected.data(),
                                 position.data(),
                                 group_base.data(),
                                 s,
                                 e,
                                 k,
                                 g,
                                 rc.normalization(),
                                 slot_raw.data(),
                                 slot_gate.data(),
                                 slot_expert.data(),
                                 slot_row.data(),
                                 token_kept.data(),
                                 counter(l.kept()),
                                 counter(l.dropped()),
                                 static_cast<float>(rc.scaling_factor())};
  for (int64_t t = 0; t < s; ++t) route_steps::GateToken(ga, t);
  std::vector<int64_t> token_row_offset(static_cast<size_t>(s + 1), 0);
  for (int64_t t = 0; t < s; ++t) token_row_offset[t + 1] = token_row_offset[t] + token_kept[t];
  const int64_t rows = expert_offset[e];
  std::vector<int32_t> row_token(static_cast<size_t>(rows), -7),
      token_rows(static_cast<size_t>(rows), -7);
  std::vector<float> row_gate(static_cast<size_t>(rows), -7.0f);
  for (int64_t t = 0; t < s; ++t) {
    route_steps::LayoutToken(slot_row.data(), slot_gate.data(), token_row_offset.data(), k, t,
                             row_token.data(), row_gate.data(), token_rows.data());
  }

  // The losses' per-group sums.
  EmulateGroupSums(s, g, 1, route_steps::ZTerm{router.logits.data(), e}, words.data(), l.z());
  EmulateGroupSums(s, g, e, route_steps::Top1Term{selected.data(), k, rc.aux_loss() == config::SWITCH_TOPK ? k : 1}, words.data(), l.top1());
  EmulateGroupSums(s, g, e, route_steps::ProbTerm{probs, e}, words.data(), l.probs());
  EmulateGroupSums(s, g, e,
                   route_steps::ImportanceTerm{probs, selected.data(), e, k, rc.normalization()},
                   words.data(), l.importance());

  Emulated out = FromDownload(words, l, s, k, capacity, rc,
                              {row_token, row_gate, token_rows, token_row_offset, group_base});
  DispatchPlan& p = out.plan;
  p.selected = selected;
  p.slot_final = selected;
  p.slot_expert = slot_expert;
  p.slot_raw = slot_raw;
  p.slot_gate = slot_gate;
  p.slot_row = slot_row;
  out.selected = selected;
  out.slot_row = slot_row;
  out.slot_gate = slot_gate;
  out.slot_raw = slot_raw;
  return out;
}

// DeviceRouter::Forward for expert choice after the softmax, step by step.
Emulated EmulateExpertChoice(const config::RouterConfig& rc, int64_t e, const RouterOutput& router,
                             const RouteContext& ctx) {
  const int64_t s = router.probs.rows(), g = rc.num_local_groups(), segs = g * e;
  const int64_t capacity = ComputeCapacity(rc, e, s, g, ctx.train);
  const route_steps::Summary l{e, g};
  std::vector<int64_t> words(static_cast<size_t>(l.words()), 0);
  const float* probs = router.probs.data();

  // EcKeyKernel, EcSegmentKernel.
  std::vector<float> key(static_cast<size_t>(s * e), -7.0f);
  std::vector<int32_t> token(static_cast<size_t>(s * e), -7);
  for (int64_t i = 0; i < s * e; ++i) {
    route_steps::EcKeyElement(probs, s, g, e, i, key.data(), token.data());
  }
  std::vector<int> offsets(static_cast<size_t>(segs + 1), -7);
  std::vector<int32_t> counts(static_cast<size_t>(segs), -7);
  for (int64_t seg = 0; seg <= segs; ++seg) {
    route_steps::EcSegment(s, g, e, capacity, seg, offsets.data(), counts.data());
  }
  // The stable segmented sort of the (key, token) pairs, descending.
  std::vector<int32_t> sorted(static_cast<size_t>(s * e));
  for (int64_t seg = 0; seg < segs; ++seg) {
    std::vector<int64_t> at(static_cast<size_t>(offsets[seg + 1] - offsets[seg]));
    std::iota(at.begin(), at.end(), offsets[seg]);
    std::stable_sort(at.begin(), at.end(), [&](int64_t a, int64_t b) { return key[a] > key[b]; });
    for (size_t i = 0; i < at.size(); ++i) sorted[offsets[seg] + i] = token[at[i]];
  }
  const std::vector<int64_t> group_base = EmulateRowBases(counts, g, e, l, words.data());
  const int64_t rows = words[l.expert_offset() + e];

  // EcPlaceKernel, EcTokenKeptKernel, the scan, EcLayoutKernel.
  std::vector<int32_t> rank(static_cast<size_t>(s * e), -1), ec_token(segs * capacity, -1);
  std::vector<int32_t> row_token(static_cast<size_t>(rows), -7),
      token_rows(static_cast<size_t>(rows), -7);
  std::vector<float> row_gate(static_cast<size_t>(rows), -7.0f);
  const route_steps::EcPlaceArgs pa{
      probs,    sorted.data(), offsets.data(),  counts.data(),    group_base.data(), e,
      capacity, rank.data(),   ec_token.data(), row_token.data(), row_gate.data()};
  for (int64_t i = 0; i < segs * capacity; ++i) route_steps::EcPlace(pa, i);
  std::vector<int64_t> token_row_offset(static_cast<size_t>(s + 1), 0);
  for (int64_t t = 0; t < s; ++t) {
    token_row_offset[t + 1] = token_row_offset[t] + route_steps::EcTokenKept(rank.data(), e, t);
  }
  for (int64_t t = 0; t < s; ++t) {
    route_steps::EcLayoutToken(rank.data(), group_base.data(), token_row_offset.data(), s, g, e, t,
                               token_rows.data());
  }
  EmulateGroupSums(s, g, 1, route_steps::ZTerm{router.logits.data(), e}, words.data(), l.z());

  Emulated out = FromDownload(words, l, s, 0, capacity, rc,
                              {row_token, row_gate, token_rows, token_row_offset, group_base});
  out.plan.ec_token = ec_token;
  out.ec_rank = rank;
  return out;
}

// DeviceRouter::Backward: the per-group loss gradients, then one token at a time.
RouterGradients EmulateBackward(const config::RouterConfig& rc, const Emulated& f,
                                const RouterOutput& router, const std::vector<float>& dgate_rows,
                                double scale) {
  const int64_t s = router.probs.rows(), e = router.probs.cols(),
                k = rc.gate() == config::EXPERT_CHOICE ? 0 : TopK(rc), g = rc.num_local_groups();
  // The upload as the device gets it: the packed words, read through the same offsets.
  const route_steps::PackedLossGradients packed = route_steps::PackLossGradients(rc, f.sums, scale, e);
  EXPECT_EQ(static_cast<int64_t>(f.sums.size()), g);
  RouterGradients out;
  out.dprobs = Tensor(s, e);
  out.dscores = Tensor(s, e);
  out.dlogits = Tensor(s, e);
  out.dnoise = Tensor(s, e);
  const route_steps::BackwardArgs ba{
      router.probs.data(),
      router.logits.data(),
      router.noisy ? router.eps.data() : nullptr,
      router.noisy ? router.noise_in.data() : nullptr,
      f.slot_gate.data(),
      f.slot_raw.data(),
      dgate_rows.data(),
      f.selected.data(),
      f.slot_row.data(),
      f.ec_rank.empty() ? nullptr : f.ec_rank.data(),
      f.group_base.data(),
      packed.to_every_prob(packed.words.data()),
      packed.dimportance(packed.words.data()),
      packed.z_weight,
      s,
      e,
      k,
      g,
      rc.normalization(),
      router.noisy,
      out.dprobs.data(),
      out.dscores.data(),
      out.dlogits.data(),
      out.dnoise.data(),
      static_cast<float>(rc.scaling_factor())};
  for (int64_t t = 0; t < s; ++t) route_steps::RouterBackwardToken(ba, t);
  return out;
}

// Every field of the plans.
void ExpectSamePlan(const DispatchPlan& q, const DispatchPlan& p) {
  ASSERT_EQ(q.num_rows(), p.num_rows());
  EXPECT_EQ(q.num_tokens, p.num_tokens);
  EXPECT_EQ(q.num_experts, p.num_experts);
  EXPECT_EQ(q.top_k, p.top_k);
  EXPECT_EQ(q.num_groups, p.num_groups);
  EXPECT_EQ(q.capacity, p.capacity);
  EXPECT_EQ(q.expert_choice, p.expert_choice);
  EXPECT_EQ(q.normalization, p.normalization);
  EXPECT_EQ(q.group_begin, p.group_begin);
  EXPECT_EQ(q.selected, p.selected);
  EXPECT_EQ(q.slot_final, p.slot_final);
  EXPECT_EQ(q.slot_expert, p.slot_expert);
  EXPECT_EQ(q.slot_raw, p.slot_raw);
  EXPECT_EQ(q.slot_gate, p.slot_gate);
  EXPECT_EQ(q.slot_row, p.slot_row);
  EXPECT_EQ(q.expert_offset, p.expert_offset);
  EXPECT_EQ(q.group_expert_count, p.group_expert_count);
  EXPECT_EQ(q.row_token, p.row_token);
  EXPECT_EQ(q.row_expert, p.row_expert);
  EXPECT_EQ(q.row_gate, p.row_gate);
  EXPECT_EQ(q.token_row_offset, p.token_row_offset);
  EXPECT_EQ(q.token_rows, p.token_rows);
  EXPECT_EQ(q.ec_token, p.ec_token);
  EXPECT_EQ(q.kept_per_expert, p.kept_per_expert);
  EXPECT_EQ(q.dropped_per_expert, p.dropped_per_expert);
  EXPECT_EQ(q.load_per_expert, p.load_per_expert);
  EXPECT_EQ(q.dropped_slots, p.dropped_slots);
}

// The emulated device router against the CPU's plan p: the whole plan, the losses, and the
// backward (dlogits, dnoise) from random gate gradients — all identical.
void ExpectSameAsCpu(const config::RouterConfig& rc, const DispatchPlan& p,
                     const RouterOutput& router, const Emulated& got, uint64_t seed) {
  ExpectSamePlan(got.plan, p);
  const RouterLosses losses = ComputeRouterLosses(rc, p, router.probs, router.logits);
  EXPECT_EQ(got.losses.aux, losses.aux);
  EXPECT_EQ(got.losses.z, losses.z);
  Tensor dgate(1, std::max<int64_t>(p.num_rows(), 1));
  testing::FillRandom(&dgate, seed + 3000, 1.0f);
  const std::vector<float> dgate_rows(dgate.vec().begin(), dgate.vec().begin() + p.num_rows());
  RouterGradients cpu;
  RouterScoreGradients(rc, p, router, dgate_rows.data(), 0.5, &cpu);
  const RouterGradients dev = EmulateBackward(rc, got, router, dgate_rows, 0.5);
  EXPECT_EQ(dev.dlogits.vec(), cpu.dlogits.vec());
  if (router.noisy) {
    EXPECT_EQ(dev.dnoise.vec(), cpu.dnoise.vec());
  }
}

// A random valid router config (validated by ParseConfig), its expert count and whether its
// logits are quantized into exact ties.
struct RandomRouter {
  config::RouterConfig rc;
  int64_t experts, tokens;
  bool ties, bias;
};
RandomRouter MakeRandom(uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  const auto pick = [&](int64_t n) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return static_cast<int64_t>(x % static_cast<uint64_t>(n));
  };
  RandomRouter r;
  r.experts = 1 + pick(12);
  r.tokens = 1 + pick(80);
  const int64_t groups = 1 + pick(std::min<int64_t>(4, r.tokens));
  const int64_t gate = pick(3);  // TOP1, TOPK, NOISY_TOPK
  const int64_t k = gate == 0 ? 1 : 1 + pick(std::min<int64_t>(4, r.experts));
  const bool random_routing = gate != 0 && k == 2 && pick(2) == 0;
  const char* norms[] = {"NONE", "TOPK_SOFTMAX", "RENORM_AFTER_CAPACITY"};
  const char* aux[] = {"NO_AUX_LOSS", "SWITCH", "GSHARD", "IMPORTANCE_CV", "SWITCH_TOPK"};
  const char* cfs[] = {"0", "0.5", "1.0", "1.25", "2.0"};
  std::string text =
      "gate: " +
      std::string(gate == 0   ? "TOP1"
                  : gate == 1 ? "TOPK"
                              : "NOISY_TOPK") +
      " top_k: " + std::to_string(k) + " num_local_groups: " + std::to_string(groups) +
      " normalization: " + (gate == 2 ? "TOPK_SOFTMAX" : norms[pick(3)]) +
      " drop_policy: " + (pick(2) == 0 ? "POSITION" : "PROBABILITY") +
      " capacity_factor_train: " + cfs[pick(5)] + " min_capacity: " + std::to_string(pick(3)) +
      " aux_loss: " + aux[pick(5)] + " aux_loss_weight: 0.05 z_loss_weight: 0.002";
  if (pick(3) == 0) text += " scaling_factor: 2.5";
  if (random_routing) text += " random_routing: true";
  const config::LayerConfig layer = ResolvedLayerConfig(
      testing::LayerFromText("model_dim: 4 num_experts: " + std::to_string(r.experts) +
                             " expert { hidden_dim: 4 } router { " + text + " }"));
  r.rc = layer.router();
  r.ties = pick(4) == 0;
  r.bias = pick(3) == 0;
  return r;
}

TEST(RouteSteps, EmulatedDeviceRouterIsTheCpuRouter) {
  int dropped = 0, noisy = 0, probability = 0, random_routing = 0;
  for (uint64_t seed = 1; seed <= 400; ++seed) {
    const RandomRouter r = MakeRandom(seed);
    SCOPED_TRACE("seed " + std::to_string(seed) + ": E=" + std::to_string(r.experts) +
                 " S=" + std::to_string(r.tokens) + " router { " + r.rc.ShortDebugString() + " }");
    const int64_t s = r.tokens, e = r.experts;
    RouteContext ctx;
    ctx.train = true;
    ctx.seed = seed;
    ctx.step = 5;
    ctx.token_offset = 17 * static_cast<int64_t>(seed);
    RouterOutput router;
    router.logits = Tensor(s, e);
    router.noise_in = Tensor(s, e);
    testing::FillRandom(&router.logits, seed, 3.0f);
    testing::FillRandom(&router.noise_in, seed + 1000, 2.0f);
    if (r.ties) {
      for (int64_t i = 0; i < router.logits.size(); ++i)
        router.logits[i] = std::round(router.logits[i]);
    }
    FinishRouter(r.rc, ctx, &router);
    std::vector<float> bias;
    if (r.bias) {
      Tensor b(1, e);
      testing::FillRandom(&b, seed + 2000, 0.05f);
      bias = b.vec();
    }
    // The noise kernel's element function against FinishRouter's.
    if (router.noisy) {
      ++noisy;
      std::vector<float> eps(static_cast<size_t>(s * e)), scores(static_cast<size_t>(s * e));
      for (int64_t i = 0; i < s * e; ++i) {
        route_steps::NoiseElement(router.logits.data(), router.noise_in.data(), e, ctx, i,
                                  eps.data(), scores.data());
      }
      ASSERT_EQ(eps, router.eps.vec());
      Tensor probs(s, e);
      SoftmaxRows(testing::MakeTensor(s, e, scores).view(), probs.view());
      ASSERT_EQ(probs.vec(), router.probs.vec());
    }

    auto want = BuildDispatchPlan(r.rc, router.probs, bias, ctx);
    ASSERT_TRUE(want.ok()) << want.status().ToString();
    const DispatchPlan& p = *want;
    ExpectSameAsCpu(r.rc, p, router, EmulateForward(r.rc, e, router, bias, ctx), seed);
    // Blocks of 1 to 7 lanes: capacity's chunks end inside every group, the carry decides.
    const int lanes = 1 + static_cast<int>(seed % 7);
    SCOPED_TRACE("capacity blocks of " + std::to_string(lanes) + " lanes");
    ExpectSameAsCpu(r.rc, p, router, EmulateForward(r.rc, e, router, bias, ctx, lanes), seed);

    dropped += p.dropped_slots > 0;
    probability += r.rc.drop_policy() == config::PROBABILITY && p.dropped_slots > 0;
    random_routing += r.rc.random_routing();
  }
  // The random configs cover what the comparison is for.
  EXPECT_GT(dropped, 100);
  EXPECT_GT(probability, 30);
  EXPECT_GT(noisy, 60);
  EXPECT_GT(random_routing, 20);
}

// Expert choice: 300 random routers (up to 12 experts, 1 to 80 tokens in 1 to 4 groups, capacity
// factors from 0 = every token to 0.25, min_capacity, exact ties), plan, z-loss and dlogits.
TEST(RouteSteps, EmulatedDeviceExpertChoiceIsTheCpuRouter) {
  int unrouted = 0, ties = 0;
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    uint64_t x = seed * 0xD1B54A32D192ED03ull + 7;
    const auto pick = [&](int64_t n) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      return static_cast<int64_t>(x % static_cast<uint64_t>(n));
    };
    const int64_t e = 1 + pick(12), s = 1 + pick(80);
    const int64_t groups = 1 + pick(std::min<int64_t>(4, s));
    const char* cfs[] = {"0", "0.25", "0.5", "1.0", "2.0"};
    const config::RouterConfig rc =
        ResolvedLayerConfig(
            testing::LayerFromText(
                "model_dim: 4 num_experts: " + std::to_string(e) +
                " expert { hidden_dim: 4 } router { gate: EXPERT_CHOICE num_local_groups: " +
                std::to_string(groups) + " capacity_factor_train: " + cfs[pick(5)] +
                " min_capacity: " + std::to_string(pick(4)) + " z_loss_weight: 0.003 }"))
            .router();
    SCOPED_TRACE("seed " + std::to_string(seed) + ": E=" + std::to_string(e) +
                 " S=" + std::to_string(s) + " router { " + rc.ShortDebugString() + " }");
    RouteContext ctx;
    ctx.train = true;
    ctx.seed = seed;
    RouterOutput router;
    router.logits = Tensor(s, e);
    testing::FillRandom(&router.logits, seed, 3.0f);
    if (pick(3) == 0) {
      ++ties;
      for (int64_t i = 0; i < router.logits.size(); ++i)
        router.logits[i] = std::round(router.logits[i]);
    }
    FinishRouter(rc, ctx, &router);
    auto want = BuildDispatchPlan(rc, router.probs, {}, ctx);
    ASSERT_TRUE(want.ok()) << want.status().ToString();
    const DispatchPlan& p = *want;
    ASSERT_TRUE(p.expert_choice);
    ExpectSameAsCpu(rc, p, router, EmulateExpertChoice(rc, e, router, ctx), seed);
    for (int64_t t = 0; t < s; ++t) unrouted += p.token_row_offset[t + 1] == p.token_row_offset[t];
  }
  // Tight capacities leave tokens without an expert; ties exercise the lower-token rule.
  EXPECT_GT(unrouted, 500);
  EXPECT_GT(ties, 60);
}

}  // namespace
}  // namespace moe
