// The exchanges of whole experts that redundant experts need (docs/SEMANTICS.md "Redundant
// experts"), beside the row exchange engine: over the W ranks of an expert-parallel group whose
// E + R physical experts follow an ExpertPlacement (runtime/exchange/expert_placement.h).
//
//   SumReplicaGradients: every replica of a logical expert ends with the sum of all its replicas'
//     gradients — each replica's gradient goes to the expert's first replica (its primary), which
//     sums them in float64 (its own first, then by source rank) and sends the sum back.
//   MoveExperts: a new placement's experts reach their new ranks — an expert a rank keeps stays in
//     place (its old slot is named), every other one arrives as a payload packed by its first
//     replica's rank under the old placement.
// Both are collective over the group (one or two all-to-all-v of whole experts).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "base/status.h"
#include "comm/communicator.h"
#include "experts/expert_ffn.h"
#include "runtime/exchange/expert_placement.h"

namespace moe {

// grads[s]: the gradient of this rank's slot s under `placement` (host, all of one FFN shape).
Status SumReplicaGradients(comm::Communicator& ep, const ExpertPlacement& placement,
                           std::span<experts::FfnParams> grads);

// Where each slot of this rank under the new placement comes from.
struct MovedExperts {
  // Per new slot: the old slot of this rank that already holds its expert (>= 0), or -1 when it
  // arrived.
  std::vector<int> kept_from;
  // Per new slot that arrived: its payload (`floats` floats, as packed by its source), else null.
  std::vector<const float*> payload;
  std::vector<float> received;  // what the payloads point into
};
// pack(old_slot, out) writes this rank's expert in `old_slot` (under `now`) as `floats` floats.
// Unchanged placements move nothing (kept_from is every slot's own).
StatusOr<MovedExperts> MoveExperts(comm::Communicator& ep, const ExpertPlacement& now,
                                   const ExpertPlacement& next, int64_t floats,
                                   const std::function<void(int, float*)>& pack);

}  // namespace moe
