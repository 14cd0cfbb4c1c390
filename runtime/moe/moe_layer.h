// One MoE layer on one process (CPU): route -> plan -> pack -> experts -> combine, and the backward
// through the same plan. The expert-parallel executor (runtime/ep_executor.h) replaces the local
// expert step with dispatch / combine all-to-alls; everything else is shared. UseDevice hands the
// whole layer to a device-resident one (runtime/device_moe_layer.h) behind the same host interface.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/base/memory.h"
#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "proto/report.pb.h"
#include "runtime/base/status.h"
#include "runtime/base/tensor.h"
#include "runtime/moe/dispatch_plan.h"
#include "runtime/moe/expert_executor.h"
#include "runtime/moe/losses.h"
#include "runtime/moe/router.h"

namespace moe {

struct MoeLayerParams {
  Tensor router;        // M x E
  Tensor router_noise;  // M x E (NOISY_TOPK only, else empty)
  // The experts held by this process: global ids first_expert .. first_expert + experts.size() - 1.
  std::vector<experts::FfnParams> experts;
  int first_expert = 0;
  std::vector<experts::FfnParams> shared;  // num_shared_experts (replicated)

  // Visits every parameter with its file-style name ("router", "expert_3_w1", "shared_0_b2");
  // experts are named by global id.
  template <typename F>
  void ForEach(F&& f);
  template <typename F>
  void ForEach(F&& f) const;
  void Zero();
};

experts::FfnShape ExpertShape(const config::LayerConfig& cfg);
experts::FfnShape SharedShape(const config::LayerConfig& cfg);

// Zero parameters of the right shapes for `cfg`, holding experts [first_expert, first_expert +
// num_local_experts) (num_local_experts < 0: all).
MoeLayerParams MakeLayerParams(const config::LayerConfig& cfg, int first_expert = 0,
                               int num_local_experts = -1);
// Deterministic init from `seed`: every tensor U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from
// (seed, hash of its global name, element index) — the same values whichever rank holds it.
void InitLayerParams(const config::LayerConfig& cfg, uint64_t seed, MoeLayerParams* params);
// Fills t with U(-bound, bound) drawn from (seed, Fnv1a64(name), element index).
void InitUniformByName(const std::string& name, uint64_t seed, double bound, Tensor* t);

// The metrics report of one layer call: drops, loads, capacity and the unweighted losses.
report::LayerMetrics LayerMetricsOf(const DispatchPlan& plan, const RouterLosses& losses);

class DeviceMoeLayer;  // runtime/device_moe_layer.h

class MoeLayer {
 public:
  // A layer holding all experts and running them in this process.
  explicit MoeLayer(const config::LayerConfig& cfg);
  // A layer holding experts [first_expert, first_expert + num_local_experts), run by `executor`.
  MoeLayer(const config::LayerConfig& cfg, std::unique_ptr<ExpertExecutor> executor,
           int first_expert, int num_local_experts);
  MoeLayer(MoeLayer&&) noexcept;
  MoeLayer& operator=(MoeLayer&&) noexcept;
  ~MoeLayer();

  // Runs Forward and Backward on `device` instead (a device-resident layer of the same config and
  // expert shard; the executor is then unused). The host keeps what the optimizer, checkpoints and
  // statistics use: the parameters (uploaded at every Forward), the router bias and loss scale
  // (handed over at every Forward), and copies of the plan, router output and losses (taken after
  // every Forward). x and dy go up, y and dx come down, and the device's gradients are added into
  // the caller's at every Backward.
  void UseDevice(std::unique_ptr<DeviceMoeLayer> device);
  DeviceMoeLayer* device() const { return device_.get(); }

  const config::LayerConfig& config() const { return cfg_; }
  MoeLayerParams& params() { return params_; }
  const MoeLayerParams& params() const { return params_; }
  // Aux-loss-free balancing bias (E), state not parameter.
  std::vector<float>& router_bias() { return bias_; }

  // y = MoE(x) for the S rows of x (S x M). Keeps what the backward needs.
  Status Forward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y);
  // Gradient of sum(y * dy) + aux_w * aux + z_w * z w.r.t. x (written to dx) and every parameter
  // (accumulated into grads, which must have the shapes of params()).
  Status Backward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads);
  // Multiplies the aux and z-loss gradient weights (e.g. 1/W when W ranks each hold 1/W of the
  // groups whose losses are averaged). Default 1.
  void set_loss_gradient_scale(double s) { loss_grad_scale_ = s; }

  // The last Forward's plan and router output. On a device layer that routes on the device
  // (DeviceMoeLayer::routes_on_device) they hold the plan's counts and metrics only — what the
  // trainer's statistics and bias updates read — until FetchPlan.
  const DispatchPlan& plan() const { return plan_; }
  const RouterOutput& router_output() const { return router_; }
  // Completes plan() and router_output() from the device layer (per-slot, per-row and per-token
  // arrays, logits and probs); no-op without one or when it routes on the host.
  Status FetchPlan();
  const RouterLosses& losses() const { return losses_; }
  report::LayerMetrics Metrics() const;
  // bias_i += rate * sign(mean load - load_i), from the last forward's selection.
  void UpdateRouterBias();
  // The same with a given load per expert (e.g. summed over all ranks).
  void UpdateRouterBias(const std::vector<int64_t>& load);

 private:
  void RouterBackward(const std::vector<float>& dgate_rows, Tensor* dx, MoeLayerParams* grads);
  Status DeviceForward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y);
  Status DeviceBackward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads);

  config::LayerConfig cfg_;
  experts::FfnShape expert_shape_, shared_shape_;
  MoeLayerParams params_;
  std::unique_ptr<ExpertExecutor> executor_;
  std::vector<float> bias_;
  double loss_grad_scale_ = 1.0;

  // Saved by Forward.
  Tensor x_;  // copy of the input (the backward's GEMMs read it)
  RouteContext ctx_;
  RouterOutput router_;
  DispatchPlan plan_;
  RouterLosses losses_;
  Tensor packed_x_, packed_y_;
  std::vector<Tensor> shared_h_, shared_a_, shared_u_;
  // Backward scratch.
  Tensor packed_dy_, packed_dx_;
  RouterGradients router_grads_;
  Tensor shared_scratch1_, shared_scratch2_;
  bool have_forward_ = false;

  std::unique_ptr<DeviceMoeLayer> device_;
  Workspace device_x_{MemorySpace::kDevice}, device_y_{MemorySpace::kDevice},
      device_dx_{MemorySpace::kDevice};
};

template <typename F>
void MoeLayerParams::ForEach(F&& f) {
  f(std::string("router"), router);
  if (router_noise.size() > 0) f(std::string("router_noise"), router_noise);
  auto ffn = [&](const std::string& prefix, experts::FfnParams& p) {
    f(prefix + "_w1", p.w1);
    if (p.b1.size() > 0) f(prefix + "_b1", p.b1);
    f(prefix + "_w2", p.w2);
    if (p.b2.size() > 0) f(prefix + "_b2", p.b2);
    if (p.w3.size() > 0) f(prefix + "_w3", p.w3);
  };
  for (size_t e = 0; e < experts.size(); ++e) {
    ffn("expert_" + std::to_string(first_expert + static_cast<int>(e)), experts[e]);
  }
  for (size_t s = 0; s < shared.size(); ++s) ffn("shared_" + std::to_string(s), shared[s]);
}

template <typename F>
void MoeLayerParams::ForEach(F&& f) const {
  const_cast<MoeLayerParams*>(this)->ForEach(
      [&](const std::string& name, Tensor& t) { f(name, static_cast<const Tensor&>(t)); });
}

}  // namespace moe
