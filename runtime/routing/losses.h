// Router losses (load balance, importance CV, z-loss), per local group and averaged over groups,
// with their gradients. Semantics: docs/SEMANTICS.md "Losses".
#pragma once

#include <vector>

#include "proto/moe_config.pb.h"
#include "base/tensor.h"
#include "runtime/routing/dispatch_plan.h"

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
  // The denominator of f = top1 / f_tokens: 0 means `tokens` (aux_loss_scope LOCAL); GLOBAL sets
  // top1 and f_tokens to their sums over every group of the world (SetGlobalBalanceCounts).
  double f_tokens = 0.0;
  // SEQUENCE: one entry per sequence of the group (aux_sequence_length consecutive tokens from the
  // group's first, the last maybe shorter): its tokens, and E counts over the k slots and E sums of
  // P per sequence (row-major).
  int64_t sequence_length = 0;
  std::vector<int64_t> seq_tokens;
  std::vector<double> seq_top1, seq_probs;
  std::vector<double> importance;   // E, IMPORTANCE_CV: Σ pre-capacity gates of i, else empty
};
// The losses (averaged over the groups) from every group's sums.
RouterLosses LossesFromSums(const std::vector<GroupLossSums>& groups);

// The weights of the router losses' gradients: the backward adds the gradient of
// aux · aux_loss_weight · aux + z · z_loss_weight · z. One number scales both (the trainer's 1/W);
// the Python module's autograd passes the two upstream gradients.
struct LossScale {
  double aux = 1.0, z = 1.0;
  LossScale() = default;
  LossScale(double both) : aux(both), z(both) {}  // NOLINT(google-explicit-constructor)
  LossScale(double aux_scale, double z_scale) : aux(aux_scale), z(z_scale) {}
};

// One group's loss gradients, times `scale` / num_groups and the loss weights: the value added to
// every dprobs[t, i] of the group (SWITCH/GSHARD), d(aux)/d(importance) (IMPORTANCE_CV; through
// routing::AddImportanceGradient per token) and the z-loss weight for routing::AddZLossGradient.
struct GroupLossGradient {
  // E (SWITCH/GSHARD/SWITCH_TOPK), or E per sequence (SEQUENCE: token u of the group, counted from
  // its first, takes row u / sequence_length), or empty. With a sigmoid router it is d/dP for
  // P = s / Σ s (routing::AddNormalizedScoreGradient).
  std::vector<float> to_every_prob;
  int64_t sequence_length = 0;
  std::vector<double> dimportance;   // E or empty
  double z_weight = 0.0;
};
GroupLossGradient LossGradientFromSums(const config::RouterConfig& cfg, const GroupLossSums& group,
                                       LossScale scale, int64_t num_groups);

RouterLosses ComputeRouterLosses(const config::RouterConfig& cfg, const DispatchPlan& plan,
                                 const Tensor& probs, const Tensor& logits);
// The sums of every group (what ComputeRouterLosses reduces with LossesFromSums).
std::vector<GroupLossSums> RouterLossSums(const config::RouterConfig& cfg, const DispatchPlan& plan,
                                          const Tensor& probs, const Tensor& logits);

// aux_loss_scope GLOBAL: this process's balance counts (E values of top1 summed over its groups,
// then their tokens) — to be summed over the world — and, once summed, their installation as every
// group's f counts.
std::vector<double> BalanceCounts(const std::vector<GroupLossSums>& groups);
void SetGlobalBalanceCounts(const std::vector<double>& world_counts,
                            std::vector<GroupLossSums>* groups);

// Adds scale * aux_weight * d(aux)/d(probs) into dprobs (S x E) and
// scale * z_weight * d(z)/d(logits) into dlogits.
// `sums`: the forward's group sums (required for GLOBAL, whose counts are the world's); null =
// recomputed from the plan.
void AccumulateRouterLossGradients(const config::RouterConfig& cfg, const DispatchPlan& plan,
                                   const Tensor& probs, const Tensor& logits, LossScale scale,
                                   Tensor* dprobs, Tensor* dlogits,
                                   const std::vector<GroupLossSums>* sums = nullptr);

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
                          const RouterOutput& router, const float* dgate_rows,
                          LossScale loss_scale, RouterGradients* out,
                          const std::vector<GroupLossSums>* sums = nullptr);

// Pre-capacity gates g° of a token-choice slot (used by IMPORTANCE_CV).
float PreCapacityGate(const DispatchPlan& plan, const Tensor& probs, int64_t t, int64_t j);

}  // namespace moe
