// Expert-parallel equivalence (docs/SEMANTICS.md "Groups"): W ranks of S tokens each, experts
// sharded over the ranks and exchanged with all-to-alls, must equal one rank with G = W local
// groups on the concatenated tokens — routing bitwise, outputs and gradients within 1e-5.
// Ranks are threads over the loopback communicator.
#include <gtest/gtest.h>

#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "comm/loopback/loopback_world.h"
#include "runtime/config/config.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/exchange/exchange_layout.h"
#include "runtime/device/host_device.h"
#include "runtime/layer/moe_layer.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

struct EpCase {
  std::string name;
  int world;
  int experts;
  std::string router;  // router { ... } fields
  int shared = 0;
  bool dropless_exchange = false;
  int pipeline_degree = 1;
  int ranks_per_node = 0;  // > 0: the two-stage (hierarchical) all-to-all
  bool bf16 = false;       // parallel.wire_dtype BF16 (the 1-rank reference rounds the same rows)
};

void PrintTo(const EpCase& c, std::ostream* os) { *os << c.name; }

class EpEquivalenceTest : public ::testing::TestWithParam<EpCase> {};

constexpr int kTokensPerRank = 12;
constexpr int kModel = 6;
constexpr int kHidden = 5;

config::LayerConfig MakeLayer(const EpCase& c, int groups) {
  return testing::LayerFromText(
      "model_dim: " + std::to_string(kModel) + " num_experts: " + std::to_string(c.experts) +
      " expert { hidden_dim: " + std::to_string(kHidden) +
      " activation: SILU } num_shared_experts: " + std::to_string(c.shared) + " router { " +
      c.router + " num_local_groups: " + std::to_string(groups) +
      (c.router.find("gate: SOFT") == std::string::npos
           ? " aux_loss_weight: 0.1 z_loss_weight: 0.01 }"
           : " }"));  // Soft MoE has no router losses
}

void ExpectNear(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  float worst = 0.0f;
  for (int64_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  EXPECT_LE(worst, 1e-5f) << what;
}

TEST_P(EpEquivalenceTest, ForwardAndBackwardEqualOneRankWithGroups) {
  const EpCase& c = GetParam();
  const int w = c.world, s = kTokensPerRank, total = w * s;
  Tensor x(total, kModel), dy(total, kModel);
  testing::FillRandom(&x, 11, 1.0f);
  testing::FillRandom(&dy, 12, 1.0f);
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = 77;
  ctx.step = 3;

  // Reference: one rank, G = W groups.
  const config::LayerConfig ref_cfg = MakeLayer(c, w);
  const auto ref_device = std::make_shared<HostDevice>();
  MoeLayer ref(ref_cfg, ref_device,
               std::make_unique<LocalExpertExecutor>(ref_device.get(), ExpertShape(ref_cfg),
                                                     c.experts, ExchangeOptions{.bf16_wire = c.bf16}),
               0, c.experts);
  InitLayerParams(ref_cfg, 5, &ref.params());
  Tensor ref_y, ref_dx;
  ASSERT_TRUE(ref.Forward(x.view(), ctx, &ref_y).ok());
  MoeLayerParams ref_grads = MakeLayerParams(ref_cfg);
  ASSERT_TRUE(ref.Backward(dy.view(), &ref_dx, &ref_grads).ok());

  // W ranks, one group each.
  const config::LayerConfig cfg = MakeLayer(c, 1);
  auto world = comm::LoopbackWorld::Create(w, {});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  const int local = c.experts / w;
  std::vector<Tensor> y(w), dx(w);
  std::vector<MoeLayerParams> grads(w);
  std::vector<DispatchPlan> plans(w);
  std::vector<RouterLosses> losses(w);
  std::vector<Status> status(w);
  world->RunPerRank([&](comm::Communicator& comm) {
    const int r = comm.rank();
    const auto device = std::make_shared<HostDevice>();
    auto executor = std::make_unique<ExpertParallelExecutor>(
        device.get(), &comm, ExpertShape(cfg), c.experts,
        ExchangeOptions{.dropless = c.dropless_exchange,
                        .pipeline_degree = c.pipeline_degree,
                        .ranks_per_node = c.ranks_per_node,
                        .bf16_wire = c.bf16});
    status[r] = executor->EnableHierarchical();
    if (!status[r].ok()) return;
    MoeLayer layer(cfg, device, std::move(executor), r * local, local);
    InitLayerParams(cfg, 5, &layer.params());
    layer.set_loss_gradient_scale(1.0 / w);
    layer.set_balance_communicator(&comm);  // aux_loss_scope GLOBAL
    MatrixView<const float> xr(x.row(r * s), s, kModel), dyr(dy.row(r * s), s, kModel);
    RouteContext rctx = ctx;
    rctx.token_offset = r * s;
    status[r] = layer.Forward(xr, rctx, &y[r]);
    if (!status[r].ok()) return;
    grads[r] = MakeLayerParams(cfg, r * local, local);
    status[r] = layer.Backward(dyr, &dx[r], &grads[r]);
    plans[r] = layer.plan();
    losses[r] = layer.losses();
  });
  for (int r = 0; r < w; ++r)
    ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r].ToString();
  // The losses are means over groups: the ranks' mean is the reference's.
  double aux = 0.0, z = 0.0;
  for (const RouterLosses& l : losses) {
    aux += l.aux / w;
    z += l.z / w;
  }
  EXPECT_NEAR(aux, ref.losses().aux, 1e-9 * (1.0 + std::abs(aux)));
  EXPECT_NEAR(z, ref.losses().z, 1e-9 * (1.0 + std::abs(z)));

  const DispatchPlan& rp = ref.plan();
  const int k = static_cast<int>(rp.top_k);
  // Soft MoE's plan rows are its slots (no per-token routing to compare).
  const bool soft = cfg.router().gate() == config::SOFT;
  for (int r = 0; r < w; ++r) {
    for (int t = 0; t < (soft ? 0 : s); ++t) {
      for (int j = 0; j < k; ++j) {
        ASSERT_EQ(plans[r].slot_expert[t * k + j], rp.slot_expert[(r * s + t) * k + j])
            << "rank " << r << " token " << t << " slot " << j;
        ASSERT_EQ(plans[r].slot_gate[t * k + j], rp.slot_gate[(r * s + t) * k + j]);
      }
    }
    Tensor ref_y_r(s, kModel), ref_dx_r(s, kModel);
    for (int64_t i = 0; i < s * kModel; ++i) {
      ref_y_r[i] = ref_y[r * s * kModel + i];
      ref_dx_r[i] = ref_dx[r * s * kModel + i];
    }
    ExpectNear(y[r], ref_y_r, "y of rank " + std::to_string(r));
    ExpectNear(dx[r], ref_dx_r, "dx of rank " + std::to_string(r));
    for (int l = 0; l < local; ++l) {
      const auto& got = grads[r].experts[l];
      const auto& want = ref_grads.experts[r * local + l];
      ExpectNear(got.w1, want.w1, "expert w1 grad");
      ExpectNear(got.w2, want.w2, "expert w2 grad");
      ExpectNear(got.b1, want.b1, "expert b1 grad");
      ExpectNear(got.b2, want.b2, "expert b2 grad");
    }
  }
  // Replicated parameters: the sum over ranks equals the 1-rank gradient.
  Tensor router_sum(kModel, ref_grads.router.cols());
  for (int r = 0; r < w; ++r) {
    for (int64_t i = 0; i < router_sum.size(); ++i) router_sum[i] += grads[r].router[i];
  }
  ExpectNear(router_sum, ref_grads.router, "router grad summed over ranks");
  for (int sh = 0; sh < c.shared; ++sh) {
    Tensor w1_sum(kModel, kHidden);
    for (int r = 0; r < w; ++r) {
      for (int64_t i = 0; i < w1_sum.size(); ++i) w1_sum[i] += grads[r].shared[sh].w1[i];
    }
    ExpectNear(w1_sum, ref_grads.shared[sh].w1, "shared w1 grad summed over ranks");
  }
}

// The exchanges of a pipelined Forward + Backward, as each rank records them: issue order
// D0 D1 C0 D2 C1 C2 per direction, chunk numbers, and per-peer bytes that add up to the one-chunk
// exchange's (the chunks partition every block's positions).
TEST(EpPipeline, ChunksAreIssuedInPipelineOrderAndPartitionTheRows) {
  const EpCase c{"w2", 2, 4,
                 "gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY "
                 "capacity_factor_train: 1.0 min_capacity: 1"};
  const int w = c.world, s = kTokensPerRank;
  Tensor x(w * s, kModel), dy(w * s, kModel);
  testing::FillRandom(&x, 11, 1.0f);
  testing::FillRandom(&dy, 12, 1.0f);
  const config::LayerConfig cfg = MakeLayer(c, 1);
  // calls[degree 1 or 3][dropless][rank]
  using RankCalls = std::vector<std::vector<ExchangeCall>>;
  std::vector<std::vector<RankCalls>> calls(2, std::vector<RankCalls>(2, RankCalls(w)));
  for (int degree : {1, 3}) {
    for (bool dropless : {false, true}) {
      auto world = comm::LoopbackWorld::Create(w, {});
      ASSERT_TRUE(world.ok()) << world.status().ToString();
      std::vector<Status> status(w);
      world->RunPerRank([&](comm::Communicator& comm) {
        const int r = comm.rank();
        const auto device = std::make_shared<HostDevice>();
        auto ex = std::make_unique<ExpertParallelExecutor>(
            device.get(), &comm, ExpertShape(cfg), c.experts,
            ExchangeOptions{.dropless = dropless, .pipeline_degree = degree});
        ExpertParallelExecutor* exec = ex.get();
        MoeLayer layer(cfg, device, std::move(ex), r * 2, 2);
        InitLayerParams(cfg, 5, &layer.params());
        RouteContext ctx;
        ctx.train = true;
        ctx.token_offset = r * s;
        Tensor y, dx;
        MatrixView<const float> xr(x.row(r * s), s, kModel), dyr(dy.row(r * s), s, kModel);
        status[r] = layer.Forward(xr, ctx, &y);
        MoeLayerParams grads = MakeLayerParams(cfg, r * 2, 2);
        if (status[r].ok()) status[r] = layer.Backward(dyr, &dx, &grads);
        calls[degree == 1 ? 0 : 1][dropless][r] = exec->stats().calls;
      });
      for (int r = 0; r < w; ++r) ASSERT_TRUE(status[r].ok()) << status[r].ToString();
      for (int r = 0; r < w; ++r) {
        using K = ExchangeCall::Kind;
        std::vector<std::string> order;
        for (const ExchangeCall& call : calls[degree == 1 ? 0 : 1][dropless][r]) {
          EXPECT_EQ(call.chunks, degree);
          order.push_back(std::string(call.backward ? "b" : "f") +
                          (call.kind == K::kCounts     ? "N"
                           : call.kind == K::kDispatch ? "D"
                                                       : "C") +
                          std::to_string(call.chunk));
        }
        std::vector<std::string> want;
        if (dropless) want.push_back("fN0");
        const std::vector<std::string> one = {"D0", "C0"},
                                       three = {"D0", "D1", "C0", "D2", "C1", "C2"};
        for (const char* dir : {"f", "b"}) {
          for (const std::string& step : degree == 1 ? one : three) want.push_back(dir + step);
        }
        EXPECT_EQ(order, want) << "rank " << r << (dropless ? " dropless" : " capacity");
      }
    }
  }
  // Bytes: per (direction, kind, peer), the chunks add up to the one-chunk exchange.
  for (bool dropless : {false, true}) {
    for (int r = 0; r < w; ++r) {
      const auto sum = [&](const std::vector<ExchangeCall>& v, bool backward,
                           ExchangeCall::Kind kind) {
        std::vector<int64_t> to(w, 0), from(w, 0);
        int n = 0;
        for (const ExchangeCall& call : v) {
          if (call.backward != backward || call.kind != kind) continue;
          ++n;
          for (int p = 0; p < w; ++p) {
            to[p] += call.bytes_to_rank[p];
            from[p] += call.bytes_from_rank[p];
          }
        }
        return std::make_tuple(to, from, n);
      };
      for (bool backward : {false, true}) {
        for (auto kind : {ExchangeCall::Kind::kDispatch, ExchangeCall::Kind::kCombine}) {
          const auto [to1, from1, n1] = sum(calls[0][dropless][r], backward, kind);
          const auto [to3, from3, n3] = sum(calls[1][dropless][r], backward, kind);
          EXPECT_EQ(n1, 1);
          EXPECT_EQ(n3, 3);
          EXPECT_GT(std::accumulate(to1.begin(), to1.end(), int64_t{0}), 0);
          EXPECT_EQ(to3, to1) << "rank " << r;
          EXPECT_EQ(from3, from1) << "rank " << r;
        }
      }
    }
  }
}

const char* kTop1 = "gate: TOP1 capacity_factor_train: 1.0 min_capacity: 1";
const char* kTop2Pos =
    "gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY capacity_factor_train: 1.0 "
    "min_capacity: 1 drop_policy: POSITION";
const char* kTop2Prob =
    "gate: TOPK top_k: 2 normalization: TOPK_SOFTMAX capacity_factor_train: 1.0 min_capacity: 1 "
    "drop_policy: PROBABILITY";
const char* kDropless = "gate: TOPK top_k: 2 capacity_factor_train: 0";
// DeepSeek-V3-style routing: sigmoid scores, scaled normalized gates, group-limited top-k (4
// expert groups, 2 per token), the per-expert drop policies, the all-slot balance loss.
const char* kSigmoidGrouped =
    "gate: TOPK top_k: 4 score_function: SIGMOID scaling_factor: 2.5 normalization: TOPK_SOFTMAX "
    "num_expert_groups: 4 groups_per_token: 2 drop_policy: EXPERT_SCORE aux_loss: SWITCH_TOPK "
    "capacity_factor_train: 1.0 min_capacity: 1";
// DeepSeek-V3's sequence-wise loss (sequences of 5 on 12 tokens per rank: a shorter tail) and the
// global-batch balance (f counted over every rank).
const char* kSequence =
    "gate: TOPK top_k: 2 score_function: SIGMOID normalization: TOPK_SOFTMAX aux_loss: SEQUENCE "
    "aux_sequence_length: 5 capacity_factor_train: 1.0 min_capacity: 1";
const char* kGlobal =
    "gate: TOPK top_k: 2 aux_loss: SWITCH_TOPK aux_loss_scope: GLOBAL capacity_factor_train: 1.0 "
    "min_capacity: 1";
const char* kSoft = "gate: SOFT slots_per_expert: 2";
const char* kTokenOrder =
    "gate: TOPK top_k: 2 score_function: SIGMOID normalization: RENORM_AFTER_CAPACITY "
    "num_expert_groups: 2 groups_per_token: 1 drop_policy: TOKEN_ORDER aux_loss: SWITCH_TOPK "
    "capacity_factor_train: 0.75 min_capacity: 1";

INSTANTIATE_TEST_SUITE_P(
    Ranks, EpEquivalenceTest,
    ::testing::Values(
        EpCase{"w1_top1", 1, 4, kTop1}, EpCase{"w2_top1", 2, 4, kTop1},
        EpCase{"w4_top1", 4, 4, kTop1}, EpCase{"w2_top2_position", 2, 4, kTop2Pos},
        EpCase{"w4_top2_position_shared", 4, 8, kTop2Pos, 1},
        EpCase{"w2_top2_probability", 2, 4, kTop2Prob},
        EpCase{"w4_top2_probability_dropless_exchange", 4, 4, kTop2Prob, 0, true},
        EpCase{"w3_e6_top2", 3, 6, kTop2Pos, 1}, EpCase{"w7_e7_top1", 7, 7, kTop1},
        EpCase{"w2_dropless_routing", 2, 4, kDropless, 1},
        EpCase{"w4_dropless_routing_shared", 4, 8, kDropless, 2},
        EpCase{"w2_random_routing", 2, 4,
               "gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY "
               "random_routing: true capacity_factor_train: 1.0 min_capacity: 1"},
        EpCase{"w2_expert_choice", 2, 4,
               "gate: EXPERT_CHOICE capacity_factor_train: 2.0 min_capacity: 1"},
        // Pipelined exchanges (chunks along the capacity positions).
        EpCase{"w1_top1_pipeline2", 1, 4, kTop1, 0, false, 2},
        EpCase{"w2_top2_position_pipeline2", 2, 4, kTop2Pos, 0, false, 2},
        EpCase{"w4_top2_position_shared_pipeline3", 4, 8, kTop2Pos, 1, false, 3},
        EpCase{"w4_top2_probability_dropless_exchange_pipeline3", 4, 4, kTop2Prob, 0, true, 3},
        EpCase{"w2_dropless_routing_pipeline4", 2, 4, kDropless, 1, false, 4},
        // More chunks than rows in a block: most chunks are empty.
        EpCase{"w3_e6_top2_pipeline16", 3, 6, kTop2Pos, 1, false, 16},
        EpCase{"w2_expert_choice_pipeline2", 2, 4,
               "gate: EXPERT_CHOICE capacity_factor_train: 2.0 min_capacity: 1", 0, false, 2},
        // The two-stage all-to-all, 2 ranks per node on 4 ranks (and 3 per node on 6): capacity
        // (equal blocks), dropless exchange and routing (all-to-all-v), pipelined.
        EpCase{"w4_top2_position_shared_hierarchical2", 4, 8, kTop2Pos, 1, false, 1, 2},
        EpCase{"w4_top2_probability_dropless_exchange_hierarchical2", 4, 4, kTop2Prob, 0, true, 1,
               2},
        EpCase{"w4_dropless_routing_hierarchical2_pipeline3", 4, 8, kDropless, 1, false, 3, 2},
        EpCase{"w6_e6_top2_hierarchical3", 6, 6, kTop2Pos, 0, false, 1, 3},
        // bf16 rows on the wire, against the 1-rank layer that rounds the same rows.
        EpCase{"w4_top2_position_shared_bf16", 4, 8, kTop2Pos, 1, false, 1, 0, true},
        EpCase{"w2_dropless_routing_pipeline2_bf16", 2, 4, kDropless, 1, false, 2, 0, true},
        EpCase{"w4_top2_probability_dropless_exchange_hierarchical2_bf16", 4, 4, kTop2Prob, 0,
               true, 1, 2, true},
        // Second-wave routing (W in {1, 2, 4}).
        EpCase{"w1_sigmoid_grouped_expert_score", 1, 8, kSigmoidGrouped},
        EpCase{"w2_sigmoid_grouped_expert_score_shared", 2, 8, kSigmoidGrouped, 1},
        EpCase{"w4_sigmoid_grouped_expert_score", 4, 8, kSigmoidGrouped},
        EpCase{"w4_sigmoid_grouped_expert_score_dropless_exchange_pipeline2", 4, 8,
               kSigmoidGrouped, 0, true, 2},
        EpCase{"w2_token_order", 2, 4, kTokenOrder},
        EpCase{"w4_token_order_shared", 4, 8, kTokenOrder, 1},
        EpCase{"w2_sequence_loss", 2, 8, kSequence},
        EpCase{"w4_sequence_loss_shared", 4, 8, kSequence, 1},
        EpCase{"w2_global_balance", 2, 4, kGlobal},
        // Soft MoE: exactly p rows per (expert, group) in both exchange modes.
        EpCase{"w1_soft_p2", 1, 4, kSoft},
        EpCase{"w2_soft_p2_shared", 2, 4, kSoft, 1},
        EpCase{"w4_soft_p2", 4, 8, kSoft},
        EpCase{"w4_soft_p2_dropless_exchange_pipeline2", 4, 8, kSoft, 0, true, 2},
        EpCase{"w4_soft_p2_hierarchical2_bf16", 4, 4, kSoft, 1, false, 1, 2, true},
        EpCase{"w4_global_balance_dropless_exchange", 4, 8, kGlobal, 0, true}),
    [](const ::testing::TestParamInfo<EpCase>& p) { return p.param.name; });

// The pipelined exchange layout by hand: 2 ranks, 2 local experts, 2 chunks. Rank 0's plan sends
// (rank, local expert) blocks (0,0): plan rows 0-1, (0,1): row 2, (1,0): none, (1,1): rows 3-5.
// Chunk 0 takes the first n·1/2 rows of each block: rows 0 and 3; chunk 1 the rest: 1, 2 | 4, 5.
// It receives (source, local expert) = (0,0): 2, (0,1): 1, (1,0): 2, (1,1): 0 rows, so chunk 0
// receives s0l0 {0} s1l0 {1} and chunk 1 s0l0 {2} s0l1 {3} s1l0 {4}; chunk 1's expert-major order
// is expert 0 = {2, 4}, expert 1 = {3}.
TEST(ExchangeLayout, SplitsEveryBlockIntoChunksByPosition) {
  auto layout = MakeExchangeLayout({.ranks = 2, .local_experts = 2, .groups = 1, .chunks = 2},
                                   {2, 1, 0, 3}, {2, 1, 2, 0});
  ASSERT_TRUE(layout.ok()) << layout.status().ToString();
  EXPECT_EQ(layout->plan_rows, 6);
  EXPECT_EQ(layout->send_rows, 6);
  EXPECT_EQ(layout->recv_rows, 5);
  EXPECT_FALSE(layout->send_is_plan);
  EXPECT_FALSE(layout->recv_is_expert_major);
  const ExchangeMaps maps = MakeExchangeMaps(*layout);
  // The dispatch's gather: send row send_dst[i] <- plan row send_src[i]; plan row r's result
  // comes back to send row return_row[r].
  EXPECT_EQ(maps.send_dst, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(maps.send_src, (std::vector<int32_t>{0, 3, 1, 2, 4, 5}));
  EXPECT_EQ(maps.return_row, (std::vector<int32_t>{0, 2, 3, 1, 4, 5}));
  EXPECT_TRUE(maps.self_dst.empty());
  EXPECT_EQ(layout->plan_to_send, (std::vector<int64_t>{0, 2, 3, 1, 4, 5}));
  // Regroup maps, each chunk's relative to its first row (chunk 1 starts at receive row 2).
  EXPECT_EQ(maps.to_expert_major, (std::vector<int32_t>{0, 1, 0, 2, 1}));
  EXPECT_EQ(maps.to_source_major, (std::vector<int32_t>{0, 1, 0, 2, 1}));
  ASSERT_EQ(layout->chunks.size(), 2u);
  const ExchangeChunk& c0 = layout->chunks[0];
  const ExchangeChunk& c1 = layout->chunks[1];
  EXPECT_EQ(c0.send_counts, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(c0.send_displs, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(c1.send_counts, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(c1.send_displs, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(c0.recv_counts, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(c0.recv_displs, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(c1.recv_counts, (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(c1.recv_displs, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(c0.recv_begin, 0);
  EXPECT_EQ(c0.recv_rows, 2);
  EXPECT_EQ(c1.recv_begin, 2);
  EXPECT_EQ(c1.recv_rows, 3);
  EXPECT_EQ(c0.expert_offsets, (std::vector<int64_t>{0, 2, 2}));
  EXPECT_EQ(c1.expert_offsets, (std::vector<int64_t>{0, 2, 3}));
  // Chunk 1's segments in expert-major order: (expert 0, source 0), (expert 0, source 1),
  // (expert 1, source 0), each pointing at its receive row.
  ASSERT_EQ(c1.segments.size(), 3u);
  EXPECT_EQ(std::make_tuple(c1.segments[0].local_expert, c1.segments[0].source, c1.segments[0].row,
                            c1.segments[0].rows),
            std::make_tuple(0, 0, int64_t{2}, int64_t{1}));
  EXPECT_EQ(std::make_tuple(c1.segments[1].local_expert, c1.segments[1].source, c1.segments[1].row),
            std::make_tuple(0, 1, int64_t{4}));
  EXPECT_EQ(std::make_tuple(c1.segments[2].local_expert, c1.segments[2].source, c1.segments[2].row),
            std::make_tuple(1, 0, int64_t{3}));

  // One chunk: the plan order is the send order (no gathers), one exchange of whole blocks.
  auto one = MakeExchangeLayout({.ranks = 2, .local_experts = 2}, {2, 1, 0, 3}, {2, 1, 2, 0});
  ASSERT_TRUE(one.ok());
  EXPECT_TRUE(one->send_is_plan);
  EXPECT_EQ(MakeExchangeMaps(*one).send_src, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(MakeExchangeMaps(*one).return_row, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(one->chunks[0].send_counts, (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(one->chunks[0].recv_counts, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(MakeExchangeMaps(*one).to_expert_major, (std::vector<int32_t>{0, 1, 3, 4, 2}));

  const auto code = [](const ExchangeShape& shape, std::vector<int64_t> send,
                       std::vector<int64_t> recv) {
    return MakeExchangeLayout(shape, send, recv).status().code();
  };
  const std::vector<int64_t> zeros(4, 0);
  EXPECT_EQ(code({.ranks = 2, .local_experts = 2, .chunks = 0}, zeros, zeros),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.ranks = 2, .local_experts = 2, .chunks = 17}, zeros, zeros),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.ranks = 2, .local_experts = 2}, {0, 0, 0}, zeros), StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.ranks = 2, .local_experts = 2}, zeros, {0, -1, 0, 0}),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.ranks = 0}, {}, {}), StatusCode::kInvalidArgument);
  // Capacity 1: a block of 2 real rows does not fit, and every block must arrive as 1 row.
  EXPECT_EQ(code({.ranks = 2, .local_experts = 2, .capacity = 1}, {2, 0, 0, 0}, {1, 1, 1, 1}),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.ranks = 2, .local_experts = 2, .capacity = 1}, zeros, {1, 1, 0, 1}),
            StatusCode::kInvalidArgument);
}

// Capacity padding by hand: 2 ranks, 1 local expert, 2 groups, C = 2. Blocks (rank, group) hold
// 1, 2, 0, 1 real rows (plan rows 0 | 1-2 | - | 3); each travels as 2 rows, real first.
TEST(ExchangeLayout, PadsEveryBlockToTheCapacity) {
  auto layout = MakeExchangeLayout({.ranks = 2, .local_experts = 1, .groups = 2, .capacity = 2},
                                   {1, 2, 0, 1}, {2, 2, 2, 2});
  ASSERT_TRUE(layout.ok()) << layout.status().ToString();
  EXPECT_EQ(layout->plan_rows, 4);
  EXPECT_EQ(layout->send_rows, 8);
  EXPECT_FALSE(layout->send_is_plan);
  EXPECT_TRUE(layout->recv_is_expert_major);  // one local expert
  EXPECT_EQ(layout->plan_to_send, (std::vector<int64_t>{0, 2, 3, 6}));
  EXPECT_EQ(MakeExchangeMaps(*layout).send_src,
            (std::vector<int32_t>{0, -1, 1, 2, -1, -1, 3, -1}));
  const ExchangeChunk& c = layout->chunks[0];
  EXPECT_EQ(c.send_counts, (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(c.recv_counts, (std::vector<int64_t>{4, 4}));
  ASSERT_EQ(c.pieces.size(), 4u);
  EXPECT_EQ(std::make_tuple(c.pieces[2].send_row, c.pieces[2].real, c.pieces[2].rows),
            std::make_tuple(int64_t{4}, int64_t{0}, int64_t{2}));
  ASSERT_EQ(c.segments.size(), 4u);  // (expert 0: source 0 groups 0, 1; source 1 groups 0, 1)
  EXPECT_EQ(std::make_tuple(c.segments[3].source, c.segments[3].group, c.segments[3].row),
            std::make_tuple(1, 1, int64_t{6}));
}

// The whole pipelined exchange emulated on host rows labelled (source rank, plan row), for random
// counts, ranks, experts and chunk counts: what the device layer does with the layout (gather to
// the send order, one all-to-all-v per chunk, regroup, identity "experts", regroup back, combine,
// gather to the plan order) must hand each expert exactly the rows its sources' plans hold for it
// — within a chunk by source, then position — and return every row to its plan position.
TEST(ExchangeLayout, EmulatedPipelinedExchangeRoundTrips) {
  std::mt19937 rng(7);
  using Label = std::pair<int, int32_t>;  // (source rank, plan row there)
  for (int trial = 0; trial < 200; ++trial) {
    const int w = 1 + static_cast<int>(rng() % 4), l = 1 + static_cast<int>(rng() % 3),
              d = 1 + static_cast<int>(rng() % 5);
    // cnt[(s * w + p) * l + e]: rows rank s sends to local expert e of rank p.
    std::vector<int64_t> cnt(static_cast<size_t>(w * w * l));
    for (int64_t& c : cnt) c = rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 6);
    const auto at = [&](int s, int p, int e) {
      return cnt[static_cast<size_t>((s * w + p) * l + e)];
    };
    std::vector<ExchangeLayout> lay;
    std::vector<ExchangeMaps> maps;
    for (int r = 0; r < w; ++r) {
      std::vector<int64_t> send, recv;
      for (int p = 0; p < w; ++p)
        for (int e = 0; e < l; ++e) send.push_back(at(r, p, e));
      for (int s = 0; s < w; ++s)
        for (int e = 0; e < l; ++e) recv.push_back(at(s, r, e));
      auto one = MakeExchangeLayout({.ranks = w, .local_experts = l, .chunks = d}, send, recv);
      ASSERT_TRUE(one.ok()) << one.status().ToString();
      maps.push_back(MakeExchangeMaps(*one));
      lay.push_back(std::move(*one));
    }
    const auto gather = [](const std::vector<Label>& in, const std::vector<int32_t>& idx) {
      std::vector<Label> out;
      for (int32_t i : idx) out.push_back(in[static_cast<size_t>(i)]);
      return out;
    };
    // dispatch: from send layouts into receive layouts; combine: the reverse.
    const auto exchange = [&](const std::vector<std::vector<Label>>& from, bool dispatch) {
      std::vector<std::vector<Label>> to(static_cast<size_t>(w));
      for (int r = 0; r < w; ++r) {
        const ExchangeLayout& x = lay[static_cast<size_t>(r)];
        to[static_cast<size_t>(r)].resize(
            static_cast<size_t>(dispatch ? x.recv_rows : x.send_rows));
      }
      for (int j = 0; j < d; ++j) {
        for (int s = 0; s < w; ++s) {
          for (int p = 0; p < w; ++p) {
            const ExchangeChunk& cs = lay[static_cast<size_t>(s)].chunks[static_cast<size_t>(j)];
            const ExchangeChunk& cp = lay[static_cast<size_t>(p)].chunks[static_cast<size_t>(j)];
            // s sends to p: the dispatch's send block of s meets the receive block of p.
            const int64_t n = dispatch ? cs.send_counts[static_cast<size_t>(p)]
                                       : cs.recv_counts[static_cast<size_t>(p)];
            EXPECT_EQ(n, dispatch ? cp.recv_counts[static_cast<size_t>(s)]
                                  : cp.send_counts[static_cast<size_t>(s)]);
            const int64_t src = dispatch ? cs.send_displs[static_cast<size_t>(p)]
                                         : cs.recv_displs[static_cast<size_t>(p)];
            const int64_t dst = dispatch ? cp.recv_displs[static_cast<size_t>(s)]
                                         : cp.send_displs[static_cast<size_t>(s)];
            for (int64_t i = 0; i < n; ++i) {
              to[static_cast<size_t>(p)][static_cast<size_t>(dst + i)] =
                  from[static_cast<size_t>(s)][static_cast<size_t>(src + i)];
            }
          }
        }
      }
      return to;
    };
    std::vector<std::vector<Label>> plan(static_cast<size_t>(w)), send(static_cast<size_t>(w));
    for (int r = 0; r < w; ++r) {
      for (int32_t i = 0; i < lay[static_cast<size_t>(r)].send_rows; ++i) {
        plan[static_cast<size_t>(r)].push_back({r, i});
      }
      // The dispatch's gather: (send row, plan row) pairs; no padding and no self pieces here.
      const ExchangeMaps& xm = maps[static_cast<size_t>(r)];
      send[static_cast<size_t>(r)].assign(static_cast<size_t>(lay[static_cast<size_t>(r)].send_rows),
                                          Label{-1, -1});
      for (size_t i = 0; i < xm.send_dst.size(); ++i) {
        send[static_cast<size_t>(r)][static_cast<size_t>(xm.send_dst[i])] =
            plan[static_cast<size_t>(r)][static_cast<size_t>(xm.send_src[i])];
      }
    }
    const auto recv = exchange(send, /*dispatch=*/true);
    std::vector<std::vector<Label>> back(static_cast<size_t>(w));
    for (int p = 0; p < w; ++p) {
      const ExchangeLayout& x = lay[static_cast<size_t>(p)];
      const ExchangeMaps& xm = maps[static_cast<size_t>(p)];
      // The regroup maps address each chunk's own rows.
      const auto regroup = [&](const std::vector<Label>& in, const std::vector<int32_t>& idx) {
        std::vector<Label> out(in.size());
        for (const ExchangeChunk& c : x.chunks) {
          for (int64_t i = c.recv_begin; i < c.recv_begin + c.recv_rows; ++i) {
            out[static_cast<size_t>(i)] =
                in[static_cast<size_t>(c.recv_begin + idx[static_cast<size_t>(i)])];
          }
        }
        return out;
      };
      const std::vector<Label> em = regroup(recv[static_cast<size_t>(p)], xm.to_expert_major);
      std::vector<int64_t> seen(static_cast<size_t>(l), 0);
      for (const ExchangeChunk& c : x.chunks) {
        for (int e = 0; e < l; ++e) {
          Label prev{-1, -1};
          for (int64_t i = c.expert_offsets[static_cast<size_t>(e)];
               i < c.expert_offsets[static_cast<size_t>(e) + 1]; ++i) {
            const Label got = em[static_cast<size_t>(c.recv_begin + i)];
            // The plan row lies in source got.first's block for (rank p, local expert e).
            int64_t block_begin = 0;
            for (int b = 0; b < p * l + e; ++b) block_begin += at(got.first, b / l, b % l);
            EXPECT_GE(got.second, block_begin);
            EXPECT_LT(got.second, block_begin + at(got.first, p, e));
            EXPECT_LT(prev, got);
            prev = got;
            ++seen[static_cast<size_t>(e)];
          }
        }
      }
      for (int e = 0; e < l; ++e) {
        int64_t want = 0;
        for (int s = 0; s < w; ++s) want += at(s, p, e);
        EXPECT_EQ(seen[static_cast<size_t>(e)], want) << "rank " << p << " expert " << e;
      }
      back[static_cast<size_t>(p)] = regroup(em, xm.to_source_major);
      EXPECT_EQ(back[static_cast<size_t>(p)], recv[static_cast<size_t>(p)]);
    }
    const auto combined = exchange(back, /*dispatch=*/false);
    for (int r = 0; r < w; ++r) {
      EXPECT_EQ(gather(combined[static_cast<size_t>(r)], maps[static_cast<size_t>(r)].return_row),
                plan[static_cast<size_t>(r)])
          << "trial " << trial << " rank " << r << " of " << w << ", " << l << " experts, " << d
          << " chunks";
    }
    if (HasFailure()) return;
  }
}

}  // namespace
}  // namespace moe
