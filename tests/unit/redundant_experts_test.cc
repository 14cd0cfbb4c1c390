// Redundant experts on the exchange (runtime/exchange/redundant_experts.h,
// runtime/exchange/expert_moves.h): the replicas' gradient sums and expert moves by hand, the
// physical plan of a hand-made logical plan, and the expert-parallel layer with R redundant experts against the same
// layer without (4 loopback ranks): y and dx equal, every logical expert's gradient the sum of its
// replicas' within 1e-5, capacity and dropless exchanges, pipelined or not.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "comm/loopback/loopback_world.h"
#include "runtime/config/config.h"
#include "runtime/device/host_device.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/exchange/expert_moves.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/exchange/expert_placement.h"
#include "runtime/exchange/redundant_experts.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

// The whole-expert exchanges (runtime/exchange/expert_moves.h) on 3 loopback ranks, E = 3 with
// R = 3 (6 physical experts, 2 per rank), by hand. Placement A: [0, 1 | 2, 0 | 1, 2], so every
// logical expert has 2 replicas; a replica's gradient is (100·rank + slot + 1) in every element,
// so after the sum each replica holds the sum of its expert's two. Then placement B:
// [2, 1 | 0, 1 | 2, 0]: rank 0 keeps expert 1 (from its slot 1) and receives expert 2 from its
// first replica's rank under A (rank 1); rank 1 keeps 0 and receives 1 from rank 0; rank 2 keeps
// 2 and receives 0 from rank 0.
TEST(ExpertMoves, SumReplicaGradientsAndMoveExpertsByHand) {
  const experts::FfnShape shape{2, 3, experts::Activation::kRelu, false, true};
  auto a = MakePlacement(3, 3, {0, 1, 2, 0, 1, 2});
  auto b = MakePlacement(3, 3, {2, 1, 0, 1, 2, 0});
  ASSERT_TRUE(a.ok() && b.ok()) << a.status().ToString() << b.status().ToString();
  auto world = comm::LoopbackWorld::Create(3, {});
  ASSERT_TRUE(world.ok());
  std::vector<std::string> failures(3);
  world->RunPerRank([&](comm::Communicator& comm) {
    const int r = comm.rank();
    std::string& fail = failures[static_cast<size_t>(r)];
    std::vector<experts::FfnParams> g(2, experts::FfnParams::Zeros(shape));
    for (int s = 0; s < 2; ++s) {
      for (Tensor* t : {&g[s].w1, &g[s].b1, &g[s].w2, &g[s].b2}) t->Fill(100.0f * r + s + 1);
    }
    if (Status st = SumReplicaGradients(comm, *a, g); !st.ok()) {
      fail = st.ToString();
      return;
    }
    // Expert e's replicas under A: 0 at (0, 0), (1, 1); 1 at (0, 1), (2, 0); 2 at (1, 0), (2, 1).
    const float sums[3] = {1 + 102, 2 + 201, 101 + 202};
    for (int s = 0; s < 2; ++s) {
      const float want = sums[a->logical_at(r, s)];
      if (g[s].w1[0] != want || g[s].b2[1] != want) {
        fail = "rank " + std::to_string(r) + " slot " + std::to_string(s) + ": " +
               std::to_string(g[s].w1[0]) + ", want " + std::to_string(want);
        return;
      }
    }
    // Move: each payload is the logical id of the expert packed (3 floats: id, id, id).
    auto moved = MoveExperts(comm, *a, *b, 3, [&](int slot, float* out) {
      std::fill(out, out + 3, static_cast<float>(a->logical_at(r, slot)));
    });
    if (!moved.ok()) {
      fail = moved.status().ToString();
      return;
    }
    const std::vector<int> kept[3] = {{-1, 1}, {1, -1}, {1, -1}};
    if (moved->kept_from != kept[r]) fail = "rank " + std::to_string(r) + ": kept_from differs";
    for (int s = 0; s < 2; ++s) {
      const bool arrived = moved->kept_from[s] < 0;
      if (arrived != (moved->payload[s] != nullptr)) fail = "payload without an arrival";
      if (arrived && moved->payload[s][0] != static_cast<float>(b->logical_at(r, s))) {
        fail = "rank " + std::to_string(r) + " slot " + std::to_string(s) + " received expert " +
               std::to_string(moved->payload[s][0]);
      }
    }
  });
  for (const std::string& f : failures) EXPECT_TRUE(f.empty()) << f;
}

// E = 2, one group, C = 5: expert 0 keeps tokens 0..4 (positions 0..4), expert 1 tokens 5, 6.
// Placement on 2 ranks of 2: physical [0, 1 | 0, 1], so expert 0's replicas are 0 and 2, expert
// 1's 1 and 3. Positions alternate over the replicas: physical 0 gets tokens 0, 2, 4; physical 2
// tokens 1, 3; physical 1 token 5; physical 3 token 6. Capacities ceil(5/2) = 3 and ceil(4/2) = 2.
TEST(RedundantExperts, PhysicalPlanSplitsPositionsOverReplicas) {
  DispatchPlan plan;
  plan.num_tokens = 7;
  plan.num_experts = 2;
  plan.top_k = 1;
  plan.num_groups = 1;
  plan.capacity = 5;
  plan.group_begin = {0, 7};
  plan.group_expert_count = {5, 2};
  plan.expert_offset = {0, 5, 7};
  plan.row_token = {0, 1, 2, 3, 4, 5, 6};
  plan.row_expert = {0, 0, 0, 0, 0, 1, 1};
  plan.row_gate = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f};
  plan.token_row_offset = {0, 1, 2, 3, 4, 5, 6, 7};
  plan.token_rows = {0, 1, 2, 3, 4, 5, 6};
  StatusOr<ExpertPlacement> placement = MakePlacement(2, 2, {0, 1, 0, 1});
  ASSERT_TRUE(placement.ok()) << placement.status().ToString();
  PhysicalPlan phys;
  ASSERT_TRUE(MakePhysicalPlan(plan, *placement, &phys).ok());
  const DispatchPlan& p = phys.plan;
  EXPECT_EQ(p.num_experts, 4);
  EXPECT_EQ(p.expert_capacity, (std::vector<int64_t>{3, 3, 2, 2}));
  EXPECT_EQ(p.group_expert_count, (std::vector<int32_t>{3, 1, 2, 1}));
  EXPECT_EQ(p.expert_offset, (std::vector<int64_t>{0, 3, 4, 6, 7}));
  EXPECT_EQ(p.row_token, (std::vector<int32_t>{0, 2, 4, 5, 1, 3, 6}));
  EXPECT_EQ(p.row_expert, (std::vector<int32_t>{0, 0, 0, 1, 2, 2, 3}));
  EXPECT_EQ(p.row_gate, (std::vector<float>{0.1f, 0.3f, 0.5f, 0.6f, 0.2f, 0.4f, 0.7f}));
  EXPECT_EQ(phys.physical_row, (std::vector<int32_t>{0, 4, 1, 5, 2, 3, 6}));
  EXPECT_EQ(p.token_rows, (std::vector<int32_t>{0, 4, 1, 5, 2, 3, 6}));
  // Dropless: no capacities.
  plan.capacity = 0;
  ASSERT_TRUE(MakePhysicalPlan(plan, *placement, &phys).ok());
  EXPECT_TRUE(phys.plan.expert_capacity.empty());
}

struct RedundantCase {
  std::string name;
  int redundant;
  std::string router;
  bool dropless_exchange = false;
  int pipeline_degree = 1;
};
void PrintTo(const RedundantCase& c, std::ostream* os) { *os << c.name; }

class RedundantLayerTest : public ::testing::TestWithParam<RedundantCase> {};

constexpr int kRanks = 4, kExperts = 8, kTokens = 16, kModel = 6, kHidden = 5;

void ExpectNear(const Tensor& a, const Tensor& b, float tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  float worst = 0.0f;
  for (int64_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  EXPECT_LE(worst, tol) << what;
}

TEST_P(RedundantLayerTest, EqualsTheLayerWithoutReplicas) {
  const RedundantCase& c = GetParam();
  const config::LayerConfig cfg = testing::LayerFromText(
      "model_dim: " + std::to_string(kModel) + " num_experts: " + std::to_string(kExperts) +
      " expert { hidden_dim: " + std::to_string(kHidden) + " activation: SILU } router { " +
      c.router + " aux_loss_weight: 0.1 z_loss_weight: 0.01 }");
  Tensor x(kRanks * kTokens, kModel), dy(kRanks * kTokens, kModel);
  testing::FillRandom(&x, 21, 1.0f);
  testing::FillRandom(&dy, 22, 1.0f);
  MoeLayerParams full = MakeLayerParams(cfg);
  InitLayerParams(cfg, 9, &full);
  // A skewed load (expert 0 hot, from ranks 0 and 1) for the balanced placement.
  std::vector<double> load(static_cast<size_t>(kRanks * kExperts), 1.0);
  load[0] = 40.0;
  load[kExperts] = 30.0;
  load[3] = 8.0;
  StatusOr<ExpertPlacement> placement =
      BalancedPlacement(load, kExperts, c.redundant, kRanks, /*ranks_per_node=*/0);
  ASSERT_TRUE(placement.ok()) << placement.status().ToString();
  const int per_rank = placement->per_rank;
  const ExchangeOptions options{.dropless = c.dropless_exchange,
                                .pipeline_degree = c.pipeline_degree};

  // Per rank: y, dx and gradients without (index 0) and with (index 1) redundancy.
  std::vector<Tensor> y[2], dx[2];
  std::vector<MoeLayerParams> grads[2];
  for (int variant = 0; variant < 2; ++variant) {
    y[variant].resize(kRanks);
    dx[variant].resize(kRanks);
    grads[variant].resize(kRanks);
    auto world = comm::LoopbackWorld::Create(kRanks, {});
    ASSERT_TRUE(world.ok()) << world.status().ToString();
    std::vector<Status> status(kRanks);
    world->RunPerRank([&](comm::Communicator& comm) {
      const int r = comm.rank();
      const bool redundant = variant == 1;
      const int local = redundant ? per_rank : kExperts / kRanks;
      const int physical = redundant ? placement->num_physical() : kExperts;
      const auto device = std::make_shared<HostDevice>();
      auto inner = std::make_unique<ExpertParallelExecutor>(device.get(), &comm, ExpertShape(cfg),
                                                            physical, options);
      std::unique_ptr<ExpertExecutor> executor;
      if (redundant) {
        executor = std::make_unique<RedundantExpertExecutor>(std::move(inner), *placement);
      } else {
        executor = std::move(inner);
      }
      MoeLayer layer(cfg, device, std::move(executor), r * local, local);
      MoeLayerParams& p = layer.params();
      p.router = full.router;
      for (int s = 0; s < local; ++s) {
        const int e = redundant ? placement->logical_at(r, s) : r * local + s;
        p.experts[static_cast<size_t>(s)] = full.experts[static_cast<size_t>(e)];
      }
      layer.set_loss_gradient_scale(1.0 / kRanks);
      MatrixView<const float> xr(x.row(r * kTokens), kTokens, kModel),
          dyr(dy.row(r * kTokens), kTokens, kModel);
      RouteContext ctx;
      ctx.train = true;
      ctx.seed = 5;
      ctx.token_offset = r * kTokens;
      status[r] = layer.Forward(xr, ctx, &y[variant][r]);
      if (!status[r].ok()) return;
      grads[variant][r] = MakeLayerParams(cfg, r * local, local);
      status[r] = layer.Backward(dyr, &dx[variant][r], &grads[variant][r]);
    });
    for (int r = 0; r < kRanks; ++r) ASSERT_TRUE(status[r].ok()) << status[r].ToString();
  }
  for (int r = 0; r < kRanks; ++r) {
    ExpectNear(y[1][r], y[0][r], 1e-6f, "y of rank " + std::to_string(r));
    ExpectNear(dx[1][r], dx[0][r], 1e-6f, "dx of rank " + std::to_string(r));
    ExpectNear(grads[1][r].router, grads[0][r].router, 1e-6f, "router grad");
  }
  // Each logical expert's gradient: the sum of its replicas'.
  const int local0 = kExperts / kRanks;
  for (int e = 0; e < kExperts; ++e) {
    const experts::FfnParams& want = grads[0][e / local0].experts[static_cast<size_t>(e % local0)];
    experts::FfnParams sum = experts::FfnParams::Zeros(ExpertShape(cfg));
    for (int q : placement->replicas[static_cast<size_t>(e)]) {
      const experts::FfnParams& g =
          grads[1][placement->rank_of(q)].experts[static_cast<size_t>(placement->slot_of(q))];
      for (auto [to, from] : {std::pair{&sum.w1, &g.w1}, std::pair{&sum.w2, &g.w2},
                              std::pair{&sum.b1, &g.b1}, std::pair{&sum.b2, &g.b2}}) {
        for (int64_t i = 0; i < to->size(); ++i) (*to)[i] += (*from)[i];
      }
    }
    ExpectNear(sum.w1, want.w1, 1e-5f, "w1 grad of expert " + std::to_string(e));
    ExpectNear(sum.w2, want.w2, 1e-5f, "w2 grad of expert " + std::to_string(e));
    ExpectNear(sum.b1, want.b1, 1e-5f, "b1 grad of expert " + std::to_string(e));
    ExpectNear(sum.b2, want.b2, 1e-5f, "b2 grad of expert " + std::to_string(e));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RedundantLayerTest,
    ::testing::Values(
        RedundantCase{"capacity_r4", 4, "gate: TOPK top_k: 2 capacity_factor_train: 1.0"},
        RedundantCase{"capacity_r8", 8, "gate: TOPK top_k: 2 capacity_factor_train: 1.5"},
        RedundantCase{"dropless_exchange_r4", 4, "gate: TOPK top_k: 2 capacity_factor_train: 1.0",
                      true},
        RedundantCase{"dropless_routing_r12", 12, "gate: TOPK top_k: 2 capacity_factor_train: 0"},
        RedundantCase{"pipelined_r4", 4, "gate: TOPK top_k: 2 capacity_factor_train: 1.25", false,
                      2},
        RedundantCase{"top1_r4", 4, "gate: TOP1 capacity_factor_train: 1.0"}),
    [](const ::testing::TestParamInfo<RedundantCase>& i) { return i.param.name; });

}  // namespace
}  // namespace moe
