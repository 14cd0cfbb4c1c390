// CpuMoeLayer (runtime/layer/cpu_moe_layer.h).
#include "runtime/layer/cpu_moe_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "experts/cpu/blas.h"
#include "runtime/config/config.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/layer/host_layer_call.h"
#include "runtime/routing/routing_math.h"

namespace moe {

namespace {

// The router's backward scratch (dlogits, dprobs, dscores, dnoise: S x E each) lives only inside
// one Backward, so each thread keeps one set instead of each layer: a model of L layers holds one,
// not L (moe_simulate's 1024 rank threads with E = 1024 held 0.75 GiB of them for tiny_lm).
RouterGradients& RouterScratch() {
  thread_local RouterGradients scratch;
  return scratch;
}

}  // namespace

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
                                       LayerParamShapes(cfg_, first_expert_, num_local_experts_,
                                                        params.expert_ids)));
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
  // SOFT has no router losses (its plan's "tokens" are the slot rows).
  loss_sums_ = cfg_.router().gate() == config::SOFT
                   ? std::vector<GroupLossSums>()
                   : RouterLossSums(cfg_.router(), plan_, router_.probs, router_.logits);
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
  SharedForward(params, y);
  if (cfg_.router().gate() == config::SOFT) {
    MOE_RETURN_IF_ERROR(SoftForward(params, y));
  } else {
    MOE_RETURN_IF_ERROR(executor_->Forward(plan_, x_.view(), params.experts, y));
  }
  have_forward_ = true;
  return Status::Ok();
}

void CpuMoeLayer::SharedForward(const MoeLayerParams& params, MatrixView<float> y) {
  const int64_t s = x_.rows();
  if (params.shared.empty()) {
    std::memset(y.data(), 0, sizeof(float) * static_cast<size_t>(s * y.cols()));
  }
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
}

void CpuMoeLayer::SharedBackward(const MoeLayerParams& params, MatrixView<const float> dy,
                                 MatrixView<float> dx, MoeLayerParams* grads) {
  const int64_t s = x_.rows();
  std::memset(dx.data(), 0, sizeof(float) * static_cast<size_t>(s * dx.cols()));
  for (size_t i = 0; i < params.shared.size(); ++i) {
    const int64_t h = shared_shape_.hidden_dim;
    ResizeTensor(&shared_scratch1_, s, h);
    if (shared_shape_.swiglu) ResizeTensor(&shared_scratch2_, s, h);
    experts::FfnBackward(shared_shape_, params.shared[i], x_.view(),
                         {shared_h_[i].view(), shared_a_[i].view(), shared_u_[i].view()}, dy, dx,
                         true, &grads->shared[i], shared_scratch1_.view(), shared_scratch2_.view());
  }
}

Status CpuMoeLayer::SoftForward(const MoeLayerParams& params, MatrixView<float> y) {
  const int64_t m = x_.cols(), cols = router_.probs.cols(), g = plan_.num_groups;
  // X̃_g = D_gᵀ X_g: slot c = e·p + j of group g is row g·E·p + c.
  ResizeTensor(&soft_x_, g * cols, m);
  ResizeTensor(&soft_y_, g * cols, m);
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(x_.rows(), g, gr),
                  n = routing::GroupBegin(x_.rows(), g, gr + 1) - b;
    blas::Gemm(true, false, cols, m, n, 1.0f, router_.dispatch.row(b), x_.row(b), 0.0f,
               soft_x_.row(gr * cols));
  }
  soft_y_.Fill(0.0f);  // the executor adds gate (1) · expert(slot input)
  MOE_RETURN_IF_ERROR(executor_->Forward(plan_, soft_x_.view(), params.experts, soft_y_.view()));
  // y_g += C_g Ỹ_g.
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(x_.rows(), g, gr),
                  n = routing::GroupBegin(x_.rows(), g, gr + 1) - b;
    blas::Gemm(false, false, n, m, cols, 1.0f, router_.probs.row(b), soft_y_.row(gr * cols), 1.0f,
               y.row(b));
  }
  return Status::Ok();
}

Status CpuMoeLayer::SoftBackward(const MoeLayerParams& params, MatrixView<const float> dy,
                                 MatrixView<float> dx, MoeLayerParams* grads) {
  const int64_t s = x_.rows(), m = x_.cols(), cols = router_.probs.cols(), g = plan_.num_groups;
  const Tensor& c_w = router_.probs;
  const Tensor& d_w = router_.dispatch;
  // dỸ_g = C_gᵀ dy_g; dC_g = dy_g Ỹ_gᵀ.
  Tensor dsoft_y(g * cols, m), dsoft_x(g * cols, m), dc(s, cols), dd(s, cols);
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(s, g, gr), n = routing::GroupBegin(s, g, gr + 1) - b;
    blas::Gemm(true, false, cols, m, n, 1.0f, c_w.row(b), dy.row(b), 0.0f,
               dsoft_y.row(gr * cols));
    blas::Gemm(false, true, n, cols, m, 1.0f, dy.row(b), soft_y_.row(gr * cols), 0.0f, dc.row(b));
  }
  // The experts' backward on the slot rows (gate 1): dX̃ and the expert weight gradients.
  dsoft_x.Fill(0.0f);
  MOE_RETURN_IF_ERROR(
      executor_->Backward(plan_, dsoft_y.view(), params.experts, &grads->experts, dsoft_x.view()));
  // dx_g += D_g dX̃_g; dD_g = X_g dX̃_gᵀ.
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(s, g, gr), n = routing::GroupBegin(s, g, gr + 1) - b;
    blas::Gemm(false, false, n, m, cols, 1.0f, d_w.row(b), dsoft_x.row(gr * cols), 1.0f, dx.row(b));
    blas::Gemm(false, true, n, cols, m, 1.0f, x_.row(b), dsoft_x.row(gr * cols), 0.0f, dd.row(b));
  }
  // Through the softmaxes to the logits: dL = C ⊙ (dC − <dC, C>_row) + D ⊙ (dD − <dD, D>_column
  // over the group).
  Tensor& dlogits = RouterScratch().dlogits;
  ResizeTensor(&dlogits, s, cols);
  for (int64_t t = 0; t < s; ++t) {
    double dot = 0.0;
    for (int64_t c = 0; c < cols; ++c) dot += static_cast<double>(dc(t, c)) * c_w(t, c);
    for (int64_t c = 0; c < cols; ++c) {
      dlogits(t, c) = static_cast<float>(c_w(t, c) * (dc(t, c) - dot));
    }
  }
  std::vector<double> coldot(static_cast<size_t>(cols));
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(s, g, gr), end = routing::GroupBegin(s, g, gr + 1);
    std::fill(coldot.begin(), coldot.end(), 0.0);
    for (int64_t t = b; t < end; ++t) {
      for (int64_t c = 0; c < cols; ++c) coldot[c] += static_cast<double>(dd(t, c)) * d_w(t, c);
    }
    for (int64_t t = b; t < end; ++t) {
      for (int64_t c = 0; c < cols; ++c) {
        dlogits(t, c) += static_cast<float>(d_w(t, c) * (dd(t, c) - coldot[c]));
      }
    }
  }
  blas::Gemm(true, false, m, cols, s, 1.0f, x_.data(), dlogits.data(), 1.0f, grads->router.data());
  blas::Gemm(false, true, s, m, cols, 1.0f, dlogits.data(), params.router.data(), 1.0f, dx.data());
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
  if (cfg_.router().gate() == config::SOFT) {
    const MatrixView<float> dx(dx_out, s, m);
    SharedBackward(params, dy, dx, grads);
    return SoftBackward(params, dy, dx, grads);
  }
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
  SharedBackward(params, dy, dx, grads);
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
  RouterGradients& scratch = RouterScratch();
  RouterScoreGradients(cfg_.router(), plan_, router_, dgate_rows, loss_grad_scale_, &scratch,
                       &loss_sums_);
  if (router_.noisy) {
    const Tensor& dn = scratch.dnoise;
    blas::Gemm(true, false, m, e, s, 1.0f, x_.data(), dn.data(), 1.0f, grads->router_noise.data());
    blas::Gemm(false, true, s, m, e, 1.0f, dn.data(), params.router_noise.data(), 1.0f, dx);
  }
  const Tensor& dlogits = scratch.dlogits;
  blas::Gemm(true, false, m, e, s, 1.0f, x_.data(), dlogits.data(), 1.0f, grads->router.data());
  blas::Gemm(false, true, s, m, e, 1.0f, dlogits.data(), params.router.data(), 1.0f, dx);
}

}  // namespace moe
