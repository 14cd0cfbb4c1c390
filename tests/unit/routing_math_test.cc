// runtime/routing/routing_math.h, the per-token routing code the CPU plan and the GPU kernels share, on
// hand-worked cases: selection order with ties and bias, the random-routing keep test at its
// boundary, gate normalization with drops, the gates' backward, group bounds (the device's
// GroupOf against GroupBounds for every S <= 64, G <= S) and the softmax backward.
#include "runtime/routing/routing_math.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "runtime/routing/dispatch_plan.h"

namespace moe {
namespace {

TEST(RoutingMath, RankTopExpertsBreaksTiesByLowerIndexAndAddsTheBias) {
  const std::vector<float> probs = {0.1f, 0.3f, 0.3f, 0.2f};
  std::vector<int32_t> out(3, -7);
  routing::RankTopExperts(probs.data(), nullptr, 4, 2, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{1, 2, -7}));
  routing::RankTopExperts(probs.data(), nullptr, 4, 3, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{1, 2, 3}));
  // bias: scores 0.1, 0.3, 0.3, 0.35 -> expert 3 first.
  const std::vector<float> bias = {0.0f, 0.0f, 0.0f, 0.15f};
  routing::RankTopExperts(probs.data(), bias.data(), 4, 2, out.data());
  EXPECT_EQ(out[0], 3);
  EXPECT_EQ(out[1], 1);
  // Top-1 of all-equal scores is expert 0; the full order is the index order.
  const std::vector<float> flat(5, 0.2f);
  std::vector<int32_t> all(5);
  routing::RankTopExperts(flat.data(), nullptr, 5, 5, all.data());
  EXPECT_EQ(all, (std::vector<int32_t>{0, 1, 2, 3, 4}));
}

TEST(RoutingMath, SecondSlotIsKeptBelowTwiceItsNormalizedGate) {
  // g2 = 0.2 / (0.6 + 0.2) = 0.25: kept iff u < 0.5.
  EXPECT_TRUE(routing::KeepsSecondSlot(0.6f, 0.2f, 0.0));
  EXPECT_TRUE(routing::KeepsSecondSlot(0.6f, 0.2f, 0.4999));
  EXPECT_FALSE(routing::KeepsSecondSlot(0.6f, 0.2f, 0.5));
  EXPECT_FALSE(routing::KeepsSecondSlot(0.6f, 0.2f, 0.9));
  // Equal gates: g2 = 0.5, every u < 1 keeps it.
  EXPECT_TRUE(routing::KeepsSecondSlot(0.3f, 0.3f, 0.999999));
}

TEST(RoutingMath, TokenGatesNormalizeOverAllOrKeptSlots) {
  const std::vector<float> probs = {0.5f, 0.3f, 0.2f};
  const int32_t final_expert[2] = {0, 1};
  const uint8_t kept[2] = {1, 0};  // slot 1 dropped
  float raw[2], gate[2];
  int32_t expert[2];
  routing::TokenGates(config::NONE, 1.0f, 2, probs.data(), final_expert, kept, raw, gate, expert);
  EXPECT_EQ(raw[0], 0.5f);
  EXPECT_EQ(raw[1], 0.3f);
  EXPECT_EQ(gate[0], 0.5f);
  EXPECT_EQ(gate[1], 0.0f);
  EXPECT_EQ(expert[0], 0);
  EXPECT_EQ(expert[1], -1);
  routing::TokenGates(config::TOPK_SOFTMAX, 1.0f, 2, probs.data(), final_expert, kept, raw, gate, expert);
  EXPECT_EQ(gate[0], 0.5f / 0.8f);  // the dropped slot keeps its share of the denominator
  routing::TokenGates(config::RENORM_AFTER_CAPACITY, 1.0f, 2, probs.data(), final_expert, kept, raw, gate,
                      expert);
  EXPECT_EQ(gate[0], 1.0f);
  EXPECT_EQ(gate[1], 0.0f);
}

TEST(RoutingMath, GateGradientsGoThroughTheNormalization) {
  // Two kept slots on experts 2 and 0 with raw gates 0.6 and 0.2, rows 5 and 9.
  const int32_t slot_row[2] = {5, 9}, slot_final[2] = {2, 0};
  const float slot_raw[2] = {0.6f, 0.2f};
  std::vector<float> dgate_rows(10, 0.0f);
  dgate_rows[5] = 1.0f;
  dgate_rows[9] = -2.0f;
  // NONE: dprobs = dg.
  {
    const float slot_gate[2] = {0.6f, 0.2f};
    std::vector<float> dprobs(3, 0.0f);
    routing::AddGateGradients(config::NONE, 1.0f, 2, slot_row, slot_gate, slot_raw, slot_final,
                              dgate_rows.data(), dprobs.data());
    EXPECT_EQ(dprobs, (std::vector<float>{-2.0f, 0.0f, 1.0f}));
  }
  // Normalized g_j = r_j / D, D = 0.8: dr_j = (dg_j - Σ dg g) / D with Σ dg g = 0.75 - 0.5.
  {
    const float slot_gate[2] = {0.75f, 0.25f};
    std::vector<float> dprobs(3, 0.0f);
    routing::AddGateGradients(config::TOPK_SOFTMAX, 1.0f, 2, slot_row, slot_gate, slot_raw, slot_final,
                              dgate_rows.data(), dprobs.data());
    const double denom = static_cast<double>(0.6f) + static_cast<double>(0.2f);
    EXPECT_FLOAT_EQ(dprobs[2], static_cast<float>((1.0 - 0.25) / denom));
    EXPECT_FLOAT_EQ(dprobs[0], static_cast<float>((-2.0 - 0.25) / denom));
    EXPECT_EQ(dprobs[1], 0.0f);
  }
}

TEST(RoutingMath, ScalingFactorMultipliesGatesAndTheirGradients) {
  const std::vector<float> probs = {0.5f, 0.25f, 0.25f};
  const int32_t final_expert[2] = {0, 1};
  const uint8_t kept[2] = {1, 1};
  float raw[2], gate[2];
  int32_t expert[2];
  // TOPK_SOFTMAX: 0.5/0.75 and 0.25/0.75, times 2.5.
  routing::TokenGates(config::TOPK_SOFTMAX, 2.5f, 2, probs.data(), final_expert, kept, raw, gate,
                      expert);
  EXPECT_EQ(gate[0], (0.5f / 0.75f) * 2.5f);
  EXPECT_EQ(gate[1], (0.25f / 0.75f) * 2.5f);
  // g = c r / D: dr_i = (c dg_i - Σ dg g) / D. dg = (1, -1): Σ dg g = 2.5 (2/3 - 1/3) = 5/6.
  const int32_t slot_row[2] = {0, 1};
  const float dgate_rows[2] = {1.0f, -1.0f};
  std::vector<float> dprobs(3, 0.0f);
  routing::AddGateGradients(config::TOPK_SOFTMAX, 2.5f, 2, slot_row, gate, raw, final_expert,
                            dgate_rows, dprobs.data());
  EXPECT_NEAR(dprobs[0], (2.5 - 5.0 / 6.0) / 0.75, 1e-6);
  EXPECT_NEAR(dprobs[1], (-2.5 - 5.0 / 6.0) / 0.75, 1e-6);
  // NONE: dr = c dg.
  std::vector<float> dnone(3, 0.0f);
  routing::AddGateGradients(config::NONE, 2.5f, 2, slot_row, gate, raw, final_expert, dgate_rows,
                            dnone.data());
  EXPECT_EQ(dnone, (std::vector<float>{2.5f, -2.5f, 0.0f}));
}

TEST(RoutingMath, GroupLimitedTopKPicksInsideTheBestGroups) {
  // 8 experts in 4 groups of 2; k = 4 over 2 groups, so a group scores the sum of its top 2.
  // Group sums: g0 0.9+0.0 = 0.9, g1 0.5+0.5 = 1.0, g2 0.8+0.3 = 1.1, g3 0.1+0.1 = 0.2.
  const float p[8] = {0.9f, 0.0f, 0.5f, 0.5f, 0.8f, 0.3f, 0.1f, 0.1f};
  EXPECT_EQ(routing::ExpertGroupScore(p, nullptr, 2, 2, 2), 0.8f + 0.3f);
  const uint64_t mask = routing::ChooseExpertGroups(p, nullptr, 8, 4, 2, 2);
  EXPECT_EQ(mask, 0b0110u);  // groups 1 and 2, although expert 0 has the best score
  int32_t top[4];
  routing::RankTopExperts(p, nullptr, 8, 4, top, 2, mask);
  EXPECT_EQ(std::vector<int32_t>(top, top + 4), (std::vector<int32_t>{4, 2, 3, 5}));
  // A bias moves group 0 up: selection scores 0.9+0.3, so g0 = 1.2 > g2 = 1.1 > g1 = 1.0.
  const float bias[8] = {0.3f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  const uint64_t biased = routing::ChooseExpertGroups(p, bias, 8, 4, 2, 2);
  EXPECT_EQ(biased, 0b0101u);
  routing::RankTopExperts(p, bias, 8, 4, top, 2, biased);
  EXPECT_EQ(std::vector<int32_t>(top, top + 4), (std::vector<int32_t>{0, 4, 5, 1}));
  // Tied groups: the lower index wins.
  const float tied[4] = {0.5f, 0.5f, 0.5f, 0.5f};
  EXPECT_EQ(routing::ChooseExpertGroups(tied, nullptr, 4, 2, 1, 1), 0b01u);
}

TEST(RoutingMath, SigmoidAndItsBackward) {
  EXPECT_EQ(routing::Sigmoid(0.0f), 0.5f);
  EXPECT_FLOAT_EQ(routing::Sigmoid(2.0f), static_cast<float>(1.0 / (1.0 + std::exp(-2.0))));
  const float s[2] = {0.5f, 0.25f}, dp[2] = {2.0f, -4.0f};
  float dscores[2], dlogits[2] = {1.0f, 0.0f};
  routing::SigmoidBackward(2, s, dp, dscores, dlogits);
  EXPECT_EQ(dscores[0], 0.5f);    // 2 · 0.5 · 0.5
  EXPECT_EQ(dscores[1], -0.75f);  // -4 · 0.25 · 0.75
  EXPECT_EQ(dlogits[0], 1.5f);
  // P = s / Σ s = (2/3, 1/3); a = (1, 0): ds = (a - <a, P>) / Σ s = (1/3, -2/3) / 0.75.
  const float a[2] = {1.0f, 0.0f};
  float ds[2] = {0.0f, 0.0f};
  routing::AddNormalizedScoreGradient(2, s, a, ds);
  EXPECT_FLOAT_EQ(ds[0], static_cast<float>((1.0 / 3.0) / 0.75));
  EXPECT_FLOAT_EQ(ds[1], static_cast<float>((-2.0 / 3.0) / 0.75));
}

TEST(RoutingMath, GroupOfInvertsGroupBounds) {
  for (int64_t s = 1; s <= 64; ++s) {
    for (int64_t g = 1; g <= s; ++g) {
      const std::vector<int64_t> begin = GroupBounds(s, g);
      for (int64_t gr = 0; gr <= g; ++gr) {
        ASSERT_EQ(routing::GroupBegin(s, g, gr), begin[gr]) << "S=" << s << " G=" << g;
      }
      for (int64_t gr = 0; gr < g; ++gr) {
        for (int64_t t = begin[gr]; t < begin[gr + 1]; ++t) {
          ASSERT_EQ(routing::GroupOf(s, g, t), gr) << "S=" << s << " G=" << g << " t=" << t;
        }
      }
    }
  }
}

TEST(RoutingMath, SoftmaxBackwardSubtractsTheProbsWeightedMean) {
  const std::vector<float> probs = {0.5f, 0.25f, 0.25f}, dprobs = {1.0f, 0.0f, -1.0f};
  std::vector<float> dscores(3), dlogits = {10.0f, 10.0f, 10.0f};
  // <dprobs, probs> = 0.25: dscores = probs * (dprobs - 0.25), added onto dlogits.
  routing::SoftmaxBackward(3, probs.data(), dprobs.data(), dscores.data(), dlogits.data());
  EXPECT_EQ(dscores, (std::vector<float>{0.375f, -0.0625f, -0.3125f}));
  EXPECT_EQ(dlogits, (std::vector<float>{10.375f, 9.9375f, 9.6875f}));
}

}  // namespace
}  // namespace moe
