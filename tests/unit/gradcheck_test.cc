// Finite-difference check of MoeLayer::Backward for every parameter tensor and the input, across
// gate kinds, normalizations, drops, reroute, random routing, activations, shared experts, losses
// and groups. Objective: L = sum(y * dy) + aux_w * aux + z_w * z (docs/SEMANTICS.md "Backward").
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "runtime/config/config.h"
#include "runtime/layer/moe_layer.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

using testing::FillRandom;
using testing::LayerFromText;

struct GradCase {
  std::string name;
  std::string layer;  // inside moe { }
  int tokens = 10;
  bool train = false;
  bool relu = false;  // skip coordinates whose perturbation flips a ReLU pre-activation's sign
  float router_scale = 3.0f;
  std::vector<float> bias;  // aux-loss-free selection bias
};

std::string Base(const std::string& expert, const std::string& router, const std::string& extra = "") {
  return "model_dim: 4 num_experts: 4 expert { hidden_dim: 6 " + expert + " } router { " + router +
         " } " + extra;
}

// Everything discrete the forward decided: if a perturbation changes it, the objective is not
// differentiable there and the coordinate is skipped.
struct Routing {
  std::vector<int32_t> selected, slot_expert, slot_final, row_token, ec_token;
  bool operator==(const Routing&) const = default;
};

Routing RoutingOf(const MoeLayer& l) {
  const DispatchPlan& p = l.plan();
  return {p.selected, p.slot_expert, p.slot_final, p.row_token, p.ec_token};
}

// Signs of every ReLU pre-activation h = x W1 + b1 the forward computed (routed rows and shared
// experts), recomputed here: a perturbation that flips one crosses a kink.
std::vector<bool> ReluSigns(const MoeLayer& l, const Tensor& x) {
  std::vector<bool> out;
  auto rows = [&](const experts::FfnParams& p, int64_t t) {
    for (int64_t j = 0; j < p.w1.cols(); ++j) {
      double h = p.b1.size() > 0 ? p.b1[j] : 0.0;
      for (int64_t i = 0; i < x.cols(); ++i) h += static_cast<double>(x(t, i)) * p.w1(i, j);
      out.push_back(h > 0);
    }
  };
  const DispatchPlan& p = l.plan();
  // Soft MoE's rows are slot mixes, not token rows (its cases use no ReLU).
  const bool soft = l.config().router().gate() == config::SOFT;
  for (int64_t r = 0; r < (soft ? 0 : p.num_rows()); ++r) {
    rows(l.params().experts[p.row_expert[r]], p.row_token[r]);
  }
  for (const auto& sp : l.params().shared) {
    for (int64_t t = 0; t < x.rows(); ++t) rows(sp, t);
  }
  return out;
}

void PrintTo(const GradCase& c, std::ostream* os) { *os << c.name; }

class GradCheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(GradCheck, BackwardMatchesFiniteDifferences) {
  const GradCase& c = GetParam();
  const config::LayerConfig cfg = LayerFromText(c.layer);
  ASSERT_GT(cfg.model_dim(), 0);
  MoeLayer layer(cfg);
  InitLayerParams(cfg, 17, &layer.params());
  for (int64_t i = 0; i < layer.params().router.size(); ++i) layer.params().router[i] *= c.router_scale;
  if (!c.bias.empty()) layer.router_bias() = c.bias;
  const int64_t s = c.tokens, m = cfg.model_dim();
  Tensor x(s, m), dy(s, m);
  FillRandom(&x, 5, 1.0f);
  FillRandom(&dy, 6, 1.0f);
  const RouteContext ctx{c.train, 99, 4, 32};
  const double aw = cfg.router().aux_loss_weight(), zw = cfg.router().z_loss_weight();

  Tensor y;
  auto objective = [&](const Tensor& input) {
    Status st = layer.Forward(input.view(), ctx, &y);
    EXPECT_TRUE(st.ok()) << st.ToString();
    double l = 0.0;
    for (int64_t i = 0; i < y.size(); ++i) l += static_cast<double>(y[i]) * dy[i];
    return l + aw * layer.losses().aux + zw * layer.losses().z;
  };

  const double l0 = objective(x);
  const Routing r0 = RoutingOf(layer);
  const std::vector<bool> signs0 = ReluSigns(layer, x);
  if (cfg.router().aux_loss() != config::NO_AUX_LOSS && aw > 0) {
    EXPECT_GT(layer.losses().aux, 0.0);
  }
  MoeLayerParams grads = testing::ZeroGrads(layer);
  Tensor dx;
  ASSERT_TRUE(layer.Backward(dy.view(), &dx, &grads).ok());
  if (c.name.find("drop") != std::string::npos && c.name.find("dropless") == std::string::npos) {
    EXPECT_GT(layer.plan().dropped_slots, 0) << "the case should drop slots";
  }

  const float h = 1e-2f;
  int checked = 0, skipped = 0, failed = 0;
  // Checks d L / d v[i] for every element of v (a parameter or the input) against grad[i].
  auto check_tensor = [&](const std::string& name, Tensor& v, const Tensor& grad, bool is_input) {
    ASSERT_TRUE(v.SameShape(grad)) << name;
    int tensor_checked = 0;
    for (int64_t i = 0; i < v.size(); ++i) {
      const float orig = v[i];
      const float plus = orig + h, minus = orig - h;
      v[i] = plus;
      const double lp = objective(is_input ? v : x);
      bool same_p = RoutingOf(layer) == r0;
      if (c.relu) same_p = same_p && ReluSigns(layer, is_input ? v : x) == signs0;
      v[i] = minus;
      const double lm = objective(is_input ? v : x);
      bool same_m = RoutingOf(layer) == r0;
      if (c.relu) same_m = same_m && ReluSigns(layer, is_input ? v : x) == signs0;
      v[i] = orig;
      if (!same_p || !same_m) {
        ++skipped;
        continue;
      }
      const double num = (lp - lm) / (static_cast<double>(plus) - static_cast<double>(minus));
      const double ana = grad[i];
      const double tol = 2e-3 + 2e-2 * std::max(std::abs(num), std::abs(ana));
      ++checked;
      ++tensor_checked;
      if (std::abs(num - ana) > tol) {
        ++failed;
        ADD_FAILURE() << c.name << ": d L / d " << name << "[" << i << "]: numeric " << num
                      << ", backward " << ana;
      }
    }
    // Every tensor gets checked somewhere (an expert that receives no token has zero gradient,
    // which the finite differences confirm too).
    EXPECT_GT(tensor_checked, 0) << name;
  };

  std::vector<std::pair<std::string, Tensor*>> params;
  layer.params().ForEach([&](const std::string& name, Tensor& t) { params.push_back({name, &t}); });
  std::vector<const Tensor*> grad_list;
  grads.ForEach([&](const std::string&, Tensor& t) { grad_list.push_back(&t); });
  ASSERT_EQ(params.size(), grad_list.size());
  for (size_t i = 0; i < params.size(); ++i) check_tensor(params[i].first, *params[i].second, *grad_list[i], false);
  check_tensor("x", x, dx, true);
  // Restore the forward state of the unperturbed point (not needed, but keeps the layer sane).
  EXPECT_EQ(objective(x), l0);
  EXPECT_LT(skipped, checked / 3 + 5) << "too many coordinates change the routing";
  EXPECT_EQ(failed, 0);
  std::printf("[ %s ] checked %d coordinates, skipped %d\n", c.name.c_str(), checked, skipped);
}

const char* kGelu = "activation: GELU_TANH";
const char* kSilu = "activation: SILU";
const char* kLoss = " aux_loss_weight: 0.3 z_loss_weight: 0.05 ";
const char* kDrops = " capacity_factor_train: 0.5 capacity_factor_eval: 0.5 min_capacity: 0 ";
const char* kDropless = " capacity_factor_train: 0 capacity_factor_eval: 0 ";

std::vector<GradCase> Cases() {
  std::vector<GradCase> v;
  auto add = [&](std::string name, std::string layer, int tokens = 10, bool train = false) {
    GradCase c;
    c.name = std::move(name);
    c.layer = std::move(layer);
    c.tokens = tokens;
    c.train = train;
    v.push_back(c);
    return &v.back();
  };
  add("top1_switch", Base(kGelu, std::string("gate: TOP1 aux_loss: SWITCH") + kLoss + kDropless));
  add("top1_drop_importance", Base(kSilu, std::string("gate: TOP1 aux_loss: IMPORTANCE_CV") + kLoss + kDrops));
  add("topk_none_dropless_cv", Base(kGelu, std::string("top_k: 2 normalization: NONE aux_loss: IMPORTANCE_CV") + kLoss + kDropless));
  add("topk_none_drop_switch", Base(kGelu, std::string("top_k: 2 normalization: NONE aux_loss: SWITCH") + kLoss + kDrops));
  add("topk_softmax_drop_cv", Base(kSilu, std::string("top_k: 2 normalization: TOPK_SOFTMAX aux_loss: IMPORTANCE_CV") + kLoss + kDrops));
  add("topk_softmax_dropless_switch", Base(kGelu, std::string("top_k: 2 normalization: TOPK_SOFTMAX aux_loss: SWITCH") + kLoss + kDropless));
  add("topk_renorm_drop_cv", Base(kGelu, std::string("top_k: 2 normalization: RENORM_AFTER_CAPACITY aux_loss: IMPORTANCE_CV") + kLoss + kDrops));
  add("topk_renorm_drop_switch_g2", Base(kSilu, std::string("top_k: 2 normalization: RENORM_AFTER_CAPACITY aux_loss: SWITCH num_local_groups: 2") + kLoss + kDrops), 11);
  add("top3_probability_drop_g2", Base(kGelu, std::string("top_k: 3 normalization: TOPK_SOFTMAX drop_policy: PROBABILITY num_local_groups: 2 aux_loss: IMPORTANCE_CV") + kLoss + kDrops), 12);
  add("noisy_train_drop", Base(kGelu, std::string("gate: NOISY_TOPK top_k: 2 aux_loss: SWITCH") + kLoss + kDrops), 10, true);
  add("noisy_train_dropless_cv_g2", Base(kSilu, std::string("gate: NOISY_TOPK top_k: 2 aux_loss: IMPORTANCE_CV num_local_groups: 2") + kLoss + kDropless), 10, true);
  add("noisy_eval", Base(kGelu, std::string("gate: NOISY_TOPK top_k: 2 aux_loss: SWITCH") + kLoss + kDropless), 8, false);
  add("expert_choice", Base(kGelu, "gate: EXPERT_CHOICE z_loss_weight: 0.05 capacity_factor_eval: 1 min_capacity: 0"), 10);
  add("expert_choice_g2_shared", Base(kSilu, "gate: EXPERT_CHOICE z_loss_weight: 0.05 num_local_groups: 2 capacity_factor_eval: 1.5 min_capacity: 0", "num_shared_experts: 1"), 11);
  add("reroute_softmax_drop", Base(kGelu, std::string("top_k: 2 normalization: TOPK_SOFTMAX reroute_overflow: true aux_loss: SWITCH") + kLoss + kDrops), 12);
  add("reroute_renorm_drop", Base(kSilu, std::string("top_k: 2 normalization: RENORM_AFTER_CAPACITY reroute_overflow: true aux_loss: IMPORTANCE_CV") + kLoss + kDrops), 12);
  add("random_routing_renorm_train", Base(kGelu, std::string("top_k: 2 normalization: RENORM_AFTER_CAPACITY random_routing: true aux_loss: SWITCH") + kLoss + kDropless), 10, true);
  add("random_routing_softmax_drop_train", Base(kGelu, std::string("top_k: 2 normalization: TOPK_SOFTMAX random_routing: true aux_loss: IMPORTANCE_CV") + kLoss + kDrops), 10, true);
  add("relu", Base("activation: RELU", std::string("top_k: 2 normalization: TOPK_SOFTMAX aux_loss: SWITCH") + kLoss + kDropless))->relu = true;
  add("relu_shared_drop", Base("activation: RELU", std::string("top_k: 2 normalization: RENORM_AFTER_CAPACITY aux_loss: IMPORTANCE_CV") + kLoss + kDrops, "num_shared_experts: 1"))->relu = true;
  add("swiglu_bias", Base("kind: SWIGLU", std::string("top_k: 2 normalization: RENORM_AFTER_CAPACITY aux_loss: SWITCH") + kLoss + kDrops));
  add("swiglu_nobias_shared", Base("kind: SWIGLU bias: false", std::string("top_k: 2 normalization: NONE aux_loss: IMPORTANCE_CV") + kLoss + kDropless, "num_shared_experts: 2 shared_hidden_dim: 3"), 9);
  add("shared_gelu_nobias", Base("activation: GELU_TANH bias: false", std::string("gate: TOP1 aux_loss: SWITCH") + kLoss + kDrops, "num_shared_experts: 2 shared_hidden_dim: 5"));
  add("no_aux_z_only", Base(kGelu, "top_k: 2 aux_loss: NO_AUX_LOSS z_loss_weight: 0.2 capacity_factor_eval: 0"));
  // Second-wave routing: sigmoid scores (the balance losses on s / Σ s), the gate scaling,
  // SWITCH_TOPK, group-limited selection and the per-expert drop policies.
  add("sigmoid_scaled_topk_softmax_switch_topk_drop", Base(kGelu, std::string("score_function: SIGMOID scaling_factor: 2.5 top_k: 2 normalization: TOPK_SOFTMAX aux_loss: SWITCH_TOPK") + kLoss + kDrops));
  add("sigmoid_none_switch_dropless", Base(kSilu, std::string("score_function: SIGMOID top_k: 2 normalization: NONE aux_loss: SWITCH") + kLoss + kDropless));
  add("sigmoid_renorm_cv_drop", Base(kGelu, std::string("score_function: SIGMOID scaling_factor: 1.5 top_k: 2 normalization: RENORM_AFTER_CAPACITY aux_loss: IMPORTANCE_CV") + kLoss + kDrops));
  add("sigmoid_top1_token_order", Base(kGelu, std::string("gate: TOP1 score_function: SIGMOID drop_policy: TOKEN_ORDER aux_loss: SWITCH") + kLoss + kDrops));
  add("grouped_expert_score_switch_topk", Base(kSilu, std::string("top_k: 2 num_expert_groups: 2 groups_per_token: 1 drop_policy: EXPERT_SCORE normalization: RENORM_AFTER_CAPACITY aux_loss: SWITCH_TOPK") + kLoss + kDrops), 12);
  add("softmax_scaled_token_order_g2", Base(kGelu, std::string("scaling_factor: 2 top_k: 2 drop_policy: TOKEN_ORDER num_local_groups: 2 aux_loss: SWITCH_TOPK") + kLoss + kDrops), 12);
  add("sequence_sigmoid_drop", Base(kGelu, std::string("score_function: SIGMOID top_k: 2 normalization: TOPK_SOFTMAX aux_loss: SEQUENCE aux_sequence_length: 4") + kLoss + kDrops), 10);
  add("sequence_softmax_g2_dropless", Base(kSilu, std::string("top_k: 2 aux_loss: SEQUENCE aux_sequence_length: 3 num_local_groups: 2") + kLoss + kDropless), 11);
  add("global_switch_topk_g3_drop", Base(kGelu, std::string("top_k: 2 aux_loss: SWITCH_TOPK aux_loss_scope: GLOBAL num_local_groups: 3") + kLoss + kDrops), 12);
  add("global_sigmoid_switch_g2", Base(kGelu, std::string("score_function: SIGMOID top_k: 2 aux_loss: SWITCH aux_loss_scope: GLOBAL num_local_groups: 2") + kLoss + kDropless), 10);
  add("soft_p2_g2_shared", Base(kGelu, "gate: SOFT slots_per_expert: 2 num_local_groups: 2", "num_shared_experts: 1"), 11);
  add("soft_p1_swiglu", Base("kind: SWIGLU", "gate: SOFT slots_per_expert: 1"), 9);
  GradCase* b = add("selection_bias", Base(kGelu, std::string("top_k: 2 normalization: TOPK_SOFTMAX aux_loss: IMPORTANCE_CV") + kLoss + kDropless));
  b->bias = {0.3f, -0.2f, 0.0f, 0.1f};
  return v;
}

INSTANTIATE_TEST_SUITE_P(Configs, GradCheck, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<GradCase>& param_info) { return param_info.param.name; });

// The finite-difference check can fail: a wrong gradient (here: the router gradient scaled) is
// detected. Guards against a vacuous comparison.
TEST(GradCheckSelfTest, DetectsAWrongGradient) {
  const config::LayerConfig cfg = LayerFromText(Base(kGelu, "top_k: 2 capacity_factor_eval: 0 aux_loss: NO_AUX_LOSS"));
  MoeLayer layer(cfg);
  InitLayerParams(cfg, 17, &layer.params());
  Tensor x(6, 4), dy(6, 4), y, dx;
  FillRandom(&x, 1, 1.0f);
  FillRandom(&dy, 2, 1.0f);
  ASSERT_TRUE(layer.Forward(x.view(), {}, &y).ok());
  MoeLayerParams g = testing::ZeroGrads(layer);
  ASSERT_TRUE(layer.Backward(dy.view(), &dx, &g).ok());
  // Backward accumulates into grads: a second call doubles them.
  MoeLayerParams g2 = g;
  ASSERT_TRUE(layer.Backward(dy.view(), &dx, &g2).ok());
  double nonzero = 0;
  for (int64_t i = 0; i < g.router.size(); ++i) {
    EXPECT_NEAR(g2.router[i], 2.0f * g.router[i], 1e-6f + 1e-6f * std::abs(g.router[i]));
    nonzero += std::abs(g.router[i]);
  }
  EXPECT_GT(nonzero, 1e-3);
  // Numeric router gradient of one element agrees with g, not with 2 g.
  const float h = 1e-2f;
  auto obj = [&]() {
    EXPECT_TRUE(layer.Forward(x.view(), {}, &y).ok());
    double l = 0;
    for (int64_t i = 0; i < y.size(); ++i) l += static_cast<double>(y[i]) * dy[i];
    return l;
  };
  int64_t best = 0;
  for (int64_t i = 0; i < g.router.size(); ++i) {
    if (std::abs(g.router[i]) > std::abs(g.router[best])) best = i;
  }
  const float orig = layer.params().router[best];
  layer.params().router[best] = orig + h;
  const double lp = obj();
  layer.params().router[best] = orig - h;
  const double lm = obj();
  layer.params().router[best] = orig;
  const double num = (lp - lm) / (2 * h);
  EXPECT_NEAR(num, g.router[best], 2e-3 + 2e-2 * std::abs(num));
  EXPECT_GT(std::abs(num - g2.router[best]), 2e-3 + 2e-2 * std::abs(num));
}

TEST(BackwardErrors, NeedsForwardAndMatchingShapes) {
  const config::LayerConfig cfg = LayerFromText(Base(kGelu, "top_k: 2"));
  MoeLayer layer(cfg);
  Tensor dy(3, 4), dx;
  MoeLayerParams g = testing::ZeroGrads(layer);
  Status s = layer.Backward(dy.view(), &dx, &g);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  Tensor x(3, 4), y;
  ASSERT_TRUE(layer.Forward(x.view(), {}, &y).ok());
  Tensor bad(2, 4);
  Status s2 = layer.Backward(bad.view(), &dx, &g);
  EXPECT_EQ(s2.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s2.message().find("2x4"), std::string::npos) << s2.message();
  Tensor xbad(3, 5);
  Status s3 = layer.Forward(xbad.view(), {}, &y);
  EXPECT_EQ(s3.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s3.message().find("moe.model_dim=4"), std::string::npos) << s3.message();
}

}  // namespace
}  // namespace moe
