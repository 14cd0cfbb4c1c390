// StagedHostRouting (runtime/device/staged_routing.h).
#include "runtime/device/staged_routing.h"

#include "base/clock.h"
#include "runtime/config/config.h"

namespace moe {
namespace {
constexpr int64_t kFloat = sizeof(float);
}  // namespace

StagedHostRouting::StagedHostRouting(Device* device, const config::LayerConfig& layer)
    : device_(device),
      cfg_(ResolvedLayerConfig(layer)),
      host_(cfg_),
      arrays_ws_(device->memory()),
      plan_ws_(device->memory()) {}

Status StagedHostRouting::ComputeLogits(const float* x, int64_t s, const float* wg,
                                        const float* wnoise, const RouteContext& ctx) {
  const int64_t m = cfg_.model_dim(), e = cfg_.num_experts(), cols = RouterColumns(cfg_);
  const int64_t noise = RouterIsNoisy(cfg_.router(), ctx) ? s * e : 0;
  const int64_t soft = cfg_.router().gate() == config::SOFT ? s * cols : 0;
  MOE_ASSIGN_OR_RETURN(arrays_, arrays_ws_.Carve([&](Carver& c) {
    return Arrays{c.Take<float>(s * cols), c.Take<float>(noise), c.Take<float>(s * cols),
                  c.Take<float>(noise),    c.Take<float>(e),     c.Take<float>(soft),
                  c.Take<float>(soft)};
  }));
  MOE_RETURN_IF_ERROR(device_->Gemm(false, false, s, cols, m, 1.0f, x, wg, 0.0f, arrays_.logits));
  if (noise == 0) return Status::Ok();
  return device_->Gemm(false, false, s, e, m, 1.0f, x, wnoise, 0.0f, arrays_.noise_in);
}

Status StagedHostRouting::RouteOnHost(int64_t s, const std::vector<float>& bias,
                                      const RouteContext& ctx) {
  const int64_t e = cfg_.num_experts(), cols = RouterColumns(cfg_);
  const bool noisy = RouterIsNoisy(cfg_.router(), ctx);
  logits_.resize(static_cast<size_t>(s * cols));
  MOE_RETURN_IF_ERROR(device_->Download(logits_.data(), arrays_.logits, s * cols * kFloat));
  if (noisy) {
    noise_in_.resize(static_cast<size_t>(s * e));
    MOE_RETURN_IF_ERROR(device_->Download(noise_in_.data(), arrays_.noise_in, s * e * kFloat));
  }
  const double t0 = WallSeconds();
  MOE_RETURN_IF_ERROR(
      host_.ForwardFromLogits(logits_.data(), noisy ? noise_in_.data() : nullptr, s, bias, ctx));
  host_seconds_ = WallSeconds() - t0;
  MOE_ASSIGN_OR_RETURN(rows_, PlanRowsOn(*device_, host_.plan(), &plan_ws_));
  if (cfg_.router().gate() == config::SOFT) {
    // Soft MoE's combine and dispatch weights, for the GEMMs on the device.
    const RouterOutput& r = host_.router_output();
    MOE_RETURN_IF_ERROR(device_->Upload(arrays_.combine, r.probs.data(), s * cols * kFloat));
    MOE_RETURN_IF_ERROR(device_->Upload(arrays_.dispatch, r.dispatch.data(), s * cols * kFloat));
  }
  return Status::Ok();
}

Status StagedHostRouting::Forward(const float* x, int64_t tokens, const float* wg,
                                  const float* wnoise, const std::vector<float>& bias,
                                  const RouteContext& ctx) {
  MOE_RETURN_IF_ERROR(ComputeLogits(x, tokens, wg, wnoise, ctx));
  return RouteOnHost(tokens, bias, ctx);
}

StatusOr<LayerRouting::Gradients> StagedHostRouting::Backward(const float* dgate,
                                                              LossScale scale) {
  const int64_t s = host_.plan().num_tokens, e = cfg_.num_experts(),
                rows = host_.plan().num_rows();
  // The gates' gradients to the host, its S x E backward there, dlogits back.
  down_.resize(static_cast<size_t>(rows));
  MOE_RETURN_IF_ERROR(device_->Download(down_.data(), dgate, rows * kFloat));
  const double t0 = WallSeconds();
  MOE_ASSIGN_OR_RETURN(const Gradients g, host_.Backward(down_.data(), scale));
  host_seconds_ += WallSeconds() - t0;
  MOE_RETURN_IF_ERROR(device_->Upload(arrays_.dlogits, g.dlogits, s * e * kFloat));
  if (g.dnoise == nullptr) return Gradients{arrays_.dlogits, nullptr};
  MOE_RETURN_IF_ERROR(device_->Upload(arrays_.dnoise, g.dnoise, s * e * kFloat));
  return Gradients{arrays_.dlogits, arrays_.dnoise};
}

StatusOr<const float*> StagedHostRouting::SoftBackward(const float* dcombine,
                                                       const float* ddispatch) {
  const int64_t s = host_.router_output().probs.rows(), cols = RouterColumns(cfg_);
  down_.resize(static_cast<size_t>(2 * s * cols));
  MOE_RETURN_IF_ERROR(device_->Download(down_.data(), dcombine, s * cols * kFloat));
  MOE_RETURN_IF_ERROR(device_->Download(down_.data() + s * cols, ddispatch, s * cols * kFloat));
  MOE_ASSIGN_OR_RETURN(const float* dlogits,
                       host_.SoftBackward(down_.data(), down_.data() + s * cols));
  MOE_RETURN_IF_ERROR(device_->Upload(arrays_.dlogits, dlogits, s * cols * kFloat));
  return static_cast<const float*>(arrays_.dlogits);
}

}  // namespace moe
