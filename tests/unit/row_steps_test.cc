// The row operations' index arithmetic (runtime/device/row_steps.h) — the per-row code the CUDA
// kernels run — and the host device's row operations built on it, on hand-made maps with exact
// answers (small integers and powers of two: exact in fp32 and bf16).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "base/bf16.h"
#include "runtime/device/host_device.h"
#include "runtime/device/row_steps.h"

namespace moe {
namespace {

// Three source tokens of width 2 ({1, 2}, {3, 4}, {5, 6}) reached through a plan of 3 rows:
// plan row p is token row_token[p] with gate row_gate[p].
const std::vector<float> kX = {1, 2, 3, 4, 5, 6};
const std::vector<int32_t> kRowToken = {2, 0, 1};
const std::vector<float> kRowGate = {0.5f, 2.0f, 4.0f};
// Gather row i writes destination dst[i] from plan row src[i] (-1: zeros).
const std::vector<int32_t> kSrc = {2, -1, 0};
const std::vector<int32_t> kDst = {3, 0, 1};

RowGather Gather(RowFormat format, bool gated, void* dst) {
  return {.rows = 3,
          .cols = 2,
          .src_row = kSrc.data(),
          .dst_row = kDst.data(),
          .row_token = kRowToken.data(),
          .row_gate = gated ? kRowGate.data() : nullptr,
          .src = kX.data(),
          .dst = dst,
          .format = format};
}

TEST(RowSteps, GatherIndexArithmetic) {
  const RowGather g = Gather(RowFormat::kFloat32, true, nullptr);
  EXPECT_EQ(row_steps::GatherDestination(g, 0), 3);
  EXPECT_EQ(row_steps::GatherSource(g, 0), 1);  // plan row 2 -> token 1
  EXPECT_EQ(row_steps::GatherScale(g, 0), 4.0f);
  EXPECT_EQ(row_steps::GatherSource(g, 1), -1);  // padding
  EXPECT_EQ(row_steps::GatherSource(g, 2), 2);   // plan row 0 -> token 2
  RowGather plain = g;
  plain.dst_row = nullptr;
  plain.row_token = nullptr;
  plain.row_gate = nullptr;
  EXPECT_EQ(row_steps::GatherDestination(plain, 2), 2);
  EXPECT_EQ(row_steps::GatherSource(plain, 2), 0);  // no token indirection
  EXPECT_EQ(row_steps::GatherScale(plain, 2), 1.0f);
}

TEST(RowSteps, HostGatherInEveryFormat) {
  HostDevice host;
  const float nan = -7.0f;  // poison: every destination row must be written
  std::vector<float> out(8, nan);
  ASSERT_TRUE(host.GatherRows(Gather(RowFormat::kFloat32, false, out.data())).ok());
  EXPECT_EQ(out, (std::vector<float>{0, 0, 5, 6, nan, nan, 3, 4}));
  std::vector<float> gated(8, nan);
  ASSERT_TRUE(host.GatherRows(Gather(RowFormat::kFloat32, true, gated.data())).ok());
  EXPECT_EQ(gated, (std::vector<float>{0, 0, 2.5f, 3, nan, nan, 12, 16}));
  // Rounded to bf16: 1/3 is not a bfloat16; its rounding is what the row holds.
  const std::vector<float> third = {1.0f / 3, 2.0f / 3};
  std::vector<float> rounded(2, nan);
  const std::vector<int32_t> zero = {0};
  RowGather r{.rows = 1, .cols = 2, .src_row = zero.data(), .src = third.data(),
              .dst = rounded.data(), .format = RowFormat::kRoundedBf16};
  ASSERT_TRUE(host.GatherRows(r).ok());
  EXPECT_EQ(rounded[0], RoundToBf16(1.0f / 3));
  EXPECT_NE(rounded[0], 1.0f / 3);
  std::vector<uint16_t> half(8, 0xffff);
  ASSERT_TRUE(host.GatherRows(Gather(RowFormat::kBf16, true, half.data())).ok());
  EXPECT_EQ(Bf16ToFloat(half[2]), 2.5f);
  EXPECT_EQ(Bf16ToFloat(half[7]), 16.0f);
  EXPECT_EQ(half[0], 0);
  EXPECT_EQ(half[4], 0xffff);  // row 2 is nobody's destination
}

TEST(RowSteps, ReturnedRowsAndTheCombine) {
  // Plan rows 0, 1, 2: returned row 1 of `rows`, self row 0, self row 1.
  const std::vector<int32_t> return_row = {1, -1, -2};
  const std::vector<float> rows = {10, 20, 30, 40};  // 2 rows of width 2
  const std::vector<float> self = {1, 2, 3, 4};
  const ReturnedRows ret{return_row.data(), rows.data(), self.data()};
  EXPECT_EQ(row_steps::ReturnedRow(ret, 0, 2), rows.data() + 2);
  EXPECT_EQ(row_steps::ReturnedRow(ret, 1, 2), self.data());
  EXPECT_EQ(row_steps::ReturnedRow(ret, 2, 2), self.data() + 2);
  EXPECT_EQ(row_steps::ReturnedRow({nullptr, rows.data(), nullptr}, 1, 2), rows.data() + 2);

  // Token 0 holds plan rows 2 then 0, token 1 row 1; gates 0.5, 2, 4.
  const std::vector<int64_t> offsets = {0, 2, 3};
  const std::vector<int32_t> token_rows = {2, 0, 1};
  const PlanRows plan{3, 2, kRowToken.data(), kRowGate.data(), offsets.data(), token_rows.data()};
  EXPECT_EQ(row_steps::TokenRowsBegin(plan, 1), 2);
  EXPECT_EQ(row_steps::TokenRowsEnd(plan, 1), 3);
  HostDevice host;
  std::vector<float> y = {100, 100, 100, 100};
  ASSERT_TRUE(host.CombineRows({.cols = 2, .plan = plan, .returned = ret, .gated = true,
                                .y = y.data()})
                  .ok());
  // y[0] += 4·self[1] + 0.5·rows[1]; y[1] += 2·self[0].
  EXPECT_EQ(y, (std::vector<float>{100 + 12 + 15, 100 + 16 + 20, 102, 104}));
  std::vector<float> ungated = {0, 0, 0, 0};
  ASSERT_TRUE(host.CombineRows({.cols = 2, .plan = plan, .returned = ret, .gated = false,
                                .y = ungated.data()})
                  .ok());
  EXPECT_EQ(ungated, (std::vector<float>{33, 44, 1, 2}));

  // dgate[r] = dy[token(r)] · row(r): tokens 2, 0, 1 of dy = {1, 1}, {2, 0}, {0, 3}.
  const std::vector<float> dy = {1, 1, 2, 0, 0, 3};
  const PlanRows three{3, 3, kRowToken.data(), kRowGate.data(), offsets.data(), token_rows.data()};
  std::vector<float> dgate(3, -1);
  ASSERT_TRUE(host.GateGradients({.cols = 2, .plan = three, .returned = ret, .dy = dy.data(),
                                  .dgate = dgate.data()})
                  .ok());
  EXPECT_EQ(dgate, (std::vector<float>{0 * 30 + 3 * 40, 1 * 1 + 1 * 2, 2 * 3 + 0 * 4}));
}

TEST(RowSteps, HostCasts) {
  HostDevice host;
  const std::vector<float> v = {1.0f, 1.0f + 1.0f / 512, 1.0f + 3.0f / 512, -2.5f};
  std::vector<uint16_t> h(4);
  ASSERT_TRUE(host.Cast(CastKind::kToBf16, v.data(), h.data(), 4).ok());
  std::vector<float> back(4);
  ASSERT_TRUE(host.Cast(CastKind::kFromBf16, h.data(), back.data(), 4).ok());
  // To nearest, ties to even: 1 + 2^-9 -> 1, 1 + 3·2^-9 -> 1 + 2^-7.
  EXPECT_EQ(back, (std::vector<float>{1.0f, 1.0f, 1.0f + 1.0f / 128, -2.5f}));
  std::vector<float> in_place = v;
  ASSERT_TRUE(host.Cast(CastKind::kRoundBf16, in_place.data(), in_place.data(), 4).ok());
  EXPECT_EQ(in_place, back);
}

}  // namespace
}  // namespace moe
