// Row maps of a device-resident expert-parallel layer (runtime/device_moe_layer.h): the rows a rank
// receives in the dispatch all-to-all arrive source-major — from each source rank s, the rows of
// each of this rank's L local experts in expert order — but the grouped expert FFN wants them
// local-expert-major (all of expert 0's rows, from every source, then expert 1's, ...). The maps
// are gather indices, so the regroup and its inverse are each one PermuteRows call.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/base/status.h"

namespace moe {

struct EpRowMaps {
  // Expert-major row j is received row to_expert_major[j].
  std::vector<int32_t> to_expert_major;
  // Received row i is expert-major row to_source_major[i] (the inverse permutation).
  std::vector<int32_t> to_source_major;
  std::vector<int64_t> expert_offsets;  // L + 1: each local expert's rows, expert-major
  std::vector<int64_t> source_rows;     // W: rows received from each source rank
};

// recv_counts[s * L + l]: rows source rank s sends for local expert l (W * L entries, >= 0, total
// < 2^31).
StatusOr<EpRowMaps> MakeEpRowMaps(int ranks, int local_experts,
                                  const std::vector<int64_t>& recv_counts);

}  // namespace moe
