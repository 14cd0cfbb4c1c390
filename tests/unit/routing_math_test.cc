// runtime/moe/routing_math.h, the per-token routing code the CPU plan and the GPU kernels share, on
// hand-worked cases: selection order with ties and bias, the random-routing keep test at its
// boundary, gate normalization with drops, the gates' backward, group bounds (the device's
// GroupOf against GroupBounds for every S <= 64, G <= S) and the softmax backward.
#include "runtime/moe/routing_math.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "runtime/moe/dispatch_plan.h"

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
  routing::TokenGates(config::NONE, 2, probs.data(), final_expert, kept, raw, gate, expert);
  EXPECT_EQ(raw[0], 0.5f);
  EXPECT_EQ(raw[1], 0.3f);
  EXPECT_EQ(gate[0], 0.5f);
  EXPECT_EQ(gate[1], 0.0f);
  EXPECT_EQ(expert[0], 0);
  EXPECT_EQ(expert[1], -1);
  routing::TokenGates(config::TOPK_SOFTMAX, 2, probs.data(), final_expert, kept, raw, gate, expert);
  EXPECT_EQ(gate[0], 0.5f / 0.8f);  // the dropped slot keeps its share of the denominator
  routing::TokenGates(config::RENORM_AFTER_CAPACITY, 2, probs.data(), final_expert, kept, raw, gate,
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
    routing::AddGateGradients(config::NONE, 2, slot_row, slot_gate, slot_raw, slot_final,
                              dgate_rows.data(), dprobs.data());
    EXPECT_EQ(dprobs, (std::vector<float>{-2.0f, 0.0f, 1.0f}));
  }
  // Normalized g_j = r_j / D, D = 0.8: dr_j = (dg_j - Σ dg g) / D with Σ dg g = 0.75 - 0.5.
  {
    const float slot_gate[2] = {0.75f, 0.25f};
    std::vector<float> dprobs(3, 0.0f);
    routing::AddGateGradients(config::TOPK_SOFTMAX, 2, slot_row, slot_gate, slot_raw, slot_final,
                              dgate_rows.data(), dprobs.data());
    const double denom = static_cast<double>(0.6f) + static_cast<double>(0.2f);
    EXPECT_FLOAT_EQ(dprobs[2], static_cast<float>((1.0 - 0.25) / denom));
    EXPECT_FLOAT_EQ(dprobs[0], static_cast<float>((-2.0 - 0.25) / denom));
    EXPECT_EQ(dprobs[1], 0.0f);
  }
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
