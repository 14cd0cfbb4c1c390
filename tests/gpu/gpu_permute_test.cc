// The device permute kernels (runtime/device/cuda/permute.h) against the CPU loops of the MoE layer, on a
// real DispatchPlan (top-2 with drops, so some tokens have 0, 1 or 2 rows): gathers are exact,
// combines and the gate gradient within 1e-6 of the largest magnitude (fused multiply-adds, a
// tree-ordered dot product). Row widths 64 (float4 path) and 30 (scalar path). Outputs are
// poisoned (NaN) first, so an element nothing wrote fails. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "base/memory.h"
#include "runtime/device/cuda/permute.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/layer/cpu_moe_layer.h"
#include "tests/gpu/device_util.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

using testing::FromDevice;
using testing::ToDevice;

std::vector<float> Poison(int64_t n) {
  return std::vector<float>(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN());
}

double RelativeError(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double worst = 0, scale = 1;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, static_cast<double>(std::abs(got[i] - want[i])));
    scale = std::max(scale, static_cast<double>(std::abs(want[i])));
  }
  return worst / scale;
}

class GpuPermute : public ::testing::TestWithParam<int> {};

TEST_P(GpuPermute, MatchesTheCpuLoops) {
  MOE_REQUIRE_GPU();
  const int cols = GetParam();
  constexpr int kTokens = 200, kExperts = 8;
  // A plan from the real router: top-2, capacity factor 0.5 so that some slots drop.
  const config::LayerConfig cfg = testing::LayerFromText(
      "model_dim: 4 num_experts: 8 expert { hidden_dim: 4 } router { gate: TOPK top_k: 2 "
      "capacity_factor_train: 0.5 min_capacity: 1 normalization: RENORM_AFTER_CAPACITY }");
  Tensor probs(kTokens, kExperts);
  testing::FillRandom(&probs, 3, 1.0f);
  for (int64_t t = 0; t < kTokens; ++t) {
    float sum = 0;
    for (int e = 0; e < kExperts; ++e) sum += probs(t, e) = std::abs(probs(t, e)) + 0.01f;
    for (int e = 0; e < kExperts; ++e) probs(t, e) /= sum;
  }
  RouteContext ctx;
  ctx.train = true;
  auto plan = BuildDispatchPlan(cfg.router(), probs, {}, ctx);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  const DispatchPlan& p = *plan;
  const int64_t rows = p.num_rows();
  ASSERT_GT(p.dropped_slots, 0);

  Tensor x(kTokens, cols), packed_y(rows, cols), dy(kTokens, cols), base(kTokens, cols);
  testing::FillRandom(&x, 4, 1.0f);
  testing::FillRandom(&packed_y, 5, 1.0f);
  testing::FillRandom(&dy, 6, 1.0f);
  testing::FillRandom(&base, 7, 1.0f);

  // CPU: the loops of CpuMoeLayer::Forward / Backward.
  std::vector<float> want_packed(static_cast<size_t>(rows * cols)),
      want_out = base.vec(), want_pdy(static_cast<size_t>(rows * cols)),
      want_dgate(static_cast<size_t>(rows)), want_dx(static_cast<size_t>(kTokens * cols), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    double dot = 0;
    for (int c = 0; c < cols; ++c) {
      want_packed[static_cast<size_t>(r * cols + c)] = x(p.row_token[r], c);
      want_pdy[static_cast<size_t>(r * cols + c)] = p.row_gate[r] * dy(p.row_token[r], c);
      dot += static_cast<double>(dy(p.row_token[r], c)) * packed_y(r, c);
    }
    want_dgate[static_cast<size_t>(r)] = static_cast<float>(dot);
  }
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t i = p.token_row_offset[t]; i < p.token_row_offset[t + 1]; ++i) {
      const int32_t r = p.token_rows[i];
      for (int c = 0; c < cols; ++c) {
        want_out[static_cast<size_t>(t * cols + c)] += p.row_gate[r] * packed_y(r, c);
        want_dx[static_cast<size_t>(t * cols + c)] += packed_y(r, c);
      }
    }
  }

  Buffer row_token = ToDevice(p.row_token), row_gate = ToDevice(p.row_gate),
         offsets = ToDevice(p.token_row_offset), token_rows = ToDevice(p.token_rows);
  gpu::DevicePlan dp{rows,
                     kTokens,
                     row_token.as<int32_t>(),
                     row_gate.as<float>(),
                     offsets.as<int64_t>(),
                     token_rows.as<int32_t>()};
  Buffer d_x = ToDevice(x.vec()), d_py = ToDevice(packed_y.vec()), d_dy = ToDevice(dy.vec());
  Buffer d_packed = ToDevice(Poison(rows * cols)), d_out = ToDevice(base.vec()),
         d_pdy = ToDevice(Poison(rows * cols)), d_dgate = ToDevice(Poison(rows)),
         d_dx = ToDevice(Poison(kTokens * cols));

  ASSERT_TRUE(gpu::PermuteRows(dp, d_x.as<float>(), cols, d_packed.as<float>(), nullptr).ok());
  ASSERT_TRUE(
      gpu::UnpermuteRows(dp, d_py.as<float>(), cols, true, true, d_out.as<float>(), nullptr).ok());
  ASSERT_TRUE(gpu::PermuteGradRows(dp, d_dy.as<float>(), d_py.as<float>(), cols, d_pdy.as<float>(),
                                   d_dgate.as<float>(), nullptr)
                  .ok());
  ASSERT_TRUE(
      gpu::UnpermuteRows(dp, d_py.as<float>(), cols, false, false, d_dx.as<float>(), nullptr).ok());

  EXPECT_EQ(FromDevice<float>(d_packed, rows * cols), want_packed);  // copies: exact
  EXPECT_EQ(FromDevice<float>(d_pdy, rows * cols), want_pdy);        // one product each: exact
  EXPECT_LE(RelativeError(FromDevice<float>(d_out, kTokens * cols), want_out), 1e-6);
  EXPECT_LE(RelativeError(FromDevice<float>(d_dgate, rows), want_dgate), 1e-6);
  EXPECT_LE(RelativeError(FromDevice<float>(d_dx, kTokens * cols), want_dx), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Widths, GpuPermute, ::testing::Values(64, 30));

// Without a GPU a call fails with a status that names it (a CUDA build: the launch error; no CUDA:
// kUnimplemented), never a crash.
TEST(GpuPermuteNoDevice, WithoutAGpuTheCallsFailWithAReason) {
  if (CudaDeviceCount() > 0) {
    GTEST_SKIP() << "a CUDA device is visible; this checks the error without one";
  }
  gpu::DevicePlan plan;
  plan.rows = 1;  // a launch is needed to meet the missing device
  plan.tokens = 1;
  const Status s = gpu::PermuteRows(plan, nullptr, 4, nullptr, nullptr);
  ASSERT_FALSE(s.ok());
#if MOE_BASE_HAVE_CUDA
  EXPECT_EQ(s.code(), StatusCode::kInternal) << s.ToString();
#else
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << s.ToString();
#endif
  EXPECT_NE(s.message().find("PermuteRows"), std::string::npos) << s.ToString();
}

}  // namespace
}  // namespace moe
