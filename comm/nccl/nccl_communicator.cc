// The NCCL backend (comm/nccl/nccl_communicator.h).
#include "comm/nccl/nccl_communicator.h"

#include <chrono>
#include <string>
#include <thread>
#include <utility>

#include "base/memory.h"

namespace moe::comm {
namespace {

using Clock = std::chrono::steady_clock;

Clock::time_point DeadlineFrom(const Options& options) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(options.deadline_seconds));
}

ncclDataType_t ToNccl(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32:
      return ncclFloat32;
    case DataType::kFloat64:
      return ncclFloat64;
    case DataType::kInt32:
      return ncclInt32;
    case DataType::kInt64:
      return ncclInt64;
    case DataType::kUint8:
      return ncclUint8;
  }
  return ncclUint8;
}

ncclRedOp_t ToNccl(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

Status CudaCall(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return Status::Ok();
  return Internal(what + " failed: " + cudaGetErrorString(err));
}

const char* Offset(const void* p, int64_t bytes) { return static_cast<const char*>(p) + bytes; }
char* Offset(void* p, int64_t bytes) { return static_cast<char*>(p) + bytes; }

// Polls a nonblocking communicator until `result` is no longer ncclInProgress.
ncclResult_t SettleComm(ncclComm_t comm, ncclResult_t result, Clock::time_point deadline) {
  while (result == ncclInProgress) {
    if (Clock::now() >= deadline) return ncclInProgress;
    std::this_thread::yield();
    if (ncclCommGetAsyncError(comm, &result) != ncclSuccess) return ncclInternalError;
  }
  return result;
}

class NcclRequest final : public Request {
 public:
  NcclRequest(NcclCommunicator* comm, uint64_t seq, cudaEvent_t event)
      : comm_(comm), seq_(seq), event_(event) {}
  ~NcclRequest() override {
    if (event_ != nullptr) (void)Wait();
  }
  Status Wait() override {
    if (event_ == nullptr) return FailedPrecondition("NCCL request waited twice");
    const Status status = comm_->WaitForEvent("alltoallv", seq_, event_);
    (void)cudaEventDestroy(event_);
    event_ = nullptr;
    return status;
  }
  // The operation's completion event, waited for on `stream` by the device (the host goes on).
  Status Then(StreamHandle stream) override {
    if (event_ == nullptr) return FailedPrecondition("NCCL request: Then after Wait");
    return CudaCall(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), event_, 0),
                    "alltoallv #" + std::to_string(seq_) + " cudaStreamWaitEvent");
  }

 private:
  NcclCommunicator* const comm_;
  const uint64_t seq_;
  cudaEvent_t event_;
};

}  // namespace

StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(Communicator& bootstrap,
                                                                     const NcclOptions& options) {
  MOE_RETURN_IF_ERROR(ValidateOptions(options.options));
  if (bootstrap.memory_space() != MemorySpace::kHost) {
    return InvalidArgument("nccl: the bootstrap communicator must use host memory, not " +
                           std::string(MemorySpaceName(bootstrap.memory_space())));
  }
  if (CudaDeviceCount() == 0) {
    return FailedPrecondition("nccl: no CUDA device (cudaGetDeviceCount found none)");
  }
  int device = options.device;
  if (device < 0) MOE_RETURN_IF_ERROR(CudaCall(cudaGetDevice(&device), "cudaGetDevice"));
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device), "cudaSetDevice"));

  ncclUniqueId id{};
  if (bootstrap.rank() == 0) {
    const ncclResult_t made = ncclGetUniqueId(&id);
    if (made != ncclSuccess) {
      return Internal(std::string("ncclGetUniqueId failed: ") + ncclGetErrorString(made));
    }
  }
  MOE_RETURN_IF_ERROR(bootstrap.Broadcast(&id, sizeof(id), DataType::kUint8, 0));

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const auto deadline = DeadlineFrom(options.options);
  ncclResult_t result =
      ncclCommInitRankConfig(&comm, bootstrap.size(), id, bootstrap.rank(), &config);
  if (comm != nullptr) result = SettleComm(comm, result, deadline);
  if (result != ncclSuccess) {
    if (comm != nullptr) (void)ncclCommAbort(comm);
    if (result == ncclInProgress) {
      return DeadlineExceeded("nccl init on rank " + std::to_string(bootstrap.rank()) +
                              ": deadline exceeded; some ranks did not join");
    }
    return Internal(std::string("ncclCommInitRankConfig failed: ") + ncclGetErrorString(result));
  }
  std::unique_ptr<NcclCommunicator> out(new NcclCommunicator(comm, device, options.options));
  out->local_rank_ = bootstrap.local_rank();
  out->local_size_ = bootstrap.local_size();
  MOE_RETURN_IF_ERROR(out->Init());
  return out;
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, int device, const Options& options)
    : Communicator(options), comm_(comm), device_(device) {}

Status NcclCommunicator::Init() {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
  if (ncclCommCount(comm_, &size_) != ncclSuccess ||
      ncclCommUserRank(comm_, &rank_) != ncclSuccess) {
    return Internal("nccl: could not query the communicator's rank and size");
  }
  MOE_RETURN_IF_ERROR(
      CudaCall(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
  return CudaCall(cudaMalloc(reinterpret_cast<void**>(&scratch_), sizeof(int)), "cudaMalloc");
}

NcclCommunicator::~NcclCommunicator() {
  (void)cudaSetDevice(device_);
  if (comm_ != nullptr) {
    if (aborted()) {
      (void)ncclCommAbort(comm_);
    } else {
      const ncclResult_t finalized =
          SettleComm(comm_, ncclCommFinalize(comm_), DeadlineFrom(options()));
      if (finalized == ncclSuccess) {
        (void)ncclCommDestroy(comm_);
      } else {
        (void)ncclCommAbort(comm_);
      }
    }
  }
  if (scratch_ != nullptr) (void)cudaFree(scratch_);
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
}

Status NcclCommunicator::AbortWith(Status status) {
  if (comm_ != nullptr) {
    (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  return Abort(std::move(status));
}

Status NcclCommunicator::Settle(std::string_view op, uint64_t seq, ncclResult_t result) {
  const ncclResult_t settled = SettleComm(comm_, result, DeadlineFrom(options()));
  if (settled == ncclSuccess) return Status::Ok();
  const std::string where =
      std::string(op) + " #" + std::to_string(seq) + " on rank " + std::to_string(rank_);
  if (settled == ncclInProgress) {
    return AbortWith(DeadlineExceeded(DeadlinePrefix(op, seq) +
                                      ": NCCL was still launching the operation (ranks unknown); "
                                      "communicator aborted (ncclCommAbort)"));
  }
  return AbortWith(Internal(where + ": " + ncclGetErrorString(settled)));
}

StatusOr<cudaEvent_t> NcclCommunicator::Record(std::string_view op, uint64_t seq) {
  cudaEvent_t event = nullptr;
  const std::string what = std::string(op) + " #" + std::to_string(seq);
  MOE_RETURN_IF_ERROR(CudaCall(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                               what + " cudaEventCreate"));
  const Status recorded = CudaCall(cudaEventRecord(event, stream_), what + " cudaEventRecord");
  if (!recorded.ok()) {
    (void)cudaEventDestroy(event);
    return recorded;
  }
  return event;
}

Status NcclCommunicator::WaitForEvent(std::string_view op, uint64_t seq, cudaEvent_t event) {
  if (comm_ == nullptr) return Aborted(std::string(op) + ": communicator was aborted");
  const auto deadline = DeadlineFrom(options());
  for (int64_t poll = 0;; ++poll) {
    const cudaError_t state = cudaEventQuery(event);
    if (state == cudaSuccess) return Status::Ok();
    if (state != cudaErrorNotReady) {
      return AbortWith(CudaCall(state, std::string(op) + " #" + std::to_string(seq)));
    }
    ncclResult_t async = ncclSuccess;
    (void)ncclCommGetAsyncError(comm_, &async);
    if (async != ncclSuccess && async != ncclInProgress) {
      return AbortWith(Internal(std::string(op) + " #" + std::to_string(seq) + " on rank " +
                                std::to_string(rank_) + ": " + ncclGetErrorString(async)));
    }
    if (Clock::now() >= deadline) {
      return AbortWith(DeadlineExceeded(
          DeadlinePrefix(op, seq) +
          ": NCCL cannot tell which ranks did not arrive; communicator aborted (ncclCommAbort)"));
    }
    if (poll > 64) std::this_thread::yield();
  }
}

Status NcclCommunicator::Complete(std::string_view op, uint64_t seq, ncclResult_t enqueued) {
  MOE_RETURN_IF_ERROR(Settle(op, seq, enqueued));
  MOE_ASSIGN_OR_RETURN(cudaEvent_t event, Record(op, seq));
  const Status status = WaitForEvent(op, seq, event);
  (void)cudaEventDestroy(event);
  return status;
}

Status NcclCommunicator::DoAllToAll(uint64_t seq, const void* send, void* recv, int64_t count,
                                    DataType dtype) {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 0)
  return Complete(
      "alltoall", seq,
      ncclAlltoAll(send, recv, static_cast<size_t>(count), ToNccl(dtype), comm_, stream_));
#else
  // NCCL before 2.28 has no ncclAlltoAll: the same exchange as grouped sends and receives.
  const int64_t bytes = count * DataTypeSize(dtype);
  ncclResult_t result = ncclGroupStart();
  for (int p = 0; p < size_ && result == ncclSuccess; ++p) {
    result = ncclSend(Offset(send, p * bytes), static_cast<size_t>(count), ToNccl(dtype), p, comm_,
                      stream_);
    if (result == ncclSuccess) {
      result = ncclRecv(Offset(recv, p * bytes), static_cast<size_t>(count), ToNccl(dtype), p,
                        comm_, stream_);
    }
  }
  const ncclResult_t ended = ncclGroupEnd();
  return Complete("alltoall", seq, result != ncclSuccess ? result : ended);
#endif
}

StatusOr<std::unique_ptr<Request>> NcclCommunicator::DoStartAllToAllV(uint64_t seq,
                                                                      const AllToAllVArgs& a) {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
  const int64_t es = DataTypeSize(a.dtype);
  const ncclDataType_t type = ToNccl(a.dtype);
  if (a.after != nullptr) {
    // This stream waits, on the device, for the work queued on `after` so far.
    const std::string what = "alltoallv #" + std::to_string(seq);
    cudaEvent_t ready = nullptr;
    MOE_RETURN_IF_ERROR(CudaCall(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming),
                                 what + " cudaEventCreate"));
    Status ordered = CudaCall(cudaEventRecord(ready, static_cast<cudaStream_t>(a.after)),
                              what + " cudaEventRecord");
    if (ordered.ok()) {
      ordered = CudaCall(cudaStreamWaitEvent(stream_, ready, 0), what + " cudaStreamWaitEvent");
    }
    (void)cudaEventDestroy(ready);  // released once the wait is satisfied
    MOE_RETURN_IF_ERROR(ordered);
  }
  ncclResult_t result = ncclGroupStart();
  for (int p = 0; p < size_ && result == ncclSuccess; ++p) {
    if (a.send_counts[p] > 0) {
      result = ncclSend(Offset(a.send, a.send_displs[p] * es),
                        static_cast<size_t>(a.send_counts[p]), type, p, comm_, stream_);
    }
    if (result == ncclSuccess && a.recv_counts[p] > 0) {
      result = ncclRecv(Offset(a.recv, a.recv_displs[p] * es),
                        static_cast<size_t>(a.recv_counts[p]), type, p, comm_, stream_);
    }
  }
  const ncclResult_t ended = ncclGroupEnd();
  MOE_RETURN_IF_ERROR(Settle("alltoallv", seq, result == ncclSuccess ? ended : result));
  MOE_ASSIGN_OR_RETURN(cudaEvent_t event, Record("alltoallv", seq));
  return std::unique_ptr<Request>(std::make_unique<NcclRequest>(this, seq, event));
}

Status NcclCommunicator::DoAllReduce(uint64_t seq, const void* send, void* recv, int64_t count,
                                     DataType dtype, ReduceOp op) {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
  return Complete("allreduce", seq,
                  ncclAllReduce(send, recv, static_cast<size_t>(count), ToNccl(dtype), ToNccl(op),
                                comm_, stream_));
}

Status NcclCommunicator::DoAllGather(uint64_t seq, const void* send, void* recv, int64_t count,
                                     DataType dtype) {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
  return Complete(
      "allgather", seq,
      ncclAllGather(send, recv, static_cast<size_t>(count), ToNccl(dtype), comm_, stream_));
}

Status NcclCommunicator::DoBroadcast(uint64_t seq, void* buffer, int64_t count, DataType dtype,
                                     int root) {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
  return Complete("broadcast", seq,
                  ncclBroadcast(buffer, buffer, static_cast<size_t>(count), ToNccl(dtype), root,
                                comm_, stream_));
}

Status NcclCommunicator::DoBarrier(uint64_t seq) {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
  return Complete("barrier", seq,
                  ncclAllReduce(scratch_, scratch_, 1, ncclInt32, ncclSum, comm_, stream_));
}

StatusOr<std::unique_ptr<Communicator>> NcclCommunicator::DoSplit(uint64_t seq, int color,
                                                                  int key) {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t child = nullptr;
  const ncclResult_t result =
      ncclCommSplit(comm_, color == kNoColor ? NCCL_SPLIT_NOCOLOR : color, key, &child, &config);
  MOE_RETURN_IF_ERROR(Settle("split", seq, result));
  if (child != nullptr) {
    const ncclResult_t settled = SettleComm(child, ncclInProgress, DeadlineFrom(options()));
    if (settled != ncclSuccess) {
      (void)ncclCommAbort(child);
      return AbortWith(Internal("split #" + std::to_string(seq) +
                                ": new communicator failed: " + ncclGetErrorString(settled)));
    }
  }
  if (child == nullptr) return std::unique_ptr<Communicator>();
  std::unique_ptr<NcclCommunicator> out(new NcclCommunicator(child, device_, options()));
  MOE_RETURN_IF_ERROR(out->Init());
  return std::unique_ptr<Communicator>(std::move(out));
}

}  // namespace moe::comm
