// Raw collectives: the transport's own calls under a Communicator, made directly (no deadline, no
// argument checks, no arrival handshake). A benchmark times a communicator against them in the same
// loop; comm/mpi/mpi_raw_collectives.h is the MPI one. Buffers live in the communicator's memory
// space; counts and displacements are in elements of `dtype`, as in comm/communicator.h.
#pragma once

#include <cstdint>
#include <span>

#include "comm/communicator.h"
#include "base/status.h"

namespace moe::comm::bench {

class RawCollectives {
 public:
  enum class Op { kAllToAllV, kAllReduce, kAllGather };

  virtual ~RawCollectives() = default;

  // The call a table names as the baseline of `op` ("MPI_Alltoallv").
  virtual const char* Name(Op op) const = 0;

  virtual Status AllToAllV(const void* send, std::span<const int64_t> send_counts,
                           std::span<const int64_t> send_displs, void* recv,
                           std::span<const int64_t> recv_counts,
                           std::span<const int64_t> recv_displs, DataType dtype) = 0;
  virtual Status AllReduceSum(const void* send, void* recv, int64_t count, DataType dtype) = 0;
  // `count` elements from each rank.
  virtual Status AllGather(const void* send, void* recv, int64_t count, DataType dtype) = 0;
};

}  // namespace moe::comm::bench
