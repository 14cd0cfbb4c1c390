// LayerRouting: the routing steps of one MoE layer on a device — the router's GEMMs and the rest
// of the router (noise, softmax or sigmoid, Soft MoE's two softmaxes), the DispatchPlan, the
// losses' per-group sums, and their backward down to the logits. Semantics: docs/SEMANTICS.md.
//
// Host (runtime/device/host_device.cc): ComputeRouter, BuildDispatchPlan and RouterLossSums on the
// host, the code every test checks. CUDA (runtime/device/cuda/cuda_device.cc): the router's GEMMs
// on the GPU, then routing on the device (runtime/device/cuda/route.h) where DeviceRouter supports
// the config — the plan's counts come down, its per-row arrays stay on the device — or else the
// logits down, the host's code, and the plan's arrays up. Both make the same routing decisions
// (routing_math.h is their shared arithmetic).
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"
#include "runtime/device/device.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/routing/router.h"

namespace moe {

class LayerRouting {
 public:
  virtual ~LayerRouting() = default;

  // Routes the `tokens` rows of x (tokens x M) with router weights wg (M x RouterColumns) and,
  // NOISY_TOPK, wnoise (M x E): all device memory, unchanged until Backward. bias: the
  // aux-loss-free selection bias (host, E values or empty). Waits for what the host needs (the
  // plan's counts).
  virtual Status Forward(const float* x, int64_t tokens, const float* wg, const float* wnoise,
                         const std::vector<float>& bias, const RouteContext& ctx) = 0;

  // After Forward. The plan (host): complete when routed on the host; with routes_on_device()
  // only its counts and metrics (sizes, capacity, group bounds, expert_offset,
  // group_expert_count, per-expert kept / dropped / load) until Fetch.
  virtual const DispatchPlan& plan() const = 0;
  // The plan's row arrays in device memory.
  virtual const PlanRows& rows() const = 0;
  virtual bool routes_on_device() const = 0;
  // Completes plan() and router_output() on the host (waits).
  virtual Status Fetch() = 0;
  // logits, probs (Soft MoE: the combine weights), noise: empty with routes_on_device() until
  // Fetch.
  virtual const RouterOutput& router_output() const = 0;
  virtual const RouterLosses& losses() const = 0;
  // aux_loss_scope GLOBAL (host routing only): this call's balance counts, and the world's sums of
  // them installed in place of them (losses() and the backward follow).
  virtual std::vector<double> BalanceCounts() const = 0;
  virtual void SetGlobalBalanceCounts(const std::vector<double>& world_counts) = 0;
  // gate SOFT, device memory: the combine weights C and dispatch weights D (tokens x E·p each).
  virtual const float* combine_weights() const = 0;
  virtual const float* dispatch_weights() const = 0;

  // The router's backward down to its GEMMs, for the last Forward: from each packed row's gate
  // gradient (dgate, plan().num_rows() values, device) through the normalization, the weighted
  // losses (times `scale`) and the softmax. Returns dlogits (tokens x E) and, for a noisy
  // forward, dnoise (tokens x E; else null): device memory, valid until the next call.
  struct Gradients {
    const float* dlogits = nullptr;
    const float* dnoise = nullptr;
  };
  virtual StatusOr<Gradients> Backward(const float* dgate, LossScale scale) = 0;
  // gate SOFT: from dC and dD (tokens x E·p each, device) through both softmaxes to dlogits.
  virtual StatusOr<const float*> SoftBackward(const float* dcombine, const float* ddispatch) = 0;

  // Host seconds of the last Forward and the Backward after it (routing on the host, staging the
  // plan; on the device, launching the router and finishing its counts and losses).
  virtual double host_seconds() const = 0;
};

}  // namespace moe
