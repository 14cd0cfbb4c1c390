// Group equivalence: one call on S tokens in G local groups equals G calls on S/G tokens (each
// with its token_offset and one group): routing bitwise, outputs and gradients to float rounding,
// losses as the mean over the calls. And determinism: identical calls give identical bits.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "runtime/config/config.h"
#include "runtime/layer/moe_layer.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

using testing::FillRandom;
using testing::LayerFromText;

struct EqCase {
  std::string name;
  std::string router;   // router fields, without num_local_groups
  std::string extra;    // other layer fields
  bool train = false;
  int groups = 2;
};

config::LayerConfig MakeCfg(const EqCase& c, int groups, double loss_scale) {
  config::LayerConfig cfg = LayerFromText(
      "model_dim: 6 num_experts: 4 expert { hidden_dim: 5 activation: SILU } router { " + c.router +
      " num_local_groups: " + std::to_string(groups) + " } " + c.extra);
  cfg.mutable_router()->set_aux_loss_weight(cfg.router().aux_loss_weight() * loss_scale);
  cfg.mutable_router()->set_z_loss_weight(cfg.router().z_loss_weight() * loss_scale);
  return cfg;
}

void ExpectNearVec(const std::vector<float>& a, const std::vector<float>& b, double tol,
                   const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::abs(static_cast<double>(a[i]) - b[i]) > tol * (1.0 + std::abs(static_cast<double>(a[i])))) {
      if (++bad <= 5) ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

void PrintTo(const EqCase& c, std::ostream* os) { *os << c.name; }

class GroupEquivalence : public ::testing::TestWithParam<EqCase> {};

TEST_P(GroupEquivalence, OneCallWithGroupsEqualsOneCallPerGroup) {
  const EqCase& c = GetParam();
  const int g = c.groups, s = 16, part = s / g;
  const config::LayerConfig cfg_g = MakeCfg(c, g, 1.0);
  // The losses are averaged over groups: per-group calls carry 1/G of the loss weights.
  const config::LayerConfig cfg_1 = MakeCfg(c, 1, 1.0 / g);
  MoeLayer whole(cfg_g), single(cfg_1);
  InitLayerParams(cfg_g, 3, &whole.params());
  for (int64_t i = 0; i < whole.params().router.size(); ++i) whole.params().router[i] *= 3.0f;
  single.params() = whole.params();
  const int64_t m = cfg_g.model_dim();
  Tensor x(s, m), dy(s, m);
  FillRandom(&x, 21, 1.0f);
  FillRandom(&dy, 22, 1.0f);
  const int64_t base = 40;  // this rank's first global token

  Tensor y, dx;
  ASSERT_TRUE(whole.Forward(x.view(), {c.train, 8, 5, base}, &y).ok());
  MoeLayerParams grads = testing::ZeroGrads(whole);
  ASSERT_TRUE(whole.Backward(dy.view(), &dx, &grads).ok());
  const DispatchPlan& pw = whole.plan();
  const int k = static_cast<int>(pw.top_k);
  if (c.name.find("capacity") != std::string::npos) {
    EXPECT_GT(pw.dropped_slots, 0);
  }

  MoeLayerParams grads1 = testing::ZeroGrads(single);  // summed over the G calls
  double aux_sum = 0.0, z_sum = 0.0;
  std::vector<float> y1, dx1;
  for (int gi = 0; gi < g; ++gi) {
    SCOPED_TRACE("group " + std::to_string(gi));
    Tensor xg(part, m), dyg(part, m), yg, dxg;
    for (int t = 0; t < part; ++t) {
      for (int64_t j = 0; j < m; ++j) {
        xg(t, j) = x(gi * part + t, j);
        dyg(t, j) = dy(gi * part + t, j);
      }
    }
    ASSERT_TRUE(single.Forward(xg.view(), {c.train, 8, 5, base + gi * part}, &yg).ok());
    ASSERT_TRUE(single.Backward(dyg.view(), &dxg, &grads1).ok());
    const DispatchPlan& p1 = single.plan();
    ASSERT_EQ(p1.capacity, pw.capacity);
    if (pw.expert_choice) {
      const int64_t cap = pw.capacity, e = pw.num_experts;
      for (int64_t i = 0; i < e * cap; ++i) {
        const int32_t tw = pw.ec_token[gi * e * cap + i];
        const int32_t t1 = p1.ec_token[i];
        EXPECT_EQ(tw, t1 < 0 ? -1 : t1 + gi * part) << i;
      }
    } else {
      for (int t = 0; t < part; ++t) {
        for (int j = 0; j < k; ++j) {
          const int64_t sw = (gi * part + t) * k + j, s1 = t * k + j;
          EXPECT_EQ(pw.selected[sw], p1.selected[s1]);
          EXPECT_EQ(pw.slot_expert[sw], p1.slot_expert[s1]) << "token " << t << " slot " << j;
          EXPECT_EQ(pw.slot_gate[sw], p1.slot_gate[s1]) << "token " << t << " slot " << j;
        }
      }
    }
    for (int64_t e = 0; e < pw.num_experts; ++e) {
      EXPECT_EQ(pw.group_expert_count[gi * pw.num_experts + e], p1.group_expert_count[e]);
    }
    aux_sum += single.losses().aux;
    z_sum += single.losses().z;
    y1.insert(y1.end(), yg.vec().begin(), yg.vec().end());
    dx1.insert(dx1.end(), dxg.vec().begin(), dxg.vec().end());
  }
  ExpectNearVec(y.vec(), y1, 1e-5, "y");
  ExpectNearVec(dx.vec(), dx1, 1e-5, "dx");
  EXPECT_NEAR(whole.losses().aux, aux_sum / g, 1e-9 * (1 + std::abs(aux_sum)));
  EXPECT_NEAR(whole.losses().z, z_sum / g, 1e-9 * (1 + std::abs(z_sum)));
  if (cfg_g.router().aux_loss() != config::NO_AUX_LOSS) {
    EXPECT_GT(whole.losses().aux, 0.0);
  }
  std::vector<std::pair<std::string, const Tensor*>> gw, g1;
  grads.ForEach([&](const std::string& n, Tensor& t) { gw.push_back({n, &t}); });
  grads1.ForEach([&](const std::string& n, Tensor& t) { g1.push_back({n, &t}); });
  ASSERT_EQ(gw.size(), g1.size());
  double norm = 0.0;
  for (size_t i = 0; i < gw.size(); ++i) {
    ExpectNearVec(gw[i].second->vec(), g1[i].second->vec(), 1e-5, gw[i].first);
    for (float v : gw[i].second->vec()) norm += std::abs(v);
  }
  EXPECT_GT(norm, 1e-2);
}

const char* kLoss = " aux_loss_weight: 0.3 z_loss_weight: 0.05 ";
const char* kCap = " capacity_factor_train: 0.75 capacity_factor_eval: 0.75 min_capacity: 0 ";
const char* kDropless = " capacity_factor_train: 0 capacity_factor_eval: 0 ";

std::vector<EqCase> Cases() {
  std::vector<EqCase> v;
  auto add = [&](std::string name, std::string router, bool train = false, int groups = 2,
                 std::string extra = "") {
    v.push_back({std::move(name), std::move(router), std::move(extra), train, groups});
  };
  add("top1_capacity", std::string("gate: TOP1 aux_loss: SWITCH") + kLoss + kCap);
  add("top1_dropless_g4", std::string("gate: TOP1 aux_loss: IMPORTANCE_CV") + kLoss + kDropless, false, 4);
  add("topk_position_capacity", std::string("top_k: 2 normalization: TOPK_SOFTMAX drop_policy: POSITION aux_loss: SWITCH") + kLoss + kCap);
  add("topk_probability_capacity", std::string("top_k: 2 normalization: RENORM_AFTER_CAPACITY drop_policy: PROBABILITY aux_loss: IMPORTANCE_CV") + kLoss + kCap);
  add("topk_probability_capacity_g4", std::string("top_k: 2 normalization: NONE drop_policy: PROBABILITY aux_loss: SWITCH") + kLoss + kCap, false, 4);
  add("topk_dropless", std::string("top_k: 2 normalization: TOPK_SOFTMAX aux_loss: IMPORTANCE_CV") + kLoss + kDropless);
  add("topk_reroute_capacity", std::string("top_k: 2 normalization: TOPK_SOFTMAX reroute_overflow: true aux_loss: SWITCH") + kLoss + kCap);
  add("noisy_train_capacity", std::string("gate: NOISY_TOPK top_k: 2 aux_loss: SWITCH") + kLoss + kCap, true);
  add("noisy_train_dropless_g4", std::string("gate: NOISY_TOPK top_k: 2 aux_loss: IMPORTANCE_CV") + kLoss + kDropless, true, 4);
  add("random_routing_train_capacity", std::string("top_k: 2 normalization: RENORM_AFTER_CAPACITY random_routing: true aux_loss: SWITCH") + kLoss + kCap, true);
  add("random_routing_train_dropless", std::string("top_k: 2 random_routing: true aux_loss: IMPORTANCE_CV") + kLoss + kDropless, true);
  add("topk_shared_capacity", std::string("top_k: 2 normalization: TOPK_SOFTMAX aux_loss: SWITCH") + kLoss + kCap, false, 2, "num_shared_experts: 2 shared_hidden_dim: 3");
  add("top1_shared_dropless", std::string("gate: TOP1 aux_loss: SWITCH") + kLoss + kDropless, false, 4, "num_shared_experts: 1");
  add("expert_choice", "gate: EXPERT_CHOICE z_loss_weight: 0.05 capacity_factor_eval: 1 min_capacity: 0");
  add("expert_choice_g4_shared", "gate: EXPERT_CHOICE z_loss_weight: 0.05 capacity_factor_eval: 2 min_capacity: 0", false, 4, "num_shared_experts: 1");
  add("expert_choice_dropless", "gate: EXPERT_CHOICE z_loss_weight: 0.05 capacity_factor_train: 0", true);
  return v;
}

INSTANTIATE_TEST_SUITE_P(Configs, GroupEquivalence, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<EqCase>& param_info) { return param_info.param.name; });

// ---------------------------------------------------------------------------------------------
// Determinism.

struct RunResult {
  std::vector<float> y, dx;
  std::vector<std::vector<float>> grads;
  std::vector<int32_t> slot_expert, row_token;
  std::vector<float> slot_gate;
  double aux = 0, z = 0;
  bool operator==(const RunResult&) const = default;
};

RunResult RunOnce(MoeLayer& layer, const Tensor& x, const Tensor& dy, const RouteContext& ctx) {
  RunResult r;
  Tensor y, dx;
  EXPECT_TRUE(layer.Forward(x.view(), ctx, &y).ok());
  MoeLayerParams g = testing::ZeroGrads(layer);
  EXPECT_TRUE(layer.Backward(dy.view(), &dx, &g).ok());
  r.y = y.vec();
  r.dx = dx.vec();
  g.ForEach([&](const std::string&, Tensor& t) { r.grads.push_back(t.vec()); });
  r.slot_expert = layer.plan().slot_expert;
  r.row_token = layer.plan().row_token;
  r.slot_gate = layer.plan().slot_gate;
  r.aux = layer.losses().aux;
  r.z = layer.losses().z;
  return r;
}

TEST(Determinism, IdenticalCallsGiveIdenticalBits) {
  for (const char* router :
       {"gate: NOISY_TOPK top_k: 2 z_loss_weight: 0.1 capacity_factor_train: 0.75 min_capacity: 0 num_local_groups: 2",
        "top_k: 2 random_routing: true normalization: RENORM_AFTER_CAPACITY aux_loss: IMPORTANCE_CV capacity_factor_train: 1 min_capacity: 0",
        "gate: EXPERT_CHOICE z_loss_weight: 0.1 capacity_factor_train: 1 min_capacity: 0"}) {
    SCOPED_TRACE(router);
    const config::LayerConfig cfg = LayerFromText(
        std::string("model_dim: 8 num_experts: 4 expert { hidden_dim: 16 kind: SWIGLU } num_shared_experts: 1 router { ") +
        router + " }");
    MoeLayer a(cfg), b(cfg);
    InitLayerParams(cfg, 7, &a.params());
    InitLayerParams(cfg, 7, &b.params());
    Tensor x(24, 8), dy(24, 8), x_small(8, 8), dy_small(8, 8);
    FillRandom(&x, 1, 1.0f);
    FillRandom(&dy, 2, 1.0f);
    FillRandom(&x_small, 3, 1.0f);
    FillRandom(&dy_small, 4, 1.0f);
    const RouteContext ctx{true, 3, 9, 100};
    const RunResult first = RunOnce(a, x, dy, ctx);
    const RunResult second = RunOnce(a, x, dy, ctx);
    EXPECT_TRUE(first == second) << "same layer, same call";
    const RunResult other_layer = RunOnce(b, x, dy, ctx);
    EXPECT_TRUE(first == other_layer) << "another layer with the same parameters";
    // A call of another size in between (buffers are reused) does not change the result.
    (void)RunOnce(a, x_small, dy_small, ctx);
    const RunResult after = RunOnce(a, x, dy, ctx);
    EXPECT_TRUE(first == after) << "after a call of another size";
    // Sanity: another step changes something (the comparison is not vacuous).
    const RunResult other_step = RunOnce(a, x, dy, {true, 3, 10, 100});
    if (std::string(router).find("EXPERT_CHOICE") == std::string::npos) {
      EXPECT_FALSE(first == other_step);
    }
  }
}

}  // namespace
}  // namespace moe
