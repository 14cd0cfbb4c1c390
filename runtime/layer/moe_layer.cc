// The MoE layer over a Device (runtime/layer/moe_layer.h).
#include "runtime/layer/moe_layer.h"

#include <string>
#include <utility>

#include "runtime/config/config.h"
#include "runtime/device/host_device.h"
#include "runtime/exchange/expert_exchange.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/layer/host_layer_call.h"
#include "runtime/routing/routing_math.h"

namespace moe {

namespace {

constexpr int64_t kFloat = sizeof(float);

std::shared_ptr<Device> HostDeviceFor() { return std::make_shared<HostDevice>(); }

}  // namespace

MoeLayer::MoeLayer(const config::LayerConfig& cfg)
    : MoeLayer(cfg, HostDeviceFor(), nullptr, 0, cfg.num_experts()) {}

MoeLayer::MoeLayer(const config::LayerConfig& cfg, std::shared_ptr<Device> device,
                   std::unique_ptr<ExpertExecutor> executor, int first_expert,
                   int num_local_experts)
    : MoeLayer(Uninitialized{}, cfg, std::move(device), std::move(executor), first_expert,
               num_local_experts) {
  MOE_CHECK_OK(Init(/*host_plan=*/false));
}

MoeLayer::MoeLayer(Uninitialized, const config::LayerConfig& cfg, std::shared_ptr<Device> device,
                   std::unique_ptr<ExpertExecutor> executor, int first_expert,
                   int num_local_experts)
    : cfg_(ResolvedLayerConfig(cfg)),
      expert_shape_(ExpertShape(cfg)),
      shared_shape_(SharedShape(cfg)),
      first_expert_(first_expert),
      num_local_experts_(num_local_experts),
      device_(std::move(device)),
      executor_(executor != nullptr
                    ? std::move(executor)
                    : std::make_unique<LocalExpertExecutor>(device_.get(), expert_shape_,
                                                            cfg.num_experts())),
      bias_(static_cast<size_t>(cfg.num_experts()), 0.0f),
      weights_ws_(device_->memory()),
      x_ws_(device_->memory()),
      soft_ws_(device_->memory()),
      dgate_ws_(device_->memory()),
      soft_grad_ws_(device_->memory()) {}

StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(const config::LayerConfig& cfg,
                                                     std::shared_ptr<Device> device,
                                                     std::unique_ptr<ExpertExecutor> executor,
                                                     int first_expert, int num_local_experts,
                                                     bool host_plan) {
  std::unique_ptr<MoeLayer> layer(new MoeLayer(Uninitialized{}, cfg, std::move(device),
                                               std::move(executor), first_expert,
                                               num_local_experts));
  MOE_RETURN_IF_ERROR(layer->Init(host_plan));
  return layer;
}

Status MoeLayer::Init(bool host_plan) {
  MOE_ASSIGN_OR_RETURN(routing_, device_->MakeRouting(cfg_, host_plan));
  for (int i = 0; i < cfg_.num_shared_experts(); ++i) {
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<ExpertCompute> shared,
                         device_->MakeExperts(shared_shape_, 1));
    shared_.push_back(std::move(shared));
  }
  if (memory_space() == MemorySpace::kHost) return Status::Ok();
  // A GPU holds the router's weights and accumulates their gradients: M x cols (and M x E for the
  // noise) each.
  const int64_t m = cfg_.model_dim(), cols = RouterColumns(cfg_), e = cfg_.num_experts();
  const bool noise = cfg_.router().gate() == config::NOISY_TOPK;
  struct Weights {
    float *wg, *gwg, *wn, *gwn;
  };
  MOE_ASSIGN_OR_RETURN(const Weights w, weights_ws_.Carve([&](Carver& c) {
    return Weights{c.Take<float>(m * cols), c.Take<float>(m * cols),
                   noise ? c.Take<float>(m * e) : nullptr, noise ? c.Take<float>(m * e) : nullptr};
  }));
  wg_ = w.wg;
  wn_ = w.wn;
  gwg_ = w.gwg;
  gwn_ = w.gwn;
  MOE_RETURN_IF_ERROR(device_->Zero(gwg_, m * cols * kFloat));
  if (gwn_ != nullptr) MOE_RETURN_IF_ERROR(device_->Zero(gwn_, m * e * kFloat));
  return device_->Synchronize();
}

// params_ may point at *own_, which is on the heap: a move keeps it valid.
MoeLayer::MoeLayer(MoeLayer&&) noexcept = default;
MoeLayer& MoeLayer::operator=(MoeLayer&&) noexcept = default;
MoeLayer::~MoeLayer() {
  if (device_ != nullptr) (void)device_->Synchronize();
}

MoeLayerParams& MoeLayer::params() {
  if (own_ == nullptr) {
    own_ = std::make_unique<MoeLayerParams>(MakeLayerParams(cfg_, first_expert_, num_local_experts_));
    if (params_ == nullptr) params_ = own_.get();
  }
  return *own_;
}

Status MoeLayer::SetParams(const MoeLayerParams& params) {
  const bool host = memory_space() == MemorySpace::kHost;
  if (host && &params == params_) return BindHostParams();  // checked when it was bound
  MOE_RETURN_IF_ERROR(CheckParamShapes("MoeLayer::SetParams", params,
                                       LayerParamShapes(cfg_, first_expert_, num_local_experts_,
                                                        params.expert_ids)));
  if (params.first_expert != first_expert_) {
    return InvalidArgument("MoeLayer::SetParams: the parameters start at expert " +
                           std::to_string(params.first_expert) + ", the layer's at " +
                           std::to_string(first_expert_));
  }
  params_ = &params;
  if (host) return BindHostParams();
  MOE_RETURN_IF_ERROR(executor_->SetWeights(params.experts));
  for (size_t i = 0; i < shared_.size(); ++i) {
    MOE_RETURN_IF_ERROR(shared_[i]->SetWeights({&params.shared[i], 1}));
  }
  MOE_RETURN_IF_ERROR(device_->Upload(const_cast<float*>(wg_), params.router.data(),
                                      params.router.size() * kFloat));
  if (wn_ != nullptr) {
    MOE_RETURN_IF_ERROR(device_->Upload(const_cast<float*>(wn_), params.router_noise.data(),
                                        params.router_noise.size() * kFloat));
  }
  return device_->Synchronize();
}

Status MoeLayer::BindHostParams() {
  const MoeLayerParams& params = *params_;
  MOE_RETURN_IF_ERROR(executor_->SetWeights(params.experts));
  for (size_t i = 0; i < shared_.size(); ++i) {
    MOE_RETURN_IF_ERROR(shared_[i]->SetWeights({&params.shared[i], 1}));
  }
  wg_ = params.router.data();
  wn_ = params.router_noise.size() > 0 ? params.router_noise.data() : nullptr;
  return Status::Ok();
}

Status MoeLayer::Forward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y) {
  return HostLayerCall(this).Forward(x, ctx, y);
}

Status MoeLayer::Backward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads) {
  return HostLayerCall(this).Backward(dy, dx, grads);
}

float* MoeLayer::Floats(Workspace* ws, int64_t count, Status* status) {
  StatusOr<void*> got = ws->Get(count * kFloat);
  if (!got.ok()) {
    *status = got.status();
    return nullptr;
  }
  return static_cast<float*>(*got);
}

Status MoeLayer::Forward(const float* x_in, int64_t s, const RouteContext& ctx, float* y_out) {
  const int64_t m = cfg_.model_dim();
  if (s < 1) return InvalidArgument("input has no tokens (S=0)");
  if (s > kMaxDeviceRows) {
    return InvalidArgument("input has " + std::to_string(s) + " tokens, must be < 2^31");
  }
  if (params_ == nullptr) {
    MOE_RETURN_IF_ERROR(SetParams(params()));  // the layer's own (zero)
  } else if (memory_space() == MemorySpace::kHost) {
    // Read in place: the tensors' current addresses (a caller may have replaced them).
    MOE_RETURN_IF_ERROR(BindHostParams());
  }
  have_forward_ = false;
  // x is kept for the backward (the router's weight gradient reads it).
  Status status;
  x_ = Floats(&x_ws_, s * m, &status);
  MOE_RETURN_IF_ERROR(status);
  MOE_RETURN_IF_ERROR(device_->Copy(x_, x_in, s * m * kFloat));
  tokens_ = s;
  MOE_RETURN_IF_ERROR(routing_->Forward(x_, s, wg_, wn_, bias_, ctx));
  if (cfg_.router().aux_loss_scope() == config::GLOBAL) {
    std::vector<double> counts = routing_->BalanceCounts();
    if (balance_ != nullptr && balance_->size() > 1) {
      MOE_RETURN_IF_ERROR(balance_->AllReduce(counts.data(), counts.data(),
                                              static_cast<int64_t>(counts.size()),
                                              comm::DataType::kFloat64, comm::ReduceOp::kSum)
                              .WithContext("moe.router.aux_loss_scope=GLOBAL counts"));
    }
    routing_->SetGlobalBalanceCounts(counts);
  }
  // Shared experts write y first (y = shared(x)); then the executor adds the routed rows per token
  // in slot order, so the sum order does not depend on how rows are laid out.
  const MatrixView<float> y(y_out, s, m);
  MOE_RETURN_IF_ERROR(SharedForward(y));
  if (cfg_.router().gate() == config::SOFT) {
    MOE_RETURN_IF_ERROR(SoftForward(y));
  } else {
    MOE_RETURN_IF_ERROR(executor_->Forward(plan(), routing_->rows(), {x_, s, m}, y));
  }
  have_forward_ = true;
  return Status::Ok();
}

Status MoeLayer::SharedForward(MatrixView<float> y) {
  if (shared_.empty()) return device_->Zero(y.data(), y.size() * kFloat);
  const std::vector<int64_t> all = {0, y.rows()};
  for (size_t i = 0; i < shared_.size(); ++i) {
    MOE_RETURN_IF_ERROR(shared_[i]->Forward(0, all, {x_, y.rows(), y.cols()}, y, i > 0));
  }
  return Status::Ok();
}

Status MoeLayer::SharedBackward(MatrixView<const float> dy, MatrixView<float> dx,
                                MoeLayerParams* grads) {
  MOE_RETURN_IF_ERROR(device_->Zero(dx.data(), dx.size() * kFloat));
  const std::vector<int64_t> all = {0, dy.rows()};
  for (size_t i = 0; i < shared_.size(); ++i) {
    MOE_RETURN_IF_ERROR(
        shared_[i]->Backward(0, all, dy, dx, SharedGrads(grads, i), /*accumulate_dx=*/true));
  }
  return Status::Ok();
}

Status MoeLayer::SoftForward(MatrixView<float> y) {
  const int64_t s = tokens_, m = cfg_.model_dim(), cols = RouterColumns(cfg_),
                g = plan().num_groups;
  Status status;
  float* const buf = Floats(&soft_ws_, 2 * g * cols * m, &status);
  MOE_RETURN_IF_ERROR(status);
  soft_x_ = buf;
  soft_y_ = buf + g * cols * m;
  const float* const c_w = routing_->combine_weights();
  const float* const d_w = routing_->dispatch_weights();
  // X̃_g = D_gᵀ X_g: slot c = e·p + j of group g is row g·E·p + c.
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(s, g, gr), n = routing::GroupBegin(s, g, gr + 1) - b;
    MOE_RETURN_IF_ERROR(device_->Gemm(true, false, cols, m, n, 1.0f, d_w + b * cols, x_ + b * m,
                                      0.0f, soft_x_ + gr * cols * m));
  }
  // The executor adds gate (1) · expert(slot input).
  MOE_RETURN_IF_ERROR(device_->Zero(soft_y_, g * cols * m * kFloat));
  MOE_RETURN_IF_ERROR(executor_->Forward(plan(), routing_->rows(), {soft_x_, g * cols, m},
                                         {soft_y_, g * cols, m}));
  // y_g += C_g Ỹ_g.
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(s, g, gr), n = routing::GroupBegin(s, g, gr + 1) - b;
    MOE_RETURN_IF_ERROR(device_->Gemm(false, false, n, m, cols, 1.0f, c_w + b * cols,
                                      soft_y_ + gr * cols * m, 1.0f, y.row(b)));
  }
  return Status::Ok();
}

Status MoeLayer::SoftBackward(MatrixView<const float> dy, MatrixView<float> dx,
                              MoeLayerParams* grads) {
  const int64_t s = tokens_, m = cfg_.model_dim(), cols = RouterColumns(cfg_),
                g = plan().num_groups;
  const float* const c_w = routing_->combine_weights();
  const float* const d_w = routing_->dispatch_weights();
  Status status;
  float* const buf = Floats(&soft_grad_ws_, 2 * g * cols * m + 2 * s * cols, &status);
  MOE_RETURN_IF_ERROR(status);
  float* const dsoft_y = buf;
  float* const dsoft_x = dsoft_y + g * cols * m;
  float* const dc = dsoft_x + g * cols * m;
  float* const dd = dc + s * cols;
  // dỸ_g = C_gᵀ dy_g; dC_g = dy_g Ỹ_gᵀ.
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(s, g, gr), n = routing::GroupBegin(s, g, gr + 1) - b;
    MOE_RETURN_IF_ERROR(device_->Gemm(true, false, cols, m, n, 1.0f, c_w + b * cols, dy.row(b),
                                      0.0f, dsoft_y + gr * cols * m));
    MOE_RETURN_IF_ERROR(device_->Gemm(false, true, n, cols, m, 1.0f, dy.row(b),
                                      soft_y_ + gr * cols * m, 0.0f, dc + b * cols));
  }
  // The experts' backward on the slot rows (gate 1): dX̃ and the expert weight gradients.
  MOE_RETURN_IF_ERROR(device_->Zero(dsoft_x, g * cols * m * kFloat));
  MOE_RETURN_IF_ERROR(executor_->Backward(plan(), {dsoft_y, g * cols, m}, ExpertGrads(grads),
                                          {dsoft_x, g * cols, m}));
  // dx_g += D_g dX̃_g; dD_g = X_g dX̃_gᵀ.
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = routing::GroupBegin(s, g, gr), n = routing::GroupBegin(s, g, gr + 1) - b;
    MOE_RETURN_IF_ERROR(device_->Gemm(false, false, n, m, cols, 1.0f, d_w + b * cols,
                                      dsoft_x + gr * cols * m, 1.0f, dx.row(b)));
    MOE_RETURN_IF_ERROR(device_->Gemm(false, true, n, cols, m, 1.0f, x_ + b * m,
                                      dsoft_x + gr * cols * m, 0.0f, dd + b * cols));
  }
  // Through the softmaxes to the logits, then the router's GEMMs.
  MOE_ASSIGN_OR_RETURN(const float* dlogits, routing_->SoftBackward(dc, dd));
  return RouterWeightGradients(dlogits, nullptr, cols, grads, dx.data());
}

MoeLayerParams* MoeLayer::HostGrads(MoeLayerParams* grads_out) {
  if (memory_space() != MemorySpace::kHost) return nullptr;
  if (grads_out != nullptr) return grads_out;
  if (!accumulated_) accumulated_ = MakeLayerParams(cfg_, first_expert_, num_local_experts_);
  return &*accumulated_;
}

std::span<experts::FfnParams> MoeLayer::ExpertGrads(MoeLayerParams* grads) const {
  if (grads == nullptr) return {};
  return grads->experts;
}

std::span<experts::FfnParams> MoeLayer::SharedGrads(MoeLayerParams* grads, size_t i) const {
  if (grads == nullptr) return {};
  return {&grads->shared[i], 1};
}

Status MoeLayer::RouterWeightGradients(const float* dlogits, const float* dnoise, int64_t cols,
                                       MoeLayerParams* grads, float* dx) {
  const int64_t s = tokens_, m = cfg_.model_dim(), e = cfg_.num_experts();
  float* const gwg = grads != nullptr ? grads->router.data() : gwg_;
  float* const gwn = grads != nullptr ? grads->router_noise.data() : gwn_;
  if (dnoise != nullptr) {
    MOE_RETURN_IF_ERROR(device_->Gemm(true, false, m, e, s, 1.0f, x_, dnoise, 1.0f, gwn));
    MOE_RETURN_IF_ERROR(device_->Gemm(false, true, s, m, e, 1.0f, dnoise, wn_, 1.0f, dx));
  }
  MOE_RETURN_IF_ERROR(device_->Gemm(true, false, m, cols, s, 1.0f, x_, dlogits, 1.0f, gwg));
  return device_->Gemm(false, true, s, m, cols, 1.0f, dlogits, wg_, 1.0f, dx);
}

Status MoeLayer::Backward(const float* dy_in, float* dx_out, MoeLayerParams* grads_out) {
  if (!have_forward_) return FailedPrecondition("MoeLayer::Backward called without a Forward");
  MoeLayerParams* const grads = HostGrads(grads_out);
  const int64_t s = tokens_, m = cfg_.model_dim();
  const MatrixView<const float> dy(dy_in, s, m);
  const MatrixView<float> dx(dx_out, s, m);
  if (cfg_.router().gate() == config::SOFT) {
    MOE_RETURN_IF_ERROR(SharedBackward(dy, dx, grads));
    MOE_RETURN_IF_ERROR(SoftBackward(dy, dx, grads));
  } else {
    // d gate of each kept row = dy[token] . its expert output (the executor sends gate * dy).
    Status status;
    float* const dgate = Floats(&dgate_ws_, plan().num_rows(), &status);
    MOE_RETURN_IF_ERROR(status);
    MOE_RETURN_IF_ERROR(executor_->GateGradients(dy, dgate));
    // dx = shared experts' dx, then the routed rows' per token in slot order.
    MOE_RETURN_IF_ERROR(SharedBackward(dy, dx, grads));
    MOE_RETURN_IF_ERROR(executor_->Backward(plan(), dy, ExpertGrads(grads), dx));
    MOE_ASSIGN_OR_RETURN(const LayerRouting::Gradients g,
                         routing_->Backward(dgate, loss_grad_scale_));
    MOE_RETURN_IF_ERROR(
        RouterWeightGradients(g.dlogits, g.dnoise, cfg_.num_experts(), grads, dx_out));
  }
  // A GPU's gradients come down now when the caller asked for them.
  if (grads == nullptr && grads_out != nullptr) return AddGradients(grads_out);
  return Status::Ok();
}

Status MoeLayer::AddRouterGradients(MoeLayerParams* grads) {
  const auto add = [&](float* dev, Tensor* host) -> Status {
    download_.resize(static_cast<size_t>(host->size()));
    MOE_RETURN_IF_ERROR(device_->Download(download_.data(), dev, host->size() * kFloat));
    for (int64_t i = 0; i < host->size(); ++i) (*host)[i] += download_[static_cast<size_t>(i)];
    return device_->Zero(dev, host->size() * kFloat);
  };
  MOE_RETURN_IF_ERROR(add(gwg_, &grads->router));
  if (gwn_ != nullptr) MOE_RETURN_IF_ERROR(add(gwn_, &grads->router_noise));
  return Status::Ok();
}

Status MoeLayer::AddGradients(MoeLayerParams* grads) {
  if (memory_space() != MemorySpace::kHost) {
    MOE_RETURN_IF_ERROR(CheckParamShapes("MoeLayer::AddGradients", *grads,
                                         LayerParamShapes(cfg_, first_expert_, num_local_experts_,
                                                          grads->expert_ids)));
    MOE_RETURN_IF_ERROR(AddRouterGradients(grads));
    MOE_RETURN_IF_ERROR(executor_->AddGradients(grads->experts));
    for (size_t i = 0; i < shared_.size(); ++i) {
      MOE_RETURN_IF_ERROR(shared_[i]->AddGradients({&grads->shared[i], 1}));
    }
    return device_->Synchronize();
  }
  if (!accumulated_) return Status::Ok();
  std::vector<Tensor*> into;
  grads->ForEach([&](const std::string&, Tensor& t) { into.push_back(&t); });
  size_t i = 0;
  Status status;
  accumulated_->ForEach([&](const std::string& name, Tensor& g) {
    if (!status.ok()) return;
    if (i >= into.size() || !into[i]->SameShape(g)) {
      status = InvalidArgument("MoeLayer::AddGradients: " + name +
                               " has no tensor of its shape in the destination");
      return;
    }
    for (int64_t j = 0; j < g.size(); ++j) (*into[i])[j] += g[j];
    g.Fill(0.0f);
    ++i;
  });
  return status;
}

void MoeLayer::UpdateRouterBias(const std::vector<int64_t>& load) {
  const double rate = config().router().bias_update_rate();
  std::vector<float>& bias = router_bias();
  if (rate == 0.0 || load.size() != bias.size()) return;
  double mean = 0.0;
  for (int64_t v : load) mean += static_cast<double>(v);
  mean /= static_cast<double>(load.size());
  for (size_t i = 0; i < bias.size(); ++i) {
    const double d = mean - static_cast<double>(load[i]);
    const double sign = d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0);
    bias[i] = static_cast<float>(bias[i] + rate * sign);
  }
}

}  // namespace moe
