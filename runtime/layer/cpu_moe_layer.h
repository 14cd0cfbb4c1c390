// CpuMoeLayer: the MoE layer on host buffers (runtime/layer/moe_layer.h): route -> plan -> pack ->
// experts -> combine, and the backward through the same plan. Where its experts run is an
// ExpertExecutor (runtime/exchange/expert_executor.h): all of them in this process (the default), or
// expert-parallel over a communicator (runtime/exchange/expert_parallel_executor.h), which replaces
// the local expert step with dispatch / combine all-to-alls; everything else is shared.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "base/check.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/exchange/expert_executor.h"
#include "runtime/routing/losses.h"
#include "comm/communicator.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/routing/router.h"

namespace moe {

class CpuMoeLayer final : public MoeLayer {
 public:
  // A layer holding all experts and running them in this process.
  explicit CpuMoeLayer(const config::LayerConfig& cfg);
  // A layer holding experts [first_expert, first_expert + num_local_experts), run by `executor`.
  CpuMoeLayer(const config::LayerConfig& cfg, std::unique_ptr<ExpertExecutor> executor,
              int first_expert, int num_local_experts);
  CpuMoeLayer(CpuMoeLayer&&) noexcept;
  CpuMoeLayer& operator=(CpuMoeLayer&&) noexcept;
  ~CpuMoeLayer() override;

  // The layer's own parameters (zero, allocated on the first call or at a Forward with nothing
  // bound), for code that does not keep its own: they are the ones the layer computes with unless
  // SetParams was given others.
  MoeLayerParams& params();
  // The parameters the layer computes with (SetParams's, or its own); there must be some.
  const MoeLayerParams& params() const {
    MOE_CHECK(params_ != nullptr);
    return *params_;
  }

  const config::LayerConfig& config() const override { return cfg_; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
  int first_expert() const override { return first_expert_; }
  int num_local_experts() const override { return num_local_experts_; }
  Status SetParams(const MoeLayerParams& params) override;
  Status Forward(const float* x, int64_t tokens, const RouteContext& ctx, float* y) override;
  Status Backward(const float* dy, float* dx, MoeLayerParams* grads) override;
  Status AddGradients(MoeLayerParams* grads) override;
  Status Synchronize() override { return Status::Ok(); }
  const DispatchPlan& plan() const override { return plan_; }
  int64_t forward_tokens() const override { return have_forward_ ? x_.rows() : 0; }
  Status FetchPlan() override { return Status::Ok(); }
  const RouterOutput& router_output() const override { return router_; }
  const RouterLosses& losses() const override { return losses_; }
  std::vector<float>& router_bias() override { return bias_; }
  void set_loss_gradient_scale(LossScale s) override { loss_grad_scale_ = s; }
  ExchangeStats* exchange_stats() override { return executor_->exchange_stats(); }
  ExpertExecutor* executor() { return executor_.get(); }
  // router.aux_loss_scope GLOBAL: the ranks over whose tokens f is counted (their counts are
  // all-reduced in every Forward; host memory). Null: this process's groups only. Not owned.
  void set_balance_communicator(comm::Communicator* world) { balance_ = world; }

  // The same calls on host tensors, shapes checked (runtime/layer/host_layer_call.h).
  using MoeLayer::Backward;
  using MoeLayer::Forward;
  Status Forward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y);
  Status Backward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads);

 private:
  void RouterBackward(const std::vector<float>& dgate_rows, float* dx, MoeLayerParams* grads);
  // Shared experts: y = Σ shared(x) (y's old contents replaced); dx = Σ their input gradients
  // (dx's old contents replaced), their weight gradients into grads.
  void SharedForward(const MoeLayerParams& params, MatrixView<float> y);
  void SharedBackward(const MoeLayerParams& params, MatrixView<const float> dy, MatrixView<float> dx,
                      MoeLayerParams* grads);
  // gate SOFT (docs/SEMANTICS.md "Soft MoE"): slot inputs Dᵀ·X per group, the experts on the
  // slot rows through the executor (SoftSlotPlan), y += C·Ỹ; and the backward through both
  // softmaxes to the router.
  Status SoftForward(const MoeLayerParams& params, MatrixView<float> y);
  Status SoftBackward(const MoeLayerParams& params, MatrixView<const float> dy, MatrixView<float> dx,
                      MoeLayerParams* grads);

  config::LayerConfig cfg_;
  experts::FfnShape expert_shape_, shared_shape_;
  int first_expert_ = 0, num_local_experts_ = 0;
  std::unique_ptr<ExpertExecutor> executor_;
  std::vector<float> bias_;
  LossScale loss_grad_scale_;
  comm::Communicator* balance_ = nullptr;
  std::vector<GroupLossSums> loss_sums_;  // the last Forward's, for the Backward
  // The parameters the calls compute with: SetParams's, or own_ (params()).
  const MoeLayerParams* params_ = nullptr;
  std::unique_ptr<MoeLayerParams> own_;
  // Gradients of Backward calls without a destination, until AddGradients.
  std::optional<MoeLayerParams> accumulated_;

  // Saved by Forward.
  Tensor x_;  // copy of the input (the backward's GEMMs read it)
  RouteContext ctx_;
  RouterOutput router_;
  DispatchPlan plan_;
  RouterLosses losses_;
  std::vector<Tensor> shared_h_, shared_a_, shared_u_;
  Tensor soft_x_, soft_y_;  // SOFT: slot inputs Dᵀ·X and expert outputs, G·E·p x M
  // Backward scratch (the router's is per thread: RouterScratch in the .cc).
  Tensor shared_scratch1_, shared_scratch2_;
  bool have_forward_ = false;
};

}  // namespace moe
