// The collective sweeps of moe_comm_bench (nccl-tests style): alltoall, alltoallv, allreduce and
// allgather over a range of sizes, one table of cases and one timing loop (bench_loop.h).
//
// Size is the bytes of each rank's send buffer (allgather: of its receive buffer), rounded down to
// whole elements per peer; count is that in elements. time is the slowest rank's mean over `iters`
// iterations after `warmup` ones; algbw = size / time; busbw = algbw · (n-1)/n for all-to-all and
// all-gather, · 2(n-1)/n for all-reduce. Each size also times a baseline moving the same bytes in
// the same loop: the raw collective when one is given (MPI_Alltoallv, MPI_Allreduce, MPI_Allgather
// on the MPI backend), plain memcpy (cudaMemcpy on device memory) otherwise; "ratio" is wrapper
// time / baseline time. With `check` the result of the last timed iteration is checked (#wrong =
// wrong elements, all ranks). alltoall and alltoallv may run the two-stage all-to-all
// (comm/algorithms/hierarchical_alltoall.h) with `hierarchical` ranks per node.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include "comm/bench/bench_loop.h"
#include "comm/bench/raw_collectives.h"
#include "comm/communicator.h"
#include "base/status.h"

namespace moe::comm::bench {

struct CollectiveBenchOptions {
  std::string op = "alltoall";  // alltoall, alltoallv, allreduce or allgather
  int64_t min_bytes = 0;
  int64_t max_bytes = 0;
  int factor = 2;  // between sizes (>= 2)
  int iters = 20;
  int warmup = 5;
  bool check = true;
  DataType dtype = DataType::kFloat32;
  int hierarchical = 0;  // ranks per node of the two-stage all-to-all; 0: flat
};

// Runs every size on this rank; collective over `comm`. `raw` (may be null: memcpy) is the
// baseline. Rank 0 prints the table to `out` and hands each row to `sink` (when set). After the
// table, kDataLoss when `check` found wrong elements at any size.
Status RunCollectiveBench(Communicator& comm, const CollectiveBenchOptions& options,
                          RawCollectives* raw, std::FILE* out, const RowSink& sink);

}  // namespace moe::comm::bench
