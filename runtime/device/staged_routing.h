// StagedHostRouting: the host's routing steps for a device whose memory the host reads only by
// copies (the CUDA device, the checked host device): the router's GEMMs on the device, the logits
// (and noise pre-activations) down, HostRouting's code there, the plan's row arrays — and Soft
// MoE's combine and dispatch weights — up; the backward brings the gates' gradients (or Soft MoE's
// dC and dD) down and dlogits (and dnoise) up. Same decisions as the host device's routing, from
// the device's logits. The CUDA device's own router starts from the same GEMMs (ComputeLogits).
#pragma once

#include <cstdint>
#include <vector>

#include "base/memory.h"
#include "base/status.h"
#include "runtime/device/device.h"
#include "runtime/device/host_device.h"
#include "runtime/device/layer_routing.h"

namespace moe {

class StagedHostRouting final : public LayerRouting {
 public:
  // `device` must outlive this object; `layer` is resolved here.
  StagedHostRouting(Device* device, const config::LayerConfig& layer);

  // One call's device arrays (tokens x RouterColumns each, the noise's tokens x E): the logits
  // and the noise pre-activations, their gradients, the selection bias (E), Soft MoE's combine and
  // dispatch weights.
  struct Arrays {
    float *logits = nullptr, *noise_in = nullptr, *dlogits = nullptr, *dnoise = nullptr,
          *bias = nullptr, *combine = nullptr, *dispatch = nullptr;
  };
  // The router's GEMMs on the device: logits = x·Wg and, when RouterIsNoisy, noise_in = x·Wnoise,
  // into arrays() sized for `tokens`.
  Status ComputeLogits(const float* x, int64_t tokens, const float* wg, const float* wnoise,
                       const RouteContext& ctx);
  // After ComputeLogits: the host's routing on the downloaded logits, the plan's rows up.
  Status RouteOnHost(int64_t tokens, const std::vector<float>& bias, const RouteContext& ctx);
  const Arrays& arrays() const { return arrays_; }

  Status Forward(const float* x, int64_t tokens, const float* wg, const float* wnoise,
                 const std::vector<float>& bias, const RouteContext& ctx) override;
  const DispatchPlan& plan() const override { return host_.plan(); }
  const PlanRows& rows() const override { return rows_; }
  bool routes_on_device() const override { return false; }
  Status Fetch() override { return Status::Ok(); }
  const RouterOutput& router_output() const override { return host_.router_output(); }
  const RouterLosses& losses() const override { return host_.losses(); }
  std::vector<double> BalanceCounts() const override { return host_.BalanceCounts(); }
  void SetGlobalBalanceCounts(const std::vector<double>& world_counts) override {
    host_.SetGlobalBalanceCounts(world_counts);
  }
  const float* combine_weights() const override { return arrays_.combine; }
  const float* dispatch_weights() const override { return arrays_.dispatch; }
  StatusOr<Gradients> Backward(const float* dgate, LossScale scale) override;
  StatusOr<const float*> SoftBackward(const float* dcombine, const float* ddispatch) override;
  double host_seconds() const override { return host_seconds_; }

 private:
  Device* device_;
  config::LayerConfig cfg_;
  HostRouting host_;
  Workspace arrays_ws_, plan_ws_;
  Arrays arrays_;
  PlanRows rows_;
  // Host copies: the logits and noise down, the gates' gradients or Soft MoE's dC and dD.
  std::vector<float> logits_, noise_in_, down_;
  double host_seconds_ = 0.0;
};

}  // namespace moe
