// NCCL backend: device buffers (CUDA), one rank per GPU. Compiled only with CUDA (MOE_HAVE_CUDA).
//
// Creation is collective over a bootstrap communicator of the same ranks with host buffers (MPI,
// or loopback with one GPU per thread): rank 0 makes an ncclUniqueId and broadcasts it. The NCCL
// communicator is created nonblocking (ncclConfig_t.blocking = 0), so no NCCL call can hang the
// host: every call is followed by polling ncclCommGetAsyncError while it reports ncclInProgress.
//
// Stream semantics: operations are enqueued on this communicator's own CUDA stream (stream()), in
// call order. A blocking operation enqueues, records an event and polls it (cudaEventQuery) and
// ncclCommGetAsyncError until done or the deadline; StartAllToAllV returns after enqueueing, and
// its Request polls the event in Wait(). Device work enqueued on stream() after a Start is ordered
// after the exchange, so compute can overlap without a host wait.
//
// Deadlines: on expiry the communicator calls ncclCommAbort and is marked aborted. NCCL does not
// report which peers never joined, so the message says the ranks are unknown rather than naming
// them (MPI and loopback name them).
//
// AllToAll uses ncclAlltoAll (NCCL >= 2.28; before, grouped ncclSend/ncclRecv); AllToAllV uses
// ncclSend/ncclRecv pairs inside ncclGroupStart/End; Barrier is an all-reduce of one int; Split is
// ncclCommSplit.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <string_view>
#include <vector>

#include "comm/communicator.h"
#include "comm/nccl/nccl_window.h"

namespace moe::comm {

struct NcclOptions {
  int device = -1;  // CUDA device of this rank; -1: the current device
  Options options;
};

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `bootstrap` (host memory; same ranks). kFailedPrecondition without a GPU.
  static StatusOr<std::unique_ptr<NcclCommunicator>> Create(Communicator& bootstrap,
                                                            const NcclOptions& options);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  // The bootstrap's (a Split's child: its rank and size, not known per node).
  int local_rank() const override { return local_rank_ >= 0 ? local_rank_ : rank_; }
  int local_size() const override { return local_rank_ >= 0 ? local_size_ : size_; }
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  std::string_view backend() const override { return "nccl"; }
  int device() const { return device_; }
  // The stream every operation of this communicator is ordered on.
  cudaStream_t stream() const { return stream_; }

  // Polls `event` (recorded after operation `seq`) until done or the deadline; aborts on expiry.
  Status WaitForEvent(std::string_view op, uint64_t seq, cudaEvent_t event);

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
  // NCCL symmetric memory: ncclMemAlloc + ncclCommWindowRegister(NCCL_WIN_COLL_SYMMETRIC), peers
  // through the device API (NCCL 2.28); fences all-gather the boards on this communicator.
  StatusOr<std::unique_ptr<SymmetricBuffer>> DoAllocateSymmetric(
      uint64_t seq, int64_t bytes, int64_t board_words) override;

 private:
  // Deregisters and frees the retired windows (every rank retired the same ones).
  Status ReleaseRetired(uint64_t seq);

  NcclCommunicator(ncclComm_t comm, int device, const Options& options);
  // Creates the stream and scratch memory after construction.
  Status Init();
  // Polls ncclCommGetAsyncError while `result` is ncclInProgress.
  Status Settle(std::string_view op, uint64_t seq, ncclResult_t result);
  // Records an event after the enqueued operation; the caller owns it.
  StatusOr<cudaEvent_t> Record(std::string_view op, uint64_t seq);
  // Settle + Record + WaitForEvent.
  Status Complete(std::string_view op, uint64_t seq, ncclResult_t enqueued);
  Status AbortWith(Status status);

  ncclComm_t comm_ = nullptr;
  const int device_;
  int rank_ = 0;
  int size_ = 0;
  int local_rank_ = -1;  // the bootstrap's, or -1
  int local_size_ = 0;
  cudaStream_t stream_ = nullptr;
  int* scratch_ = nullptr;  // one device int for Barrier
  std::vector<NcclWindow> retired_windows_;
};

}  // namespace moe::comm
