// The exchange engine called on its own (runtime/exchange/expert_exchange.h): Dispatch hands every
// rank exactly the rows the plans of all ranks route to its experts, segment by segment, and
// Combine brings back whatever the caller's experts made of them — here the identity and a copy
// scaled by the expert's id — summed per token with the gates. Ranks are threads over the
// loopback communicator; every comparison is exact (small-integer rows, the engine's sum order).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "comm/loopback/loopback_world.h"
#include "base/bf16.h"
#include "runtime/device/host_device.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/exchange/expert_exchange.h"

namespace moe {
namespace {

constexpr int64_t kModel = 5;

struct ExchangeCase {
  std::string name;
  int ranks, local_experts, groups, chunks;
  bool dropless_exchange;
  double capacity_factor;  // 0: dropless routing
  int ranks_per_node = 0;
  bool bf16 = false;  // parallel.wire_dtype BF16
};

void PrintTo(const ExchangeCase& c, std::ostream* os) { *os << c.name; }

// Rank r's plan of 13 tokens: top-2 of seeded random probs over E experts in `groups` groups.
DispatchPlan MakePlan(const ExchangeCase& c, int rank) {
  const int e = c.ranks * c.local_experts;
  const int64_t tokens = 13;
  config::RouterConfig cfg;
  cfg.set_gate(config::TOPK);
  cfg.set_top_k(2);
  cfg.set_capacity_factor_train(c.capacity_factor);
  cfg.set_min_capacity(1);
  cfg.set_num_local_groups(c.groups);
  Tensor probs(tokens, e);
  std::mt19937 rng(static_cast<uint32_t>(100 + rank));
  std::uniform_real_distribution<float> u(0.01f, 1.0f);
  for (int64_t t = 0; t < tokens; ++t) {
    float sum = 0;
    for (int i = 0; i < e; ++i) sum += (probs(t, i) = u(rng));
    for (int i = 0; i < e; ++i) probs(t, i) /= sum;
  }
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = 5;
  auto plan = BuildDispatchPlan(cfg, probs, {}, ctx);
  MOE_CHECK_OK(plan.status());
  return std::move(plan).value();
}

// Token t's row on rank r: small integers, distinct per (rank, token).
float Value(int rank, int64_t t, int64_t c) { return static_cast<float>(rank * 100 + t * 5 + c); }

class ExpertExchangeTest : public ::testing::TestWithParam<ExchangeCase> {};

TEST_P(ExpertExchangeTest, DispatchDeliversEveryRowAndCombineSumsTheCallersResults) {
  const ExchangeCase& c = GetParam();
  const int w = c.ranks, l = c.local_experts, e = w * l;
  std::vector<DispatchPlan> plans;
  std::vector<Tensor> xs;
  for (int r = 0; r < w; ++r) {
    plans.push_back(MakePlan(c, r));
    Tensor x(plans.back().num_tokens, kModel);
    for (int64_t t = 0; t < x.rows(); ++t) {
      for (int64_t k = 0; k < kModel; ++k) x(t, k) = Value(r, t, k);
    }
    xs.push_back(std::move(x));
  }
  auto world = comm::LoopbackWorld::Create(w, {});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  std::vector<std::string> failures(static_cast<size_t>(w));
  world->RunPerRank([&](comm::Communicator& comm) {
    const int p = comm.rank();
    std::string& fail = failures[static_cast<size_t>(p)];
    const char* transport_name = "";
    const auto check = [&](bool ok, const std::string& what) {
      if (!ok && fail.empty()) {
        fail = "rank " + std::to_string(p) + " (" + transport_name + "): " + what;
      }
      return ok;
    };
    HostDevice device;
    // Every way of moving the rows against the same exact expectations, so also equal to each
    // other bit for bit: flat, the all-to-all and direct writes (where they run: more than one
    // rank); two-stage, its node stage on the communicator, by direct writes, and with the
    // node-deduplicated dispatch.
    struct Way {
      const char* name;
      ExchangeTransport transport;
      bool dedup;
    };
    const bool two_stage = c.ranks_per_node > 0;
    const std::vector<Way> ways =
        two_stage ? std::vector<Way>{{"two-stage", ExchangeTransport::kAllToAll, false},
                                     {"two-stage, direct node stage", ExchangeTransport::kAuto, false},
                                     {"two-stage, deduplicated", ExchangeTransport::kAuto, true}}
                  : std::vector<Way>{{"alltoall", ExchangeTransport::kAllToAll, false},
                                     {"direct", ExchangeTransport::kDirect, false}};
    for (const Way& way : ways) {
    const bool direct = way.transport == ExchangeTransport::kDirect;
    if (direct && w == 1) continue;
    transport_name = way.name;
    ExpertExchange exchange(&device, &comm, e, kModel,
                            {.dropless = c.dropless_exchange,
                             .pipeline_degree = c.chunks,
                             .ranks_per_node = c.ranks_per_node,
                             .bf16_wire = c.bf16,
                             .node_dedup = way.dedup,
                             .transport = way.transport});
    if (!check(exchange.transport() == (direct ? ExchangeTransport::kDirect
                                               : ExchangeTransport::kAllToAll),
               "transport chosen")) {
      return;
    }
    if (!check(exchange.EnableHierarchical().ok(), "EnableHierarchical")) return;
    if (two_stage &&
        !check(exchange.intra_node_direct() == (way.transport == ExchangeTransport::kAuto),
               "node stage by direct writes")) {
      return;
    }
    const DispatchPlan& plan = plans[static_cast<size_t>(p)];
    const Tensor& x = xs[static_cast<size_t>(p)];
    const bool padded = !c.dropless_exchange && plan.capacity > 0;
    // What the wire does to a value: nothing, or the rounding to bf16 (the reference rounds the
    // same way, so every comparison stays exact).
    const auto wire = [&](float v) { return c.bf16 ? RoundToBf16(v) : v; };
    for (const bool scaled : {false, true}) {
      ExchangeHandle h;
      Status st = exchange.Dispatch(plan, x.view(), Pass::kForward, &h);
      if (!check(st.ok(), "Dispatch: " + st.ToString())) return;
      const MatrixView<const float> got = h.received(Pass::kForward);
      // Every segment: source s's rows for this rank's local expert le from its group g, in
      // position order, chunk j's share of positions (zero rows past the real ones when padded).
      Tensor out(got.rows(), kModel);
      int64_t covered = 0;
      for (int j = 0; j < h.chunks(); ++j) {
        int prev_key = -1;
        for (const Segment& seg : h.segments(j)) {
          const int key = (seg.local_expert * w + seg.source) * c.groups + seg.group;
          check(key > prev_key, "segments out of (local expert, source, group) order");
          prev_key = key;
          const DispatchPlan& sp = plans[static_cast<size_t>(seg.source)];
          const int64_t expert = p * l + seg.local_expert;
          int64_t first = sp.expert_offset[expert];
          for (int g = 0; g < seg.group; ++g) first += sp.group_expert_count[g * e + expert];
          const int64_t real = sp.group_expert_count[seg.group * e + expert];
          const int64_t n = padded ? sp.capacity : real;
          const int64_t lo = n * j / c.chunks;
          check(seg.rows == n * (j + 1) / c.chunks - lo, "segment size");
          for (int64_t i = 0; i < seg.rows; ++i) {
            const int64_t pos = lo + i;
            for (int64_t k = 0; k < kModel; ++k) {
              const float want =
                  pos < real ? wire(Value(seg.source, sp.row_token[first + pos], k)) : 0.0f;
              check(got(seg.row + i, k) == want,
                    "received row " + std::to_string(seg.row + i) + " of segment (expert " +
                        std::to_string(seg.local_expert) + ", source " +
                        std::to_string(seg.source) + ", group " + std::to_string(seg.group) + ")");
              // The caller's experts: identity, or the row times (global expert id + 1).
              out(seg.row + i, k) = scaled ? static_cast<float>(expert + 1) * got(seg.row + i, k)
                                           : got(seg.row + i, k);
            }
          }
          covered += seg.rows;
        }
      }
      check(covered == got.rows(), "segments do not cover the received rows");
      // The direct transport's output rows, read in place by the origins: used by every other
      // rank (the others' rows are copied), so both ways meet in one combine.
      MatrixView<const float> results = out.view();
      if (direct && scaled != (p % 2 == 1)) {
        float* const shared = exchange.OutputRows(Pass::kForward);
        if (!check(shared != nullptr, "the direct transport offers output rows")) return;
        std::copy(out.data(), out.data() + out.size(), shared);
        results = MatrixView<const float>(shared, out.rows(), kModel);
      }
      Tensor y(plan.num_tokens, kModel);
      st = exchange.Combine(&h, Pass::kForward, results, /*gated=*/true, y.view());
      if (!check(st.ok(), "Combine: " + st.ToString())) return;
      for (int64_t t = 0; t < plan.num_tokens; ++t) {
        for (int64_t k = 0; k < kModel; ++k) {
          float want = 0.0f;
          for (int64_t i = plan.token_row_offset[t]; i < plan.token_row_offset[t + 1]; ++i) {
            const int32_t r = plan.token_rows[i];
            const float v = wire(scaled ? static_cast<float>(plan.row_expert[r] + 1) * wire(x(t, k))
                                        : wire(x(t, k)));
            want += plan.row_gate[r] * v;
            check(h.returned_value(Pass::kForward, r, k) == v, "returned row");
          }
          check(y(t, k) == want, "y[" + std::to_string(t) + "][" + std::to_string(k) + "]");
        }
      }
      // The backward on the same handle: gate·dy goes out, the rows come back ungated.
      st = exchange.Dispatch(plan, x.view(), Pass::kBackward, &h);
      if (!check(st.ok(), "backward Dispatch: " + st.ToString())) return;
      Tensor dx(plan.num_tokens, kModel);
      st = exchange.Combine(&h, Pass::kBackward, h.received(Pass::kBackward), /*gated=*/false,
                            dx.view());
      if (!check(st.ok(), "backward Combine: " + st.ToString())) return;
      for (int64_t t = 0; t < plan.num_tokens; ++t) {
        for (int64_t k = 0; k < kModel; ++k) {
          float want = 0.0f;
          for (int64_t i = plan.token_row_offset[t]; i < plan.token_row_offset[t + 1]; ++i) {
            // The engine sends the rounded product gate·dy, then adds (no fused multiply-add).
            const volatile float sent = wire(plan.row_gate[plan.token_rows[i]] * x(t, k));
            want += sent;
          }
          check(dx(t, k) == want, "dx[" + std::to_string(t) + "] = " + std::to_string(dx(t, k)) + ", want " + std::to_string(want));
        }
      }
      // The forward's results are still there after the backward.
      for (int64_t r = 0; r < plan.num_rows(); ++r) {
        const float xr = wire(x(plan.row_token[r], 0));
        const float v = wire(scaled ? static_cast<float>(plan.row_expert[r] + 1) * xr : xr);
        check(h.returned_value(Pass::kForward, r, 0) == v, "forward row after the backward");
      }
    }
    }
  });
  for (const std::string& f : failures) EXPECT_TRUE(f.empty()) << f;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ExpertExchangeTest,
    ::testing::Values(ExchangeCase{"w1_capacity", 1, 4, 1, 1, false, 1.0},
                      ExchangeCase{"w2_capacity", 2, 2, 1, 1, false, 1.0},
                      ExchangeCase{"w2_capacity_groups2", 2, 2, 2, 1, false, 1.0},
                      ExchangeCase{"w3_dropless_exchange", 3, 2, 1, 1, true, 1.0},
                      ExchangeCase{"w4_dropless_routing", 4, 1, 1, 1, false, 0.0},
                      ExchangeCase{"w2_capacity_chunks3", 2, 2, 2, 3, false, 1.25},
                      ExchangeCase{"w3_dropless_chunks4", 3, 2, 1, 4, true, 1.0},
                      ExchangeCase{"w4_capacity_hierarchical2", 4, 2, 1, 1, false, 1.0, 2},
                      ExchangeCase{"w4_dropless_hierarchical2_chunks2", 4, 2, 2, 2, true, 1.0, 2},
                      ExchangeCase{"w6_capacity_hierarchical2_groups2", 6, 2, 2, 1, false, 1.25,
                                   2},
                      ExchangeCase{"w6_dropless_hierarchical3", 6, 1, 1, 1, true, 1.0, 3},
                      // The bf16 wire: capacity (self rows rounded too), dropless with chunks,
                      // hierarchical, and a one-rank communicator.
                      ExchangeCase{"w1_capacity_bf16", 1, 4, 1, 1, false, 1.0, 0, true},
                      ExchangeCase{"w2_capacity_groups2_bf16", 2, 2, 2, 1, false, 1.0, 0, true},
                      ExchangeCase{"w3_dropless_chunks4_bf16", 3, 2, 1, 4, true, 1.0, 0, true},
                      ExchangeCase{"w4_capacity_hierarchical2_bf16", 4, 2, 1, 1, false, 1.0, 2,
                                   true},
                      // Seven ranks (an odd world, most peers per row).
                      ExchangeCase{"w7_capacity_groups2_chunks2", 7, 1, 2, 2, false, 1.25},
                      ExchangeCase{"w7_dropless_exchange_bf16", 7, 2, 1, 1, true, 1.0, 0, true}),
    [](const ::testing::TestParamInfo<ExchangeCase>& p) { return p.param.name; });

// A one-rank engine (no communicator) exchanges nothing: the received rows are the gathered
// rows, and Combine reads the caller's rows in place.
TEST(ExpertExchange, OneRankMovesNothing) {
  const ExchangeCase c{"local", 1, 3, 1, 1, true, 1.0};
  const DispatchPlan plan = MakePlan(c, 0);
  Tensor x(plan.num_tokens, kModel);
  for (int64_t t = 0; t < x.rows(); ++t) {
    for (int64_t k = 0; k < kModel; ++k) x(t, k) = Value(0, t, k);
  }
  HostDevice device;
  ExpertExchange exchange(&device, nullptr, 3, kModel, {.dropless = true});
  ExchangeHandle h;
  ASSERT_TRUE(exchange.Dispatch(plan, x.view(), Pass::kForward, &h).ok());
  EXPECT_TRUE(h.layout().send_is_plan);
  const MatrixView<const float> got = h.received(Pass::kForward);
  ASSERT_EQ(got.rows(), plan.num_rows());
  for (int64_t r = 0; r < plan.num_rows(); ++r) EXPECT_EQ(got(r, 1), x(plan.row_token[r], 1));
  Tensor y(plan.num_tokens, kModel);
  ASSERT_TRUE(exchange.Combine(&h, Pass::kForward, got, true, y.view()).ok());
  EXPECT_EQ(h.returned_row(Pass::kForward, 0), got.row(0));  // read in place
  EXPECT_TRUE(exchange.stats().calls.empty());
  // Wrong shapes are errors naming what was expected.
  Tensor small(2, kModel);
  const Status st = exchange.Dispatch(plan, small.view(), Pass::kForward, &h);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("the plan needs"), std::string::npos) << st.ToString();
  ExchangeHandle fresh;
  EXPECT_EQ(exchange.Dispatch(plan, x.view(), Pass::kBackward, &fresh).code(),
            StatusCode::kFailedPrecondition);
}

// The bf16 wire against fp32, real-valued rows, 3 ranks: a travelled row is rounded once on the
// way out (|R(v) - v| <= u|v|, u = 2^-8, bf16's unit roundoff) and the scaled copy s·R(x) once on
// the way back, so each kept row's contribution moves by at most g·s·|x|·((1 + u)^2 - 1) =
// g·s·|x|·(2u + u^2); y's bound is the sum over the token's rows (plus 1e-6 of it for the fp32
// sums, which differ only in what they add).
TEST(ExpertExchange, Bf16WireStaysWithinTheRoundingBoundOfFp32) {
  const ExchangeCase c{"bound", 3, 2, 1, 2, true, 1.0};
  const int w = c.ranks, e = w * c.local_experts;
  std::vector<DispatchPlan> plans;
  std::vector<Tensor> xs;
  for (int r = 0; r < w; ++r) {
    plans.push_back(MakePlan(c, r));
    Tensor x(plans.back().num_tokens, kModel);
    std::mt19937 rng(static_cast<uint32_t>(7 + r));
    std::normal_distribution<float> normal(0.0f, 3.0f);
    for (int64_t i = 0; i < x.size(); ++i) x[i] = normal(rng);
    xs.push_back(std::move(x));
  }
  auto world = comm::LoopbackWorld::Create(w, {});
  ASSERT_TRUE(world.ok());
  std::vector<double> worst(static_cast<size_t>(w), 0.0);  // max |Δ| / bound per rank
  std::vector<Status> status(static_cast<size_t>(w));
  world->RunPerRank([&](comm::Communicator& comm) {
    const int p = comm.rank();
    const DispatchPlan& plan = plans[static_cast<size_t>(p)];
    std::vector<Tensor> ys;
    for (const bool bf16 : {false, true}) {
      HostDevice device;
      ExpertExchange exchange(&device, &comm, e, kModel,
                              {.dropless = true, .pipeline_degree = c.chunks, .bf16_wire = bf16});
      ExchangeHandle h;
      Status st = exchange.Dispatch(plan, xs[static_cast<size_t>(p)].view(), Pass::kForward, &h);
      Tensor out(h.received(Pass::kForward).rows(), kModel);
      for (int j = 0; j < h.chunks(); ++j) {
        for (const Segment& seg : h.segments(j)) {
          const float scale = static_cast<float>(p * c.local_experts + seg.local_expert + 1);
          for (int64_t i = seg.row; i < seg.row + seg.rows; ++i) {
            for (int64_t k = 0; k < kModel; ++k) out(i, k) = scale * h.received(Pass::kForward)(i, k);
          }
        }
      }
      Tensor y(plan.num_tokens, kModel);
      if (st.ok()) st = exchange.Combine(&h, Pass::kForward, out.view(), true, y.view());
      if (!st.ok()) {
        status[static_cast<size_t>(p)] = st;
        return;
      }
      ys.push_back(std::move(y));
    }
    const double u = 1.0 / 256;
    for (int64_t t = 0; t < plan.num_tokens; ++t) {
      for (int64_t k = 0; k < kModel; ++k) {
        double bound = 0.0;
        for (int64_t i = plan.token_row_offset[t]; i < plan.token_row_offset[t + 1]; ++i) {
          const int32_t r = plan.token_rows[i];
          bound += std::abs(plan.row_gate[r] * (plan.row_expert[r] + 1.0) *
                            xs[static_cast<size_t>(p)](t, k)) * (2 * u + u * u);
        }
        bound *= 1.0 + 1e-6;
        const double diff = std::abs(static_cast<double>(ys[1](t, k)) - ys[0](t, k));
        if (bound > 0) worst[static_cast<size_t>(p)] = std::max(worst[static_cast<size_t>(p)], diff / bound);
        else if (diff > 0) worst[static_cast<size_t>(p)] = 1e9;
      }
    }
  });
  for (int r = 0; r < w; ++r) {
    ASSERT_TRUE(status[static_cast<size_t>(r)].ok()) << status[static_cast<size_t>(r)].ToString();
    EXPECT_LE(worst[static_cast<size_t>(r)], 1.0) << "rank " << r << ": |bf16 - fp32| / bound";
    // The rounding is really there: the two dtypes differ somewhere.
    EXPECT_GT(worst[static_cast<size_t>(r)], 0.0) << "rank " << r;
  }
}

// A forced direct transport where it cannot run is refused naming the field and the reason;
// AUTO picks it where it can.
TEST(ExpertExchange, DirectTransportChosenWhereRanksShareMemoryAndRefusedElsewhere) {
  auto world = comm::LoopbackWorld::Create(2, {});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  world->RunPerRank([&](comm::Communicator& comm) {
    HostDevice device;
    EXPECT_EQ(ExpertExchange(&device, &comm, 4, kModel, {}).transport(), ExchangeTransport::kDirect);
    EXPECT_EQ(ExpertExchange(&device, &comm, 4, kModel, {.ranks_per_node = 1}).transport(),
              ExchangeTransport::kAllToAll);
    ExpertExchange forced(&device, &comm, 4, kModel,
                          {.ranks_per_node = 1, .transport = ExchangeTransport::kDirect});
    ASSERT_TRUE(forced.EnableHierarchical().ok());
    ExchangeHandle h;
    const DispatchPlan plan = MakePlan({"refused", 2, 2, 1, 1, false, 1.0}, comm.rank());
    Tensor x(plan.num_tokens, kModel);
    const Status st = forced.Dispatch(plan, x.view(), Pass::kForward, &h);
    EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st.ToString();
    EXPECT_NE(st.message().find("parallel.exchange_transport=DIRECT cannot run here: "
                                "comm.ranks_per_node > 0"),
              std::string::npos)
        << st.message();
  });
  HostDevice device;
  EXPECT_EQ(ExpertExchange(&device, nullptr, 4, kModel, {}).transport(),
            ExchangeTransport::kAllToAll);
}

// On the direct transport a handle's rows live in the engine's buffer: a second forward takes
// them over, and the first handle refuses to go on (instead of reading the second call's rows).
TEST(ExpertExchange, DirectHandleTakenOverByALaterForwardIsRefused) {
  auto world = comm::LoopbackWorld::Create(2, {});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  world->RunPerRank([&](comm::Communicator& comm) {
    HostDevice device;
    ExpertExchange exchange(&device, &comm, 4, kModel, {});
    ASSERT_EQ(exchange.transport(), ExchangeTransport::kDirect);
    const DispatchPlan plan = MakePlan({"two", 2, 2, 1, 1, false, 1.0}, comm.rank());
    Tensor x(plan.num_tokens, kModel), y(plan.num_tokens, kModel);
    ExchangeHandle first, second;
    ASSERT_TRUE(exchange.Dispatch(plan, x.view(), Pass::kForward, &first).ok());
    ASSERT_TRUE(exchange.Dispatch(plan, x.view(), Pass::kForward, &second).ok());
    const Status st =
        exchange.Combine(&first, Pass::kForward, first.received(Pass::kForward), true, y.view());
    EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition) << st.ToString();
    EXPECT_NE(st.message().find("taken over by a later forward Dispatch"), std::string::npos)
        << st.message();
    // The current handle goes on.
    EXPECT_TRUE(exchange
                    .Combine(&second, Pass::kForward, second.received(Pass::kForward), true,
                             y.view())
                    .ok());
  });
}

TEST(ExpertExchange, ValidatesOptionsAndRanksPerNode) {
  EXPECT_EQ(ValidateExchangeOptions({.pipeline_degree = 0}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateExchangeOptions({.pipeline_degree = 17}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateExchangeOptions({.ranks_per_node = -1}).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateExchangeOptions({.pipeline_degree = 16, .ranks_per_node = 2}).ok());
  // EP groups of 4 consecutive ranks in a world of 8.
  EXPECT_EQ(*EpRanksPerNode(0, 8, 4), 0);
  EXPECT_EQ(*EpRanksPerNode(2, 8, 4), 2);
  EXPECT_EQ(*EpRanksPerNode(4, 8, 4), 0);  // a group inside one node: flat
  EXPECT_EQ(*EpRanksPerNode(8, 8, 4), 0);
  EXPECT_EQ(EpRanksPerNode(3, 8, 4).status().code(), StatusCode::kInvalidArgument);
  const Status st = EpRanksPerNode(3, 6, 2).status();  // 3 per node cuts groups of 2 unevenly
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("comm.ranks_per_node=3"), std::string::npos) << st.ToString();
}

}  // namespace
}  // namespace moe
