// The MoE layer: its parameters, and the one interface of its two implementations —
//   CpuMoeLayer    (runtime/layer/cpu_moe_layer.h): host buffers; its experts run in this process or,
//                  through an ExpertExecutor, expert-parallel over a communicator;
//   DeviceMoeLayer (runtime/layer/device_moe_layer.h): device buffers, weights and gradients on one
//                  GPU, expert-parallel over a device-memory communicator.
// MakeMoeLayer (runtime/layer/make_moe_layer.h) picks one from the config's compute section, and
// HostLayerCall (runtime/layer/host_layer_call.h) runs either on host tensors.
//
// One call: route -> plan -> dispatch -> experts -> combine (DESIGN §3); the backward runs through
// the same plan. What it computes, exactly, is docs/SEMANTICS.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "proto/report.pb.h"
#include "base/memory.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/routing/router.h"

namespace moe {

struct ExchangeStats;  // runtime/exchange/expert_parallel_executor.h

struct MoeLayerParams {
  Tensor router;        // M x E
  Tensor router_noise;  // M x E (NOISY_TOPK only, else empty)
  // The experts held by this process: global ids first_expert .. first_expert + experts.size() - 1.
  std::vector<experts::FfnParams> experts;
  int first_expert = 0;
  // Redundant experts (parallel.num_redundant_experts): the logical expert each local expert holds
  // (names and initialization follow it, so replicas are equal). Empty: first_expert + index.
  std::vector<int> expert_ids;
  int expert_id(size_t local) const {
    return expert_ids.empty() ? first_expert + static_cast<int>(local) : expert_ids[local];
  }
  std::vector<experts::FfnParams> shared;  // num_shared_experts (replicated)

  // Visits every parameter with its file-style name ("router", "expert_3_w1", "shared_0_b2");
  // experts are named by global id.
  template <typename F>
  void ForEach(F&& f);
  template <typename F>
  void ForEach(F&& f) const;
  void Zero();
};

experts::FfnShape ExpertShape(const config::LayerConfig& cfg);
experts::FfnShape SharedShape(const config::LayerConfig& cfg);

// Zero parameters of the right shapes for `cfg`, holding experts [first_expert, first_expert +
// num_local_experts) (num_local_experts < 0: all).
MoeLayerParams MakeLayerParams(const config::LayerConfig& cfg, int first_expert = 0,
                               int num_local_experts = -1);
// Deterministic init from `seed`: every tensor U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from
// (seed, hash of its global name, element index) — the same values whichever rank holds it.
void InitLayerParams(const config::LayerConfig& cfg, uint64_t seed, MoeLayerParams* params);
// Fills t with U(-bound, bound) drawn from (seed, Fnv1a64(name), element index).
void InitUniformByName(const std::string& name, uint64_t seed, double bound, Tensor* t);

// The name and shape of every tensor of a MoeLayerParams, in ForEach order.
struct ParamShape {
  std::string name;
  int64_t rows = 0, cols = 0;
};
std::vector<ParamShape> ParamShapes(const MoeLayerParams& p);
// ParamShapes(MakeLayerParams(cfg, first_expert, num_local_experts)) without allocating them.
// expert_ids: the local experts' logical ids when they are not first_expert + index (redundant
// experts; MoeLayerParams::expert_ids).
std::vector<ParamShape> LayerParamShapes(const config::LayerConfig& cfg, int first_expert = 0,
                                         int num_local_experts = -1,
                                         const std::vector<int>& expert_ids = {});
// Every tensor of `got` has the name and shape of `want`, or an error naming the first that differs
// ("<what>: expert_3_w1 is 4x8, must be 4x16").
Status CheckParamShapes(const std::string& what, const MoeLayerParams& got,
                        const std::vector<ParamShape>& want);

// The metrics report of one layer call: drops, loads, capacity and the unweighted losses.
report::LayerMetrics LayerMetricsOf(const DispatchPlan& plan, const RouterLosses& losses);

class MoeLayer {
 public:
  virtual ~MoeLayer() = default;

  // The resolved layer config.
  virtual const config::LayerConfig& config() const = 0;
  // Where x and y of Forward and dy and dx of Backward live.
  virtual MemorySpace memory_space() const = 0;
  // The global id of this layer's first expert and how many it holds (all E, or E/W of them when
  // expert-parallel).
  virtual int first_expert() const = 0;
  virtual int num_local_experts() const = 0;

  // The parameters the next calls compute with (host fp32, the shapes of
  // MakeLayerParams(config(), first_expert(), num_local_experts())); fails naming the first tensor
  // whose shape differs. The CPU layer reads them in place: they must stay alive and unchanged
  // until the Backward of the last Forward. The device layer copies them to the device (complete
  // when this returns), so it may be given them once.
  virtual Status SetParams(const MoeLayerParams& params) = 0;

  // y = MoE(x) for the `tokens` rows of x: x and y are tokens x M fp32 in memory_space(). x must
  // stay allocated and unchanged until the Backward (the router's weight gradient reads it). Work
  // may still be in flight on the device when this returns (Synchronize).
  virtual Status Forward(const float* x, int64_t tokens, const RouteContext& ctx, float* y) = 0;
  // dx (tokens x M) from dy (tokens x M), both in memory_space(), for the last Forward: the
  // gradient of sum(y * dy) + aux_w * aux + z_w * z. The parameter gradients of this call are added
  // into `grads` (host, the shapes SetParams takes) before it returns; with grads null they
  // accumulate inside the layer until AddGradients.
  virtual Status Backward(const float* dy, float* dx, MoeLayerParams* grads) = 0;
  // Adds the gradients accumulated since the last AddGradients into grads and zeroes them.
  virtual Status AddGradients(MoeLayerParams* grads) = 0;
  // Waits for the work enqueued so far (a no-op on the host).
  virtual Status Synchronize() = 0;

  // The last Forward's plan, router output and losses. A device layer that routes on the device
  // holds the plan's counts and metrics only — what the trainer's statistics and bias updates
  // read — until FetchPlan brings the per-slot arrays (and the router output) down.
  virtual const DispatchPlan& plan() const = 0;
  // Tokens of the last Forward (0 before one): plan().num_tokens, except for gate SOFT, whose
  // plan's "tokens" are the slot rows.
  virtual int64_t forward_tokens() const = 0;
  virtual Status FetchPlan() = 0;
  virtual const RouterOutput& router_output() const = 0;
  virtual const RouterLosses& losses() const = 0;
  report::LayerMetrics Metrics() const { return LayerMetricsOf(plan(), losses()); }

  // Aux-loss-free balancing bias (E), state not parameter; used by the next Forward.
  virtual std::vector<float>& router_bias() = 0;
  // bias_i += rate * sign(mean load - load_i), from the last Forward's selection.
  void UpdateRouterBias() { UpdateRouterBias(plan().load_per_expert); }
  // The same with a given load per expert (e.g. summed over all ranks).
  void UpdateRouterBias(const std::vector<int64_t>& load);
  // Multiplies the aux and z-loss gradient weights (e.g. 1/W when W ranks each hold 1/W of the
  // groups whose losses are averaged; or each loss's upstream gradient, from an autograd engine).
  // Default 1.
  virtual void set_loss_gradient_scale(LossScale s) = 0;

  // The exchanges of an expert-parallel layer since the caller last reset them (each with its
  // bytes per rank and seconds, and the experts' time): what the trainer's step metrics and
  // moe_simulate's cost model read. Null for a layer that exchanges nothing. On the device,
  // reading it waits for the experts' work enqueued so far.
  virtual ExchangeStats* exchange_stats() = 0;
};

template <typename F>
void MoeLayerParams::ForEach(F&& f) {
  f(std::string("router"), router);
  if (router_noise.size() > 0) f(std::string("router_noise"), router_noise);
  auto ffn = [&](const std::string& prefix, experts::FfnParams& p) {
    f(prefix + "_w1", p.w1);
    if (p.b1.size() > 0) f(prefix + "_b1", p.b1);
    f(prefix + "_w2", p.w2);
    if (p.b2.size() > 0) f(prefix + "_b2", p.b2);
    if (p.w3.size() > 0) f(prefix + "_w3", p.w3);
  };
  for (size_t e = 0; e < experts.size(); ++e) {
    ffn("expert_" + std::to_string(expert_id(e)), experts[e]);
  }
  for (size_t s = 0; s < shared.size(); ++s) ffn("shared_" + std::to_string(s), shared[s]);
}

template <typename F>
void MoeLayerParams::ForEach(F&& f) const {
  const_cast<MoeLayerParams*>(this)->ForEach(
      [&](const std::string& name, Tensor& t) { f(name, static_cast<const Tensor&>(t)); });
}

}  // namespace moe
