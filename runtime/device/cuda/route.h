// Routing on the GPU: the router after its GEMMs (noise, softmax), the whole DispatchPlan — token
// choice (selection with the aux-loss-free bias, GShard random routing, capacity with the POSITION
// and PROBABILITY drop policies, gates) or expert choice (each expert's top-C tokens of a group),
// then the packed-row layout and per-expert metrics —, the losses' per-group sums, and the
// router's backward from the gates' gradients to dlogits (and dnoise). The GPU counterpart of FinishRouter + BuildDispatchPlan + ComputeRouterLosses +
// RouterScoreGradients (docs/SEMANTICS.md): the per-token arithmetic is runtime/routing/routing_math.h, the
// code the CPU path runs, so for the same probs the device makes the CPU's routing decisions
// (selection, random-routing drops, positions, capacity drops) and the same gates; sums over
// tokens (losses, their gradients) agree to double rounding.
//
// Not on the device (DeviceRouter::Supports says why): reroute_overflow (a sequential walk over
// each group), token choice with k > routing::kMaxRankedExperts, score_function SIGMOID,
// group-limited top-k, the per-expert drop policies EXPERT_SCORE and TOKEN_ORDER, and the SEQUENCE
// loss; the layer routes those on the host (its code, the same results). aux_loss_scope GLOBAL
// runs on the CPU layer only. scaling_factor and SWITCH_TOPK run on the device.
//
// Every pointer is a device pointer unless said otherwise; `stream` is a cudaStream_t. Without a
// CUDA build Create fails with kUnimplemented.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "proto/moe_config.pb.h"
#include "base/status.h"
#include "runtime/device/device.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/routing/router.h"

namespace moe::gpu {

// probs[t] = softmax(logits[t]) over `cols` values, for `rows` rows (max-subtracted).
Status SoftmaxRows(const float* logits, int64_t rows, int64_t cols, float* probs, void* stream);

class DeviceRouter {
 public:
  // Whether `router` routes on the device; if not, *why_not (may be null) says which field.
  static bool Supports(const config::RouterConfig& router, std::string* why_not);

  // A router for `num_experts` experts and the resolved `router` config, enqueueing on `stream`
  // (the caller's; kept), its workspaces from `memory` (the device's stream-ordered allocator; null:
  // cudaMalloc). Fails for a config Supports refuses.
  static StatusOr<std::unique_ptr<DeviceRouter>> Create(const config::RouterConfig& router,
                                                        int64_t num_experts, void* stream,
                                                        MemoryResource* memory = nullptr);
  virtual ~DeviceRouter() = default;

  // Routes `tokens` rows: logits (S x E, x·Wg), noise_in (S x E, x·Wnoise; read only when
  // RouterIsNoisy(router, ctx)) and bias (E, the aux-loss-free selection bias, or null). logits
  // and noise_in must stay unchanged until Backward. Waits once, for the plan's counts: *plan gets
  // every field except the per-slot, per-row and per-token arrays (sizes, capacity, group bounds,
  // expert_offset, group_expert_count and the per-expert metrics; num_rows() is right), *losses
  // the loss values. The rest of the plan stays on the device: device_plan() for the permute
  // kernels, Fetch for the host.
  virtual Status Forward(const float* logits, const float* noise_in, const float* bias,
                         int64_t tokens, const RouteContext& ctx, DispatchPlan* plan,
                         RouterLosses* losses) = 0;
  virtual const PlanRows& device_plan() const = 0;

  // The router's backward for the last Forward: from each packed row's gate gradient (dgate_rows,
  // num_rows()) through the normalization, the weighted losses (times loss_scale) and the softmax
  // to dlogits (S x E, overwritten) and, for a noisy forward, dnoise (S x E, overwritten).
  virtual Status Backward(const float* dgate_rows, LossScale loss_scale, float* dlogits,
                          float* dnoise) = 0;

  // Host seconds of the last Forward or Backward call (launching the kernels, the plan's counts,
  // the losses from their sums), not counting the wait for the device.
  virtual double host_seconds() const = 0;

  // Completes *plan (from the last Forward) with its per-slot, per-row and per-token arrays and
  // fills *router (logits, probs and, noisy, noise_in and eps) from the device; waits.
  virtual Status Fetch(DispatchPlan* plan, RouterOutput* router) = 0;
};

}  // namespace moe::gpu
