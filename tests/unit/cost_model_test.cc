// Exact-answer tests of the alpha-beta cost model (runtime/cost_model.h) on hand-computed cases.
#include "runtime/cost_model.h"

#include <gtest/gtest.h>

namespace moe {
namespace {

// 2 nodes x 2 GPUs; intra 1 us + 100 GB/s, inter 10 us + 10 GB/s, 1 TFLOP/s.
config::TopologyConfig TwoByTwo() {
  config::TopologyConfig t;
  t.set_name("test_2x2");
  t.set_nodes(2);
  t.set_gpus_per_node(2);
  t.set_intra_bandwidth_gbps(100);
  t.set_intra_latency_us(1);
  t.set_inter_bandwidth_gbps(10);
  t.set_inter_latency_us(10);
  t.set_gpu_tflops(1);
  return t;
}

constexpr double kUs = 1e-6;

// rank 0 -> 1: 1 MB (intra), 0 -> 2: 2 MB (inter), 1 -> 3: 1 MB (inter).
TrafficMatrix Sparse() {
  return {{0, 1e6, 2e6, 0}, {0, 0, 0, 1e6}, {0, 0, 0, 0}, {0, 0, 0, 0}};
}

TEST(CostModelTest, FlatOverlapTakesSlowestLinkClass) {
  auto m = CostModel::Create(TwoByTwo(), 4);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  // rank 0: intra 1 + 10 = 11 us, inter 10 + 200 = 210 us; overlapped -> 210 us (the maximum).
  auto t = m->FlatAllToAllSeconds(Sparse());
  ASSERT_TRUE(t.ok());
  EXPECT_NEAR(*t, 210 * kUs, 1e-12);
}

TEST(CostModelTest, FlatSerialAddsLinkClasses) {
  CostModelOptions o;
  o.overlap_link_classes = false;
  auto m = CostModel::Create(TwoByTwo(), 4, o);
  ASSERT_TRUE(m.ok());
  EXPECT_NEAR(*m->FlatAllToAllSeconds(Sparse()), 221 * kUs, 1e-12);  // 11 + 210
}

TEST(CostModelTest, SelfBlockIsFreeUnlessCounted) {
  TrafficMatrix self = {{5e6, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  auto m = CostModel::Create(TwoByTwo(), 4);
  EXPECT_EQ(*m->FlatAllToAllSeconds(self), 0.0);
  CostModelOptions o;
  o.count_self = true;
  auto c = CostModel::Create(TwoByTwo(), 4, o);
  EXPECT_NEAR(*c->FlatAllToAllSeconds(self), 51 * kUs, 1e-12);  // 1 + 5e6 / 1e11 s
}

TEST(CostModelTest, HierarchicalSparse) {
  auto m = CostModel::Create(TwoByTwo(), 4);
  // stage 1: 0 -> 1 carries 1 MB (11 us); the inter-node blocks are already on local index 0 / 1.
  // stage 2: 0 -> 2 2 MB (210 us), 1 -> 3 1 MB (110 us) -> 210 us. Total 221 us.
  EXPECT_NEAR(*m->HierarchicalAllToAllSeconds(Sparse()), 221 * kUs, 1e-12);
}

TEST(CostModelTest, HierarchicalBeatsFlatForSmallUniformMessages) {
  TrafficMatrix u(4, std::vector<double>(4, 1000.0));
  auto m = CostModel::Create(TwoByTwo(), 4);
  // flat: per rank 1 intra (1.01 us) and 2 inter (2 x 10.1 us) messages -> 20.2 us.
  EXPECT_NEAR(*m->FlatAllToAllSeconds(u), 20.2 * kUs, 1e-12);
  // hierarchical: stage 1 one intra message of 2000 B (1.02 us); stage 2 one inter message of
  // 2000 B (10.2 us) -> 11.22 us.
  EXPECT_NEAR(*m->HierarchicalAllToAllSeconds(u), 11.22 * kUs, 1e-12);
}

TEST(CostModelTest, ComputeAllReduceAndStep) {
  auto m = CostModel::Create(TwoByTwo(), 4);
  // 1.2e12 flops at 1 TFLOP/s x 0.6 efficiency = 2 s; max over ranks.
  EXPECT_NEAR(*m->ComputeSeconds({1.2e12, 0.6e12, 0, 0}), 2.0, 1e-12);
  // ring over 2 nodes: 2 (n-1) (alpha + B / (n beta)) = 6 (10 us + 4e6 / 4e10 s) = 660 us.
  EXPECT_NEAR(*m->AllReduceSeconds(4e6), 660 * kUs, 1e-12);
  StepTraffic s;
  s.dispatch = {Sparse(), Sparse()};
  s.combine = {Sparse()};
  s.expert_flops = {0.6e6, 0, 0, 0};  // 1 us
  s.other_flops = {0, 0, 0.3e6, 0};   // 0.5 us
  s.allreduce_bytes = 4e6;
  auto p = m->PredictStep(s, /*hierarchical=*/false);
  ASSERT_TRUE(p.ok());
  EXPECT_NEAR(p->dispatch_seconds, 420 * kUs, 1e-12);
  EXPECT_NEAR(p->combine_seconds, 210 * kUs, 1e-12);
  EXPECT_NEAR(p->experts_seconds, 1 * kUs, 1e-12);
  EXPECT_NEAR(p->other_seconds, 660.5 * kUs, 1e-12);
  EXPECT_NEAR(p->total(), 1291.5 * kUs, 1e-12);
}

TEST(CostModelTest, FitRecoversAlphaBeta) {
  const double alpha = 5e-6, beta = 2e9;
  std::vector<std::pair<double, double>> pts;
  for (double b : {1e3, 1e4, 1e5, 1e6, 1e7}) pts.push_back({b, alpha + b / beta});
  auto f = FitAlphaBeta(pts);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_NEAR(f->alpha_seconds, alpha, 1e-12);
  EXPECT_NEAR(f->beta_bytes_per_second / beta, 1.0, 1e-9);
  EXPECT_LT(f->rms_residual_seconds, 1e-12);
  EXPECT_FALSE(FitAlphaBeta({{1e3, 1.0}}).ok());
  EXPECT_FALSE(FitAlphaBeta({{1e3, 1.0}, {1e3, 2.0}}).ok());
  EXPECT_FALSE(FitAlphaBeta({{1e3, 2.0}, {1e4, 1.0}}).ok());
}

TEST(CostModelTest, BadTopologyNamesTheField) {
  auto wrong = CostModel::Create(TwoByTwo(), 8);
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("nodes * gpus_per_node"), std::string::npos);
  config::TopologyConfig t = TwoByTwo();
  t.set_intra_bandwidth_gbps(0);
  auto bw = CostModel::Create(t, 4);
  ASSERT_FALSE(bw.ok());
  EXPECT_NE(bw.status().message().find("intra_bandwidth_gbps=0"), std::string::npos);
  t = TwoByTwo();
  t.set_inter_bandwidth_gbps(-1);
  EXPECT_NE(CostModel::Create(t, 4).status().message().find("inter_bandwidth_gbps"), std::string::npos);
  t = TwoByTwo();
  t.clear_nodes();
  EXPECT_NE(CostModel::Create(t, 4).status().message().find("nodes"), std::string::npos);
  auto m = CostModel::Create(TwoByTwo(), 4);
  EXPECT_FALSE(m->FlatAllToAllSeconds({{0, 1}, {1, 0}}).ok());
}

}  // namespace
}  // namespace moe
