// The device routing kernels (runtime/cuda/route.h) against the CPU router and plan:
//  - SoftmaxRows within 1e-6 of runtime SoftmaxRows (expf vs std::exp);
//  - RouteTokenChoice on the same probs as BuildDispatchPlan: selected experts, kept/dropped
//    slots, positions (through the kept counts per (group, expert)) and the experts identical,
//    gates within 4 ulp, for top-1/top-2/top-4, the three normalizations, 1 and 3 groups, with
//    capacity (drops) and dropless, with and without the aux-loss-free bias, and with exact ties.
// Skips without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "comm/memory.h"
#include "runtime/cuda/route.h"
#include "runtime/dispatch_plan.h"
#include "runtime/router.h"
#include "tests/gpu/device_util.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

using comm::Buffer;
using comm::MemorySpace;

using testing::DeviceArray;
using testing::FromDevice;
using testing::ToDevice;

TEST(GpuRoute, SoftmaxMatchesCpu) {
  MOE_REQUIRE_GPU();
  Tensor logits(300, 37), want(300, 37);
  testing::FillRandom(&logits, 9, 8.0f);
  SoftmaxRows(logits.view(), want.view());
  Buffer d_logits = ToDevice(logits.vec()), d_probs = DeviceArray<float>(logits.size());
  ASSERT_TRUE(gpu::SoftmaxRows(d_logits.as<float>(), 300, 37, d_probs.as<float>(), nullptr).ok());
  const std::vector<float> got = FromDevice<float>(d_probs, logits.size());
  for (int64_t i = 0; i < want.size(); ++i)
    ASSERT_NEAR(got[static_cast<size_t>(i)], want[i], 1e-6) << i;
}

struct RouteCase {
  std::string name;
  std::string router;  // router { ... } fields
  bool bias = false;
  bool ties = false;  // quantized probs: many exact ties
};
void PrintTo(const RouteCase& c, std::ostream* os) { *os << c.name; }

class GpuRouteVersusPlan : public ::testing::TestWithParam<RouteCase> {};

TEST_P(GpuRouteVersusPlan, SameRoutingAsTheCpuPlan) {
  MOE_REQUIRE_GPU();
  const RouteCase& c = GetParam();
  constexpr int64_t kTokens = 301, kExperts = 8;
  const config::LayerConfig cfg = testing::LayerFromText(
      "model_dim: 4 num_experts: 8 expert { hidden_dim: 4 } router { " + c.router + " }");
  Tensor probs(kTokens, kExperts);
  testing::FillRandom(&probs, 21, 1.0f);
  for (int64_t t = 0; t < kTokens; ++t) {
    float sum = 0;
    for (int64_t e = 0; e < kExperts; ++e) {
      float v = std::abs(probs(t, e)) + 0.01f;
      if (c.ties) v = std::round(v * 4.0f) / 4.0f + 0.25f;
      sum += probs(t, e) = v;
    }
    for (int64_t e = 0; e < kExperts; ++e) probs(t, e) /= sum;
  }
  std::vector<float> bias;
  if (c.bias) {
    Tensor b(1, kExperts);
    testing::FillRandom(&b, 22, 0.05f);
    bias = b.vec();
  }
  RouteContext ctx;
  ctx.train = true;
  auto plan = BuildDispatchPlan(cfg.router(), probs, bias, ctx);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  const DispatchPlan& p = *plan;
  const int64_t k = p.top_k, slots = kTokens * k;

  Buffer d_probs = ToDevice(probs.vec());
  Buffer d_bias = bias.empty() ? Buffer() : ToDevice(bias);
  Buffer selected = DeviceArray<int32_t>(slots), position = DeviceArray<int32_t>(slots),
         slot_expert = DeviceArray<int32_t>(slots), slot_gate = DeviceArray<float>(slots),
         counts = DeviceArray<int32_t>(p.num_groups * kExperts);
  gpu::TokenChoiceShape shape{kTokens, kExperts, k, p.num_groups, p.capacity, p.normalization};
  const Status s = gpu::RouteTokenChoice(
      shape, d_probs.as<float>(), bias.empty() ? nullptr : d_bias.as<float>(),
      {selected.as<int32_t>(), position.as<int32_t>(), slot_expert.as<int32_t>(),
       slot_gate.as<float>(), counts.as<int32_t>()},
      nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();

  EXPECT_EQ(FromDevice<int32_t>(selected, slots), p.selected);
  EXPECT_EQ(FromDevice<int32_t>(slot_expert, slots), p.slot_expert);
  EXPECT_EQ(FromDevice<int32_t>(counts, p.num_groups * kExperts), p.group_expert_count);
  const std::vector<float> gates = FromDevice<float>(slot_gate, slots);
  for (int64_t i = 0; i < slots; ++i)
    EXPECT_FLOAT_EQ(gates[static_cast<size_t>(i)], p.slot_gate[i]) << "slot " << i;
  // Positions: the kept slots of each (group, expert) take 0, 1, 2, ... in slot-major order, as the
  // plan's row layout does; check them through the plan's packed rows.
  const std::vector<int32_t> pos = FromDevice<int32_t>(position, slots);
  for (int64_t i = 0; i < slots; ++i) {
    ASSERT_EQ(pos[static_cast<size_t>(i)] >= 0, p.slot_expert[i] >= 0) << "slot " << i;
    if (pos[static_cast<size_t>(i)] < 0) continue;
    const int64_t t = i / k;
    int64_t g = 0;
    while (p.group_begin[g + 1] <= t) ++g;
    const int32_t e = p.slot_expert[i];
    int64_t row = p.expert_offset[e];
    for (int64_t gg = 0; gg < g; ++gg) row += p.group_expert_count[gg * kExperts + e];
    EXPECT_EQ(p.slot_row[i], row + pos[static_cast<size_t>(i)]) << "slot " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Routers, GpuRouteVersusPlan,
    ::testing::Values(
        RouteCase{"top1_capacity", "gate: TOP1 capacity_factor_train: 1.0 min_capacity: 1"},
        RouteCase{"top2_none_capacity",
                  "gate: TOPK top_k: 2 capacity_factor_train: 0.75 min_capacity: 1"},
        RouteCase{
            "top2_renorm_groups3",
            "gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY capacity_factor_train: 1.0 "
            "min_capacity: 1 num_local_groups: 3"},
        RouteCase{"top4_topk_softmax_dropless",
                  "gate: TOPK top_k: 4 normalization: TOPK_SOFTMAX capacity_factor_train: 0"},
        RouteCase{"top2_bias", "gate: TOPK top_k: 2 capacity_factor_train: 1.25 min_capacity: 2",
                  true},
        RouteCase{
            "top2_ties_groups3",
            "gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY capacity_factor_train: 1.0 "
            "min_capacity: 1 num_local_groups: 3",
            false, true}),
    [](const ::testing::TestParamInfo<RouteCase>& p) { return p.param.name; });

}  // namespace
}  // namespace moe
