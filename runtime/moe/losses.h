// Router losses (load balance, importance CV, z-loss), per local group and averaged over groups,
// with their gradients. Semantics: docs/SEMANTICS.md "Losses".
#pragma once

#include <vector>

#include "proto/moe_config.pb.h"
#include "runtime/base/tensor.h"
#include "runtime/moe/dispatch_plan.h"

namespace moe {

struct RouterLosses {
  double aux = 0.0;  // unweighted
  double z = 0.0;    // unweighted
};

// What one local group's losses and their gradients need, summed over the group's tokens: the
// CPU sums them in ComputeRouterLosses, the device router on the GPU.
struct GroupLossSums {
  int64_t tokens = 0;               // n
  double z = 0.0;                   // Σ_t logsumexp(logits[t])²
  // SWITCH/GSHARD/SWITCH_TOPK, else empty: tokens that chose i in their first `slots` slots (1,
  // or k for SWITCH_TOPK), and Σ_t P[t, i] with P the probs (softmax) or s / Σ s (sigmoid).
  std::vector<double> top1;         // E
  std::vector<double> probs;        // E
  int64_t slots = 1;
  std::vector<double> importance;   // E, IMPORTANCE_CV: Σ pre-capacity gates of i, else empty
};
// The losses (averaged over the groups) from every group's sums.
RouterLosses LossesFromSums(const std::vector<GroupLossSums>& groups);

// One group's loss gradients, times `scale` / num_groups and the loss weights: the value added to
// every dprobs[t, i] of the group (SWITCH/GSHARD), d(aux)/d(importance) (IMPORTANCE_CV; through
// routing::AddImportanceGradient per token) and the z-loss weight for routing::AddZLossGradient.
struct GroupLossGradient {
  std::vector<float> to_every_prob;  // E or empty
  std::vector<double> dimportance;   // E or empty
  double z_weight = 0.0;
};
GroupLossGradient LossGradientFromSums(const config::RouterConfig& cfg, const GroupLossSums& group,
                                       double scale, int64_t num_groups);

RouterLosses ComputeRouterLosses(const config::RouterConfig& cfg, const DispatchPlan& plan,
                                 const Tensor& probs, const Tensor& logits);

// Adds scale * aux_weight * d(aux)/d(probs) into dprobs (S x E) and
// scale * z_weight * d(z)/d(logits) into dlogits.
void AccumulateRouterLossGradients(const config::RouterConfig& cfg, const DispatchPlan& plan,
                                   const Tensor& probs, const Tensor& logits, double scale,
                                   Tensor* dprobs, Tensor* dlogits);

// The router's backward up to its GEMMs (S x E work, no dependence on the model width): from the
// gradient of every packed row's gate (dgate_rows, plan.num_rows()), through the gate
// normalization, the weighted losses (times loss_scale) and the softmax, to the logits and — noisy
// router — to the noise pre-activations. Then dWg += xᵀ dlogits, dx += dlogits Wgᵀ (and the same
// with dnoise).
struct RouterGradients {
  Tensor dlogits;          // S x E
  Tensor dnoise;           // S x E when router.noisy, else empty
  Tensor dprobs, dscores;  // scratch
};
void RouterScoreGradients(const config::RouterConfig& cfg, const DispatchPlan& plan,
                          const RouterOutput& router, const std::vector<float>& dgate_rows,
                          double loss_scale, RouterGradients* out);

// Pre-capacity gates g° of a token-choice slot (used by IMPORTANCE_CV).
float PreCapacityGate(const DispatchPlan& plan, const Tensor& probs, int64_t t, int64_t j);

}  // namespace moe
