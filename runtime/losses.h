// Router losses (load balance, importance CV, z-loss), per local group and averaged over groups,
// with their gradients. Semantics: docs/SEMANTICS.md "Losses".
#pragma once

#include <vector>

#include "proto/moe_config.pb.h"
#include "runtime/base/tensor.h"
#include "runtime/dispatch_plan.h"

namespace moe {

struct RouterLosses {
  double aux = 0.0;  // unweighted
  double z = 0.0;    // unweighted
};

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
