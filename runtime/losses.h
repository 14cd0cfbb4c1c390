// Router losses (load balance, importance CV, z-loss), per local group and averaged over groups,
// with their gradients. Semantics: docs/SEMANTICS.md "Losses".
#pragma once

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

// Pre-capacity gates g° of a token-choice slot (used by IMPORTANCE_CV).
float PreCapacityGate(const DispatchPlan& plan, const Tensor& probs, int64_t t, int64_t j);

}  // namespace moe
