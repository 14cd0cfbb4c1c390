#include "runtime/moe/moe_layer.h"

#include <cmath>
#include <cstring>

#include "experts/cpu/blas.h"
#include "runtime/base/hash.h"
#include "runtime/base/rng.h"
#include "runtime/moe/config.h"
#include "runtime/cuda/device_moe_layer.h"

namespace moe {
namespace {

experts::Activation ToActivation(config::Activation a) {
  switch (a) {
    case config::RELU: return experts::Activation::kRelu;
    case config::GELU_TANH: return experts::Activation::kGeluTanh;
    case config::SILU: return experts::Activation::kSilu;
  }
  return experts::Activation::kGeluTanh;
}


}  // namespace

experts::FfnShape ExpertShape(const config::LayerConfig& cfg) {
  experts::FfnShape s;
  s.model_dim = cfg.model_dim();
  s.hidden_dim = cfg.expert().hidden_dim();
  s.activation = ToActivation(cfg.expert().activation());
  s.swiglu = cfg.expert().kind() == config::SWIGLU;
  s.bias = cfg.expert().bias();
  return s;
}

experts::FfnShape SharedShape(const config::LayerConfig& cfg) {
  experts::FfnShape s = ExpertShape(cfg);
  s.hidden_dim = SharedHidden(cfg);
  return s;
}

void MoeLayerParams::Zero() {
  ForEach([](const std::string&, Tensor& t) { t.Fill(0.0f); });
}

void InitUniformByName(const std::string& name, uint64_t seed, double bound, Tensor* t) {
  const uint64_t id = Fnv1a64(name);
  for (int64_t i = 0; i < t->size(); ++i) {
    const double u = CounterUniform(seed, 0, id, RngStream::kInit, static_cast<uint64_t>(i));
    (*t)[i] = static_cast<float>((2.0 * u - 1.0) * bound);
  }
}

MoeLayerParams MakeLayerParams(const config::LayerConfig& cfg, int first_expert, int num_local_experts) {
  MoeLayerParams p;
  p.router = Tensor(cfg.model_dim(), cfg.num_experts());
  if (cfg.router().gate() == config::NOISY_TOPK) p.router_noise = Tensor(cfg.model_dim(), cfg.num_experts());
  p.first_expert = first_expert;
  const int local = num_local_experts < 0 ? cfg.num_experts() : num_local_experts;
  for (int e = 0; e < local; ++e) p.experts.push_back(experts::FfnParams::Zeros(ExpertShape(cfg)));
  for (int s = 0; s < cfg.num_shared_experts(); ++s) p.shared.push_back(experts::FfnParams::Zeros(SharedShape(cfg)));
  return p;
}

void InitLayerParams(const config::LayerConfig& cfg, uint64_t seed, MoeLayerParams* params) {
  const int64_t m = cfg.model_dim();
  params->ForEach([&](const std::string& name, Tensor& t) {
    // fan_in: rows of a weight matrix; for b1 the model dim, for b2 the hidden dim.
    int64_t fan_in = t.rows();
    if (name.size() > 3 && name.compare(name.size() - 3, 3, "_b1") == 0) fan_in = m;
    if (name.size() > 3 && name.compare(name.size() - 3, 3, "_b2") == 0) {
      fan_in = name.rfind("shared", 0) == 0 ? SharedHidden(cfg) : cfg.expert().hidden_dim();
    }
    InitUniformByName(name, seed, 1.0 / std::sqrt(static_cast<double>(fan_in)), &t);
  });
}

MoeLayer::MoeLayer(const config::LayerConfig& cfg)
    : MoeLayer(cfg, std::make_unique<LocalExpertExecutor>(ExpertShape(cfg)), 0, cfg.num_experts()) {}

MoeLayer::MoeLayer(const config::LayerConfig& cfg, std::unique_ptr<ExpertExecutor> executor,
                   int first_expert, int num_local_experts)
    : cfg_(ResolvedLayerConfig(cfg)),
      expert_shape_(ExpertShape(cfg)),
      shared_shape_(SharedShape(cfg)),
      params_(MakeLayerParams(cfg, first_expert, num_local_experts)),
      executor_(std::move(executor)),
      bias_(static_cast<size_t>(cfg.num_experts()), 0.0f) {}

MoeLayer::MoeLayer(MoeLayer&&) noexcept = default;
MoeLayer& MoeLayer::operator=(MoeLayer&&) noexcept = default;
MoeLayer::~MoeLayer() = default;

void MoeLayer::UseDevice(std::unique_ptr<DeviceMoeLayer> device) { device_ = std::move(device); }

Status MoeLayer::Forward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y) {
  const int64_t s = x.rows(), m = cfg_.model_dim();
  if (x.cols() != m) {
    return InvalidArgument("input has " + std::to_string(x.cols()) +
                           " columns, must equal moe.model_dim=" + std::to_string(m));
  }
  if (s < 1) return InvalidArgument("input has no tokens (S=0)");
  have_forward_ = false;
  ResizeTensor(&x_, s, m);
  std::memcpy(x_.data(), x.data(), sizeof(float) * static_cast<size_t>(s * m));
  ctx_ = ctx;
  if (device_ != nullptr) return DeviceForward(x, ctx, y);
  ComputeRouter(cfg_.router(), x_.view(), params_.router, params_.router_noise, ctx, &router_);
  MOE_ASSIGN_OR_RETURN(plan_, BuildDispatchPlan(cfg_.router(), router_.probs, bias_, ctx));
  losses_ = ComputeRouterLosses(cfg_.router(), plan_, router_.probs, router_.logits);

  // Pack: gather token rows in expert-major order.
  const int64_t rows = plan_.num_rows();
  ResizeTensor(&packed_x_, rows, m);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(packed_x_.row(r), x_.row(plan_.row_token[r]), sizeof(float) * static_cast<size_t>(m));
  }
  MOE_RETURN_IF_ERROR(executor_->Forward(plan_, packed_x_.view(), params_.experts, &packed_y_));

  // Shared experts write y first (y = shared(x)), then the routed contributions are added per token
  // in slot order, so the sum order does not depend on how rows are laid out.
  ResizeTensor(y, s, m);
  if (params_.shared.empty()) y->Fill(0.0f);
  shared_h_.resize(params_.shared.size());
  shared_a_.resize(params_.shared.size());
  shared_u_.resize(params_.shared.size());
  for (size_t i = 0; i < params_.shared.size(); ++i) {
    const int64_t h = shared_shape_.hidden_dim;
    ResizeTensor(&shared_h_[i], s, h);
    ResizeTensor(&shared_a_[i], s, h);
    if (shared_shape_.swiglu) ResizeTensor(&shared_u_[i], s, h);
    experts::FfnForward(shared_shape_, params_.shared[i], x_.view(), y->view(), i > 0,
                        {shared_h_[i].view(), shared_a_[i].view(), shared_u_[i].view()});
  }
  for (int64_t t = 0; t < s; ++t) {
    float* out = y->row(t);
    for (int64_t i = plan_.token_row_offset[t]; i < plan_.token_row_offset[t + 1]; ++i) {
      const int32_t r = plan_.token_rows[i];
      const float g = plan_.row_gate[r];
      const float* src = packed_y_.row(r);
      for (int64_t c = 0; c < m; ++c) out[c] += g * src[c];
    }
  }
  have_forward_ = true;
  return Status::Ok();
}

Status MoeLayer::Backward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads) {
  if (!have_forward_) return FailedPrecondition("MoeLayer::Backward called without a Forward");
  const int64_t s = x_.rows(), m = x_.cols();
  if (dy.rows() != s || dy.cols() != m) {
    return InvalidArgument("grad output is " + std::to_string(dy.rows()) + "x" +
                           std::to_string(dy.cols()) + ", must be " + std::to_string(s) + "x" +
                           std::to_string(m) + " like the layer output");
  }
  if (device_ != nullptr) return DeviceBackward(dy, dx, grads);
  const int64_t rows = plan_.num_rows();
  // dY of each packed row = gate * dy[token]; d gate = dy[token] . expert output row.
  ResizeTensor(&packed_dy_, rows, m);
  std::vector<float> dgate(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const float* d = dy.row(plan_.row_token[r]);
    const float* out = packed_y_.row(r);
    float* pd = packed_dy_.row(r);
    const float g = plan_.row_gate[r];
    double dot = 0.0;
    for (int64_t c = 0; c < m; ++c) {
      pd[c] = g * d[c];
      dot += static_cast<double>(d[c]) * out[c];
    }
    dgate[r] = static_cast<float>(dot);
  }
  MOE_RETURN_IF_ERROR(
      executor_->Backward(plan_, packed_dy_.view(), params_.experts, &grads->experts, &packed_dx_));

  ResizeTensor(dx, s, m);
  dx->Fill(0.0f);
  for (size_t i = 0; i < params_.shared.size(); ++i) {
    const int64_t h = shared_shape_.hidden_dim;
    ResizeTensor(&shared_scratch1_, s, h);
    if (shared_shape_.swiglu) ResizeTensor(&shared_scratch2_, s, h);
    experts::FfnBackward(shared_shape_, params_.shared[i], x_.view(),
                         {shared_h_[i].view(), shared_a_[i].view(), shared_u_[i].view()}, dy,
                         dx->view(), true, &grads->shared[i], shared_scratch1_.view(),
                         shared_scratch2_.view());
  }
  for (int64_t t = 0; t < s; ++t) {
    float* out = dx->row(t);
    for (int64_t i = plan_.token_row_offset[t]; i < plan_.token_row_offset[t + 1]; ++i) {
      const float* src = packed_dx_.row(plan_.token_rows[i]);
      for (int64_t c = 0; c < m; ++c) out[c] += src[c];
    }
  }
  RouterBackward(dgate, dx, grads);
  return Status::Ok();
}

void MoeLayer::RouterBackward(const std::vector<float>& dgate_rows, Tensor* dx, MoeLayerParams* grads) {
  const int64_t s = plan_.num_tokens, e = plan_.num_experts, m = x_.cols();
  RouterScoreGradients(cfg_.router(), plan_, router_, dgate_rows, loss_grad_scale_, &router_grads_);
  if (router_.noisy) {
    const Tensor& dn = router_grads_.dnoise;
    blas::Gemm(true, false, m, e, s, 1.0f, x_.data(), dn.data(), 1.0f, grads->router_noise.data());
    blas::Gemm(false, true, s, m, e, 1.0f, dn.data(), params_.router_noise.data(), 1.0f, dx->data());
  }
  const Tensor& dlogits = router_grads_.dlogits;
  blas::Gemm(true, false, m, e, s, 1.0f, x_.data(), dlogits.data(), 1.0f, grads->router.data());
  blas::Gemm(false, true, s, m, e, 1.0f, dlogits.data(), params_.router.data(), 1.0f, dx->data());
}

report::LayerMetrics LayerMetricsOf(const DispatchPlan& plan, const RouterLosses& losses) {
  report::LayerMetrics mt;
  mt.set_aux_loss(losses.aux);
  mt.set_z_loss(losses.z);
  mt.set_dropped_slots(plan.dropped_slots);
  for (int64_t v : plan.kept_per_expert) mt.add_tokens_per_expert(v);
  for (int64_t v : plan.dropped_per_expert) mt.add_dropped_per_expert(v);
  mt.set_capacity(plan.capacity);
  mt.set_total_slots(plan.expert_choice ? plan.num_rows() : plan.num_tokens * plan.top_k);
  return mt;
}

Status MoeLayer::DeviceForward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y) {
  const int64_t s = x.rows(), m = cfg_.model_dim();
  const int64_t bytes = s * m * static_cast<int64_t>(sizeof(float));
  const auto dev = MemorySpace::kDevice;
  device_->router_bias() = bias_;
  device_->set_loss_gradient_scale(loss_grad_scale_);
  MOE_RETURN_IF_ERROR(device_->SetParams(params_));  // returns with the upload complete
  MOE_ASSIGN_OR_RETURN(void* x_dev, device_x_.Get(bytes));
  MOE_ASSIGN_OR_RETURN(void* y_dev, device_y_.Get(bytes));
  MOE_RETURN_IF_ERROR(CopyFromHost(dev, x_dev, x.data(), bytes));
  MOE_RETURN_IF_ERROR(
      device_->Forward(static_cast<const float*>(x_dev), s, ctx, static_cast<float*>(y_dev)));
  MOE_RETURN_IF_ERROR(device_->Synchronize());
  ResizeTensor(y, s, m);
  MOE_RETURN_IF_ERROR(CopyToHost(dev, y->data(), y_dev, bytes));
  router_ = device_->router_output();
  plan_ = device_->plan();
  losses_ = device_->losses();
  have_forward_ = true;
  return Status::Ok();
}

// dy and dx travel through the forward's y buffer and a buffer of their own: the device layer
// keeps reading x (its router weight gradient) until its Backward is done.
Status MoeLayer::DeviceBackward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads) {
  const int64_t s = x_.rows(), m = x_.cols();
  const int64_t bytes = s * m * static_cast<int64_t>(sizeof(float));
  const auto dev = MemorySpace::kDevice;
  MOE_ASSIGN_OR_RETURN(void* dy_dev, device_y_.Get(bytes));
  MOE_ASSIGN_OR_RETURN(void* dx_dev, device_dx_.Get(bytes));
  MOE_RETURN_IF_ERROR(CopyFromHost(dev, dy_dev, dy.data(), bytes));
  MOE_RETURN_IF_ERROR(
      device_->Backward(static_cast<const float*>(dy_dev), static_cast<float*>(dx_dev)));
  MOE_RETURN_IF_ERROR(device_->Synchronize());
  ResizeTensor(dx, s, m);
  MOE_RETURN_IF_ERROR(CopyToHost(dev, dx->data(), dx_dev, bytes));
  return device_->AddGradients(grads);
}

Status MoeLayer::FetchPlan() {
  if (device_ == nullptr || !device_->routes_on_device()) return Status::Ok();
  MOE_RETURN_IF_ERROR(device_->FetchPlan());
  plan_ = device_->plan();
  router_ = device_->router_output();
  return Status::Ok();
}

report::LayerMetrics MoeLayer::Metrics() const { return LayerMetricsOf(plan_, losses_); }

void MoeLayer::UpdateRouterBias() { UpdateRouterBias(plan_.load_per_expert); }

void MoeLayer::UpdateRouterBias(const std::vector<int64_t>& load) {
  const double rate = cfg_.router().bias_update_rate();
  if (rate == 0.0 || load.size() != bias_.size()) return;
  double mean = 0.0;
  for (int64_t v : load) mean += static_cast<double>(v);
  mean /= static_cast<double>(load.size());
  for (size_t i = 0; i < bias_.size(); ++i) {
    const double d = mean - static_cast<double>(load[i]);
    const double sign = d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0);
    bias_[i] = static_cast<float>(bias_[i] + rate * sign);
  }
}

}  // namespace moe
