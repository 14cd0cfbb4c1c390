// Exact-answer tests of the alpha-beta cost model (runtime/sim/cost_model.h) on hand-computed cases.
#include "runtime/sim/cost_model.h"

#include <gtest/gtest.h>

#include <algorithm>

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

TEST(CostModelTest, DedupDispatchCrossesOnceThenForwardsInTheNode) {
  auto m = CostModel::Create(TwoByTwo(), 4);
  // Rank 0 sends a token's rows to ranks 2 and 3 (1 MB each, equal rows): the deduplicated
  // exchange sends them to its relay on node 1 (rank 2, its local index) once, 1 MB + 8 KB of
  // lists: stage A 10 + 100.8 us; stage B, the relay forwards rank 3's 1 MB (1 + 10 us), rank 2's
  // stays with it. 121.8 us, against 220 us flat (two inter-node messages from rank 0).
  const TrafficMatrix bytes = {{0, 0, 1e6, 1e6}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  const TrafficMatrix unique = {{0, 0, 1.008e6, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  EXPECT_NEAR(*m->DedupAllToAllSeconds(bytes, unique), 121.8 * kUs, 1e-12);
  EXPECT_NEAR(*m->FlatAllToAllSeconds(bytes), 220 * kUs, 1e-12);
  // In a step: the two-stage prediction prices the dispatch as deduplicated, the flat one not.
  StepTraffic s;
  s.dispatch = {bytes};
  s.dispatch_unique = {unique};
  s.combine = {bytes};
  s.expert_flops = {0, 0, 0, 0};
  auto hier = m->PredictStep(s, /*hierarchical=*/true);
  ASSERT_TRUE(hier.ok()) << hier.status().ToString();
  EXPECT_NEAR(hier->dispatch_seconds, 121.8 * kUs, 1e-12);
  EXPECT_NEAR(hier->combine_seconds, *m->HierarchicalAllToAllSeconds(bytes), 1e-12);
  EXPECT_NEAR(m->PredictStep(s, /*hierarchical=*/false)->dispatch_seconds, 220 * kUs, 1e-12);
  // An empty matrix: that dispatch was not deduplicated.
  s.dispatch_unique = {TrafficMatrix()};
  EXPECT_NEAR(m->PredictStep(s, true)->dispatch_seconds, *m->HierarchicalAllToAllSeconds(bytes), 1e-12);
  s.dispatch_unique = {unique, unique};
  EXPECT_EQ(m->PredictStep(s, true).status().code(), StatusCode::kInvalidArgument);
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

// ---- Pipelined layers (parallel.pipeline_degree) ----

TEST(CostModelTest, PipelineComputeBound) {
  // d = 2, a = (1, 1), c = (2, 2), b = (1, 1). Comm: D0 [0, 1], D1 [1, 2]; compute 0 [1, 3];
  // C0 [3, 4]; compute 1 [3, 5]; C1 [5, 6]. Serial 8, pipelined 6.
  EXPECT_EQ(*PipelinedGroupSeconds({1, 1}, {2, 2}, {1, 1}), 6.0);
  // d = 4, the same chunks: D0 [0, 1] D1 [1, 2] c0 [1, 3] C0 [3, 4] D2 [4, 5] c1 [3, 5] C1 [5, 6]
  // D3 [6, 7] c2 [5, 7] C2 [7, 8] c3 [7, 9] C3 [9, 10] = a0 + sum c + b3. Serial 16.
  EXPECT_EQ(*PipelinedGroupSeconds({1, 1, 1, 1}, {2, 2, 2, 2}, {1, 1, 1, 1}), 10.0);
}

TEST(CostModelTest, PipelineCommBound) {
  // a = (3, 3), c = (1, 1), b = (3, 3): D0 [0, 3] D1 [3, 6] c0 [3, 4] C0 [6, 9] c1 [6, 7]
  // C1 [9, 12]: the exchanges back to back, the experts hidden. Serial 14.
  EXPECT_EQ(*PipelinedGroupSeconds({3, 3}, {1, 1}, {3, 3}), 12.0);
  // Unequal chunks: a = (2, 1), c = (1, 4), b = (2, 1): D0 [0, 2] D1 [2, 3] c0 [2, 3] C0 [3, 5]
  // c1 [3, 7] C1 [7, 8]. Serial 11.
  EXPECT_EQ(*PipelinedGroupSeconds({2, 1}, {1, 4}, {2, 1}), 8.0);
}

TEST(CostModelTest, PipelineOfOneChunkIsTheSerialSum) {
  EXPECT_EQ(*PipelinedGroupSeconds({1}, {2}, {3}), 6.0);
  const double a = 0.1, c = 0.7, b = 0.2;  // the same additions, in the same order: bit equal
  EXPECT_EQ(*PipelinedGroupSeconds({a}, {c}, {b}), a + c + b);
}

TEST(CostModelTest, PipelineChunkWithoutRows) {
  // An empty chunk costs nothing and hides nothing: a = (1, 0), c = (2, 0), b = (1, 0) ->
  // D0 [0, 1] D1 [1, 1] c0 [1, 3] C0 [3, 4] c1 [3, 3] C1 [4, 4] = the serial 4.
  EXPECT_EQ(*PipelinedGroupSeconds({1, 0}, {2, 0}, {1, 0}), 4.0);
  // Empty first chunk: D0 [0, 0] D1 [0, 1] c0 [0, 0] C0 [1, 1] c1 [1, 3] C1 [3, 4].
  EXPECT_EQ(*PipelinedGroupSeconds({0, 1}, {0, 2}, {0, 1}), 4.0);
}

TEST(CostModelTest, PipelineRejectsBadTimes) {
  EXPECT_FALSE(PipelinedGroupSeconds({}, {}, {}).ok());
  EXPECT_FALSE(PipelinedGroupSeconds({1, 1}, {1}, {1, 1}).ok());
  EXPECT_FALSE(PipelinedGroupSeconds({1}, {-1}, {1}).ok());
}

// 1 node x 2 GPUs, no latency, 1 GB/s, 1 TFLOP/s; at efficiency 0.5 a GFLOP takes 2 ms.
config::TopologyConfig OneByTwo() {
  config::TopologyConfig t;
  t.set_name("test_1x2");
  t.set_nodes(1);
  t.set_gpus_per_node(2);
  t.set_intra_bandwidth_gbps(1);
  t.set_intra_latency_us(0);
  t.set_inter_bandwidth_gbps(1);
  t.set_inter_latency_us(0);
  t.set_gpu_tflops(1);
  return t;
}

// One layer and direction in two chunks: dispatch 0 -> 1 of `bytes` (bytes / 1e9 s), combine
// 1 -> 0 of as many, chunk j's experts `flops[j]` per rank.
StepTraffic TwoChunks(double bytes, std::vector<std::vector<double>> flops) {
  StepTraffic s;
  const TrafficMatrix there = {{0, bytes}, {0, 0}}, back = {{0, 0}, {bytes, 0}};
  s.dispatch = {there, there};
  s.combine = {back, back};
  s.expert_flops.assign(2, 0.0);
  for (const std::vector<double>& f : flops) {
    for (size_t r = 0; r < std::min<size_t>(2, f.size()); ++r) s.expert_flops[r] += f[r];
  }
  s.pipelines = {{{0, 1}, {0, 1}, std::move(flops)}};
  return s;
}

TEST(CostModelTest, PredictStepOverlapsPipelinedChunks) {
  CostModelOptions o;
  o.gemm_efficiency = 0.5;
  auto m = CostModel::Create(OneByTwo(), 2, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  // a = (1, 1), c = (2, 2), b = (1, 1) s: serial 8, pipelined 6.
  auto p = m->PredictStep(TwoChunks(1e9, {{0, 1e12}, {0, 1e12}}), /*hierarchical=*/false);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->dispatch_seconds, 2.0);  // the serial sums stay
  EXPECT_EQ(p->combine_seconds, 2.0);
  EXPECT_EQ(p->experts_seconds, 4.0);
  EXPECT_EQ(p->other_seconds, 0.0);
  EXPECT_EQ(p->overlap_seconds, 2.0);
  EXPECT_EQ(p->total(), 6.0);
  // Comm bound, a = b = (3, 3), c = (1, 1): serial 14, pipelined 12 (the experts hidden).
  p = m->PredictStep(TwoChunks(3e9, {{0, 0.5e12}, {0, 0.5e12}}), false);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->overlap_seconds, 2.0);
  EXPECT_EQ(p->total(), 12.0);
  // Chunk 1 without rows: a = (1, 0), c = (2, 0), b = (1, 0): nothing to overlap.
  StepTraffic empty = TwoChunks(1e9, {{0, 1e12}, {0, 0}});
  empty.dispatch[1] = empty.combine[1] = {{0, 0}, {0, 0}};
  p = m->PredictStep(empty, false);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->overlap_seconds, 0.0);
  EXPECT_EQ(p->total(), 4.0);
}

TEST(CostModelTest, PredictStepOverlapIsAtMostTheExperts) {
  CostModelOptions o;
  o.gemm_efficiency = 0.5;
  auto m = CostModel::Create(OneByTwo(), 2, o);
  // a = b = (3, 3) and c = (2, 2), but chunk 0's experts run on rank 0 and chunk 1's on rank 1:
  // serial 16 - pipelined 12 = 4, more than the step's experts term (max over ranks of 1e12 FLOPs
  // = 2 s): the overlap is capped there and the step is its exchanges, 12 s.
  auto p = m->PredictStep(TwoChunks(3e9, {{1e12, 0}, {0, 1e12}}), false);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->experts_seconds, 2.0);
  EXPECT_EQ(p->overlap_seconds, 2.0);
  EXPECT_EQ(p->total(), 12.0);
}

TEST(CostModelTest, PredictStepWithOneChunkGroupsIsUnchanged) {
  auto m = CostModel::Create(TwoByTwo(), 4);
  StepTraffic s;
  TrafficMatrix other = Sparse();
  other[3][0] = 1.5e6;
  s.dispatch = {Sparse(), other};
  s.combine = {other, Sparse()};
  s.expert_flops = {0.7e6, 0.1e6, 0, 0.3e6};
  s.other_flops = {0, 0, 0.3e6, 0};
  s.allreduce_bytes = 4e6;
  StepTraffic grouped = s;
  // Two layers with pipeline degree 1: D0 C0 each.
  grouped.pipelines = {{{0}, {0}, {{0.6e6, 0, 0, 0.1e6}}}, {{1}, {1}, {{0.1e6, 0.1e6, 0, 0.2e6}}}};
  for (bool hierarchical : {false, true}) {
    auto serial = m->PredictStep(s, hierarchical);
    auto with = m->PredictStep(grouped, hierarchical);
    ASSERT_TRUE(serial.ok() && with.ok()) << with.status().ToString();
    EXPECT_EQ(with->overlap_seconds, 0.0);  // bit for bit: the same numbers as without groups
    EXPECT_EQ(with->dispatch_seconds, serial->dispatch_seconds);
    EXPECT_EQ(with->combine_seconds, serial->combine_seconds);
    EXPECT_EQ(with->experts_seconds, serial->experts_seconds);
    EXPECT_EQ(with->other_seconds, serial->other_seconds);
    EXPECT_EQ(with->total(), serial->total());
  }
}

TEST(CostModelTest, PredictStepRejectsBadPipelineGroups) {
  auto m = CostModel::Create(OneByTwo(), 2);
  StepTraffic s = TwoChunks(1e9, {{0, 1e12}, {0, 1e12}});
  s.pipelines[0].combine = {0};
  EXPECT_FALSE(m->PredictStep(s, false).ok());
  s = TwoChunks(1e9, {{0, 1e12}, {0, 1e12}});
  s.pipelines[0].dispatch[1] = 2;  // 2 dispatches
  EXPECT_NE(m->PredictStep(s, false).status().message().find("chunk 1"), std::string::npos);
  s = TwoChunks(1e9, {{0, 1e12}, {0}});  // FLOPs for 1 of 2 ranks
  EXPECT_FALSE(m->PredictStep(s, false).ok());
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

// ---- The step on one shared-memory host ----

// cores 2; all-to-all 10 us + 1 GB/s per call, all-reduce 5 us + 2 GB/s per call.
HostModel TwoCores() {
  HostModel h;
  h.cores = 2;
  h.alltoall = {10e-6, 1e9};
  h.allreduce = {5e-6, 2e9};
  return h;
}

TEST(CostModelTest, MaxRankBytesTakesTheBusiestSenderOrReceiverSelfIncluded) {
  // rank 0 sends 1000 to every rank (itself included): 4000 sent; every rank receives 1000.
  TrafficMatrix fan_out = {{1000, 1000, 1000, 1000}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  EXPECT_EQ(*MaxRankBytes(fan_out), 4000.0);
  // incast: ranks 1..3 send 700 each to rank 2 -> rank 2 receives 2100, sends at most 700.
  TrafficMatrix incast = {{0, 0, 0, 0}, {0, 0, 700, 0}, {0, 0, 700, 0}, {0, 0, 700, 0}};
  EXPECT_EQ(*MaxRankBytes(incast), 2100.0);
  EXPECT_FALSE(MaxRankBytes({{0, 1}, {1}}).ok());
  EXPECT_FALSE(MaxRankBytes({{0, -1}, {1, 0}}).ok());
}

TEST(CostModelTest, HostStepOversubscribedSerialisesComputeAndAddsPerCallCosts) {
  HostStepInputs in;
  in.compute_seconds = {1e-3, 2e-3, 3e-3, 2e-3};  // max 3 ms, mean 2 ms, sum 8 ms
  TrafficMatrix fan_out = {{1000, 1000, 1000, 1000}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
  TrafficMatrix uniform(4, std::vector<double>(4, 500.0));  // 2000 sent and received per rank
  in.alltoalls = {fan_out, uniform};
  in.allreduce_bytes = {8, 2000};
  auto p = PredictHostStep(TwoCores(), in);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_NEAR(p->compute_mean_seconds, 2e-3, 1e-15);
  EXPECT_NEAR(p->wait_seconds, 1e-3, 1e-15);              // slowest rank 3 ms - mean 2 ms
  EXPECT_NEAR(p->oversubscription_seconds, 1e-3, 1e-15);  // 8 ms on 2 cores = 4 ms > 3 ms
  EXPECT_NEAR(p->compute_seconds(), 4e-3, 1e-15);
  // (10 + 4000 B / 1 GB/s = 4) + (10 + 2) = 26 us.
  EXPECT_NEAR(p->alltoall_seconds, 26e-6, 1e-15);
  EXPECT_EQ(p->alltoall_calls, 2);
  // (5 + 8 B / 2 GB/s = 0.004) + (5 + 1) = 11.004 us.
  EXPECT_NEAR(p->allreduce_seconds, 11.004e-6, 1e-15);
  EXPECT_EQ(p->allreduce_calls, 2);
  EXPECT_NEAR(p->total(), 4.037004e-3, 1e-15);
}

TEST(CostModelTest, HostStepWithACorePerRankWaitsForTheSlowest) {
  HostModel h = TwoCores();
  h.cores = 4;
  HostStepInputs in;
  in.compute_seconds = {1e-3, 3e-3};  // 2 ranks on 4 cores: no serialisation
  in.alltoalls = {{{0, 0}, {0, 0}}};  // an empty call still costs alpha
  auto p = PredictHostStep(h, in);
  ASSERT_TRUE(p.ok());
  EXPECT_NEAR(p->wait_seconds, 1e-3, 1e-15);
  EXPECT_EQ(p->oversubscription_seconds, 0.0);
  EXPECT_NEAR(p->total(), 3e-3 + 10e-6, 1e-15);
  // One rank alone: compute only, alltoall alpha + its self block.
  in.compute_seconds = {2e-3};
  in.alltoalls = {{{3000}}};
  EXPECT_NEAR(PredictHostStep(h, in)->total(), 2e-3 + 13e-6, 1e-15);
}

TEST(CostModelTest, HostStepRejectsBadInputs) {
  HostStepInputs in;
  in.compute_seconds = {1e-3, 1e-3};
  HostModel h = TwoCores();
  h.cores = 0;
  EXPECT_FALSE(PredictHostStep(h, in).ok());
  h = TwoCores();
  h.alltoall.beta_bytes_per_second = 0;
  EXPECT_NE(PredictHostStep(h, in).status().message().find("alltoall beta"), std::string::npos);
  h = TwoCores();
  in.alltoalls = {{{0}}};  // 1 x 1 for 2 ranks
  EXPECT_FALSE(PredictHostStep(h, in).ok());
  in.alltoalls.clear();
  in.compute_seconds = {-1.0};
  EXPECT_FALSE(PredictHostStep(h, in).ok());
  in.compute_seconds.clear();
  EXPECT_FALSE(PredictHostStep(h, in).ok());
}

TEST(CostModelTest, RelativeFitWeightsSmallTimes) {
  // (0, 1), (1, 2), (2, 2). Absolute: slope 1/2, intercept 5/3 - 1/2 = 7/6.
  // Relative, weights 1, 1/4, 1/4: W = 1.5, mean x = 0.5, mean y = 4/3, Sxx = 0.875, Sxy = 0.5
  // -> slope 4/7, intercept 4/3 - 2/7 = 22/21.
  const std::vector<std::pair<double, double>> pts = {{0, 1}, {1, 2}, {2, 2}};
  auto a = FitAlphaBeta(pts);
  ASSERT_TRUE(a.ok());
  EXPECT_NEAR(a->alpha_seconds, 7.0 / 6.0, 1e-12);
  EXPECT_NEAR(a->beta_bytes_per_second, 2.0, 1e-12);
  auto r = FitAlphaBeta(pts, FitWeighting::kRelative);
  ASSERT_TRUE(r.ok());
  EXPECT_NEAR(r->alpha_seconds, 22.0 / 21.0, 1e-12);
  EXPECT_NEAR(r->beta_bytes_per_second, 7.0 / 4.0, 1e-12);
  // Exact data is recovered either way.
  std::vector<std::pair<double, double>> exact;
  for (double b : {1e3, 1e4, 1e5, 1e6}) exact.push_back({b, 5e-6 + b / 2e9});
  auto e = FitAlphaBeta(exact, FitWeighting::kRelative);
  EXPECT_NEAR(e->alpha_seconds, 5e-6, 1e-15);
  EXPECT_NEAR(e->beta_bytes_per_second / 2e9, 1.0, 1e-9);
  EXPECT_FALSE(FitAlphaBeta({{1e3, 0.0}, {1e4, 1.0}}, FitWeighting::kRelative).ok());
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
