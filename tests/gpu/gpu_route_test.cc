// The device router (runtime/device/cuda/route.h) against the CPU router and plan:
//  - SoftmaxRows within 1e-6 of runtime SoftmaxRows (expf vs std::exp);
//  - DeviceRouter on random logits: probs (and, noisy, eps) within 1e-6 of FinishRouter; on the
//    device's own probs, BuildDispatchPlan's whole plan identical — selection, random-routing and
//    capacity drops, positions through the packed rows, gates, per-token rows, counts and metrics —
//    for top-1/2/4, the three normalizations, both drop policies, random routing, the noisy router,
//    1 and 3 groups, capacity and dropless, the aux-loss-free bias and exact ties, and expert
//    choice (ec_token too) with tight, loose and no capacity; the losses
//    within 1e-9 and the router's backward (dlogits, dnoise) within 1e-5 of RouterScoreGradients;
//  - which configs route on the device, and why the others do not (runs without a GPU).
// Skips the GPU cases without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "base/memory.h"
#include "runtime/config/config.h"
#include "runtime/device/cuda/route.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/routing/router.h"
#include "tests/gpu/device_util.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {


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
  bool ties = false;  // quantized logits: many exact ties
};
void PrintTo(const RouteCase& c, std::ostream* os) { *os << c.name; }

class GpuRouteVersusPlan : public ::testing::TestWithParam<RouteCase> {};

TEST_P(GpuRouteVersusPlan, SameRoutingAsTheCpuPlan) {
  MOE_REQUIRE_GPU();
  const RouteCase& c = GetParam();
  constexpr int64_t kTokens = 301, kExperts = 8;
  const config::LayerConfig cfg = ResolvedLayerConfig(testing::LayerFromText(
      "model_dim: 4 num_experts: 8 expert { hidden_dim: 4 } router { " + c.router + " }"));
  const config::RouterConfig& rc = cfg.router();
  Tensor logits(kTokens, kExperts), noise_in(kTokens, kExperts);
  testing::FillRandom(&logits, 21, 3.0f);
  testing::FillRandom(&noise_in, 23, 2.0f);
  if (c.ties) {
    for (int64_t i = 0; i < logits.size(); ++i) logits[i] = std::round(logits[i]);
  }
  std::vector<float> bias;
  if (c.bias) {
    Tensor b(1, kExperts);
    testing::FillRandom(&b, 22, 0.05f);
    bias = b.vec();
  }
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = 7;
  ctx.step = 3;
  ctx.token_offset = 1000;

  Buffer d_logits = ToDevice(logits.vec()), d_noise = ToDevice(noise_in.vec());
  Buffer d_bias = bias.empty() ? Buffer() : ToDevice(bias);
  auto router = gpu::DeviceRouter::Create(rc, kExperts, nullptr);
  ASSERT_TRUE(router.ok()) << router.status().ToString();
  DispatchPlan got;
  RouterLosses got_losses;
  Status st = (*router)->Forward(d_logits.as<float>(), d_noise.as<float>(),
                                 bias.empty() ? nullptr : d_bias.as<float>(), kTokens, ctx, &got,
                                 &got_losses);
  ASSERT_TRUE(st.ok()) << st.ToString();
  // Before Fetch: the counts and metrics only, num_rows() right.
  EXPECT_TRUE(got.slot_expert.empty());
  const int64_t rows = got.num_rows();
  RouterOutput dev;
  st = (*router)->Fetch(&got, &dev);
  ASSERT_TRUE(st.ok()) << st.ToString();

  // The router: probs (and the noise) as FinishRouter's.
  RouterOutput host;
  host.logits = logits;
  host.noise_in = noise_in;
  FinishRouter(rc, ctx, &host);
  ASSERT_EQ(dev.noisy, host.noisy);
  EXPECT_EQ(dev.logits.vec(), logits.vec());
  for (int64_t i = 0; i < host.probs.size(); ++i)
    ASSERT_NEAR(dev.probs[i], host.probs[i], 1e-6) << i;
  if (host.noisy) {
    for (int64_t i = 0; i < host.eps.size(); ++i) ASSERT_NEAR(dev.eps[i], host.eps[i], 1e-6) << i;
  }

  // The plan: identical to the CPU's on the device's probs.
  auto plan = BuildDispatchPlan(rc, dev.probs, bias, ctx);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  const DispatchPlan& p = *plan;
  EXPECT_EQ(rows, p.num_rows());
  EXPECT_EQ(got.top_k, p.top_k);
  EXPECT_EQ(got.expert_choice, p.expert_choice);
  EXPECT_EQ(got.capacity, p.capacity);
  EXPECT_EQ(got.group_begin, p.group_begin);
  EXPECT_EQ(got.selected, p.selected);
  EXPECT_EQ(got.slot_final, p.slot_final);
  EXPECT_EQ(got.slot_expert, p.slot_expert);
  EXPECT_EQ(got.slot_raw, p.slot_raw);
  EXPECT_EQ(got.slot_gate, p.slot_gate);
  EXPECT_EQ(got.slot_row, p.slot_row);
  EXPECT_EQ(got.expert_offset, p.expert_offset);
  EXPECT_EQ(got.group_expert_count, p.group_expert_count);
  EXPECT_EQ(got.row_token, p.row_token);
  EXPECT_EQ(got.row_expert, p.row_expert);
  EXPECT_EQ(got.row_gate, p.row_gate);
  EXPECT_EQ(got.token_row_offset, p.token_row_offset);
  EXPECT_EQ(got.token_rows, p.token_rows);
  EXPECT_EQ(got.ec_token, p.ec_token);
  EXPECT_EQ(got.kept_per_expert, p.kept_per_expert);
  EXPECT_EQ(got.dropped_per_expert, p.dropped_per_expert);
  EXPECT_EQ(got.load_per_expert, p.load_per_expert);
  EXPECT_EQ(got.dropped_slots, p.dropped_slots);

  // The losses, from the device's per-group sums.
  const RouterLosses want_losses = ComputeRouterLosses(rc, p, dev.probs, logits);
  EXPECT_NEAR(got_losses.aux, want_losses.aux, 1e-9 * std::max(1.0, std::abs(want_losses.aux)));
  EXPECT_NEAR(got_losses.z, want_losses.z, 1e-9 * std::max(1.0, std::abs(want_losses.z)));

  // The router's backward from random gate gradients.
  Tensor dgate(1, std::max<int64_t>(rows, 1));
  testing::FillRandom(&dgate, 31, 1.0f);
  std::vector<float> dgate_rows(dgate.vec().begin(), dgate.vec().begin() + rows);
  Buffer d_dgate = ToDevice(dgate.vec());
  Buffer d_dlogits = DeviceArray<float>(kTokens * kExperts),
         d_dnoise = DeviceArray<float>(kTokens * kExperts);
  constexpr double kScale = 0.7;
  st =
      (*router)->Backward(d_dgate.as<float>(), kScale, d_dlogits.as<float>(), d_dnoise.as<float>());
  ASSERT_TRUE(st.ok()) << st.ToString();
  // (The router runs on the legacy default stream: the copies below wait for it.)
  RouterGradients want;
  RouterScoreGradients(rc, p, dev, dgate_rows.data(), kScale, &want);
  const Tensor dlogits =
      testing::MakeTensor(kTokens, kExperts, FromDevice<float>(d_dlogits, kTokens * kExperts));
  EXPECT_LT(testing::RelativeError(dlogits, want.dlogits), 1e-5);
  if (dev.noisy) {
    const Tensor dnoise =
        testing::MakeTensor(kTokens, kExperts, FromDevice<float>(d_dnoise, kTokens * kExperts));
    EXPECT_LT(testing::RelativeError(dnoise, want.dnoise), 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Routers, GpuRouteVersusPlan,
    ::testing::Values(
        RouteCase{"top1_capacity", "gate: TOP1 capacity_factor_train: 1.0 min_capacity: 1"},
        RouteCase{"top2_none_capacity_switch_z",
                  "gate: TOPK top_k: 2 capacity_factor_train: 0.75 min_capacity: 1 "
                  "aux_loss: SWITCH aux_loss_weight: 0.01 z_loss_weight: 0.001"},
        RouteCase{
            "top2_renorm_groups3",
            "gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY capacity_factor_train: 1.0 "
            "min_capacity: 1 num_local_groups: 3"},
        RouteCase{"top4_topk_softmax_dropless_importance",
                  "gate: TOPK top_k: 4 normalization: TOPK_SOFTMAX capacity_factor_train: 0 "
                  "aux_loss: IMPORTANCE_CV aux_loss_weight: 0.1"},
        RouteCase{"top2_bias", "gate: TOPK top_k: 2 capacity_factor_train: 1.25 min_capacity: 2",
                  true},
        RouteCase{
            "top2_ties_groups3",
            "gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY capacity_factor_train: 1.0 "
            "min_capacity: 1 num_local_groups: 3",
            false, true},
        RouteCase{"top2_probability_groups3",
                  "gate: TOPK top_k: 2 drop_policy: PROBABILITY capacity_factor_train: 0.75 "
                  "min_capacity: 1 num_local_groups: 3 aux_loss: GSHARD aux_loss_weight: 0.01"},
        RouteCase{"top2_probability_ties",
                  "gate: TOPK top_k: 2 drop_policy: PROBABILITY capacity_factor_train: 0.75 "
                  "min_capacity: 1",
                  false, true},
        RouteCase{"top2_random_routing_renorm",
                  "gate: TOPK top_k: 2 random_routing: true normalization: RENORM_AFTER_CAPACITY "
                  "capacity_factor_train: 1.0 min_capacity: 1 num_local_groups: 3"},
        RouteCase{"noisy_top2_importance",
                  "gate: NOISY_TOPK top_k: 2 normalization: TOPK_SOFTMAX "
                  "capacity_factor_train: 1.0 min_capacity: 1 aux_loss: IMPORTANCE_CV "
                  "aux_loss_weight: 0.1 z_loss_weight: 0.001"},
        RouteCase{"expert_choice_groups3_z",
                  "gate: EXPERT_CHOICE capacity_factor_train: 1.0 num_local_groups: 3 "
                  "z_loss_weight: 0.001"},
        RouteCase{"expert_choice_tight_ties",
                  "gate: EXPERT_CHOICE capacity_factor_train: 0.5 min_capacity: 2", false, true},
        RouteCase{"expert_choice_every_token",
                  "gate: EXPERT_CHOICE capacity_factor_train: 0 num_local_groups: 2"}),
    [](const ::testing::TestParamInfo<RouteCase>& p) { return p.param.name; });

// Which router configs the device routes (CUDA builds; needs no GPU), and the reason for the rest.
TEST(DeviceRouterSupport, RerouteAndLargeKStayOnTheHost) {
  std::string why;
  const auto router = [](const std::string& text) {
    return ResolvedLayerConfig(testing::LayerFromText("model_dim: 4 num_experts: 32 expert { "
                                                      "hidden_dim: 4 } router { " +
                                                      text + " }"))
        .router();
  };
#if MOE_BASE_HAVE_CUDA
  EXPECT_TRUE(gpu::DeviceRouter::Supports(router("gate: TOPK top_k: 2"), &why)) << why;
  EXPECT_TRUE(why.empty());
  EXPECT_TRUE(gpu::DeviceRouter::Supports(
      router("gate: TOPK top_k: 2 drop_policy: PROBABILITY random_routing: true"), nullptr));
  EXPECT_TRUE(
      gpu::DeviceRouter::Supports(router("gate: EXPERT_CHOICE capacity_factor_train: 1.0"), &why))
      << why;
  EXPECT_FALSE(
      gpu::DeviceRouter::Supports(router("gate: TOPK top_k: 2 reroute_overflow: true"), &why));
  EXPECT_NE(why.find("reroute_overflow"), std::string::npos) << why;
  EXPECT_FALSE(gpu::DeviceRouter::Supports(router("gate: TOPK top_k: 17"), &why));
  EXPECT_NE(why.find("top_k=17"), std::string::npos) << why;
  auto made =
      gpu::DeviceRouter::Create(router("gate: TOPK top_k: 2 reroute_overflow: true"), 32, nullptr);
  ASSERT_FALSE(made.ok());
  EXPECT_NE(made.status().ToString().find("reroute_overflow"), std::string::npos);
#else
  EXPECT_FALSE(gpu::DeviceRouter::Supports(router("gate: TOPK top_k: 2"), &why));
  EXPECT_NE(why.find("CUDA build"), std::string::npos) << why;
#endif
}

}  // namespace
}  // namespace moe
