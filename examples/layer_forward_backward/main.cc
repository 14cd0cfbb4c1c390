// One MoE layer, forward and backward, on CPU buffers, with its config as a text proto string.
// Prints the routing, the losses, and a finite-difference check of one weight's gradient.
//   ./layer_forward_backward
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <vector>

#include "runtime/config/config.h"
#include "runtime/layer/make_moe_layer.h"
#include "runtime/layer/moe_layer.h"

namespace {

constexpr const char* kConfig = R"pb(
  moe {
    model_dim: 16
    num_experts: 4
    expert { hidden_dim: 32 activation: GELU_TANH }
    router { gate: TOPK top_k: 2 capacity_factor_train: 1.5 aux_loss_weight: 0.01 }
  }
)pb";

// The objective the backward differentiates: sum(y * dy) (+ the weighted losses).
double Objective(const float* y, const float* dy, int64_t n, const moe::MoeLayer& layer) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(y[i]) * dy[i];
  const auto& router = layer.config().router();
  return sum + router.aux_loss_weight() * layer.losses().aux +
         router.z_loss_weight() * layer.losses().z;
}

int Fail(const moe::Status& s) {
  std::fprintf(stderr, "layer_forward_backward: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main() {
  auto cfg = moe::ParseConfig(kConfig, "kConfig");
  if (!cfg.ok()) return Fail(cfg.status());
  const moe::config::LayerConfig& layer_cfg = cfg->moe();
  // compute { device: CPU } (the default): the CPU layer with every expert in this process.
  auto layer = moe::MakeMoeLayer(layer_cfg, cfg->compute());
  if (!layer.ok()) return Fail(layer.status());
  moe::MoeLayerParams params = moe::MakeLayerParams(layer_cfg);
  moe::InitLayerParams(layer_cfg, /*seed=*/7, &params);
  if (const moe::Status s = (*layer)->SetParams(params); !s.ok()) return Fail(s);

  const int64_t tokens = 32, m = layer_cfg.model_dim(), n = tokens * m;
  std::vector<float> x(static_cast<size_t>(n)), dy(x.size()), y(x.size()), dx(x.size());
  for (int64_t i = 0; i < n; ++i) {
    x[static_cast<size_t>(i)] = std::sin(0.37f * static_cast<float>(i));
    dy[static_cast<size_t>(i)] = std::cos(0.11f * static_cast<float>(i));
  }
  moe::RouteContext ctx;
  ctx.train = true;
  if (const moe::Status s = (*layer)->Forward(x.data(), tokens, ctx, y.data()); !s.ok()) return Fail(s);
  const double objective = Objective(y.data(), dy.data(), n, **layer);
  const moe::DispatchPlan& plan = (*layer)->plan();
  std::printf("forward: %lld tokens, capacity %lld, %lld of %lld slots dropped, aux loss %.5f, "
              "z loss %.5f\n",
              static_cast<long long>(tokens), static_cast<long long>(plan.capacity),
              static_cast<long long>(plan.dropped_slots),
              static_cast<long long>(tokens * plan.top_k), (*layer)->losses().aux,
              (*layer)->losses().z);
  std::printf("tokens per expert:");
  for (int64_t k : plan.kept_per_expert) std::printf(" %lld", static_cast<long long>(k));
  std::printf("\n");

  moe::MoeLayerParams grads = moe::MakeLayerParams(layer_cfg);
  if (const moe::Status s = (*layer)->Backward(dy.data(), dx.data(), &grads); !s.ok()) return Fail(s);

  // Finite differences on one weight of expert 1 (central, in double around the float value).
  float& w = params.experts[1].w1(3, 5);
  const float w0 = w, h = 1e-2f;
  double f[2];
  for (int side = 0; side < 2; ++side) {
    w = w0 + (side == 0 ? h : -h);
    if (const moe::Status s = (*layer)->SetParams(params); !s.ok()) return Fail(s);
    if (const moe::Status s = (*layer)->Forward(x.data(), tokens, ctx, y.data()); !s.ok()) return Fail(s);
    f[side] = Objective(y.data(), dy.data(), n, **layer);
  }
  w = w0;
  const double numeric = (f[0] - f[1]) / (2.0 * h), analytic = grads.experts[1].w1(3, 5);
  const double error = std::abs(numeric - analytic) / std::max(1e-6, std::abs(analytic));
  std::printf("objective %.6f; gradient check: d/d expert_1_w1[3][5] = %.6f (finite difference "
              "%.6f, relative error %.1e) %s\n",
              objective, analytic, numeric, error, error < 1e-2 ? "OK" : "FAILED");
  return error < 1e-2 ? 0 : 1;
}
