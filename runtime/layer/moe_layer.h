// The MoE layer: route -> plan -> dispatch -> experts -> combine, and the backward through the
// same plan (docs/ARCHITECTURE.md "One layer over a Device"; what it computes, exactly, is
// docs/SEMANTICS.md). One sequence, written once over a Device (runtime/device/device.h): the
// host device runs it with OpenBLAS and loops, the CUDA device with kernels and cuBLAS, and
// nothing outside the Device's operations differs between them. Where the routed rows go is an
// ExpertExecutor (runtime/exchange/expert_executor.h): every expert in this process, or
// expert-parallel over a communicator through the exchange engine, or redundant experts.
// MakeMoeLayer (runtime/layer/make_moe_layer.h) builds one from a config's compute section;
// HostLayerCall (runtime/layer/host_layer_call.h) runs one on host tensors.
//
//   Forward:  x copied (kept for the backward) -> routing steps (LayerRouting: GEMMs, scores, the
//             plan, the losses' sums; GLOBAL balance counts all-reduced) -> y = Σ shared(x) ->
//             executor: dispatch, experts, combine y += Σ gate · out   (Soft MoE: slot inputs
//             Dᵀ·X per group, the executor on the slot rows, y += C·Ỹ)
//   Backward: the gates' gradients (dy · out per row) -> dx = Σ shared'(dy) -> executor: the
//             same exchange on gate · dy -> the router's backward (LayerRouting) and its GEMMs:
//             dWg += xᵀ·dlogits, dx += dlogits·Wgᵀ.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "base/check.h"
#include "base/memory.h"
#include "base/status.h"
#include "base/tensor.h"
#include "comm/communicator.h"
#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "proto/report.pb.h"
#include "runtime/device/device.h"
#include "runtime/device/expert_compute.h"
#include "runtime/device/layer_routing.h"
#include "runtime/exchange/expert_executor.h"
#include "runtime/layer/layer_params.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/routing/router.h"

namespace moe {

struct ExchangeStats;  // runtime/exchange/expert_exchange.h

class MoeLayer {
 public:
  // A layer holding all E experts of `cfg` on the host device, run in this process.
  explicit MoeLayer(const config::LayerConfig& cfg);
  // A layer on `device` holding experts [first_expert, first_expert + num_local_experts), run by
  // `executor` (made for the same device). `host_plan`: the plan's per-row arrays on the host
  // after every Forward (the redundant-expert executor re-addresses them there). Fails where the
  // device cannot make the layer's routing or shared experts.
  static StatusOr<std::unique_ptr<MoeLayer>> Create(const config::LayerConfig& cfg,
                                                    std::shared_ptr<Device> device,
                                                    std::unique_ptr<ExpertExecutor> executor,
                                                    int first_expert, int num_local_experts,
                                                    bool host_plan = false);
  // Create on a device that cannot fail to make them (the host).
  MoeLayer(const config::LayerConfig& cfg, std::shared_ptr<Device> device,
           std::unique_ptr<ExpertExecutor> executor, int first_expert, int num_local_experts);
  MoeLayer(MoeLayer&&) noexcept;
  MoeLayer& operator=(MoeLayer&&) noexcept;
  ~MoeLayer();

  // The resolved layer config.
  const config::LayerConfig& config() const { return cfg_; }
  Device& device() const { return *device_; }
  // Where x and y of Forward and dy and dx of Backward live.
  MemorySpace memory_space() const { return device_->memory_space(); }
  // The global id of this layer's first expert and how many it holds (all E, or E/W of them when
  // expert-parallel).
  int first_expert() const { return first_expert_; }
  int num_local_experts() const { return num_local_experts_; }

  // The parameters the next calls compute with (host fp32, the shapes of
  // MakeLayerParams(config(), first_expert(), num_local_experts())); fails naming the first tensor
  // whose shape differs. On the host they are read in place: they must stay alive and unchanged
  // until the Backward of the last Forward. A GPU copies them (complete when this returns): call
  // it again after they change.
  Status SetParams(const MoeLayerParams& params);
  // The layer's own parameters (zero, allocated on the first call or at a Forward with nothing
  // bound), for code that does not keep its own: they are the ones the layer computes with unless
  // SetParams was given others.
  MoeLayerParams& params();
  // The parameters the layer computes with (SetParams's, or its own); there must be some.
  const MoeLayerParams& params() const {
    MOE_CHECK(params_ != nullptr);
    return *params_;
  }

  // y = MoE(x) for the `tokens` rows of x: x and y are tokens x M fp32 in memory_space(). Work
  // may still be in flight on the device when this returns (Synchronize).
  Status Forward(const float* x, int64_t tokens, const RouteContext& ctx, float* y);
  // dx (tokens x M) from dy (tokens x M), both in memory_space(), for the last Forward: the
  // gradient of sum(y * dy) + aux_w * aux + z_w * z. The parameter gradients of this call are added
  // into `grads` (host, the shapes SetParams takes) before it returns; with grads null they
  // accumulate inside the layer until AddGradients.
  Status Backward(const float* dy, float* dx, MoeLayerParams* grads);
  // Adds the gradients accumulated since the last AddGradients into grads and zeroes them.
  Status AddGradients(MoeLayerParams* grads);
  // Waits for the work enqueued so far (a no-op on the host).
  Status Synchronize() { return device_->Synchronize(); }

  // The same calls on host tensors, shapes checked (runtime/layer/host_layer_call.h).
  Status Forward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y);
  Status Backward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads);

  // The last Forward's plan, router output and losses. Routed on a device, the plan holds the
  // counts and metrics only — what the trainer's statistics and bias updates read — until
  // FetchPlan brings the per-slot arrays (and the router output) down.
  const DispatchPlan& plan() const { return routing_->plan(); }
  // Tokens of the last Forward (0 before one): plan().num_tokens, except for gate SOFT, whose
  // plan's "tokens" are the slot rows.
  int64_t forward_tokens() const { return have_forward_ ? tokens_ : 0; }
  Status FetchPlan() { return routing_->Fetch(); }
  const RouterOutput& router_output() const { return routing_->router_output(); }
  const RouterLosses& losses() const { return routing_->losses(); }
  report::LayerMetrics Metrics() const { return LayerMetricsOf(plan(), losses()); }
  // Whether the plan is made on the device (LayerRouting::routes_on_device), and the host
  // seconds of the last Forward and Backward's routing (LayerRouting::host_seconds).
  bool routes_on_device() const { return routing_->routes_on_device(); }
  double host_seconds() const { return routing_->host_seconds(); }

  // Aux-loss-free balancing bias (E), state not parameter; used by the next Forward.
  std::vector<float>& router_bias() { return bias_; }
  // bias_i += rate * sign(mean load - load_i), from the last Forward's selection.
  void UpdateRouterBias() { UpdateRouterBias(plan().load_per_expert); }
  // The same with a given load per expert (e.g. summed over all ranks).
  void UpdateRouterBias(const std::vector<int64_t>& load);
  // Multiplies the aux and z-loss gradient weights (e.g. 1/W when W ranks each hold 1/W of the
  // groups whose losses are averaged; or each loss's upstream gradient, from an autograd engine).
  // Default 1.
  void set_loss_gradient_scale(LossScale s) { loss_grad_scale_ = s; }
  // router.aux_loss_scope GLOBAL: the ranks over whose tokens f is counted (their counts are
  // all-reduced in every Forward; host memory). Null: this process's groups only. Not owned.
  void set_balance_communicator(comm::Communicator* world) { balance_ = world; }

  // The exchanges of an expert-parallel layer since the caller last reset them (each with its
  // bytes per rank and seconds, and the experts' time): what the trainer's step metrics and
  // moe_simulate's cost model read. Null for a layer that exchanges nothing. On a GPU, reading
  // it waits for the experts' work enqueued so far.
  ExchangeStats* exchange_stats() { return executor_->exchange_stats(); }
  ExpertExecutor* executor() { return executor_.get(); }
  std::string exchange_description() const { return executor_->exchange_description(); }

 private:
  struct Uninitialized {};
  MoeLayer(Uninitialized, const config::LayerConfig& cfg, std::shared_ptr<Device> device,
           std::unique_ptr<ExpertExecutor> executor, int first_expert, int num_local_experts);
  // Makes the routing steps and the shared experts on the device.
  Status Init(bool host_plan);
  // The host device reads params_ in place: its experts' and router's tensors as they are now.
  Status BindHostParams();
  // Where this call's parameter gradients go: on the host the caller's (or the accumulated)
  // tensors; on a GPU the device's accumulators (null here), brought down by AddGradients.
  MoeLayerParams* HostGrads(MoeLayerParams* grads_out);
  std::span<experts::FfnParams> ExpertGrads(MoeLayerParams* grads) const;
  std::span<experts::FfnParams> SharedGrads(MoeLayerParams* grads, size_t i) const;
  // Shared experts: y = Σ shared(x) (y's old contents replaced); dx = Σ their input gradients
  // (dx's old contents replaced).
  Status SharedForward(MatrixView<float> y);
  Status SharedBackward(MatrixView<const float> dy, MatrixView<float> dx, MoeLayerParams* grads);
  // The router's weight GEMMs after its backward: dW += xᵀ·d, dx += d·Wᵀ (noise first).
  Status RouterWeightGradients(const float* dlogits, const float* dnoise, int64_t cols,
                               MoeLayerParams* grads, float* dx);
  // gate SOFT (docs/SEMANTICS.md "Soft MoE"): slot inputs Dᵀ·X per group, the experts on the
  // slot rows through the executor (SoftSlotPlan), y += C·Ỹ; and the backward through both
  // softmaxes to the router.
  Status SoftForward(MatrixView<float> y);
  Status SoftBackward(MatrixView<const float> dy, MatrixView<float> dx, MoeLayerParams* grads);
  // A GPU's router gradient accumulators into grads (host), then zeroed.
  Status AddRouterGradients(MoeLayerParams* grads);
  float* Floats(Workspace* ws, int64_t count, Status* status);

  config::LayerConfig cfg_;
  experts::FfnShape expert_shape_, shared_shape_;
  int first_expert_ = 0, num_local_experts_ = 0;
  std::shared_ptr<Device> device_;
  std::unique_ptr<ExpertExecutor> executor_;
  std::unique_ptr<LayerRouting> routing_;
  std::vector<std::unique_ptr<ExpertCompute>> shared_;
  std::vector<float> bias_;
  LossScale loss_grad_scale_;
  comm::Communicator* balance_ = nullptr;
  // The parameters the calls compute with: SetParams's, or own_ (params()).
  const MoeLayerParams* params_ = nullptr;
  std::unique_ptr<MoeLayerParams> own_;
  // Gradients of Backward calls without a destination, until AddGradients (host).
  std::optional<MoeLayerParams> accumulated_;
  // The router's weights where the device reads them (on the host: params_'s tensors), and on a
  // GPU their gradient accumulators.
  const float *wg_ = nullptr, *wn_ = nullptr;
  float *gwg_ = nullptr, *gwn_ = nullptr;

  // Device memory: the router's weights and gradients (a GPU only), the Forward's copy of x, Soft
  // MoE's slot rows, the gates' gradients and the Soft MoE backward's scratch.
  Workspace weights_ws_, x_ws_, soft_ws_, dgate_ws_, soft_grad_ws_;
  std::vector<float> download_;  // host scratch of AddRouterGradients
  float* x_ = nullptr;
  float *soft_x_ = nullptr, *soft_y_ = nullptr;  // SOFT: G·E·p x M each
  int64_t tokens_ = 0;
  bool have_forward_ = false;
};

}  // namespace moe
