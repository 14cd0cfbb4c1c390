// The CUDA device's operations (runtime/device/cuda/cuda_device.h) against the host device's on
// the same inputs — what differs between the layer on a GPU and the layer CI runs. The rows come
// from a real plan (top-2 with drops: tokens with 0, 1 or 2 rows) and a real exchange layout of
// 3 ranks (capacity padding, self rows, chunks), through the maps the engine gives the gathers:
//  - GatherRows in every format (fp32 with and without gates, rounded to bf16, bf16), with
//    destination maps and zero padding rows: exact (copies, one product, the same rounding);
//  - CombineRows (gated and not) over returned rows split between the send layout and the self
//    rows, GateGradients: within 1e-6 of the largest magnitude (fused multiply-adds; a float,
//    tree-ordered dot product where the host sums in double);
//  - Cast in every direction: exact;
//  - Gemm in every transpose with beta 0 and 1 and k = 0: within 1e-5 (summation order).
// Row widths 64 (the float4 path) and 30 (scalar). Outputs are poisoned (NaN) first, so an element
// nothing wrote fails. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "base/memory.h"
#include "runtime/device/cuda/cuda_device.h"
#include "runtime/device/host_device.h"
#include "runtime/exchange/exchange_layout.h"
#include "runtime/routing/dispatch_plan.h"
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

// A top-2 plan of 200 tokens over 6 experts with drops (capacity factor 0.5).
DispatchPlan MakePlan() {
  const config::LayerConfig cfg = testing::LayerFromText(
      "model_dim: 4 num_experts: 6 expert { hidden_dim: 4 } router { gate: TOPK top_k: 2 "
      "capacity_factor_train: 0.5 min_capacity: 1 normalization: RENORM_AFTER_CAPACITY }");
  Tensor probs(200, 6);
  testing::FillRandom(&probs, 3, 1.0f);
  for (int64_t t = 0; t < probs.rows(); ++t) {
    float sum = 0;
    for (int e = 0; e < 6; ++e) sum += probs(t, e) = std::abs(probs(t, e)) + 0.01f;
    for (int e = 0; e < 6; ++e) probs(t, e) /= sum;
  }
  RouteContext ctx;
  ctx.train = true;
  auto plan = BuildDispatchPlan(cfg.router(), probs, {}, ctx);
  EXPECT_TRUE(plan.ok()) << plan.status().ToString();
  return std::move(plan).value();
}

class GpuDeviceOps : public ::testing::TestWithParam<int> {};

TEST_P(GpuDeviceOps, MatchTheHostDevice) {
  MOE_REQUIRE_GPU();
  const int64_t cols = GetParam();
  auto made = MakeCudaDevice({.gpu = 0});
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  Device& gpu = **made;
  HostDevice host;
  const DispatchPlan p = MakePlan();
  const int64_t s = p.num_tokens, rows = p.num_rows();
  ASSERT_GT(p.dropped_slots, 0);
  // Rank 1 of 3 (2 experts each) in capacity mode with 2 chunks: padding, self rows, chunks.
  std::vector<int64_t> send(6), recv(6, p.capacity);
  for (int e = 0; e < 6; ++e) send[e] = p.group_expert_count[e];
  auto layout = MakeExchangeLayout({.ranks = 3, .local_experts = 2, .chunks = 2,
                                    .capacity = p.capacity, .self = 1},
                                   send, recv);
  ASSERT_TRUE(layout.ok()) << layout.status().ToString();
  const ExchangeMaps maps = MakeExchangeMaps(*layout);
  ASSERT_FALSE(maps.self_dst.empty());
  ASSERT_NE(std::count(maps.send_src.begin(), maps.send_src.end(), -1), 0);  // padding rows

  Tensor x(s, cols), dy(s, cols), ret(layout->send_rows, cols), self(layout->recv_rows, cols);
  testing::FillRandom(&x, 4, 1.0f);
  testing::FillRandom(&dy, 5, 1.0f);
  testing::FillRandom(&ret, 6, 1.0f);
  testing::FillRandom(&self, 7, 1.0f);
  // The plan's arrays and the maps on the device.
  Buffer row_token = ToDevice(p.row_token), row_gate = ToDevice(p.row_gate),
         offsets = ToDevice(p.token_row_offset), token_rows = ToDevice(p.token_rows),
         send_dst = ToDevice(maps.send_dst), send_src = ToDevice(maps.send_src),
         return_row = ToDevice(maps.return_row);
  const PlanRows host_plan{rows, s, p.row_token.data(), p.row_gate.data(),
                           p.token_row_offset.data(), p.token_rows.data()};
  const PlanRows gpu_plan{rows, s, row_token.as<int32_t>(), row_gate.as<float>(),
                          offsets.as<int64_t>(), token_rows.as<int32_t>()};
  Buffer d_x = ToDevice(x.vec()), d_dy = ToDevice(dy.vec()), d_ret = ToDevice(ret.vec()),
         d_self = ToDevice(self.vec());

  // Gathers into the send layout, every format, with and without the backward's gates.
  const int64_t n = static_cast<int64_t>(maps.send_dst.size()), out = layout->send_rows * cols;
  for (const RowFormat format : {RowFormat::kFloat32, RowFormat::kRoundedBf16, RowFormat::kBf16}) {
    for (const bool gated : {false, true}) {
      SCOPED_TRACE(std::string("format ") + std::to_string(static_cast<int>(format)) +
                   (gated ? ", gated" : ""));
      const bool half = format == RowFormat::kBf16;
      std::vector<float> want = Poison(out);  // bf16 rows fill the first half of the floats
      RowGather g{.rows = n,
                  .cols = cols,
                  .src_row = maps.send_src.data(),
                  .dst_row = maps.send_dst.data(),
                  .row_token = p.row_token.data(),
                  .row_gate = gated ? p.row_gate.data() : nullptr,
                  .src = x.data(),
                  .dst = want.data(),
                  .format = format};
      ASSERT_TRUE(host.GatherRows(g).ok());
      Buffer d_out = ToDevice(Poison(out));
      g.src_row = send_src.as<int32_t>();
      g.dst_row = send_dst.as<int32_t>();
      g.row_token = row_token.as<int32_t>();
      g.row_gate = gated ? row_gate.as<float>() : nullptr;
      g.src = d_x.as<float>();
      g.dst = d_out.data();
      ASSERT_TRUE(gpu.GatherRows(g).ok());
      std::vector<float> got = FromDevice<float>(d_out, out);
      const int64_t bytes = half ? out * 2 : out * 4;
      EXPECT_EQ(std::memcmp(got.data(), want.data(), static_cast<size_t>(bytes)), 0);
    }
  }

  // The combine and the gates' gradients over rows returned to the send layout and self rows.
  const ReturnedRows host_ret{maps.return_row.data(), ret.data(), self.data()};
  const ReturnedRows gpu_ret{return_row.as<int32_t>(), d_ret.as<float>(), d_self.as<float>()};
  for (const bool gated : {true, false}) {
    std::vector<float> want = dy.vec();  // y += ..., from a nonzero start
    ASSERT_TRUE(host.CombineRows({.cols = cols, .plan = host_plan, .returned = host_ret,
                                  .gated = gated, .y = want.data()})
                    .ok());
    Buffer d_y = ToDevice(dy.vec());
    ASSERT_TRUE(gpu.CombineRows({.cols = cols, .plan = gpu_plan, .returned = gpu_ret,
                                 .gated = gated, .y = d_y.as<float>()})
                    .ok());
    EXPECT_LE(RelativeError(FromDevice<float>(d_y, s * cols), want), 1e-6) << "gated " << gated;
  }
  std::vector<float> want_dgate = Poison(rows);
  ASSERT_TRUE(host.GateGradients({.cols = cols, .plan = host_plan, .returned = host_ret,
                                  .dy = dy.data(), .dgate = want_dgate.data()})
                  .ok());
  Buffer d_dgate = ToDevice(Poison(rows));
  ASSERT_TRUE(gpu.GateGradients({.cols = cols, .plan = gpu_plan, .returned = gpu_ret,
                                 .dy = d_dy.as<float>(), .dgate = d_dgate.as<float>()})
                  .ok());
  EXPECT_LE(RelativeError(FromDevice<float>(d_dgate, rows), want_dgate), 1e-6);

  // Casts: to bf16, back, and rounded in place.
  const int64_t count = s * cols;
  std::vector<uint16_t> want16(static_cast<size_t>(count));
  ASSERT_TRUE(host.Cast(CastKind::kToBf16, x.data(), want16.data(), count).ok());
  Buffer d16 = testing::DeviceArray<uint16_t>(count);
  ASSERT_TRUE(gpu.Cast(CastKind::kToBf16, d_x.data(), d16.data(), count).ok());
  EXPECT_EQ(FromDevice<uint16_t>(d16, count), want16);
  std::vector<float> want_wide(static_cast<size_t>(count));
  ASSERT_TRUE(host.Cast(CastKind::kFromBf16, want16.data(), want_wide.data(), count).ok());
  Buffer d_wide = ToDevice(Poison(count));
  ASSERT_TRUE(gpu.Cast(CastKind::kFromBf16, d16.data(), d_wide.data(), count).ok());
  EXPECT_EQ(FromDevice<float>(d_wide, count), want_wide);
  std::vector<float> want_round = x.vec();
  ASSERT_TRUE(host.Cast(CastKind::kRoundBf16, want_round.data(), want_round.data(), count).ok());
  ASSERT_TRUE(gpu.Cast(CastKind::kRoundBf16, d_x.data(), d_x.data(), count).ok());
  EXPECT_EQ(FromDevice<float>(d_x, count), want_round);
  ASSERT_TRUE(gpu.Synchronize().ok());
}

INSTANTIATE_TEST_SUITE_P(Widths, GpuDeviceOps, ::testing::Values(64, 30));

// Device::Gemm (the router, Soft MoE's mixing, the router's gradients): the row-major operands in
// column-major cuBLAS, every transpose, beta 0 and 1, and k = 0 (C zeroed, or kept) — within 1e-5
// of the largest magnitude of the host's OpenBLAS result (fp32, no TF32; summation order only).
TEST(GpuDeviceOps, GemmMatchesTheHostInEveryLayout) {
  MOE_REQUIRE_GPU();
  auto made = MakeCudaDevice({.gpu = 0});
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  Device& gpu = **made;
  HostDevice host;
  for (const int64_t k : {int64_t{37}, int64_t{0}}) {
    for (const bool ta : {false, true}) {
      for (const bool tb : {false, true}) {
        for (const float beta : {0.0f, 1.0f}) {
          SCOPED_TRACE("k " + std::to_string(k) + (ta ? " Aᵀ" : " A") + (tb ? " Bᵀ" : " B") +
                       " beta " + std::to_string(beta));
          const int64_t m = 19, n = 23;
          Tensor a(ta ? k : m, ta ? m : k), b(tb ? n : k, tb ? k : n), c(m, n);
          testing::FillRandom(&a, 11, 1.0f);
          testing::FillRandom(&b, 12, 1.0f);
          testing::FillRandom(&c, 13, 1.0f);
          std::vector<float> want = c.vec();
          ASSERT_TRUE(
              host.Gemm(ta, tb, m, n, k, 0.5f, a.data(), b.data(), beta, want.data()).ok());
          Buffer d_a = ToDevice(a.vec()), d_b = ToDevice(b.vec()), d_c = ToDevice(c.vec());
          ASSERT_TRUE(gpu.Gemm(ta, tb, m, n, k, 0.5f, d_a.as<float>(), d_b.as<float>(), beta,
                               d_c.as<float>())
                          .ok());
          ASSERT_TRUE(gpu.Synchronize().ok());
          EXPECT_LE(RelativeError(FromDevice<float>(d_c, m * n), want), 1e-5);
        }
      }
    }
  }
}

}  // namespace
}  // namespace moe
