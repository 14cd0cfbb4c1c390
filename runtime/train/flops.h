// Model FLOPs of a training step (the yardstick of model FLOP/s and utilization, as Megatron
// reports TFLOP/s per GPU): the matrix products a step needs whatever the implementation — the
// routers, the experts at the rows they kept, the shared experts, Soft MoE's slot mixing and the
// LM head — forward, and twice that backward (×3 in all). Element-wise work (norms, activations,
// softmaxes, the embedding sums) is left out, as is the padding a capacity exchange computes.
#pragma once

#include <cstdint>

#include "proto/moe_config.pb.h"

namespace moe {

struct StepFlops {
  double router = 0, experts = 0, shared = 0, soft_mix = 0, head = 0;  // forward + backward
  double total() const { return router + experts + shared + soft_mix + head; }
};

// FLOPs of a step on `tokens` tokens whose MoE layers kept `expert_rows` rows in all (summed over
// layers: the sum of the step's tokens_per_expert).
StepFlops ModelFlops(const config::MoeConfig& cfg, int64_t tokens, int64_t expert_rows);

// FLOPs per token at the config's nominal rows: k kept rows per token and layer (expert choice:
// capacity_factor_train; Soft MoE: E·p slots per local group of `tokens_per_group` tokens).
double NominalFlopsPerToken(const config::MoeConfig& cfg, int64_t tokens_per_group);

// One thread's fp32 GEMM rate on this machine in GFLOP/s: the best of repeated 512³ SGEMMs over
// about `seconds` (OpenBLAS, the rate the experts' GEMMs can reach at best).
double ProbeGemmGflops(double seconds = 0.15);

}  // namespace moe
