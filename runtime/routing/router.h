// The router's dense part: logits = x Wg, optional Shazeer noise, softmax (or the element-wise
// sigmoid of score_function SIGMOID), all in float32.
// Selection, capacity and gates live in the DispatchPlan (dispatch_plan.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "proto/moe_config.pb.h"
#include "base/tensor.h"
#include "runtime/routing/routing_math.h"

namespace moe {

// Where a call sits in training: drives noise, capacity factor and counter-based randomness.
struct RouteContext {
  bool train = false;
  uint64_t seed = 0;
  uint64_t step = 0;
  int64_t token_offset = 0;  // global index of this call's first token
  // Router replay (train.router_replay_dir): the experts to use instead of top-k, S x k for a
  // layer call (ByteLm: num_layers x S x k, one slice per layer), checked by BuildDispatchPlan;
  // null = select by score.
  const int32_t* replay_selected = nullptr;
};

struct RouterOutput {
  Tensor logits;    // S x E, x Wg (clean)
  Tensor noise_in;  // S x E, x Wnoise (NOISY_TOPK at training only)
  Tensor eps;       // S x E, the N(0,1) draws (NOISY_TOPK at training only)
  Tensor probs;     // S x E, softmax of the (noisy) scores, or sigmoid(logits) (SIGMOID)
  // gate SOFT (logits and probs are S x E·p, probs the combine weights C, a softmax over each
  // token's slots): the dispatch weights D, a softmax over each local group's tokens per slot.
  Tensor dispatch;
  bool noisy = false;
};

// Computes logits, noise and probs for the S rows of x.
// wg: M x E (M x E·p for SOFT); wnoise: M x E, read only when RouterIsNoisy.
void ComputeRouter(const config::RouterConfig& cfg, MatrixView<const float> x,
                   MatrixView<const float> wg, MatrixView<const float> wnoise,
                   const RouteContext& ctx, RouterOutput* out);

// Whether a call adds Shazeer noise (NOISY_TOPK at training): then noise_in = x Wnoise is needed.
inline bool RouterIsNoisy(const config::RouterConfig& cfg, const RouteContext& ctx) {
  return cfg.gate() == config::NOISY_TOPK && ctx.train;
}
// ComputeRouter after its GEMMs (done elsewhere, e.g. on a GPU): from out->logits (S x E) and,
// when RouterIsNoisy, out->noise_in (S x E), fills noisy, eps and probs exactly as ComputeRouter.
void FinishRouter(const config::RouterConfig& cfg, const RouteContext& ctx, RouterOutput* out);

// Row-wise softmax in float32: subtract the row max, exp, divide by the sum.
void SoftmaxRows(MatrixView<const float> in, MatrixView<float> out);
// Column-wise softmax in float32 within each of `groups` contiguous row groups (GroupBounds):
// per group and column, subtract the max over the group's rows, exp, sum in row order, multiply
// by 1/sum (Soft MoE's dispatch weights).
void SoftmaxColumnsPerGroup(MatrixView<const float> in, int64_t groups, MatrixView<float> out);

// gate SOFT's backward through both softmaxes: from dC and dD (S x E·p, the gradients of the
// combine weights router.probs and the dispatch weights router.dispatch) to dlogits (S x E·p,
// overwritten): dL = C ⊙ (dC − <dC, C>_row) + D ⊙ (dD − <dD, D>_column over the local group).
void SoftRouterGradients(const RouterOutput& router, int64_t groups, MatrixView<const float> dc,
                         MatrixView<const float> dd, Tensor* dlogits);

using routing::Softplus;

}  // namespace moe
