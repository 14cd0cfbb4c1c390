// Exact-answer tests of routing (selection, gates, capacity, drops, reroute, random routing, expert
// choice), the router losses, the aux-loss-free bias and the expert FFNs, on hand-chosen inputs.
// Semantics: docs/SEMANTICS.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "experts/expert_ffn.h"
#include "base/rng.h"
#include "runtime/config/config.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/routing/router.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

using testing::FillRandom;
using testing::LayerFromText;
using testing::MakeTensor;

// A router config for E experts from router text (validated like a real config).
config::RouterConfig RouterCfg(const std::string& router_text, int num_experts = 4) {
  return LayerFromText("model_dim: 4 num_experts: " + std::to_string(num_experts) +
                       " expert { hidden_dim: 4 } router { " + router_text + " }")
      .router();
}

// Capacity factor for both train and eval, so the context's train flag does not matter.
std::string Cf(double cf, int min_capacity = 0) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", cf);
  return std::string(" capacity_factor_train: ") + buf + " capacity_factor_eval: " + buf +
         " min_capacity: " + std::to_string(min_capacity) + " ";
}

DispatchPlan Plan(const config::RouterConfig& cfg, const Tensor& probs,
                  const std::vector<float>& bias = {}, const RouteContext& ctx = {}) {
  StatusOr<DispatchPlan> p = BuildDispatchPlan(cfg, probs, bias, ctx);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return p.ok() ? std::move(p).value() : DispatchPlan();
}

// Rows of expert e in packed order: (token, gate).
std::vector<int32_t> TokensOfExpert(const DispatchPlan& p, int e) {
  std::vector<int32_t> out;
  for (int64_t r = p.expert_offset[e]; r < p.expert_offset[e + 1]; ++r) out.push_back(p.row_token[r]);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Capacity and groups.

TEST(CapacityTest, TokenChoiceValues) {
  // C = min(S_g, max(min_capacity, ceil(k * S_g * cf / E))).
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1.25)), 4, 8, 1, true), 5);
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1.0)), 4, 8, 1, true), 4);
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1.01)), 4, 8, 1, true), 5);
  // min_capacity dominates a small capacity.
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(0.1, 4)), 4, 8, 1, true), 4);
  // With cf > 0 and min_capacity 0 the capacity is never 0: ceil of a positive number is >= 1.
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1e-12)), 4, 8, 1, true), 1);
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: TOP1" + Cf(1e-12)), 64, 1, 1, false), 1);
  // Dropless.
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(0.0, 4)), 4, 8, 1, true), 0);
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(-1.0, 4)), 4, 8, 1, false), 0);
  // TOP1 uses k = 1.
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: TOP1" + Cf(1.0)), 4, 8, 1, true), 2);
  // Capped at the group size: a huge factor or min_capacity cannot exceed S_g (8 here; 3 with G=4).
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1e6)), 4, 8, 1, true), 8);
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1e300)), 4, 8, 1, true), 8);
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1.0, 1000000)), 4, 10, 4, true), 3);
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(3.0)), 4, 8, 1, true), 8);   // 2*8*3/4 = 12 -> 8
  // S_g = ceil(S / G) for every group: S=10, G=4 -> S_g=3; 2*3*1/4 = 1.5 -> 2.
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1.0)), 4, 10, 4, true), 2);
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1.0)), 4, 12, 4, true), 2);  // S_g=3 too
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1.0)), 4, 13, 4, true), 2);  // S_g=4: 2
  EXPECT_EQ(ComputeCapacity(RouterCfg("top_k: 2" + Cf(1.0)), 4, 17, 4, true), 3);  // S_g=5: 2.5
  // Train vs eval factor.
  config::RouterConfig r = RouterCfg(
      "top_k: 1 capacity_factor_train: 1.0 capacity_factor_eval: 3.0 min_capacity: 0");
  EXPECT_EQ(ComputeCapacity(r, 4, 16, 1, true), 4);
  EXPECT_EQ(ComputeCapacity(r, 4, 16, 1, false), 12);
  config::RouterConfig d = RouterCfg(
      "top_k: 1 capacity_factor_train: 0 capacity_factor_eval: 3.0 min_capacity: 0");
  EXPECT_EQ(ComputeCapacity(d, 4, 16, 1, true), 0);
  EXPECT_EQ(ComputeCapacity(d, 4, 16, 1, false), 12);
}

TEST(CapacityTest, ExpertChoiceValues) {
  // C = max(min_capacity, ceil(S_g * cf / E)) capped at S_g; cf <= 0 -> S_g.
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: EXPERT_CHOICE" + Cf(1.0)), 4, 8, 1, true), 2);
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: EXPERT_CHOICE" + Cf(1.5)), 4, 8, 1, true), 3);
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: EXPERT_CHOICE" + Cf(0.0)), 4, 8, 1, true), 8);
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: EXPERT_CHOICE" + Cf(100.0)), 4, 8, 1, true), 8);
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: EXPERT_CHOICE" + Cf(0.1, 3)), 4, 8, 1, true), 3);
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: EXPERT_CHOICE" + Cf(0.1, 20)), 4, 8, 1, true), 8);
  EXPECT_EQ(ComputeCapacity(RouterCfg("gate: EXPERT_CHOICE" + Cf(0.0)), 4, 7, 2, true), 4);
}

TEST(GroupTest, LargerGroupsFirstAndTooFewTokens) {
  const config::RouterConfig cfg = RouterCfg("gate: TOP1 num_local_groups: 4" + Cf(0.0));
  Tensor probs(10, 4, 0.25f);
  DispatchPlan p = Plan(cfg, probs);
  EXPECT_EQ(p.group_begin, (std::vector<int64_t>{0, 3, 6, 8, 10}));
  EXPECT_EQ(p.group_size(0), 3);
  EXPECT_EQ(p.group_size(3), 2);
  Tensor few(3, 4, 0.25f);
  StatusOr<DispatchPlan> bad = BuildDispatchPlan(cfg, few, {}, {});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("S=3"), std::string::npos) << bad.status().message();
  EXPECT_NE(bad.status().message().find("moe.router.num_local_groups=4"), std::string::npos);
  StatusOr<DispatchPlan> bad_bias = BuildDispatchPlan(cfg, probs, {0.0f, 1.0f}, {});
  ASSERT_FALSE(bad_bias.ok());
  EXPECT_NE(bad_bias.status().message().find("router bias has 2 entries"), std::string::npos);
}

TEST(GroupTest, CapacityAppliesPerGroupWithUnevenGroups) {
  // S=5 in G=2 groups: sizes 3 and 2; S_g = 3; TOP1, E=4, cf=1 -> C = ceil(0.75) = 1.
  const config::RouterConfig cfg = RouterCfg("gate: TOP1 num_local_groups: 2" + Cf(1.0));
  Tensor probs(5, 4);
  for (int t = 0; t < 5; ++t) {
    probs(t, 0) = 0.7f;
    probs(t, 1) = probs(t, 2) = probs(t, 3) = 0.1f;
  }
  DispatchPlan p = Plan(cfg, probs);
  EXPECT_EQ(p.capacity, 1);
  EXPECT_EQ(p.group_begin, (std::vector<int64_t>{0, 3, 5}));
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, -1, -1, 0, -1}));
  EXPECT_EQ(TokensOfExpert(p, 0), (std::vector<int32_t>{0, 3}));
  EXPECT_EQ(p.group_expert_count[0 * 4 + 0], 1);
  EXPECT_EQ(p.group_expert_count[1 * 4 + 0], 1);
  EXPECT_EQ(p.dropped_slots, 3);
  EXPECT_EQ(p.dropped_per_expert[0], 3);
  EXPECT_EQ(p.kept_per_expert[0], 2);
  EXPECT_EQ(p.load_per_expert[0], 5);
}

// ---------------------------------------------------------------------------------------------
// Gates.

TEST(GateTest, Top1GateIsTheProbability) {
  const config::RouterConfig cfg = RouterCfg("gate: TOP1" + Cf(0.0));
  Tensor probs = MakeTensor(2, 4, {0.1f, 0.6f, 0.2f, 0.1f, 0.3f, 0.1f, 0.1f, 0.5f});
  DispatchPlan p = Plan(cfg, probs);
  EXPECT_EQ(p.top_k, 1);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(p.slot_gate, (std::vector<float>{0.6f, 0.5f}));
  EXPECT_EQ(p.dropped_slots, 0);
}

TEST(GateTest, TiesGoToTheLowerExpert) {
  const config::RouterConfig cfg = RouterCfg("top_k: 2" + Cf(0.0));
  Tensor probs = MakeTensor(2, 4, {0.25f, 0.25f, 0.25f, 0.25f, 0.1f, 0.3f, 0.3f, 0.3f});
  DispatchPlan p = Plan(cfg, probs);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, 1, 1, 2}));
}

// Two tokens, k=2, C=1: token 1's 2nd slot (expert 1) is dropped because token 0 took expert 1.
struct TwoTokenCase {
  Tensor probs = MakeTensor(2, 4, {0.5f, 0.25f, 0.125f, 0.125f, 0.125f, 0.25f, 0.5f, 0.125f});
};

TEST(GateTest, TopKNormalizationsWithADrop) {
  TwoTokenCase c;
  for (auto norm : {config::NONE, config::TOPK_SOFTMAX, config::RENORM_AFTER_CAPACITY}) {
    SCOPED_TRACE(config::GateNormalization_Name(norm));
    const config::RouterConfig cfg = RouterCfg(
        "top_k: 2 normalization: " + config::GateNormalization_Name(norm) + Cf(1.0));
    DispatchPlan p = Plan(cfg, c.probs);
    ASSERT_EQ(p.capacity, 1);
    EXPECT_EQ(p.selected, (std::vector<int32_t>{0, 1, 2, 1}));
    EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, 1, 2, -1}));
    EXPECT_EQ(p.slot_raw, (std::vector<float>{0.5f, 0.25f, 0.5f, 0.25f}));
    EXPECT_EQ(p.dropped_slots, 1);
    EXPECT_EQ(p.dropped_per_expert, (std::vector<int64_t>{0, 1, 0, 0}));
    EXPECT_EQ(p.kept_per_expert, (std::vector<int64_t>{1, 1, 1, 0}));
    EXPECT_EQ(p.load_per_expert, (std::vector<int64_t>{1, 2, 1, 0}));
    EXPECT_EQ(p.slot_row[3], -1);
    EXPECT_EQ(p.slot_gate[3], 0.0f);
    switch (norm) {
      case config::NONE:
        EXPECT_EQ(p.slot_gate, (std::vector<float>{0.5f, 0.25f, 0.5f, 0.0f}));
        break;
      case config::TOPK_SOFTMAX:  // the dropped slot keeps its share of the denominator
        EXPECT_EQ(p.slot_gate,
                  (std::vector<float>{0.5f / 0.75f, 0.25f / 0.75f, 0.5f / 0.75f, 0.0f}));
        break;
      default:  // the surviving gate of token 1 becomes 1
        EXPECT_EQ(p.slot_gate, (std::vector<float>{0.5f / 0.75f, 0.25f / 0.75f, 1.0f, 0.0f}));
        break;
    }
    // Packed rows: expert-major; the row of each kept slot holds its token and gate.
    EXPECT_EQ(p.row_token, (std::vector<int32_t>{0, 0, 1}));
    EXPECT_EQ(p.row_expert, (std::vector<int32_t>{0, 1, 2}));
    for (int s = 0; s < 4; ++s) {
      if (p.slot_row[s] < 0) continue;
      EXPECT_EQ(p.row_gate[p.slot_row[s]], p.slot_gate[s]);
      EXPECT_EQ(p.row_token[p.slot_row[s]], s / 2);
    }
  }
}

TEST(GateTest, KEqualsNumExperts) {
  const config::RouterConfig cfg = RouterCfg("top_k: 4" + Cf(0.0));
  Tensor probs = MakeTensor(1, 4, {0.125f, 0.5f, 0.125f, 0.25f});
  DispatchPlan p = Plan(cfg, probs);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{1, 3, 0, 2}));
  EXPECT_EQ(p.slot_gate, (std::vector<float>{0.5f, 0.25f, 0.125f, 0.125f}));
  // With capacity: every expert gets one token of this 1-token group.
  const config::RouterConfig cap = RouterCfg("top_k: 4 normalization: TOPK_SOFTMAX" + Cf(1.0));
  DispatchPlan q = Plan(cap, probs);
  EXPECT_EQ(q.capacity, 1);
  EXPECT_EQ(q.dropped_slots, 0);
  EXPECT_EQ(q.slot_gate, (std::vector<float>{0.5f, 0.25f, 0.125f, 0.125f}));
}

// ---------------------------------------------------------------------------------------------
// Capacity and drop priority.

TEST(DropTest, SlotMajorPriority) {
  // C=2 (S=3, k=2, E=4, cf=1). Token 0's 2nd choice (expert 0) comes after every 1st choice, so
  // tokens 1 and 2 (1st choice expert 0) fill expert 0 and token 0's 2nd slot is dropped.
  const config::RouterConfig cfg = RouterCfg("top_k: 2" + Cf(1.0));
  Tensor probs = MakeTensor(3, 4, {0.375f, 0.5f, 0.0625f, 0.0625f,  //
                                   0.5f, 0.25f, 0.125f, 0.125f,     //
                                   0.5f, 0.125f, 0.25f, 0.125f});
  DispatchPlan p = Plan(cfg, probs);
  ASSERT_EQ(p.capacity, 2);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{1, -1, 0, 1, 0, 2}));
  EXPECT_EQ(p.row_token, (std::vector<int32_t>{1, 2, 0, 1, 2}));
  EXPECT_EQ(p.row_expert, (std::vector<int32_t>{0, 0, 1, 1, 2}));
  EXPECT_EQ(p.expert_offset, (std::vector<int64_t>{0, 2, 4, 5, 5}));
  EXPECT_EQ(p.slot_row, (std::vector<int32_t>{2, -1, 0, 3, 1, 4}));
  EXPECT_EQ(p.token_row_offset, (std::vector<int64_t>{0, 1, 3, 5}));
  EXPECT_EQ(p.token_rows, (std::vector<int32_t>{2, 0, 3, 1, 4}));
}

TEST(DropTest, AllTokensToOneExpertPositionVsProbability) {
  // TOP1, S=6, E=4, cf=1 -> C=2. Every token picks expert 0.
  const std::vector<float> p0 = {0.4f, 0.7f, 0.5f, 0.9f, 0.6f, 0.3f};
  Tensor probs(6, 4);
  for (int t = 0; t < 6; ++t) {
    probs(t, 0) = p0[t];
    for (int e = 1; e < 4; ++e) probs(t, e) = (1.0f - p0[t]) / 3.0f * (p0[t] > 0.35f ? 1.0f : 0.5f);
  }
  for (int t = 0; t < 6; ++t) ASSERT_GT(probs(t, 0), probs(t, 1));
  {
    DispatchPlan p = Plan(RouterCfg("gate: TOP1 drop_policy: POSITION" + Cf(1.0)), probs);
    ASSERT_EQ(p.capacity, 2);
    EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, 0, -1, -1, -1, -1}));
    EXPECT_EQ(TokensOfExpert(p, 0), (std::vector<int32_t>{0, 1}));
    EXPECT_EQ(p.dropped_slots, 4);
    EXPECT_EQ(p.dropped_per_expert[0], 4);
    EXPECT_EQ(p.kept_per_expert[0], 2);
  }
  {
    DispatchPlan p = Plan(RouterCfg("gate: TOP1 drop_policy: PROBABILITY" + Cf(1.0)), probs);
    // The two highest top-1 probabilities (token 3: 0.9, token 1: 0.7), in that order.
    EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{-1, 0, -1, 0, -1, -1}));
    EXPECT_EQ(TokensOfExpert(p, 0), (std::vector<int32_t>{3, 1}));
    EXPECT_EQ(p.dropped_slots, 4);
  }
  {
    // Capacity 1.
    DispatchPlan p = Plan(RouterCfg("gate: TOP1 drop_policy: PROBABILITY" + Cf(0.5)), probs);
    ASSERT_EQ(p.capacity, 1);
    EXPECT_EQ(TokensOfExpert(p, 0), (std::vector<int32_t>{3}));
    DispatchPlan q = Plan(RouterCfg("gate: TOP1 drop_policy: POSITION" + Cf(0.5)), probs);
    EXPECT_EQ(TokensOfExpert(q, 0), (std::vector<int32_t>{0}));
  }
}

TEST(DropTest, ProbabilityOrdersLaterSlotsBySlotZeroGate) {
  // C=1. Token 1 has the larger slot-0 gate (0.6 > 0.4), so it gets expert 1 in slot 1 although
  // its slot-1 probability (0.3) is below token 0's (0.35).
  Tensor probs = MakeTensor(2, 4, {0.4f, 0.35f, 0.15f, 0.1f, 0.05f, 0.3f, 0.6f, 0.05f});
  DispatchPlan p = Plan(RouterCfg("top_k: 2 drop_policy: PROBABILITY" + Cf(1.0)), probs);
  ASSERT_EQ(p.capacity, 1);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, -1, 2, 1}));
  DispatchPlan q = Plan(RouterCfg("top_k: 2 drop_policy: POSITION" + Cf(1.0)), probs);
  EXPECT_EQ(q.slot_expert, (std::vector<int32_t>{0, 1, 2, -1}));
}

TEST(DropTest, ProbabilityTiesKeepPosition) {
  Tensor probs(4, 4, 0.1f);
  for (int t = 0; t < 4; ++t) probs(t, 2) = 0.7f;
  DispatchPlan p = Plan(RouterCfg("gate: TOP1 drop_policy: PROBABILITY" + Cf(1.0, 2)), probs);
  ASSERT_EQ(p.capacity, 2);
  EXPECT_EQ(TokensOfExpert(p, 2), (std::vector<int32_t>{0, 1}));
}

TEST(DropTest, TokenOrderAndExpertScoreIgnoreTheSlotIndex) {
  // S=4, k=2, E=4, cf=1 -> C=2. Selections: t0 (1, 0), t1 (0, 2), t2 (0, 1), t3 (3, 0): expert 0
  // is claimed by t0 slot 1 (score 0.45), t1 slot 0 (0.5), t2 slot 0 (0.4), t3 slot 1 (0.48).
  Tensor probs = MakeTensor(4, 4, {0.45f, 0.5f, 0.03f, 0.02f,  //
                                   0.5f, 0.02f, 0.45f, 0.03f,  //
                                   0.4f, 0.35f, 0.03f, 0.22f,  //
                                   0.48f, 0.02f, 0.0f, 0.5f});
  const std::string k2 = "top_k: 2" + Cf(1.0);
  // POSITION: slot-major, both slot-0 claims (t1, t2) first.
  DispatchPlan pos = Plan(RouterCfg(k2 + " drop_policy: POSITION"), probs);
  ASSERT_EQ(pos.capacity, 2);
  EXPECT_EQ(pos.slot_expert, (std::vector<int32_t>{1, -1, 0, 2, 0, 1, 3, -1}));
  EXPECT_EQ(TokensOfExpert(pos, 0), (std::vector<int32_t>{1, 2}));
  // TOKEN_ORDER: the first two claims in token order (t0's slot 1, t1's slot 0).
  DispatchPlan tok = Plan(RouterCfg(k2 + " drop_policy: TOKEN_ORDER"), probs);
  EXPECT_EQ(tok.slot_expert, (std::vector<int32_t>{1, 0, 0, 2, -1, 1, 3, -1}));
  EXPECT_EQ(TokensOfExpert(tok, 0), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(tok.dropped_slots, 2);
  EXPECT_EQ(tok.dropped_per_expert, (std::vector<int64_t>{2, 0, 0, 0}));
  // EXPERT_SCORE: the two largest scores (t1 0.5, t3 0.48), positions in token order.
  DispatchPlan sc = Plan(RouterCfg(k2 + " drop_policy: EXPERT_SCORE"), probs);
  EXPECT_EQ(sc.slot_expert, (std::vector<int32_t>{1, -1, 0, 2, -1, 1, 3, 0}));
  EXPECT_EQ(TokensOfExpert(sc, 0), (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(sc.slot_row, (std::vector<int32_t>{2, -1, 0, 4, -1, 3, 5, 1}));
  // Dropless: every claim kept, in token order.
  DispatchPlan all = Plan(RouterCfg("top_k: 2 drop_policy: EXPERT_SCORE" + Cf(0.0)), probs);
  EXPECT_EQ(TokensOfExpert(all, 0), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(all.dropped_slots, 0);
}

TEST(DropTest, ExpertScoreTiesGoToTheLowerToken) {
  Tensor probs(4, 4, 0.1f);
  for (int t = 0; t < 4; ++t) probs(t, 2) = 0.7f;
  DispatchPlan p = Plan(RouterCfg("gate: TOP1 drop_policy: EXPERT_SCORE" + Cf(1.0, 2)), probs);
  ASSERT_EQ(p.capacity, 2);
  EXPECT_EQ(TokensOfExpert(p, 2), (std::vector<int32_t>{0, 1}));
}

TEST(GroupLimitedTest, ExpertsComeFromAtMostGroupsPerTokenGroups) {
  // Random probs and biases over shapes (E, groups, per token, k); the plan's selection equals a
  // brute force of docs/SEMANTICS.md's group-limited top-k (sort the groups by the sum of their top k/per-token scores, keep
  // the best, sort their experts) and spans at most `per token` groups.
  struct Shape { int e, groups, per_token, k; };
  const Shape shapes[] = {{4, 2, 1, 2}, {8, 4, 2, 4}, {8, 4, 1, 2}, {12, 3, 2, 2}, {16, 8, 3, 6},
                          {16, 4, 4, 8}, {6, 6, 2, 2}, {8, 2, 2, 1 * 2}};
  int checked = 0;
  for (const Shape& sh : shapes) {
    for (uint64_t seed = 1; seed <= 40; ++seed) {
      const int s = 9;
      Tensor probs(s, sh.e);
      FillRandom(&probs, seed * 31 + sh.e, 1.0f);
      if (seed % 4 == 0) {  // exact ties
        for (int64_t i = 0; i < probs.size(); ++i) probs[i] = std::round(probs[i] * 2.0f) / 2.0f;
      }
      std::vector<float> bias;
      if (seed % 3 == 0) {
        Tensor b(1, sh.e);
        FillRandom(&b, seed + 500, 0.2f);
        bias = b.vec();
      }
      const config::RouterConfig cfg = RouterCfg(
          "top_k: " + std::to_string(sh.k) + " num_expert_groups: " + std::to_string(sh.groups) +
              " groups_per_token: " + std::to_string(sh.per_token) + Cf(0.0),
          sh.e);
      const DispatchPlan p = Plan(cfg, probs, bias);
      const int size = sh.e / sh.groups, m = sh.k / sh.per_token;
      for (int t = 0; t < s; ++t) {
        std::vector<float> sc(sh.e);
        for (int j = 0; j < sh.e; ++j) sc[j] = probs(t, j) + (bias.empty() ? 0.0f : bias[j]);
        const auto better = [&](int a, int b) { return sc[a] > sc[b] || (sc[a] == sc[b] && a < b); };
        std::vector<float> gscore(sh.groups);
        for (int g = 0; g < sh.groups; ++g) {
          std::vector<int> in(size);
          for (int i = 0; i < size; ++i) in[i] = g * size + i;
          std::sort(in.begin(), in.end(), better);
          float acc = 0.0f;
          for (int i = 0; i < m; ++i) acc += sc[in[i]];
          gscore[g] = acc;
        }
        std::vector<int> gorder(sh.groups);
        for (int g = 0; g < sh.groups; ++g) gorder[g] = g;
        std::sort(gorder.begin(), gorder.end(), [&](int a, int b) {
          return gscore[a] > gscore[b] || (gscore[a] == gscore[b] && a < b);
        });
        std::vector<int> allowed;
        for (int i = 0; i < sh.per_token; ++i)
          for (int j = 0; j < size; ++j) allowed.push_back(gorder[i] * size + j);
        std::sort(allowed.begin(), allowed.end(), better);
        std::vector<int32_t> want(allowed.begin(), allowed.begin() + sh.k);
        std::vector<int32_t> got(p.selected.begin() + t * sh.k, p.selected.begin() + (t + 1) * sh.k);
        ASSERT_EQ(got, want) << "E=" << sh.e << " groups=" << sh.groups << " seed " << seed
                             << " token " << t;
        std::vector<int> used;
        for (int32_t ex : got) {
          if (std::find(used.begin(), used.end(), ex / size) == used.end()) used.push_back(ex / size);
        }
        EXPECT_LE(static_cast<int>(used.size()), sh.per_token);
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 8 * 40 * 9);
}

TEST(ReplayTest, ReplayedSelectionReplacesTopKAndIsChecked) {
  // Probs pick (1, 0) and (0, 2); the replay says (3, 2) and (1, 0). Gates from the probs of the
  // replayed experts; capacity applies as usual.
  Tensor probs = MakeTensor(2, 4, {0.375f, 0.5f, 0.0625f, 0.0625f, 0.5f, 0.125f, 0.25f, 0.125f});
  const config::RouterConfig cfg = RouterCfg("top_k: 2 normalization: TOPK_SOFTMAX" + Cf(0.0));
  const std::vector<int32_t> replay = {3, 2, 1, 0};
  RouteContext ctx;
  ctx.replay_selected = replay.data();
  DispatchPlan p = Plan(cfg, probs, {}, ctx);
  EXPECT_EQ(p.selected, replay);
  EXPECT_EQ(p.slot_expert, replay);
  EXPECT_FLOAT_EQ(p.slot_gate[0], 0.0625f / 0.125f);
  EXPECT_FLOAT_EQ(p.slot_gate[2], 0.125f / 0.625f);
  for (const std::vector<int32_t>& bad :
       {std::vector<int32_t>{4, 0, 1, 0}, std::vector<int32_t>{1, 1, 1, 0},
        std::vector<int32_t>{-1, 0, 1, 0}}) {
    ctx.replay_selected = bad.data();
    StatusOr<DispatchPlan> q = BuildDispatchPlan(cfg, probs, {}, ctx);
    ASSERT_FALSE(q.ok());
    EXPECT_NE(q.status().ToString().find("router replay: token 0"), std::string::npos)
        << q.status().ToString();
  }
}

TEST(GateTest, SigmoidScoresAndScalingFactor) {
  // Logits (0, ln 3, -ln 3): s = (0.5, 0.75, 0.25). Top-2: experts 1, 0.
  config::LayerConfig layer = LayerFromText(
      "model_dim: 4 num_experts: 3 expert { hidden_dim: 4 } router { score_function: SIGMOID "
      "top_k: 2 normalization: TOPK_SOFTMAX scaling_factor: 2.5" + Cf(0.0) + "}");
  RouterOutput r;
  r.logits = MakeTensor(1, 3, {0.0f, std::log(3.0f), -std::log(3.0f)});
  FinishRouter(layer.router(), RouteContext{}, &r);
  EXPECT_EQ(r.probs(0, 0), 0.5f);
  EXPECT_FLOAT_EQ(r.probs(0, 1), 0.75f);
  EXPECT_FLOAT_EQ(r.probs(0, 2), 0.25f);
  DispatchPlan p = Plan(layer.router(), r.probs);
  EXPECT_EQ(p.selected, (std::vector<int32_t>{1, 0}));
  // Gates over the selected sum 1.25, times 2.5: 1.5 and 1.0.
  EXPECT_FLOAT_EQ(p.slot_gate[0], 1.5f);
  EXPECT_FLOAT_EQ(p.slot_gate[1], 1.0f);
}

TEST(RerouteTest, OverflowGoesToNextRankedExpertWithRoom) {
  // k=2, E=4, S=3, cf=0.5 -> C=1. All tokens rank experts 0,1,2,3.
  Tensor probs(3, 4);
  for (int t = 0; t < 3; ++t) {
    probs(t, 0) = 0.4f;
    probs(t, 1) = 0.3f;
    probs(t, 2) = 0.2f;
    probs(t, 3) = 0.1f;
  }
  for (auto norm : {config::NONE, config::TOPK_SOFTMAX, config::RENORM_AFTER_CAPACITY}) {
    SCOPED_TRACE(config::GateNormalization_Name(norm));
    DispatchPlan p = Plan(RouterCfg("top_k: 2 reroute_overflow: true normalization: " +
                                    config::GateNormalization_Name(norm) + Cf(0.5)),
                          probs);
    ASSERT_EQ(p.capacity, 1);
    // Slot 0: t0->0, t1->0 full->2, t2->0 full, 2 full ->3. Slot 1: t0->1; t1->1 full, candidates
    // 2 (used by t1) and 3 (full): dropped; t2->1 full, 2 full, 3 used: dropped.
    EXPECT_EQ(p.selected, (std::vector<int32_t>{0, 1, 0, 1, 0, 1}));
    EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, 1, 2, -1, 3, -1}));
    EXPECT_EQ(p.slot_final, (std::vector<int32_t>{0, 1, 2, 1, 3, 1}));
    EXPECT_EQ(p.slot_raw, (std::vector<float>{0.4f, 0.3f, 0.2f, 0.3f, 0.1f, 0.3f}));
    EXPECT_EQ(p.kept_per_expert, (std::vector<int64_t>{1, 1, 1, 1}));
    EXPECT_EQ(p.dropped_slots, 2);
    EXPECT_EQ(p.load_per_expert, (std::vector<int64_t>{3, 3, 0, 0}));
    const float t1 = norm == config::NONE ? 0.2f
                     : norm == config::TOPK_SOFTMAX ? 0.2f / (0.2f + 0.3f)
                                                    : 1.0f;
    const float t2 = norm == config::NONE ? 0.1f
                     : norm == config::TOPK_SOFTMAX ? 0.1f / (0.1f + 0.3f)
                                                    : 1.0f;
    EXPECT_EQ(p.slot_gate[2], t1);
    EXPECT_EQ(p.slot_gate[4], t2);
  }
}

TEST(RerouteTest, NeverToAnExpertTheTokenAlreadyUses) {
  // E=3, k=2, S=3, cf=1 -> C=2. Tokens 0,1 fill experts 0 and 1. Token 2's slot 0 goes 0 -> 2;
  // its slot 1 (expert 1, full) cannot go to 2 (already used by slot 0), although 2 has room.
  Tensor probs(3, 3);
  for (int t = 0; t < 3; ++t) {
    probs(t, 0) = 0.5f;
    probs(t, 1) = 0.3f;
    probs(t, 2) = 0.2f;
  }
  DispatchPlan p = Plan(RouterCfg("top_k: 2 reroute_overflow: true" + Cf(1.0), 3), probs);
  ASSERT_EQ(p.capacity, 2);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, 1, 0, 1, 2, -1}));
  EXPECT_EQ(p.group_expert_count, (std::vector<int32_t>{2, 2, 1}));
  // Without reroute token 2 loses both slots.
  DispatchPlan q = Plan(RouterCfg("top_k: 2" + Cf(1.0), 3), probs);
  EXPECT_EQ(q.slot_expert, (std::vector<int32_t>{0, 1, 0, 1, -1, -1}));
}

TEST(RerouteTest, RankingUsesTheBias) {
  // TOP1-like k=1, E=4, C=1 with 2 tokens: the 2nd token overflows expert 0 and goes to the next
  // expert by probs + bias: expert 3 (0.1 + 0.5) rather than expert 1 (0.3).
  Tensor probs = MakeTensor(2, 4, {0.4f, 0.3f, 0.2f, 0.1f, 0.4f, 0.3f, 0.2f, 0.1f});
  const std::vector<float> bias = {0.5f, 0.0f, 0.0f, 0.5f};
  DispatchPlan p = Plan(RouterCfg("top_k: 1 reroute_overflow: true" + Cf(1.0)), probs, bias);
  ASSERT_EQ(p.capacity, 1);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, 3}));
  EXPECT_EQ(p.slot_gate, (std::vector<float>{0.4f, 0.1f}));  // unbiased probs
}

// ---------------------------------------------------------------------------------------------
// Random routing.

// s tokens over 4 experts: expert 0 first (0.5), expert 1 second with a gate rising from 0.17 to
// 0.45 over the tokens, the rest split between experts 2 and 3.
Tensor SecondGateRamp(int s) {
  Tensor probs(s, 4);
  for (int t = 0; t < s; ++t) {
    const float r1 = 0.17f + 0.28f * static_cast<float>(t) / static_cast<float>(s);
    probs(t, 0) = 0.5f;
    probs(t, 1) = r1;
    probs(t, 2) = probs(t, 3) = (0.5f - r1) / 2.0f;
  }
  return probs;
}

TEST(RandomRoutingTest, SecondSlotKeptIffUniformBelowTwiceG2) {
  const int s = 48;
  const Tensor probs = SecondGateRamp(s);
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = 42;
  ctx.step = 7;
  ctx.token_offset = 100;
  std::vector<bool> keep(s);
  int kept = 0;
  for (int t = 0; t < s; ++t) {
    const float g2 = probs(t, 1) / (probs(t, 0) + probs(t, 1));
    const double u = CounterUniform(42, 7, static_cast<uint64_t>(100 + t), RngStream::kRoutingUniform);
    keep[t] = u < 2.0 * static_cast<double>(g2);
    kept += keep[t] ? 1 : 0;
  }
  ASSERT_GT(kept, 0);
  ASSERT_LT(kept, s);  // both outcomes occur, so the test can tell them apart
  for (auto norm : {config::NONE, config::TOPK_SOFTMAX, config::RENORM_AFTER_CAPACITY}) {
    SCOPED_TRACE(config::GateNormalization_Name(norm));
    DispatchPlan p = Plan(RouterCfg("top_k: 2 random_routing: true normalization: " +
                                    config::GateNormalization_Name(norm) + Cf(0.0)),
                          probs, {}, ctx);
    for (int t = 0; t < s; ++t) {
      EXPECT_EQ(p.slot_expert[2 * t], 0);
      EXPECT_EQ(p.slot_expert[2 * t + 1], keep[t] ? 1 : -1) << t;
      const float r0 = probs(t, 0), r1 = probs(t, 1);
      float g0 = r0;
      if (norm == config::TOPK_SOFTMAX) g0 = r0 / (r0 + r1);
      if (norm == config::RENORM_AFTER_CAPACITY) g0 = keep[t] ? r0 / (r0 + r1) : 1.0f;
      EXPECT_EQ(p.slot_gate[2 * t], g0) << t;
    }
    EXPECT_EQ(p.dropped_slots, s - kept);
    EXPECT_EQ(p.dropped_per_expert[1], s - kept);
    EXPECT_EQ(p.load_per_expert[1], s);  // load counts selected slots before drops
  }
  // A different offset gives different draws (tokens are keyed by their global index).
  RouteContext other = ctx;
  other.token_offset = 0;
  DispatchPlan a = Plan(RouterCfg("top_k: 2 random_routing: true" + Cf(0.0)), probs, {}, ctx);
  DispatchPlan b = Plan(RouterCfg("top_k: 2 random_routing: true" + Cf(0.0)), probs, {}, other);
  EXPECT_NE(a.slot_expert, b.slot_expert);
}

TEST(RandomRoutingTest, DroppedSlotsTakeNoCapacityAndAreNotRerouted) {
  const int s = 48;
  const Tensor probs = SecondGateRamp(s);
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = 9;
  ctx.step = 1;
  int kept = 0;
  int first_drop = -1, last_keep = -1;
  for (int t = 0; t < s; ++t) {
    const float g2 = probs(t, 1) / (probs(t, 0) + probs(t, 1));
    const bool k = CounterUniform(9, 1, static_cast<uint64_t>(t), RngStream::kRoutingUniform) <
                   2.0 * static_cast<double>(g2);
    kept += k;
    if (k) last_keep = t;
    if (!k && first_drop < 0) first_drop = t;
  }
  ASSERT_GE(first_drop, 0);
  ASSERT_LT(first_drop, last_keep);  // a random-routing drop precedes a kept 2nd slot
  // C = kept exactly: every random-routing survivor fits in expert 1 only if the dropped ones
  // took no capacity.
  for (bool reroute : {false, true}) {
    DispatchPlan p = Plan(RouterCfg(std::string("top_k: 2 random_routing: true reroute_overflow: ") +
                                    (reroute ? "true" : "false") + Cf(1e-9, kept)),
                          probs, {}, ctx);
    ASSERT_EQ(p.capacity, kept);
    EXPECT_EQ(p.kept_per_expert[1], kept);
    int second_kept = 0;
    for (int t = 0; t < s; ++t) second_kept += p.slot_expert[2 * t + 1] >= 0;
    EXPECT_EQ(second_kept, kept) << "reroute=" << reroute;
  }
}

// ---------------------------------------------------------------------------------------------
// Expert choice.

TEST(ExpertChoiceTest, EachExpertTakesItsTopCTokens) {
  const config::RouterConfig cfg = RouterCfg("gate: EXPERT_CHOICE" + Cf(1.0), 3);
  Tensor probs = MakeTensor(6, 3, {0.5f, 0.25f, 0.25f,     //
                                   0.25f, 0.5f, 0.25f,     //
                                   0.5f, 0.25f, 0.25f,     //
                                   0.125f, 0.125f, 0.75f,  //
                                   0.6f, 0.2f, 0.2f,       //
                                   0.25f, 0.25f, 0.5f});
  DispatchPlan p = Plan(cfg, probs);
  ASSERT_TRUE(p.expert_choice);
  ASSERT_EQ(p.capacity, 2);
  // Expert 0: token 4 (0.6), then the tie 0.5 of tokens 0 and 2 -> token 0.
  // Expert 1: token 1 (0.5), then the tie 0.25 of tokens 0, 2, 5 -> token 0.
  // Expert 2: token 3 (0.75), token 5 (0.5).
  EXPECT_EQ(p.ec_token, (std::vector<int32_t>{4, 0, 1, 0, 3, 5}));
  EXPECT_EQ(p.row_token, (std::vector<int32_t>{4, 0, 1, 0, 3, 5}));
  EXPECT_EQ(p.row_gate, (std::vector<float>{0.6f, 0.5f, 0.5f, 0.25f, 0.75f, 0.5f}));
  EXPECT_EQ(p.kept_per_expert, (std::vector<int64_t>{2, 2, 2}));
  // Token 0's rows in expert order; token 2 taken by nobody.
  EXPECT_EQ(p.token_row_offset, (std::vector<int64_t>{0, 2, 3, 3, 4, 5, 6}));
  EXPECT_EQ(p.token_rows, (std::vector<int32_t>{1, 3, 2, 4, 0, 5}));
}

TEST(ExpertChoiceTest, SmallerGroupPadsWithMinusOne) {
  // S=7, G=2: groups of 4 and 3; S_g = 4; cf=3, E=3 -> C = min(4, ceil(4)) = 4.
  const config::RouterConfig cfg = RouterCfg("gate: EXPERT_CHOICE num_local_groups: 2" + Cf(3.0), 3);
  Tensor probs(7, 3);
  const float v[7] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.3f, 0.4f};
  for (int t = 0; t < 7; ++t) {
    probs(t, 0) = v[t];
    probs(t, 1) = 0.5f * (1 - v[t]);
    probs(t, 2) = 0.5f * (1 - v[t]);
  }
  DispatchPlan p = Plan(cfg, probs);
  ASSERT_EQ(p.capacity, 4);
  ASSERT_EQ(p.ec_token.size(), 2u * 3u * 4u);
  // Group 0, expert 0: all four tokens by prob descending.
  EXPECT_EQ(std::vector<int32_t>(p.ec_token.begin(), p.ec_token.begin() + 4),
            (std::vector<int32_t>{3, 2, 1, 0}));
  // Group 1 (tokens 4..6), expert 0: 4 (0.5), 6 (0.4), 5 (0.3), then -1.
  EXPECT_EQ(std::vector<int32_t>(p.ec_token.begin() + 12, p.ec_token.begin() + 16),
            (std::vector<int32_t>{4, 6, 5, -1}));
  // Group 1, expert 1: 5 (0.35), 6 (0.3), 4 (0.25), -1. Expert 2 the same.
  EXPECT_EQ(std::vector<int32_t>(p.ec_token.begin() + 16, p.ec_token.begin() + 20),
            (std::vector<int32_t>{5, 6, 4, -1}));
  EXPECT_EQ(p.group_expert_count, (std::vector<int32_t>{4, 4, 4, 3, 3, 3}));
  EXPECT_EQ(p.kept_per_expert, (std::vector<int64_t>{7, 7, 7}));
  EXPECT_EQ(p.num_rows(), 21);
}

TEST(ExpertChoiceTest, MinCapacityApplies) {
  Tensor probs(6, 3, 1.0f / 3.0f);
  DispatchPlan p = Plan(RouterCfg("gate: EXPERT_CHOICE" + Cf(0.1, 3), 3), probs);
  EXPECT_EQ(p.capacity, 3);
  // All ties: every expert takes tokens 0, 1, 2.
  EXPECT_EQ(p.ec_token, (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 0, 1, 2}));
}

// ---------------------------------------------------------------------------------------------
// Losses.

TEST(LossTest, SwitchImportanceAndZOnAHandExample) {
  // E=2: probs t0 = (0.75, 0.25), t1 = (0.5, 0.5) (tie -> expert 0).
  Tensor probs = MakeTensor(2, 2, {0.75f, 0.25f, 0.5f, 0.5f});
  Tensor logits = MakeTensor(2, 2, {0.0f, 0.0f, 1.0f, -1.0f});
  {
    // f = (1, 0), P = (0.625, 0.375): aux = 2 * 0.625 = 1.25.
    const config::RouterConfig cfg = RouterCfg("gate: TOP1 aux_loss: SWITCH" + Cf(0.0), 2);
    DispatchPlan p = Plan(cfg, probs);
    RouterLosses l = ComputeRouterLosses(cfg, p, probs, logits);
    EXPECT_DOUBLE_EQ(l.aux, 1.25);
    const double lse0 = std::log(2.0), lse1 = std::log(std::exp(1.0) + std::exp(-1.0));
    EXPECT_NEAR(l.z, (lse0 * lse0 + lse1 * lse1) / 2.0, 1e-12);
    // GSHARD is the same formula.
    const config::RouterConfig gs = RouterCfg("gate: TOP1 aux_loss: GSHARD" + Cf(0.0), 2);
    EXPECT_DOUBLE_EQ(ComputeRouterLosses(gs, p, probs, logits).aux, 1.25);
    const config::RouterConfig none = RouterCfg("gate: TOP1 aux_loss: NO_AUX_LOSS" + Cf(0.0), 2);
    EXPECT_EQ(ComputeRouterLosses(none, p, probs, logits).aux, 0.0);
  }
  {
    // f uses the slot-0 selection before drops: with C=1 token 1 is dropped, f stays (1, 0).
    const config::RouterConfig cfg = RouterCfg("gate: TOP1 aux_loss: SWITCH" + Cf(1.0), 2);
    DispatchPlan p = Plan(cfg, probs);
    ASSERT_EQ(p.dropped_slots, 1);
    EXPECT_DOUBLE_EQ(ComputeRouterLosses(cfg, p, probs, logits).aux, 1.25);
  }
  {
    // k=2 SWITCH: f counts slot 0 only.
    const config::RouterConfig cfg = RouterCfg("top_k: 2 aux_loss: SWITCH" + Cf(0.0), 2);
    DispatchPlan p = Plan(cfg, probs);
    EXPECT_DOUBLE_EQ(ComputeRouterLosses(cfg, p, probs, logits).aux, 1.25);
  }
  {
    // IMPORTANCE_CV, TOP1, NONE: imp = (1.25, 0): mean 0.625, var 0.390625 -> 1.
    const config::RouterConfig cfg = RouterCfg("gate: TOP1 aux_loss: IMPORTANCE_CV" + Cf(0.0), 2);
    DispatchPlan p = Plan(cfg, probs);
    EXPECT_DOUBLE_EQ(ComputeRouterLosses(cfg, p, probs, logits).aux, 1.0);
  }
  {
    // IMPORTANCE_CV, k=2, TOPK_SOFTMAX: g° = r / 1: imp = (1.25, 0.75): var 0.0625, mean 1.
    for (const char* norm : {"TOPK_SOFTMAX", "RENORM_AFTER_CAPACITY", "NONE"}) {
      const config::RouterConfig cfg = RouterCfg(
          std::string("top_k: 2 aux_loss: IMPORTANCE_CV normalization: ") + norm + Cf(0.0), 2);
      DispatchPlan p = Plan(cfg, probs);
      EXPECT_DOUBLE_EQ(ComputeRouterLosses(cfg, p, probs, logits).aux, 0.0625) << norm;
    }
  }
  {
    // IMPORTANCE_CV with normalization: the denominator is the sum of the k selected probs.
    // E=3, k=2, one token (0.5, 0.3, 0.2): g° = (0.625, 0.375, 0) for TOPK_SOFTMAX.
    Tensor pr = MakeTensor(1, 3, {0.5f, 0.3f, 0.2f});
    Tensor lg(1, 3);
    const config::RouterConfig cfg = RouterCfg(
        "top_k: 2 aux_loss: IMPORTANCE_CV normalization: TOPK_SOFTMAX" + Cf(1.0), 3);
    DispatchPlan p = Plan(cfg, pr);
    const double a = 0.5f / (0.5 + double(0.3f)), b = double(0.3f) / (0.5 + double(0.3f));
    const double mean = (a + b) / 3.0;
    const double var = ((a - mean) * (a - mean) + (b - mean) * (b - mean) + mean * mean) / 3.0;
    EXPECT_NEAR(ComputeRouterLosses(cfg, p, pr, lg).aux, var / (mean * mean), 1e-6);
    EXPECT_NEAR(PreCapacityGate(p, pr, 0, 0), a, 1e-7);
    EXPECT_NEAR(PreCapacityGate(p, pr, 0, 1), b, 1e-7);
  }
}

TEST(LossTest, SwitchTopKCountsEverySlotAndSigmoidNormalizesP) {
  // E=3, k=2: t0 (0.5, 0.3, 0.2) selects (0, 1), t1 (0.2, 0.5, 0.3) selects (1, 2).
  Tensor probs = MakeTensor(2, 3, {0.5f, 0.3f, 0.2f, 0.2f, 0.5f, 0.3f});
  Tensor logits(2, 3);
  {
    // f = (1/2, 1, 1/2), P = (0.35, 0.4, 0.25): aux = (3/2) (0.175 + 0.4 + 0.125) = 1.05.
    const config::RouterConfig cfg = RouterCfg("top_k: 2 aux_loss: SWITCH_TOPK" + Cf(0.0), 3);
    DispatchPlan p = Plan(cfg, probs);
    EXPECT_NEAR(ComputeRouterLosses(cfg, p, probs, logits).aux, 1.05, 1e-7);
    // SWITCH counts first choices only: f = (1/2, 1/2, 0): 3 (0.175 + 0.2) = 1.125.
    const config::RouterConfig sw = RouterCfg("top_k: 2 aux_loss: SWITCH" + Cf(0.0), 3);
    EXPECT_NEAR(ComputeRouterLosses(sw, p, probs, logits).aux, 1.125, 1e-7);
  }
  {
    // SIGMOID: these are scores, P = s / Σ s. t0 (0.5, 0.3, 0.2) sums to 1; t1 scaled by 2,
    // (0.4, 1.0, 0.6) / 2 is t1 above. So P and aux are as above.
    Tensor s = MakeTensor(2, 3, {0.5f, 0.3f, 0.2f, 0.4f, 1.0f, 0.6f});
    const config::RouterConfig cfg =
        RouterCfg("score_function: SIGMOID top_k: 2 aux_loss: SWITCH_TOPK" + Cf(0.0), 3);
    DispatchPlan p = Plan(cfg, s);
    EXPECT_EQ(p.selected, (std::vector<int32_t>{0, 1, 1, 2}));
    EXPECT_NEAR(ComputeRouterLosses(cfg, p, s, logits).aux, 1.05, 1e-7);
  }
}

TEST(LossTest, SequenceAndGlobalBalanceOnAHandExample) {
  // E=3, k=2. t0 (0.5, 0.3, 0.2) -> (0, 1); t1 (0.2, 0.5, 0.3) -> (1, 2);
  //           t2 (0.6, 0.3, 0.1) -> (0, 1); t3 (0.6, 0.1, 0.3) -> (0, 2).
  Tensor probs = MakeTensor(4, 3, {0.5f, 0.3f, 0.2f, 0.2f, 0.5f, 0.3f,  //
                                   0.6f, 0.3f, 0.1f, 0.6f, 0.1f, 0.3f});
  Tensor logits(4, 3);
  {
    // SEQUENCE, L = 2: sequence (t0, t1) gives 1.05 (as SWITCH_TOPK above); (t2, t3):
    // f = E/(kT) (2, 1, 1) = (1.5, 0.75, 0.75), P = (0.6, 0.2, 0.2): 0.9 + 0.15 + 0.15 = 1.2.
    const config::RouterConfig cfg =
        RouterCfg("top_k: 2 aux_loss: SEQUENCE aux_sequence_length: 2" + Cf(0.0), 3);
    DispatchPlan p = Plan(cfg, probs);
    EXPECT_NEAR(ComputeRouterLosses(cfg, p, probs, logits).aux, (1.05 + 1.2) / 2.0, 1e-7);
    // L = 3: (t0, t1, t2) and the tail (t3): f = E/(2·3) (2, 3, 1) = (1, 1.5, 0.5),
    // P = (1.3, 1.1, 0.6) / 3 -> (1.3 + 1.65 + 0.3) / 3 = 13/12; tail f = 1.5 (1, 0, 1),
    // P = (0.6, 0.1, 0.3) -> 0.9 + 0.45 = 1.35. Mean (13/12 + 1.35) / 2.
    const config::RouterConfig l3 =
        RouterCfg("top_k: 2 aux_loss: SEQUENCE aux_sequence_length: 3" + Cf(0.0), 3);
    EXPECT_NEAR(ComputeRouterLosses(l3, Plan(l3, probs), probs, logits).aux,
                (13.0 / 12.0 + 1.35) / 2.0, 1e-7);
  }
  {
    // GLOBAL SWITCH_TOPK over 2 groups: f = (3, 3, 2) / 4 for both; group P (0.35, 0.4, 0.25)
    // and (0.6, 0.2, 0.2): 1.5 (0.6875) = 1.03125 and 1.5 (0.7) = 1.05; mean 1.040625.
    const config::RouterConfig cfg = RouterCfg(
        "top_k: 2 aux_loss: SWITCH_TOPK aux_loss_scope: GLOBAL num_local_groups: 2" + Cf(0.0), 3);
    DispatchPlan p = Plan(cfg, probs);
    std::vector<GroupLossSums> sums = RouterLossSums(cfg, p, probs, logits);
    // LOCAL: (1.05 + 1.5 (1 (0.6) + 0.5 (0.2) + 0.5 (0.2))) / 2 = (1.05 + 1.2) / 2.
    EXPECT_NEAR(LossesFromSums(sums).aux, 1.125, 1e-7);
    const std::vector<double> counts = BalanceCounts(sums);
    EXPECT_EQ(counts, (std::vector<double>{3.0, 3.0, 2.0, 4.0}));
    SetGlobalBalanceCounts(counts, &sums);
    EXPECT_NEAR(LossesFromSums(sums).aux, 1.040625, 1e-7);
    // The layer does the same (one process: its groups are the world).
    config::LayerConfig layer = LayerFromText(
        "model_dim: 4 num_experts: 3 expert { hidden_dim: 4 } router { " + cfg.ShortDebugString() +
        " }");
    EXPECT_EQ(layer.router().aux_loss_scope(), config::GLOBAL);
  }
}

TEST(LossTest, LossesAreAveragedOverGroups) {
  // S=5 in G=2 groups (3 + 2 tokens): the value is the mean of the two group values, not the
  // token-weighted mean.
  Tensor probs(5, 4), logits(5, 4);
  FillRandom(&logits, 3, 2.0f);
  SoftmaxRows(logits.view(), probs.view());
  for (const char* aux : {"SWITCH", "IMPORTANCE_CV"}) {
    SCOPED_TRACE(aux);
    const config::RouterConfig g2 =
        RouterCfg(std::string("top_k: 2 num_local_groups: 2 aux_loss: ") + aux + Cf(0.0));
    const config::RouterConfig g1 = RouterCfg(std::string("top_k: 2 aux_loss: ") + aux + Cf(0.0));
    RouterLosses grouped = ComputeRouterLosses(g2, Plan(g2, probs), probs, logits);
    double aux_sum = 0, z_sum = 0;
    for (auto [b, n] : {std::pair{0, 3}, std::pair{3, 2}}) {
      Tensor pp(n, 4), ll(n, 4);
      for (int t = 0; t < n; ++t) {
        for (int e = 0; e < 4; ++e) {
          pp(t, e) = probs(b + t, e);
          ll(t, e) = logits(b + t, e);
        }
      }
      RouterLosses l = ComputeRouterLosses(g1, Plan(g1, pp), pp, ll);
      aux_sum += l.aux;
      z_sum += l.z;
    }
    EXPECT_NEAR(grouped.aux, aux_sum / 2.0, 1e-12);
    EXPECT_NEAR(grouped.z, z_sum / 2.0, 1e-12);
    RouterLosses whole = ComputeRouterLosses(g1, Plan(g1, probs), probs, logits);
    EXPECT_GT(std::abs(whole.z - grouped.z), 1e-6);  // the test can tell the two apart
  }
}

// ---------------------------------------------------------------------------------------------
// Aux-loss-free bias.

TEST(BiasTest, BiasChangesSelectionButGatesUseUnbiasedProbs) {
  Tensor probs = MakeTensor(1, 4, {0.4f, 0.3f, 0.2f, 0.1f});
  const std::vector<float> bias = {0.0f, 0.0f, 0.25f, 0.0f};
  DispatchPlan p = Plan(RouterCfg("top_k: 1" + Cf(0.0)), probs, bias);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{2}));
  EXPECT_EQ(p.slot_gate, (std::vector<float>{0.2f}));
  DispatchPlan q = Plan(RouterCfg("top_k: 2 normalization: TOPK_SOFTMAX" + Cf(0.0)), probs, bias);
  EXPECT_EQ(q.slot_expert, (std::vector<int32_t>{2, 0}));
  EXPECT_EQ(q.slot_gate, (std::vector<float>{0.2f / (0.2f + 0.4f), 0.4f / (0.2f + 0.4f)}));
  // Ties of probs + bias go to the lower index.
  DispatchPlan r = Plan(RouterCfg("top_k: 1" + Cf(0.0)), probs, {0.0f, 0.1f, 0.0f, 0.0f});
  EXPECT_EQ(r.slot_expert, (std::vector<int32_t>{0}));
}

// ---------------------------------------------------------------------------------------------
// Whole layer on hand-chosen weights.

// A layer with M=8 whose expert e outputs the unit vector e (W1 = W2 = 0, b2 = unit(e)), so that
// y[t][e] is the gate of expert e for token t. x rows are one-hot over 8 "token types"; router
// row i holds the logits of type i.
class UnitExpertLayer {
 public:
  explicit UnitExpertLayer(const std::string& router_text, int shared = 0)
      : layer_(LayerFromText("model_dim: 8 num_experts: 4 expert { hidden_dim: 3 } num_shared_experts: " +
                             std::to_string(shared) + " router { " + router_text + " }")) {
    for (int e = 0; e < 4; ++e) layer_.params().experts[e].b2[e] = 1.0f;
  }
  MoeLayer& layer() { return layer_; }
  void SetLogits(int type, const std::vector<float>& l) {
    for (int e = 0; e < 4; ++e) layer_.params().router(type, e) = l[e];
  }
  static Tensor OneHot(const std::vector<int>& types) {
    Tensor x(static_cast<int64_t>(types.size()), 8);
    for (size_t t = 0; t < types.size(); ++t) x(static_cast<int64_t>(t), types[t]) = 1.0f;
    return x;
  }

 private:
  MoeLayer layer_;
};

std::vector<float> Logs(std::initializer_list<float> p) {
  std::vector<float> out;
  for (float v : p) out.push_back(std::log(v));
  return out;
}

TEST(LayerTest, SoftMoeMixesTokensIntoSlotsAndSlotsIntoTokens) {
  // M = 2, E = 2, p = 1, one group of 2 tokens; both experts relu(x) (W1 = W2 = I, no biases).
  // Φ = [[ln 3, 0], [0, 0]]: logits t0 = (ln 3, 0), t1 = (3 ln 3, 0).
  // C: t0 (3/4, 1/4), t1 (27/28, 1/28). D: column 0 (3, 27)/30 = (0.1, 0.9), column 1 (1/2, 1/2).
  // Slot inputs (0.1 x0 + 0.9 x1) = (2.8, 0.6) and (x0 + x1)/2 = (2, -1); outputs (2.8, 0.6), (2, 0).
  MoeLayer layer(LayerFromText("model_dim: 2 num_experts: 2 expert { hidden_dim: 2 activation: "
                                  "RELU bias: false } router { gate: SOFT slots_per_expert: 1 }"));
  MoeLayerParams& p = layer.params();
  ASSERT_EQ(p.router.rows(), 2);
  ASSERT_EQ(p.router.cols(), 2);
  p.router(0, 0) = std::log(3.0f);
  for (auto& ex : p.experts) {
    ex.w1(0, 0) = ex.w1(1, 1) = 1.0f;
    ex.w2(0, 0) = ex.w2(1, 1) = 1.0f;
  }
  Tensor x = MakeTensor(2, 2, {1.0f, -3.0f, 3.0f, 1.0f}), y;
  ASSERT_TRUE(layer.Forward(x.view(), RouteContext{}, &y).ok());
  EXPECT_NEAR(layer.router_output().dispatch(0, 0), 0.1, 1e-6);
  EXPECT_NEAR(layer.router_output().probs(1, 0), 27.0 / 28.0, 1e-6);
  EXPECT_NEAR(y(0, 0), 0.75 * 2.8 + 0.25 * 2.0, 1e-5);
  EXPECT_NEAR(y(0, 1), 0.75 * 0.6, 1e-5);
  EXPECT_NEAR(y(1, 0), (27.0 * 2.8 + 2.0) / 28.0, 1e-5);
  EXPECT_NEAR(y(1, 1), 27.0 * 0.6 / 28.0, 1e-5);
  // Every expert gets its p = 1 slot of the one group; nothing is dropped.
  EXPECT_EQ(layer.plan().kept_per_expert, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(layer.plan().dropped_slots, 0);
  EXPECT_EQ(layer.forward_tokens(), 2);
}

TEST(LayerTest, OutputIsGateWeightedExpertsAndDroppedSlotsContributeZero) {
  UnitExpertLayer u("top_k: 2 normalization: RENORM_AFTER_CAPACITY aux_loss: NO_AUX_LOSS" + Cf(1.0));
  u.SetLogits(0, Logs({0.5f, 0.25f, 0.125f, 0.125f}));
  u.SetLogits(1, Logs({0.125f, 0.25f, 0.5f, 0.125f}));
  Tensor x = UnitExpertLayer::OneHot({0, 1});
  Tensor y;
  ASSERT_TRUE(u.layer().Forward(x.view(), {}, &y).ok());
  const DispatchPlan& p = u.layer().plan();
  ASSERT_EQ(p.capacity, 1);
  EXPECT_EQ(p.slot_expert, (std::vector<int32_t>{0, 1, 2, -1}));
  const Tensor& probs = u.layer().router_output().probs;
  Tensor expect_probs(2, 4);
  SoftmaxRows(u.layer().router_output().logits.view(), expect_probs.view());
  EXPECT_EQ(probs.vec(), expect_probs.vec());
  const float d0 = probs(0, 0) + probs(0, 1);
  EXPECT_EQ(y(0, 0), probs(0, 0) / d0);
  EXPECT_EQ(y(0, 1), probs(0, 1) / d0);
  EXPECT_EQ(y(0, 2), 0.0f);
  EXPECT_EQ(y(0, 3), 0.0f);
  EXPECT_EQ(y(1, 2), 1.0f);  // the surviving gate of token 1 is renormalized to 1
  EXPECT_EQ(y(1, 1), 0.0f);  // the dropped slot (expert 1) contributes nothing
  EXPECT_EQ(y(1, 0), 0.0f);
  for (int t = 0; t < 2; ++t) {
    for (int c = 4; c < 8; ++c) EXPECT_EQ(y(t, c), 0.0f);
  }
  report::LayerMetrics m = u.layer().Metrics();
  EXPECT_EQ(m.dropped_slots(), 1);
  EXPECT_EQ(m.capacity(), 1);
  EXPECT_EQ(m.total_slots(), 4);
  ASSERT_EQ(m.tokens_per_expert_size(), 4);
  EXPECT_EQ(m.tokens_per_expert(0), 1);
  EXPECT_EQ(m.tokens_per_expert(1), 1);
  EXPECT_EQ(m.tokens_per_expert(2), 1);
  EXPECT_EQ(m.tokens_per_expert(3), 0);
  ASSERT_EQ(m.dropped_per_expert_size(), 4);
  EXPECT_EQ(m.dropped_per_expert(1), 1);
  EXPECT_EQ(m.dropped_per_expert(0) + m.dropped_per_expert(2) + m.dropped_per_expert(3), 0);
}

TEST(LayerTest, Top1GateNotRenormalizedInTheOutput) {
  UnitExpertLayer u("gate: TOP1" + Cf(0.0));
  u.SetLogits(0, Logs({0.1f, 0.6f, 0.2f, 0.1f}));
  Tensor x = UnitExpertLayer::OneHot({0, 0, 0});
  Tensor y;
  ASSERT_TRUE(u.layer().Forward(x.view(), {}, &y).ok());
  for (int t = 0; t < 3; ++t) {
    EXPECT_EQ(y(t, 1), u.layer().router_output().probs(t, 1));
    EXPECT_NEAR(y(t, 1), 0.6f, 1e-6);
    EXPECT_EQ(y(t, 0) + y(t, 2) + y(t, 3), 0.0f);
  }
}

TEST(LayerTest, ExpertChoiceOutput) {
  UnitExpertLayer u("gate: EXPERT_CHOICE" + Cf(1.0));
  u.SetLogits(0, Logs({0.7f, 0.1f, 0.1f, 0.1f}));
  u.SetLogits(1, Logs({0.1f, 0.7f, 0.1f, 0.1f}));
  u.SetLogits(2, Logs({0.4f, 0.3f, 0.2f, 0.1f}));
  Tensor x = UnitExpertLayer::OneHot({0, 1, 2, 2});  // C = ceil(4/4) = 1
  Tensor y;
  ASSERT_TRUE(u.layer().Forward(x.view(), {}, &y).ok());
  const DispatchPlan& p = u.layer().plan();
  ASSERT_EQ(p.capacity, 1);
  // e0 -> token 0 (0.7); e1 -> token 1; e2 -> token 2 (0.2, tie with 3); e3 -> token 2 (0.1 tie
  // with 3, 0.1 vs token 0's 0.1 and token 1's 0.1: all equal -> token 0).
  const Tensor& pr = u.layer().router_output().probs;
  std::vector<int32_t> expect(4);
  for (int e = 0; e < 4; ++e) {
    int best = 0;
    for (int t = 1; t < 4; ++t) {
      if (pr(t, e) > pr(best, e)) best = t;
    }
    expect[e] = best;
  }
  EXPECT_EQ(p.ec_token, expect);
  EXPECT_EQ(expect[0], 0);
  EXPECT_EQ(expect[1], 1);
  for (int t = 0; t < 4; ++t) {
    for (int e = 0; e < 4; ++e) EXPECT_EQ(y(t, e), expect[e] == t ? pr(t, e) : 0.0f) << t << " " << e;
  }
}

TEST(LayerTest, SharedExpertIsAddedUnweighted) {
  UnitExpertLayer u("gate: TOP1" + Cf(0.0), /*shared=*/2);
  u.SetLogits(0, Logs({0.1f, 0.6f, 0.2f, 0.1f}));
  for (int c = 0; c < 8; ++c) {
    u.layer().params().shared[0].b2[c] = static_cast<float>(c);
    u.layer().params().shared[1].b2[c] = 0.5f;
  }
  Tensor x = UnitExpertLayer::OneHot({0});
  Tensor y;
  ASSERT_TRUE(u.layer().Forward(x.view(), {}, &y).ok());
  const float g = u.layer().router_output().probs(0, 1);
  for (int c = 0; c < 8; ++c) EXPECT_EQ(y(0, c), static_cast<float>(c) + 0.5f + (c == 1 ? g : 0.0f));
}

// Identity-like experts: M = H = 4, W1 = I, W2 = I (W3 = s I for SwiGLU), biases 0; router 0, so
// TOP1 picks expert 0 with gate 1/2.
Tensor RunIdentityExpert(const std::string& expert_text, const Tensor& x, float w3_scale = 1.0f,
                         int shared = 0) {
  MoeLayer layer(LayerFromText("model_dim: 4 num_experts: 2 expert { hidden_dim: 4 " + expert_text +
                               " } num_shared_experts: " + std::to_string(shared) +
                               " router { gate: TOP1 capacity_factor_eval: 0 }"));
  auto set = [&](experts::FfnParams& p) {
    for (int i = 0; i < 4; ++i) {
      p.w1(i, i) = 1.0f;
      p.w2(i, i) = 1.0f;
      if (p.w3.size() > 0) p.w3(i, i) = w3_scale;
    }
  };
  for (auto& p : layer.params().experts) set(p);
  for (auto& p : layer.params().shared) set(p);
  Tensor y;
  EXPECT_TRUE(layer.Forward(x.view(), {}, &y).ok());
  EXPECT_EQ(layer.plan().slot_expert[0], 0);
  EXPECT_EQ(layer.plan().slot_gate[0], 0.5f);
  return y;
}

TEST(ExpertTest, IdentityWeightsGiveTheActivation) {
  Tensor x = MakeTensor(2, 4, {-2.0f, -0.5f, 0.0f, 0.75f, 3.0f, -1.25f, 1.5f, -4.0f});
  Tensor relu = RunIdentityExpert("activation: RELU", x);
  Tensor gelu = RunIdentityExpert("activation: GELU_TANH", x);
  Tensor silu = RunIdentityExpert("activation: SILU", x);
  Tensor swiglu = RunIdentityExpert("kind: SWIGLU bias: false", x, 2.0f);
  Tensor shared = RunIdentityExpert("activation: RELU", x, 1.0f, 1);
  for (int64_t i = 0; i < x.size(); ++i) {
    const double h = x[i];
    EXPECT_EQ(relu[i], 0.5f * std::max(x[i], 0.0f)) << i;
    const double g = 0.5 * h * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (h + 0.044715 * h * h * h)));
    EXPECT_NEAR(gelu[i], 0.5 * g, 2e-6) << i;
    const double s = h / (1.0 + std::exp(-h));
    EXPECT_NEAR(silu[i], 0.5 * s, 2e-6) << i;
    EXPECT_NEAR(swiglu[i], 0.5 * s * 2.0 * h, 4e-6) << i;
    // Shared expert: added with weight 1 to the gated routed expert.
    EXPECT_EQ(shared[i], 1.5f * std::max(x[i], 0.0f)) << i;
  }
}

TEST(ExpertTest, ActivationHelpers) {
  using experts::Activation;
  for (float h : {-3.0f, -0.5f, 0.25f, 2.0f}) {
    const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(h)));
    EXPECT_NEAR(experts::ActivationValue(Activation::kSilu, h), h * s, 1e-6);
    EXPECT_NEAR(experts::ActivationDerivative(Activation::kSilu, h), s * (1 + h * (1 - s)), 1e-6);
    EXPECT_EQ(experts::ActivationValue(Activation::kRelu, h), std::max(h, 0.0f));
    EXPECT_EQ(experts::ActivationDerivative(Activation::kRelu, h), h > 0 ? 1.0f : 0.0f);
    const double eps = 1e-4;
    auto gelu = [](double v) {
      return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    };
    EXPECT_NEAR(experts::ActivationDerivative(Activation::kGeluTanh, h),
                (gelu(h + eps) - gelu(h - eps)) / (2 * eps), 1e-5);
  }
}

TEST(ExpertTest, BiasesAreApplied) {
  // W = 0: output is b2 (b1 passes through the activation into W2 = 0).
  MoeLayer layer(LayerFromText(
      "model_dim: 2 num_experts: 2 expert { hidden_dim: 2 activation: RELU } router { gate: TOP1 "
      "capacity_factor_eval: 0 }"));
  auto& p = layer.params().experts[0];
  p.b1[0] = 2.0f;
  p.b1[1] = -1.0f;
  p.w2(0, 0) = 1.0f;  // y0 = relu(2) = 2
  p.w2(1, 1) = 1.0f;  // y1 = relu(-1) = 0
  p.b2[1] = 0.25f;
  Tensor x(1, 2);
  Tensor y;
  ASSERT_TRUE(layer.Forward(x.view(), {}, &y).ok());
  EXPECT_EQ(y(0, 0), 0.5f * 2.0f);
  EXPECT_EQ(y(0, 1), 0.5f * 0.25f);
}

// ---------------------------------------------------------------------------------------------
// Noisy top-k.

// A layer with M=8, E=4, random router (and noise) weights and expert outputs b2 only.
MoeLayer MakeRandomRouterLayer(const std::string& router_text, int groups) {
  MoeLayer layer(LayerFromText("model_dim: 8 num_experts: 4 expert { hidden_dim: 3 } router { " +
                               router_text + " num_local_groups: " + std::to_string(groups) +
                               Cf(1.0) + " }"));
  FillRandom(&layer.params().router, 1, 1.0f);
  if (layer.params().router_noise.size() > 0) FillRandom(&layer.params().router_noise, 2, 1.5f);
  for (int e = 0; e < 4; ++e) FillRandom(&layer.params().experts[e].b2, 10 + e, 1.0f);
  return layer;
}

Tensor Eye8() {
  Tensor x(8, 8);
  for (int t = 0; t < 8; ++t) x(t, t) = 1.0f;
  return x;
}

const char* kNoisy = "gate: NOISY_TOPK top_k: 2";

TEST(NoisyTest, EvalIsTopKSoftmaxOfCleanLogits) {
  MoeLayer layer = MakeRandomRouterLayer(kNoisy, 1);
  Tensor x = Eye8(), y;
  ASSERT_TRUE(layer.Forward(x.view(), {}, &y).ok());
  EXPECT_FALSE(layer.router_output().noisy);
  Tensor expect(8, 4);
  SoftmaxRows(layer.router_output().logits.view(), expect.view());
  EXPECT_EQ(layer.router_output().probs.vec(), expect.vec());
  for (int t = 0; t < 8; ++t) {
    for (int e = 0; e < 4; ++e) EXPECT_EQ(layer.router_output().logits(t, e), layer.params().router(t, e));
  }
  const DispatchPlan& p = layer.plan();
  for (int t = 0; t < 8; ++t) {
    const float r0 = expect(t, p.selected[2 * t]), r1 = expect(t, p.selected[2 * t + 1]);
    if (p.slot_expert[2 * t] >= 0) {
      EXPECT_EQ(p.slot_gate[2 * t], r0 / (r0 + r1));
    }
    if (p.slot_expert[2 * t + 1] >= 0) {
      EXPECT_EQ(p.slot_gate[2 * t + 1], r1 / (r0 + r1));
    }
  }
}

TEST(NoisyTest, TrainNoiseIsCounterBased) {
  MoeLayer layer = MakeRandomRouterLayer(kNoisy, 1);
  Tensor x = Eye8(), y1, y2, y3;
  RouteContext ctx{true, 5, 3, 0};
  ASSERT_TRUE(layer.Forward(x.view(), ctx, &y1).ok());
  ASSERT_TRUE(layer.router_output().noisy);
  const Tensor probs1 = layer.router_output().probs;
  Tensor scores(8, 4), expect(8, 4);
  for (int t = 0; t < 8; ++t) {
    for (int e = 0; e < 4; ++e) {
      const float eps = CounterNormal(5, 3, static_cast<uint64_t>(t), RngStream::kRouterNoise,
                                      static_cast<uint64_t>(e));
      EXPECT_EQ(layer.router_output().eps(t, e), eps);
      scores(t, e) = layer.params().router(t, e) + eps * Softplus(layer.params().router_noise(t, e));
    }
  }
  SoftmaxRows(scores.view(), expect.view());
  for (int64_t i = 0; i < expect.size(); ++i) EXPECT_NEAR(probs1[i], expect[i], 1e-6);
  // Gates: TOPK_SOFTMAX of the noisy probs.
  const DispatchPlan& p = layer.plan();
  for (int t = 0; t < 8; ++t) {
    const float r0 = probs1(t, p.selected[2 * t]), r1 = probs1(t, p.selected[2 * t + 1]);
    EXPECT_GE(r0, r1);
    if (p.slot_expert[2 * t] >= 0) {
      EXPECT_EQ(p.slot_gate[2 * t], r0 / (r0 + r1));
    }
  }
  // The same (seed, step) gives the same result bitwise.
  ASSERT_TRUE(layer.Forward(x.view(), ctx, &y2).ok());
  EXPECT_EQ(layer.router_output().probs.vec(), probs1.vec());
  EXPECT_EQ(y1.vec(), y2.vec());
  // Another step: other noise.
  ctx.step = 4;
  ASSERT_TRUE(layer.Forward(x.view(), ctx, &y3).ok());
  double diff = 0;
  for (int64_t i = 0; i < probs1.size(); ++i) diff += std::abs(layer.router_output().probs[i] - probs1[i]);
  EXPECT_GT(diff, 1e-2);
  // Another seed: other noise.
  ctx.step = 3;
  ctx.seed = 6;
  ASSERT_TRUE(layer.Forward(x.view(), ctx, &y3).ok());
  diff = 0;
  for (int64_t i = 0; i < probs1.size(); ++i) diff += std::abs(layer.router_output().probs[i] - probs1[i]);
  EXPECT_GT(diff, 1e-2);
}

// Draws depend only on the global token index: tokens 4..7 called alone with token_offset 4 are
// routed exactly like rows 4..7 of one call over 0..7 in two groups.
void ExpectOffsetInvariance(const std::string& router_text) {
  MoeLayer whole = MakeRandomRouterLayer(router_text, 2);
  MoeLayer half = MakeRandomRouterLayer(router_text, 1);
  Tensor x = Eye8();
  Tensor x2(4, 8);
  for (int t = 0; t < 4; ++t) x2(t, 4 + t) = 1.0f;
  Tensor y, y2;
  ASSERT_TRUE(whole.Forward(x.view(), {true, 11, 2, 0}, &y).ok());
  ASSERT_TRUE(half.Forward(x2.view(), {true, 11, 2, 4}, &y2).ok());
  ASSERT_EQ(whole.plan().capacity, half.plan().capacity);
  const int k = static_cast<int>(whole.plan().top_k);
  for (int t = 0; t < 4; ++t) {
    for (int e = 0; e < 4; ++e) {
      EXPECT_EQ(whole.router_output().probs(4 + t, e), half.router_output().probs(t, e));
    }
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(whole.plan().slot_expert[(4 + t) * k + j], half.plan().slot_expert[t * k + j]);
      EXPECT_EQ(whole.plan().slot_gate[(4 + t) * k + j], half.plan().slot_gate[t * k + j]);
    }
    for (int c = 0; c < 8; ++c) EXPECT_EQ(y(4 + t, c), y2(t, c));
  }
  // Offset 0 on the same 4 tokens gives other draws (so the check above is not vacuous).
  ASSERT_TRUE(half.Forward(x2.view(), {true, 11, 2, 0}, &y2).ok());
  bool differs = false;
  for (int t = 0; t < 4; ++t) {
    for (int e = 0; e < 4; ++e) {
      differs = differs || whole.router_output().probs(4 + t, e) != half.router_output().probs(t, e);
    }
    for (int j = 0; j < k; ++j) {
      differs = differs || whole.plan().slot_expert[(4 + t) * k + j] != half.plan().slot_expert[t * k + j];
    }
  }
  EXPECT_TRUE(differs);
}

TEST(NoisyTest, DrawsDependOnlyOnTheGlobalTokenIndex) { ExpectOffsetInvariance(kNoisy); }

TEST(RandomRoutingTest, DrawsDependOnlyOnTheGlobalTokenIndex) {
  ExpectOffsetInvariance("top_k: 2 random_routing: true normalization: RENORM_AFTER_CAPACITY");
}

// ---------------------------------------------------------------------------------------------
// Aux-loss-free bias on the layer.

TEST(BiasTest, UpdateRouterBiasMovesByRateTimesSign) {
  UnitExpertLayer u("gate: TOP1 bias_update_rate: 0.5" + Cf(0.0));
  u.SetLogits(0, Logs({0.7f, 0.1f, 0.1f, 0.1f}));
  u.SetLogits(1, Logs({0.1f, 0.7f, 0.1f, 0.1f}));
  Tensor x = UnitExpertLayer::OneHot({0, 0, 0, 1});
  Tensor y;
  ASSERT_TRUE(u.layer().Forward(x.view(), {true, 1, 0, 0}, &y).ok());
  EXPECT_EQ(u.layer().plan().load_per_expert, (std::vector<int64_t>{3, 1, 0, 0}));
  u.layer().UpdateRouterBias();  // mean load 1: (-, 0, +, +)
  EXPECT_EQ(u.layer().router_bias(), (std::vector<float>{-0.5f, 0.0f, 0.5f, 0.5f}));
  u.layer().UpdateRouterBias();
  EXPECT_EQ(u.layer().router_bias(), (std::vector<float>{-1.0f, 0.0f, 1.0f, 1.0f}));
  // Now the bias changes the selection (0.1 + 1 > 0.7 - 1): tokens go to expert 2 (lowest index
  // of the tie 2/3), and the gate is the unbiased probability.
  ASSERT_TRUE(u.layer().Forward(x.view(), {true, 1, 1, 0}, &y).ok());
  const Tensor& pr = u.layer().router_output().probs;
  for (int t = 0; t < 4; ++t) {
    EXPECT_EQ(u.layer().plan().slot_expert[t], 2);
    EXPECT_EQ(y(t, 2), pr(t, 2));
    EXPECT_NEAR(y(t, 2), 0.1f, 1e-6);
  }
  // Rate 0: no change.
  UnitExpertLayer off("gate: TOP1" + Cf(0.0));
  ASSERT_TRUE(off.layer().Forward(x.view(), {true, 1, 0, 0}, &y).ok());
  off.layer().UpdateRouterBias();
  EXPECT_EQ(off.layer().router_bias(), (std::vector<float>(4, 0.0f)));
}

}  // namespace
// A layer built from a config that never went through ParseConfig resolves its kind-dependent
// defaults itself: expert choice with aux_loss unset means no aux loss (it used to index an empty
// selection).
TEST(LayerTest, UnparsedExpertChoiceConfigResolvesItsDefaults) {
  config::LayerConfig cfg;
  cfg.set_model_dim(4);
  cfg.set_num_experts(2);
  cfg.mutable_expert()->set_hidden_dim(3);
  cfg.mutable_router()->set_gate(config::EXPERT_CHOICE);
  MoeLayer layer(cfg);
  EXPECT_EQ(layer.config().router().aux_loss(), config::NO_AUX_LOSS);
  InitLayerParams(layer.config(), 5, &layer.params());
  Tensor x(6, 4), y;
  testing::FillRandom(&x, 3, 1.0f);
  RouteContext ctx;
  ctx.train = true;
  ASSERT_TRUE(layer.Forward(x.view(), ctx, &y).ok());
  EXPECT_EQ(layer.losses().aux, 0.0);
  EXPECT_EQ(y.rows(), 6);
}

}  // namespace moe
