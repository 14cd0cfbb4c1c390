// The raw MPI collectives the benchmarks compare with (comm/mpi/mpi_raw_collectives.h).
#include "comm/mpi/mpi_raw_collectives.h"

#include <vector>

#include "comm/mpi/mpi_communicator.h"

namespace moe::comm {

const char* MpiRawCollectives::Name(Op op) const {
  switch (op) {
    case Op::kAllToAllV:
      return "MPI_Alltoallv";
    case Op::kAllReduce:
      return "MPI_Allreduce";
    case Op::kAllGather:
      return "MPI_Allgather";
  }
  return "MPI";
}

Status MpiRawCollectives::AllToAllV(const void* send, std::span<const int64_t> send_counts,
                                    std::span<const int64_t> send_displs, void* recv,
                                    std::span<const int64_t> recv_counts,
                                    std::span<const int64_t> recv_displs, DataType dtype) {
  std::vector<int> sc, sd, rc, rd;
  MOE_RETURN_IF_ERROR(ToInts("MPI_Alltoallv", "send_counts", send_counts, sc));
  MOE_RETURN_IF_ERROR(ToInts("MPI_Alltoallv", "send_displs", send_displs, sd));
  MOE_RETURN_IF_ERROR(ToInts("MPI_Alltoallv", "recv_counts", recv_counts, rc));
  MOE_RETURN_IF_ERROR(ToInts("MPI_Alltoallv", "recv_displs", recv_displs, rd));
  const MPI_Datatype type = MpiDatatype(dtype);
  return MpiCall(
      MPI_Alltoallv(send, sc.data(), sd.data(), type, recv, rc.data(), rd.data(), type, comm_),
      "MPI_Alltoallv");
}

Status MpiRawCollectives::AllReduceSum(const void* send, void* recv, int64_t count,
                                       DataType dtype) {
  MOE_ASSIGN_OR_RETURN(const int n, ToInt("MPI_Allreduce", "count", count));
  return MpiCall(MPI_Allreduce(send, recv, n, MpiDatatype(dtype), MPI_SUM, comm_), "MPI_Allreduce");
}

Status MpiRawCollectives::AllGather(const void* send, void* recv, int64_t count, DataType dtype) {
  MOE_ASSIGN_OR_RETURN(const int n, ToInt("MPI_Allgather", "count", count));
  const MPI_Datatype type = MpiDatatype(dtype);
  return MpiCall(MPI_Allgather(send, n, type, recv, n, type, comm_), "MPI_Allgather");
}

}  // namespace moe::comm
