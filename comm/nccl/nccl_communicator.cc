// The NCCL backend (comm/nccl/nccl_communicator.h).
#include "comm/nccl/nccl_communicator.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <utility>

#include "base/memory.h"
#include "comm/symmetric.h"

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

// A symmetric buffer in NCCL symmetric memory: every rank's part of one registered window, each
// addressed through the mapping NCCL made in this process (device memory, written by device copies
// and kernels). The fence is an all-gather on the communicator of (fence number, board words): it
// is a barrier with the communicator's deadline, and it brings every rank's board over. A rank's
// device writes into the buffers were completed by its caller before its Signal (symmetric.h), so
// once the all-gather returns on a rank every peer's writes of the fence are in memory.
class NcclSymmetric final : public SymmetricBuffer {
 public:
  // `boards`: this rank's board words, then size() rows of (fence, words) as gathered.
  NcclSymmetric(NcclCommunicator* comm, std::vector<NcclWindow>* retired, NcclWindow window,
                int64_t bytes, std::vector<void*> peers, int64_t board_words,
                std::unique_ptr<int64_t[]> boards, Buffer staging)
      : SymmetricBuffer(comm, bytes, MemorySpace::kDevice, std::move(peers), board_words,
                        Boards(boards.get(), comm->rank(), comm->size(), board_words)),
        retired_(retired),
        window_(window),
        words_(std::move(boards)),
        staging_(std::move(staging)) {}
  ~NcclSymmetric() override { retired_->push_back(window_); }

  static std::vector<int64_t*> Boards(int64_t* words, int rank, int ranks, int64_t board_words) {
    std::vector<int64_t*> boards;
    for (int r = 0; r < ranks; ++r) {
      boards.push_back(r == rank ? words : words + board_words + r * (board_words + 1) + 1);
    }
    return boards;
  }
  static int64_t HostWords(int ranks, int64_t board_words) {
    return board_words + ranks * (board_words + 1);
  }

 private:
  int64_t row() const { return board_words() + 1; }

  Status Arrive(uint64_t fence) override {
    // The row this rank contributes: the fence's number, then its board.
    std::vector<int64_t> mine(static_cast<size_t>(row()));
    mine[0] = static_cast<int64_t>(fence);
    std::copy(board(), board() + board_words(), mine.begin() + 1);
    return CopyFromHost(MemorySpace::kDevice, staging_.data(), mine.data(),
                        row() * static_cast<int64_t>(sizeof(int64_t)));
  }

  Status Await(uint64_t fence) override {
    int64_t* const gathered = staging_.as<int64_t>() + row();
    MOE_RETURN_IF_ERROR(comm()->AllGather(staging_.data(), gathered, row(), DataType::kInt64));
    int64_t* const rows = words_.get() + board_words();
    MOE_RETURN_IF_ERROR(CopyToHost(MemorySpace::kDevice, rows, gathered,
                                   size() * row() * static_cast<int64_t>(sizeof(int64_t))));
    for (int r = 0; r < size(); ++r) {
      if (rows[r * row()] != static_cast<int64_t>(fence)) {
        return Internal("symmetric fence #" + std::to_string(fence) + " on rank " +
                        std::to_string(rank()) + ": rank " + std::to_string(r) +
                        " arrived at its fence #" + std::to_string(rows[r * row()]) +
                        " (the ranks' fences are out of step)");
      }
    }
    return Status::Ok();
  }

  std::vector<NcclWindow>* const retired_;
  const NcclWindow window_;
  const std::unique_ptr<int64_t[]> words_;
  const Buffer staging_;  // device: this rank's row, then every rank's
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
      // Windows of an aborted communicator are not deregistered (collective) nor freed.
      (void)ncclCommAbort(comm_);
    } else {
      (void)ReleaseRetired(0);
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

#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 0)
Status NcclCommunicator::ReleaseRetired(uint64_t seq) {
  Status status;
  for (const NcclWindow& w : retired_windows_) {
    if (status.ok()) status = Settle("symmetric", seq, ncclCommWindowDeregister(comm_, w.window));
    if (status.ok() && ncclMemFree(w.memory) != ncclSuccess) {
      status = Internal("symmetric #" + std::to_string(seq) + ": ncclMemFree failed");
    }
  }
  retired_windows_.clear();
  return status;
}

StatusOr<std::unique_ptr<SymmetricBuffer>> NcclCommunicator::DoAllocateSymmetric(
    uint64_t seq, int64_t bytes, int64_t board_words) {
  MOE_RETURN_IF_ERROR(CudaCall(cudaSetDevice(device_), "cudaSetDevice"));
  // Deregistering is collective: every rank retired the same windows before this allocation,
  // whose size all-reduce showed all of them past it.
  MOE_RETURN_IF_ERROR(ReleaseRetired(seq));
  const int load_store = NcclLoadStoreRanks(comm_);
  if (load_store != size_) {
    return FailedPrecondition("symmetric: NCCL's load/store team has " +
                              std::to_string(load_store) + " of this communicator's " +
                              std::to_string(size_) + " ranks (GPUs without P2P / NVLink to each "
                              "other, or on other nodes): a symmetric buffer needs all of them");
  }
  // One window on every rank, a whole number of NCCL's alignment, zeroed.
  const int64_t align = NCCL_WIN_REQUIRED_ALIGNMENT;
  const int64_t size = std::max<int64_t>((bytes + align - 1) / align * align, align);
  NcclWindow w;
  if (ncclMemAlloc(&w.memory, static_cast<size_t>(size)) != ncclSuccess) {
    return Internal("symmetric #" + std::to_string(seq) + ": ncclMemAlloc of " +
                    std::to_string(size) + " bytes failed");
  }
  const Status registered =
      Settle("symmetric", seq,
             ncclCommWindowRegister(comm_, w.memory, static_cast<size_t>(size), &w.window,
                                    NCCL_WIN_COLL_SYMMETRIC));
  if (!registered.ok()) {
    (void)ncclMemFree(w.memory);
    return registered;
  }
  // From here the window is released like any buffer's: retired, freed by the next allocation.
  const auto retire_unless_made = [&](Status status) {
    if (!status.ok()) retired_windows_.push_back(w);
    return status;
  };
  const std::string what = "symmetric #" + std::to_string(seq);
  MOE_RETURN_IF_ERROR(retire_unless_made(
      CudaCall(cudaMemsetAsync(w.memory, 0, static_cast<size_t>(size), stream_),
               what + " cudaMemsetAsync")));
  StatusOr<Buffer> peer_table =
      Buffer::Allocate(MemorySpace::kDevice, size_ * static_cast<int64_t>(sizeof(void*)));
  MOE_RETURN_IF_ERROR(retire_unless_made(peer_table.status()));
  MOE_RETURN_IF_ERROR(retire_unless_made(CudaCall(
      NcclWindowPeers(w.window, size_, peer_table->as<void*>(), stream_), what + " peers")));
  MOE_RETURN_IF_ERROR(
      retire_unless_made(CudaCall(cudaStreamSynchronize(stream_), what + " synchronize")));
  std::vector<void*> peers(static_cast<size_t>(size_));
  MOE_RETURN_IF_ERROR(retire_unless_made(
      CopyToHost(MemorySpace::kDevice, peers.data(), peer_table->data(),
                 size_ * static_cast<int64_t>(sizeof(void*)))));
  const int64_t host_words = NcclSymmetric::HostWords(size_, board_words);
  auto boards = std::make_unique<int64_t[]>(static_cast<size_t>(host_words));  // zero
  StatusOr<Buffer> staging = Buffer::Allocate(
      MemorySpace::kDevice, (size_ + 1) * (board_words + 1) * static_cast<int64_t>(sizeof(int64_t)));
  MOE_RETURN_IF_ERROR(retire_unless_made(staging.status()));
  // Every rank's part is zero before any rank writes into it.
  MOE_RETURN_IF_ERROR(retire_unless_made(Barrier()));
  return std::unique_ptr<SymmetricBuffer>(std::make_unique<NcclSymmetric>(
      this, &retired_windows_, w, bytes, std::move(peers), board_words, std::move(boards),
      std::move(*staging)));
}
#else
Status NcclCommunicator::ReleaseRetired(uint64_t) { return Status::Ok(); }

StatusOr<std::unique_ptr<SymmetricBuffer>> NcclCommunicator::DoAllocateSymmetric(uint64_t,
                                                                                 int64_t,
                                                                                 int64_t) {
  return Unimplemented("symmetric: NCCL " + std::to_string(NCCL_VERSION_CODE) +
                       " has no device API; symmetric buffers need NCCL 2.28 or newer");
}
#endif

}  // namespace moe::comm
