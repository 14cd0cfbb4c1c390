// DispatchPlan: every routing decision of one MoE layer call, computed once (selection, random
// routing, capacity, drop priority, reroute, gates) and reused by pack, combine and backward —
// DeepEP's "layout" step. Semantics: docs/SEMANTICS.md.
//
// Packed row order (the order of the expert-side buffer): expert, then local group, then position
// in (group, expert). Because experts are placed on ranks in blocks, this is also "destination rank,
// then local expert" — the dispatch send order.
#pragma once

#include <cstdint>
#include <vector>

#include "proto/moe_config.pb.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/routing/router.h"

namespace moe {

struct DispatchPlan {
  int64_t num_tokens = 0;   // S
  int64_t num_experts = 0;  // E
  int64_t top_k = 0;        // k (token choice); 0 for expert choice
  int64_t num_groups = 0;   // G
  int64_t capacity = 0;     // C per (group, expert); 0 = dropless
  // Per expert when the experts' capacities differ (E values; the replicas of a redundant expert
  // share its C: runtime/exchange/redundant_experts.h); empty: `capacity` for every expert.
  std::vector<int64_t> expert_capacity;
  bool expert_choice = false;
  config::GateNormalization normalization = config::NONE;

  std::vector<int64_t> group_begin;  // G + 1 token offsets

  // Token choice, per slot (t * k + j):
  std::vector<int32_t> selected;    // expert picked by selection (before drops and reroute)
  std::vector<int32_t> slot_expert;  // final expert (after reroute), -1 when dropped
  std::vector<int32_t> slot_final;   // final expert even when dropped (for the normalizations)
  std::vector<float> slot_raw;       // r_j = probs[t, slot_final]
  std::vector<float> slot_gate;      // g_j, 0 when dropped
  std::vector<int32_t> slot_row;     // packed row, -1 when dropped

  // Packed rows.
  std::vector<int64_t> expert_offset;      // E + 1
  std::vector<int32_t> group_expert_count;  // G x E kept rows
  std::vector<int32_t> row_token;
  std::vector<int32_t> row_expert;
  std::vector<float> row_gate;
  // Rows of each token: token_rows[token_row_offset[t] .. token_row_offset[t+1]), in slot order
  // (token choice) or expert order (expert choice).
  std::vector<int64_t> token_row_offset;
  std::vector<int32_t> token_rows;

  // Expert choice: position p of expert e in group g holds token ec_token[(g*E + e)*C + p] or -1.
  std::vector<int32_t> ec_token;

  // Metrics.
  std::vector<int64_t> kept_per_expert;
  std::vector<int64_t> dropped_per_expert;  // by the expert the slot was for
  std::vector<int64_t> load_per_expert;     // selected slots before drops (aux-loss-free bias)
  int64_t dropped_slots = 0;

  // Packed rows: expert_offset's last entry (set also in a plan whose row arrays stay on a device).
  int64_t num_rows() const { return expert_offset.empty() ? 0 : expert_offset.back(); }
  int64_t group_size(int64_t g) const { return group_begin[g + 1] - group_begin[g]; }
};

// Token offsets of G contiguous groups of S tokens (G + 1 values): the first S % G groups hold one
// token more.
std::vector<int64_t> GroupBounds(int64_t num_tokens, int64_t num_groups);

// Soft MoE (gate SOFT): the plan of the G·E·p slot rows — "token" g·E·p + e·p + j is slot j of
// expert e in group g, one kept row each (gate 1, position j), so every (group, expert) block
// holds exactly p rows: the exchange moves slot inputs and outputs like token rows.
DispatchPlan SoftSlotPlan(int64_t num_experts, int64_t slots_per_expert, int64_t num_groups);

// Builds the plan from the router's probs. `bias` (E) is the aux-loss-free selection bias (may be
// empty). Fails with a clear error for S < G.
StatusOr<DispatchPlan> BuildDispatchPlan(const config::RouterConfig& cfg, const Tensor& probs,
                                         const std::vector<float>& bias, const RouteContext& ctx);

}  // namespace moe
