// Row maps of a device-resident expert-parallel layer (runtime/cuda/device_moe_layer.h): the rows a rank
// receives in the dispatch all-to-all arrive source-major — from each source rank s, the rows of
// each of this rank's L local experts in expert order — but the grouped expert FFN wants them
// local-expert-major (all of expert 0's rows, from every source, then expert 1's, ...). The maps
// are gather indices, so the regroup and its inverse are each one PermuteRows call.
//
// Pipelining (EpExchangeLayout, d chunks): every (rank, local expert) block of n rows is split by
// position, chunk j holding rows [n·j/d, n·(j+1)/d) of the block — both ends of an exchange know
// n, so they agree on the split without another message. Chunk j is one all-to-all-v of its own,
// so one chunk's exchange can be in flight while another chunk's experts run.
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

// One pipeline chunk of a dispatch (combine: the same with send and receive swapped). Counts and
// displacements are in rows, displacements absolute in the whole send / receive buffer.
struct EpChunk {
  std::vector<int64_t> send_counts, send_displs;  // W: rows to each rank
  std::vector<int64_t> recv_counts, recv_displs;  // W: rows from each rank
  int64_t recv_begin = 0;  // the chunk's first row in the receive and expert-major layouts
  int64_t recv_rows = 0;
  std::vector<int64_t> expert_offsets;  // L + 1: the chunk's expert-major row blocks, from 0
};

// The whole exchange of one layer call in d chunks. Layouts of rows:
//   plan:          this rank's rows in dispatch-plan order, [destination][local expert][position]
//   send:          [chunk][destination][local expert] (the plan order itself when d = 1)
//   receive:       [chunk][source][local expert], what the dispatch all-to-alls deliver
//   expert-major:  [chunk][local expert][source], what the grouped FFN of each chunk reads
struct EpExchangeLayout {
  int64_t send_rows = 0, recv_rows = 0;
  std::vector<EpChunk> chunks;
  // Send row i is plan row send_gather[i], plan row r is send row plan_gather[r]; both empty when
  // the two orders are the same (d = 1).
  std::vector<int32_t> send_gather, plan_gather;
  // Expert-major row i is receive row to_expert_major[i]; receive row r is expert-major row
  // to_source_major[r]. Absolute indices; each maps chunk j's rows onto chunk j's rows.
  std::vector<int32_t> to_expert_major, to_source_major;
};

// send_counts[p * L + l]: this rank's rows for local expert l of rank p (its dispatch plan's
// per-expert counts, experts in rank order); recv_counts[s * L + l]: rows rank s sends for this
// rank's local expert l. chunks: 1..16. Fails on bad sizes, negative counts or >= 2^31 rows.
StatusOr<EpExchangeLayout> MakeEpExchangeLayout(int ranks, int local_experts, int chunks,
                                                const std::vector<int64_t>& send_counts,
                                                const std::vector<int64_t>& recv_counts);

}  // namespace moe
