// CpuMoeLayer (runtime/moe/cpu_moe_layer.h).
#include "runtime/moe/cpu_moe_layer.h"

#include <cmath>
#include <cstring>

#include "experts/cpu/blas.h"
#include "runtime/moe/config.h"
#include "runtime/moe/expert_parallel_executor.h"
#include "runtime/moe/host_layer_call.h"

namespace moe {

CpuMoeLayer::CpuMoeLayer(const config::LayerConfig& cfg)
    : CpuMoeLayer(cfg, std::make_unique<LocalExpertExecutor>(ExpertShape(cfg), cfg.num_experts()), 0,
                  cfg.num_experts()) {}

CpuMoeLayer::CpuMoeLayer(const config::LayerConfig& cfg, std::unique_ptr<ExpertExecutor> executor,
                         int first_expert, int num_local_experts)
    : cfg_(ResolvedLayerConfig(cfg)),
      expert_shape_(ExpertShape(cfg)),
      shared_shape_(SharedShape(cfg)),
      first_expert_(first_expert),
      num_local_experts_(num_local_experts),
      executor_(std::move(executor)),
      bias_(static_cast<size_t>(cfg.num_experts()), 0.0f) {}

// params_ may point at *own_, which is on the heap: a move keeps it valid.
CpuMoeLayer::CpuMoeLayer(CpuMoeLayer&&) noexcept = default;
CpuMoeLayer& CpuMoeLayer::operator=(CpuMoeLayer&&) noexcept = default;
CpuMoeLayer::~CpuMoeLayer() = default;

MoeLayerParams& CpuMoeLayer::params() {
  if (own_ == nullptr) {
    own_ = std::make_unique<MoeLayerParams>(MakeLayerParams(cfg_, first_expert_, num_local_experts_));
    if (params_ == nullptr) params_ = own_.get();
  }
  return *own_;
}

Status CpuMoeLayer::SetParams(const MoeLayerParams& params) {
  if (&params == params_) return Status::Ok();  // checked when it was bound
  MOE_RETURN_IF_ERROR(CheckParamShapes("CpuMoeLayer::SetParams", params,
                                       LayerParamShapes(cfg_, first_expert_, num_local_experts_)));
  if (params.first_expert != first_expert_) {
    return InvalidArgument("CpuMoeLayer::SetParams: the parameters start at expert " +
                           std::to_string(params.first_expert) + ", the layer's at " +
                           std::to_string(first_expert_));
  }
  params_ = &params;
  return Status::Ok();
}

Status CpuMoeLayer::Forward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y) {
  return HostLayerCall(this).Forward(x, ctx, y);
}

Status CpuMoeLayer::Backward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads) {
  return HostLayerCall(this).Backward(dy, dx, grads);
}

Status CpuMoeLayer::Forward(const float* x_in, int64_t s, const RouteContext& ctx, float* y_out) {
  const int64_t m = cfg_.model_dim();
  if (s < 1) return InvalidArgument("input has no tokens (S=0)");
  if (params_ == nullptr) params();  // nothing bound: the layer's own (zero) parameters
  const MoeLayerParams& params = *params_;
  have_forward_ = false;
  ResizeTensor(&x_, s, m);
  std::memcpy(x_.data(), x_in, sizeof(float) * static_cast<size_t>(s * m));
  ctx_ = ctx;
  ComputeRouter(cfg_.router(), x_.view(), params.router, params.router_noise, ctx, &router_);
  MOE_ASSIGN_OR_RETURN(plan_, BuildDispatchPlan(cfg_.router(), router_.probs, bias_, ctx));
  loss_sums_ = RouterLossSums(cfg_.router(), plan_, router_.probs, router_.logits);
  if (cfg_.router().aux_loss_scope() == config::GLOBAL) {
    std::vector<double> counts = BalanceCounts(loss_sums_);
    if (balance_ != nullptr && balance_->size() > 1) {
      MOE_RETURN_IF_ERROR(balance_->AllReduce(counts.data(), counts.data(),
                                              static_cast<int64_t>(counts.size()),
                                              comm::DataType::kFloat64, comm::ReduceOp::kSum)
                              .WithContext("moe.router.aux_loss_scope=GLOBAL counts"));
    }
    SetGlobalBalanceCounts(counts, &loss_sums_);
  }
  losses_ = LossesFromSums(loss_sums_);

  // Shared experts write y first (y = shared(x)); then the executor adds the routed rows per token
  // in slot order, so the sum order does not depend on how rows are laid out.
  const MatrixView<float> y(y_out, s, m);
  if (params.shared.empty()) std::memset(y_out, 0, sizeof(float) * static_cast<size_t>(s * m));
  shared_h_.resize(params.shared.size());
  shared_a_.resize(params.shared.size());
  shared_u_.resize(params.shared.size());
  for (size_t i = 0; i < params.shared.size(); ++i) {
    const int64_t h = shared_shape_.hidden_dim;
    ResizeTensor(&shared_h_[i], s, h);
    ResizeTensor(&shared_a_[i], s, h);
    if (shared_shape_.swiglu) ResizeTensor(&shared_u_[i], s, h);
    experts::FfnForward(shared_shape_, params.shared[i], x_.view(), y, i > 0,
                        {shared_h_[i].view(), shared_a_[i].view(), shared_u_[i].view()});
  }
  MOE_RETURN_IF_ERROR(executor_->Forward(plan_, x_.view(), params.experts, y));
  have_forward_ = true;
  return Status::Ok();
}

Status CpuMoeLayer::Backward(const float* dy_in, float* dx_out, MoeLayerParams* grads_out) {
  if (!have_forward_) return FailedPrecondition("CpuMoeLayer::Backward called without a Forward");
  const MoeLayerParams& params = *params_;
  if (grads_out == nullptr && !accumulated_) {
    accumulated_ = MakeLayerParams(cfg_, first_expert_, num_local_experts_);
  }
  MoeLayerParams* grads = grads_out != nullptr ? grads_out : &*accumulated_;
  const int64_t s = x_.rows(), m = x_.cols();
  const MatrixView<const float> dy(dy_in, s, m);
  const int64_t rows = plan_.num_rows();
  // d gate of each kept row = dy[token] . its expert output (the executor sends gate * dy).
  std::vector<float> dgate(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const float* d = dy.row(plan_.row_token[r]);
    const float* out = executor_->OutputRow(r);
    double dot = 0.0;
    for (int64_t c = 0; c < m; ++c) dot += static_cast<double>(d[c]) * out[c];
    dgate[r] = static_cast<float>(dot);
  }
  // dx = shared experts' dx, then the routed rows' per token in slot order.
  const MatrixView<float> dx(dx_out, s, m);
  std::memset(dx_out, 0, sizeof(float) * static_cast<size_t>(s * m));
  for (size_t i = 0; i < params.shared.size(); ++i) {
    const int64_t h = shared_shape_.hidden_dim;
    ResizeTensor(&shared_scratch1_, s, h);
    if (shared_shape_.swiglu) ResizeTensor(&shared_scratch2_, s, h);
    experts::FfnBackward(shared_shape_, params.shared[i], x_.view(),
                         {shared_h_[i].view(), shared_a_[i].view(), shared_u_[i].view()}, dy, dx,
                         true, &grads->shared[i], shared_scratch1_.view(), shared_scratch2_.view());
  }
  MOE_RETURN_IF_ERROR(executor_->Backward(plan_, dy, params.experts, &grads->experts, dx));
  RouterBackward(dgate, dx_out, grads);
  return Status::Ok();
}

Status CpuMoeLayer::AddGradients(MoeLayerParams* grads) {
  if (!accumulated_) return Status::Ok();
  std::vector<Tensor*> into;
  grads->ForEach([&](const std::string&, Tensor& t) { into.push_back(&t); });
  size_t i = 0;
  Status status;
  accumulated_->ForEach([&](const std::string& name, Tensor& g) {
    if (!status.ok()) return;
    if (i >= into.size() || !into[i]->SameShape(g)) {
      status = InvalidArgument("CpuMoeLayer::AddGradients: " + name +
                               " has no tensor of its shape in the destination");
      return;
    }
    for (int64_t j = 0; j < g.size(); ++j) (*into[i])[j] += g[j];
    g.Fill(0.0f);
    ++i;
  });
  return status;
}

void CpuMoeLayer::RouterBackward(const std::vector<float>& dgate_rows, float* dx,
                                 MoeLayerParams* grads) {
  const int64_t s = plan_.num_tokens, e = plan_.num_experts, m = x_.cols();
  const MoeLayerParams& params = *params_;
  RouterScoreGradients(cfg_.router(), plan_, router_, dgate_rows, loss_grad_scale_, &router_grads_,
                       &loss_sums_);
  if (router_.noisy) {
    const Tensor& dn = router_grads_.dnoise;
    blas::Gemm(true, false, m, e, s, 1.0f, x_.data(), dn.data(), 1.0f, grads->router_noise.data());
    blas::Gemm(false, true, s, m, e, 1.0f, dn.data(), params.router_noise.data(), 1.0f, dx);
  }
  const Tensor& dlogits = router_grads_.dlogits;
  blas::Gemm(true, false, m, e, s, 1.0f, x_.data(), dlogits.data(), 1.0f, grads->router.data());
  blas::Gemm(false, true, s, m, e, 1.0f, dlogits.data(), params.router.data(), 1.0f, dx);
}

}  // namespace moe
