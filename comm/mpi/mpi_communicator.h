// MPI backend (Open MPI): host buffers, ranks are processes under mpirun.
//
// Every operation is a nonblocking MPI collective (MPI_Ialltoall, MPI_Ialltoallv, MPI_Iallreduce,
// MPI_Iallgather, MPI_Ibcast, MPI_Ibarrier) polled with MPI_Test until it completes or the deadline
// expires; nothing blocks inside MPI. Split first runs an MPI_Ibarrier that way, then calls
// MPI_Comm_split, which cannot block any more because every rank has arrived.
//
// Missing-rank detection: each operation also posts an arrival handshake on a private duplicate
// communicator: a nonblocking 8-byte send of the operation's sequence number to every peer (tag =
// sequence number modulo MPI_TAG_UB) and a matching receive from every peer. On expiry the peers
// whose token has not arrived are the ranks that "did not arrive". Cost: 2·(size-1) small messages
// per operation (measured by moe_comm_bench against raw MPI_Alltoallv). The handshake makes every
// operation complete only after all ranks arrived (Broadcast included).
//
// After a deadline the communicator is aborted; its in-flight MPI requests can never be cancelled,
// so they and the MPI communicators are kept alive and not freed. MPI_Finalize may then block in
// Open MPI, and MPI may still write into the failed operation's receive buffer: a process that saw
// kDeadlineExceeded should end with MPI_Abort.
//
// Counts and displacements must fit in an int (MPI-3 interface).
#pragma once

#include <mpi.h>

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi/mpi_comm_handle.h"

namespace moe::comm {

// The MPI datatype of `dtype` (MPI_FLOAT, MPI_INT64_T, ...).
MPI_Datatype MpiDatatype(DataType dtype);

// OK for MPI_SUCCESS; otherwise kInternal "<what> failed: <MPI's error string>".
Status MpiCall(int code, const std::string& what);
// MPI-3 takes int counts: `value` as an int, or kInvalidArgument naming `op`, `name` and the limit.
StatusOr<int> ToInt(std::string_view op, std::string_view name, int64_t value);
// Every element of `in` as an int (ToInt, named name[i]).
Status ToInts(std::string_view op, std::string_view name, std::span<const int64_t> in,
              std::vector<int>& out);

struct MpiOperation;  // an operation in flight (mpi_communicator.cc)

class MpiCommunicator final : public Communicator {
 public:
  // Duplicates `parent` (MPI must be initialized). Collective over `parent`.
  static StatusOr<std::unique_ptr<MpiCommunicator>> Create(MPI_Comm parent, const Options& options);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
  std::string_view backend() const override { return "mpi"; }
  // The communicator the data moves on (for baselines that call MPI directly).
  MPI_Comm mpi_comm() const { return data_.get(); }

  // Polls `op` until done or the deadline; aborts this communicator on expiry.
  Status Finish(std::unique_ptr<MpiOperation> op);

 protected:
  Status DoAllToAll(uint64_t seq, const void* send, void* recv, int64_t count,
                    DataType dtype) override;
  StatusOr<std::unique_ptr<Request>> DoStartAllToAllV(uint64_t seq,
                                                      const AllToAllVArgs& args) override;
  Status DoAllReduce(uint64_t seq, const void* send, void* recv, int64_t count, DataType dtype,
                     ReduceOp op) override;
  Status DoAllGather(uint64_t seq, const void* send, void* recv, int64_t count,
                     DataType dtype) override;
  Status DoBroadcast(uint64_t seq, void* buffer, int64_t count, DataType dtype, int root) override;
  Status DoBarrier(uint64_t seq) override;
  StatusOr<std::unique_ptr<Communicator>> DoSplit(uint64_t seq, int color, int key) override;
  // A shared-memory window over the node's ranks (MPI_Win_allocate_shared).
  StatusOr<std::unique_ptr<SymmetricBuffer>> DoAllocateSymmetric(
      uint64_t seq, int64_t bytes, int64_t board_words) override;

 private:
  struct Ranks {
    int rank, size, local_rank, local_size;
  };
  MpiCommunicator(MpiCommHandle data, MpiCommHandle control, Ranks ranks, int tag_ub,
                  const Options& options);
  // Starts the arrival handshake of a new operation.
  StatusOr<std::unique_ptr<MpiOperation>> Begin(std::string_view op, uint64_t seq);
  Status StartFailed(std::unique_ptr<MpiOperation> op, int mpi_error);

  MpiCommHandle data_;     // collectives
  MpiCommHandle control_;  // arrival handshake
  const int rank_;
  const int size_;
  const int local_rank_;  // among the ranks on this node (MPI_COMM_TYPE_SHARED)
  const int local_size_;
  const int tag_ub_;
  // Shared-memory windows whose buffers were destroyed, freed by the next AllocateSymmetric.
  std::vector<MPI_Win> retired_windows_;
  // Operations abandoned at a deadline: MPI may still write into their buffers.
  std::vector<std::unique_ptr<MpiOperation>> abandoned_;
};

}  // namespace moe::comm
