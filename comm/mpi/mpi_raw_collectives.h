// The raw MPI collectives (MPI_Alltoallv, MPI_Allreduce, MPI_Allgather) on an MPI communicator:
// the baseline moe_comm_bench times MpiCommunicator against (comm/bench/raw_collectives.h).
// Blocking, no deadline; counts and displacements must fit in an int (kInvalidArgument otherwise).
#pragma once

#include <mpi.h>

#include "comm/bench/raw_collectives.h"

namespace moe::comm {

class MpiRawCollectives final : public bench::RawCollectives {
 public:
  // `comm` (e.g. MpiCommunicator::mpi_comm()) must outlive this object.
  explicit MpiRawCollectives(MPI_Comm comm) : comm_(comm) {}

  const char* Name(Op op) const override;
  Status AllToAllV(const void* send, std::span<const int64_t> send_counts,
                   std::span<const int64_t> send_displs, void* recv,
                   std::span<const int64_t> recv_counts, std::span<const int64_t> recv_displs,
                   DataType dtype) override;
  Status AllReduceSum(const void* send, void* recv, int64_t count, DataType dtype) override;
  Status AllGather(const void* send, void* recv, int64_t count, DataType dtype) override;

 private:
  MPI_Comm comm_;
};

}  // namespace moe::comm
