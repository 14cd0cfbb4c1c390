// The parameters of a MoE layer (runtime/layer/moe_layer.h): the router, this process's experts
// (by global id) and the shared experts, as host fp32 tensors; their shapes, names, deterministic
// initialization and shape checks; and the metrics report of one layer call.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "proto/report.pb.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/routing/router.h"

namespace moe {

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
