// Token-choice routing on device memory: softmax, top-k selection, capacity positions and gates,
// one kernel each — the GPU counterpart of SoftmaxRows (runtime/router.h) and of
// BuildDispatchPlan's token-choice path (runtime/dispatch_plan.h) for the POSITION drop policy
// without random routing or overflow re-routing (docs/SEMANTICS.md). For the same probs the
// selection, drops and gates are those of the CPU plan (same comparisons, same tie rule — lower
// expert index —, same operation order for the gate sums).
//
// Every pointer is a device pointer; `stream` is a cudaStream_t (nullptr: the default stream).
// Calls only enqueue work and return launch errors. Without a CUDA build: kUnimplemented.
#pragma once

#include <cstdint>

#include "proto/moe_config.pb.h"
#include "runtime/base/status.h"

namespace moe::gpu {

// probs[t] = softmax(logits[t]) over `cols` values, for `rows` rows (max-subtracted).
Status SoftmaxRows(const float* logits, int64_t rows, int64_t cols, float* probs, void* stream);

struct TokenChoiceShape {
  int64_t tokens = 0;    // S
  int64_t experts = 0;   // E
  int64_t top_k = 0;     // k <= E
  int64_t groups = 1;    // G: S tokens in G contiguous groups, the first S % G one token longer
  int64_t capacity = 0;  // C per (group, expert); 0 = dropless
  config::GateNormalization normalization = config::NONE;
};

struct TokenChoiceOutput {         // device arrays
  int32_t* selected = nullptr;     // S*k: expert of each slot by selection score (probs + bias)
  int32_t* position = nullptr;     // S*k: position in (group, expert), -1 when dropped
  int32_t* slot_expert = nullptr;  // S*k: expert, -1 when dropped
  float* slot_gate = nullptr;      // S*k: gate, 0 when dropped
  int32_t* group_expert_count = nullptr;  // G*E kept slots
};

// probs is S x E; bias (E) may be null (the aux-loss-free selection bias).
Status RouteTokenChoice(const TokenChoiceShape& shape, const float* probs, const float* bias,
                        const TokenChoiceOutput& out, void* stream);

}  // namespace moe::gpu
