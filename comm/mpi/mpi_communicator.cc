// The MPI backend (comm/mpi/mpi_communicator.h).
#include "comm/mpi/mpi_communicator.h"

#include <chrono>
#include <climits>
#include <cstring>
#include <string>
#include <thread>
#include <utility>

namespace moe::comm {

MPI_Datatype MpiDatatype(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32:
      return MPI_FLOAT;
    case DataType::kFloat64:
      return MPI_DOUBLE;
    case DataType::kInt32:
      return MPI_INT32_T;
    case DataType::kInt64:
      return MPI_INT64_T;
    case DataType::kUint8:
      return MPI_UINT8_T;
  }
  return MPI_DATATYPE_NULL;
}

// One operation in flight: the collective's request and the arrival handshake.
struct MpiOperation {
  std::string name;
  uint64_t seq = 0;
  MPI_Request collective = MPI_REQUEST_NULL;
  std::vector<int> peers;                // ranks other than this one
  std::vector<MPI_Request> arrivals;     // receive of each peer's token
  std::vector<uint64_t> arrival_tokens;  // what each peer sent (must equal seq)
  std::vector<bool> arrived;             // per entry of peers
  std::vector<MPI_Request> departures;   // this rank's token to each peer
  uint64_t token = 0;
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;  // alltoallv, int copies
};

namespace {

MPI_Op ToMpi(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_OP_NULL;
}

std::string MpiErrorString(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  return std::string(text, static_cast<size_t>(length));
}

}  // namespace

Status MpiCall(int code, const std::string& what) {
  if (code == MPI_SUCCESS) return Status::Ok();
  return Internal(what + " failed: " + MpiErrorString(code));
}

StatusOr<int> ToInt(std::string_view op, std::string_view name, int64_t value) {
  if (value > INT_MAX) {
    return InvalidArgument(std::string(op) + ": " + std::string(name) + "=" +
                           std::to_string(value) + " exceeds the MPI int limit " +
                           std::to_string(INT_MAX));
  }
  return static_cast<int>(value);
}

Status ToInts(std::string_view op, std::string_view name, std::span<const int64_t> in,
              std::vector<int>& out) {
  out.resize(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    MOE_ASSIGN_OR_RETURN(out[i],
                         ToInt(op, std::string(name) + "[" + std::to_string(i) + "]", in[i]));
  }
  return Status::Ok();
}

namespace {

class MpiRequest final : public Request {
 public:
  MpiRequest(MpiCommunicator* comm, std::unique_ptr<MpiOperation> op)
      : comm_(comm), op_(std::move(op)) {}
  ~MpiRequest() override {
    if (op_ != nullptr) (void)Wait();
  }
  Status Wait() override {
    if (op_ == nullptr) return FailedPrecondition("MPI request waited twice");
    return comm_->Finish(std::move(op_));
  }

 private:
  MpiCommunicator* const comm_;
  std::unique_ptr<MpiOperation> op_;
};

}  // namespace

StatusOr<std::unique_ptr<MpiCommunicator>> MpiCommunicator::Create(MPI_Comm parent,
                                                                   const Options& options) {
  MOE_RETURN_IF_ERROR(ValidateOptions(options));
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return FailedPrecondition("MpiCommunicator: MPI_Init has not been called");
  MPI_Comm data = MPI_COMM_NULL;
  MPI_Comm control = MPI_COMM_NULL;
  MOE_RETURN_IF_ERROR(MpiCall(MPI_Comm_dup(parent, &data), "MPI_Comm_dup"));
  MpiCommHandle data_handle(data);
  MOE_RETURN_IF_ERROR(MpiCall(MPI_Comm_dup(parent, &control), "MPI_Comm_dup"));
  MpiCommHandle control_handle(control);
  // Errors come back as codes (turned into Status), never as an MPI abort.
  MPI_Comm_set_errhandler(data, MPI_ERRORS_RETURN);
  MPI_Comm_set_errhandler(control, MPI_ERRORS_RETURN);
  int rank = 0;
  int size = 0;
  MPI_Comm_rank(data, &rank);
  MPI_Comm_size(data, &size);
  // The ranks of this group that share this node's memory (a GPU per rank is picked by them).
  MPI_Comm node = MPI_COMM_NULL;
  MOE_RETURN_IF_ERROR(MpiCall(MPI_Comm_split_type(data, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL,
                                                  &node),
                              "MPI_Comm_split_type (ranks on this node)"));
  int local_rank = 0;
  int local_size = 1;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_size(node, &local_size);
  MPI_Comm_free(&node);
  int* tag_ub = nullptr;
  int found = 0;
  MPI_Comm_get_attr(control, MPI_TAG_UB, &tag_ub, &found);
  const int ub = (found && tag_ub != nullptr) ? *tag_ub : 32767;
  return std::unique_ptr<MpiCommunicator>(
      new MpiCommunicator(std::move(data_handle), std::move(control_handle),
                          {rank, size, local_rank, local_size}, ub, options));
}

MpiCommunicator::MpiCommunicator(MpiCommHandle data, MpiCommHandle control, Ranks ranks,
                                 int tag_ub, const Options& options)
    : Communicator(options),
      data_(std::move(data)),
      control_(std::move(control)),
      rank_(ranks.rank),
      size_(ranks.size),
      local_rank_(ranks.local_rank),
      local_size_(ranks.local_size),
      tag_ub_(tag_ub) {}

MpiCommunicator::~MpiCommunicator() {
  if (aborted()) {
    // Requests that never finished still reference these communicators.
    (void)data_.Release();
    (void)control_.Release();
  }
}

StatusOr<std::unique_ptr<MpiOperation>> MpiCommunicator::Begin(std::string_view name,
                                                               uint64_t seq) {
  auto op = std::make_unique<MpiOperation>();
  op->name = std::string(name);
  op->seq = seq;
  op->token = seq;
  const int tag = static_cast<int>(seq % static_cast<uint64_t>(tag_ub_));
  for (int p = 0; p < size_; ++p) {
    if (p != rank_) op->peers.push_back(p);
  }
  const size_t n = op->peers.size();
  op->arrivals.assign(n, MPI_REQUEST_NULL);
  op->departures.assign(n, MPI_REQUEST_NULL);
  op->arrival_tokens.assign(n, 0);
  op->arrived.assign(n, false);
  for (size_t i = 0; i < n; ++i) {
    MOE_RETURN_IF_ERROR(MpiCall(MPI_Irecv(&op->arrival_tokens[i], 1, MPI_UINT64_T, op->peers[i],
                                          tag, control_.get(), &op->arrivals[i]),
                                op->name + " arrival MPI_Irecv"));
    MOE_RETURN_IF_ERROR(MpiCall(MPI_Isend(&op->token, 1, MPI_UINT64_T, op->peers[i], tag,
                                          control_.get(), &op->departures[i]),
                                op->name + " arrival MPI_Isend"));
  }
  return op;
}

Status MpiCommunicator::StartFailed(std::unique_ptr<MpiOperation> op, int mpi_error) {
  // The handshake is out; the operation cannot be completed consistently any more.
  const Status status = MpiCall(mpi_error, op->name + " #" + std::to_string(op->seq) + " start");
  abandoned_.push_back(std::move(op));
  return Abort(status);
}

Status MpiCommunicator::Finish(std::unique_ptr<MpiOperation> owned) {
  MpiOperation& op = *owned;
  using Clock = std::chrono::steady_clock;
  const auto deadline =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(options().deadline_seconds));
  const size_t n = op.peers.size();
  std::vector<int> completed(n);
  size_t num_arrived = 0;
  bool collective_done = op.collective == MPI_REQUEST_NULL;
  bool departed = n == 0;
  for (int64_t poll = 0;; ++poll) {
    if (!collective_done) {
      int flag = 0;
      const int rc = MPI_Test(&op.collective, &flag, MPI_STATUS_IGNORE);
      if (rc != MPI_SUCCESS) return Abort(MpiCall(rc, op.name + " #" + std::to_string(op.seq)));
      collective_done = flag != 0;
    }
    if (num_arrived < n) {
      int outcount = 0;
      const int rc = MPI_Testsome(static_cast<int>(n), op.arrivals.data(), &outcount,
                                  completed.data(), MPI_STATUSES_IGNORE);
      if (rc != MPI_SUCCESS) return Abort(MpiCall(rc, op.name + " arrival handshake"));
      for (int k = 0; k < outcount && outcount != MPI_UNDEFINED; ++k) {
        op.arrived[static_cast<size_t>(completed[static_cast<size_t>(k)])] = true;
        ++num_arrived;
      }
    }
    if (!departed) {
      int flag = 0;
      const int rc =
          MPI_Testall(static_cast<int>(n), op.departures.data(), &flag, MPI_STATUSES_IGNORE);
      if (rc != MPI_SUCCESS) return Abort(MpiCall(rc, op.name + " arrival handshake"));
      departed = flag != 0;
    }
    if (collective_done && num_arrived == n && departed) break;
    if (Clock::now() >= deadline) {
      std::vector<int> missing;
      for (size_t i = 0; i < n; ++i) {
        if (!op.arrived[i]) missing.push_back(op.peers[i]);
      }
      if (missing.empty() && !collective_done) {
        // Everyone arrived but the data did not all move: a peer stalled mid-transfer. Peers that
        // already announced their next operation on this communicator finished this one; name
        // the others (the stalled rank is among them).
        const int next_tag = static_cast<int>((op.seq + 1) % static_cast<uint64_t>(tag_ub_));
        for (int p : op.peers) {
          int flag = 0;
          MPI_Iprobe(p, next_tag, control_.get(), &flag, MPI_STATUS_IGNORE);
          if (flag == 0) missing.push_back(p);
        }
      }
      const Status status =
          DeadlineError(op.name, op.seq, missing,
                        num_arrived == n ? "did not complete it (all arrived; they never moved on to the next operation)"
                                         : "did not arrive");
      abandoned_.push_back(std::move(owned));
      return Abort(status);
    }
    // Spin briefly for latency, then give the core away (ranks are often oversubscribed).
    if (poll > 64) std::this_thread::yield();
  }
  for (size_t i = 0; i < n; ++i) {
    if (op.arrival_tokens[i] != op.seq) {
      return Abort(Internal(op.name + " #" + std::to_string(op.seq) + " on rank " +
                            std::to_string(rank_) + ": rank " + std::to_string(op.peers[i]) +
                            " was at operation #" + std::to_string(op.arrival_tokens[i]) +
                            "; collectives must be called in the same order on every rank"));
    }
  }
  return Status::Ok();
}

Status MpiCommunicator::DoAllToAll(uint64_t seq, const void* send, void* recv, int64_t count,
                                   DataType dtype) {
  MOE_ASSIGN_OR_RETURN(const int n, ToInt("alltoall", "count", count));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MpiOperation> op, Begin("alltoall", seq));
  const int rc =
      MPI_Ialltoall(send, n, MpiDatatype(dtype), recv, n, MpiDatatype(dtype), data_.get(), &op->collective);
  if (rc != MPI_SUCCESS) return StartFailed(std::move(op), rc);
  return Finish(std::move(op));
}

StatusOr<std::unique_ptr<Request>> MpiCommunicator::DoStartAllToAllV(uint64_t seq,
                                                                     const AllToAllVArgs& a) {
  auto op = std::make_unique<MpiOperation>();
  MOE_RETURN_IF_ERROR(ToInts("alltoallv", "send_counts", a.send_counts, op->send_counts));
  MOE_RETURN_IF_ERROR(ToInts("alltoallv", "send_displs", a.send_displs, op->send_displs));
  MOE_RETURN_IF_ERROR(ToInts("alltoallv", "recv_counts", a.recv_counts, op->recv_counts));
  MOE_RETURN_IF_ERROR(ToInts("alltoallv", "recv_displs", a.recv_displs, op->recv_displs));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MpiOperation> started, Begin("alltoallv", seq));
  started->send_counts = std::move(op->send_counts);
  started->send_displs = std::move(op->send_displs);
  started->recv_counts = std::move(op->recv_counts);
  started->recv_displs = std::move(op->recv_displs);
  const int rc = MPI_Ialltoallv(a.send, started->send_counts.data(), started->send_displs.data(),
                                MpiDatatype(a.dtype), a.recv, started->recv_counts.data(),
                                started->recv_displs.data(), MpiDatatype(a.dtype), data_.get(),
                                &started->collective);
  if (rc != MPI_SUCCESS) return StartFailed(std::move(started), rc);
  return std::unique_ptr<Request>(std::make_unique<MpiRequest>(this, std::move(started)));
}

Status MpiCommunicator::DoAllReduce(uint64_t seq, const void* send, void* recv, int64_t count,
                                    DataType dtype, ReduceOp reduce) {
  MOE_ASSIGN_OR_RETURN(const int n, ToInt("allreduce", "count", count));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MpiOperation> op, Begin("allreduce", seq));
  const void* in = send == recv ? MPI_IN_PLACE : send;
  const int rc =
      MPI_Iallreduce(in, recv, n, MpiDatatype(dtype), ToMpi(reduce), data_.get(), &op->collective);
  if (rc != MPI_SUCCESS) return StartFailed(std::move(op), rc);
  return Finish(std::move(op));
}

Status MpiCommunicator::DoAllGather(uint64_t seq, const void* send, void* recv, int64_t count,
                                    DataType dtype) {
  MOE_ASSIGN_OR_RETURN(const int n, ToInt("allgather", "count", count));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MpiOperation> op, Begin("allgather", seq));
  const int rc =
      MPI_Iallgather(send, n, MpiDatatype(dtype), recv, n, MpiDatatype(dtype), data_.get(), &op->collective);
  if (rc != MPI_SUCCESS) return StartFailed(std::move(op), rc);
  return Finish(std::move(op));
}

Status MpiCommunicator::DoBroadcast(uint64_t seq, void* buffer, int64_t count, DataType dtype,
                                    int root) {
  MOE_ASSIGN_OR_RETURN(const int n, ToInt("broadcast", "count", count));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MpiOperation> op, Begin("broadcast", seq));
  const int rc = MPI_Ibcast(buffer, n, MpiDatatype(dtype), root, data_.get(), &op->collective);
  if (rc != MPI_SUCCESS) return StartFailed(std::move(op), rc);
  return Finish(std::move(op));
}

Status MpiCommunicator::DoBarrier(uint64_t seq) {
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MpiOperation> op, Begin("barrier", seq));
  const int rc = MPI_Ibarrier(data_.get(), &op->collective);
  if (rc != MPI_SUCCESS) return StartFailed(std::move(op), rc);
  return Finish(std::move(op));
}

StatusOr<std::unique_ptr<Communicator>> MpiCommunicator::DoSplit(uint64_t seq, int color, int key) {
  // A barrier under the deadline first: afterwards every rank is known to be in this split, so
  // the blocking MPI_Comm_split below completes.
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MpiOperation> op, Begin("split", seq));
  const int rc = MPI_Ibarrier(data_.get(), &op->collective);
  if (rc != MPI_SUCCESS) return StartFailed(std::move(op), rc);
  MOE_RETURN_IF_ERROR(Finish(std::move(op)));
  MPI_Comm split = MPI_COMM_NULL;
  const int mpi_color = color == kNoColor ? MPI_UNDEFINED : color;
  const Status made =
      MpiCall(MPI_Comm_split(data_.get(), mpi_color, key, &split), "MPI_Comm_split");
  if (!made.ok()) return Abort(made);
  if (split == MPI_COMM_NULL) return std::unique_ptr<Communicator>();
  MpiCommHandle owned(split);
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MpiCommunicator> child, Create(split, options()));
  return std::unique_ptr<Communicator>(std::move(child));
}

namespace {

// A shared-memory window: each rank's part (header + buffer) allocated by MPI on the node, every
// part mapped into every rank's address space (MPI_Win_shared_query). Loads and stores go straight
// to memory inside one passive epoch (lock_all at creation); the fences' atomics order them, and
// MPI_Win_sync makes them visible in MPI's memory model as well.
class MpiSymmetric final : public CountedSymmetricBuffer {
 public:
  MpiSymmetric(Communicator* comm, std::vector<MPI_Win>* retired, MPI_Win win, int64_t bytes,
               std::vector<void*> peers, int64_t board_words, std::vector<int64_t*> boards,
               std::vector<uint64_t*> headers)
      : CountedSymmetricBuffer(comm, bytes, MemorySpace::kHost, std::move(peers), board_words,
                               std::move(boards), std::move(headers)),
        retired_(retired),
        win_(win) {}
  // Freeing is collective: the communicator frees the window at its next allocation.
  ~MpiSymmetric() override { retired_->push_back(win_); }

 private:
  void SyncMemory() override { MPI_Win_sync(win_); }

  std::vector<MPI_Win>* const retired_;
  const MPI_Win win_;
};

}  // namespace

StatusOr<std::unique_ptr<SymmetricBuffer>> MpiCommunicator::DoAllocateSymmetric(
    uint64_t /*seq*/, int64_t bytes, int64_t board_words) {
  // The window calls below block inside MPI until every rank calls them; the base class's
  // all-reduce just now showed every rank arrived, so they cannot wait for a missing one. Every
  // rank has retired the same windows before it (program order): free them first.
  for (MPI_Win& retired : retired_windows_) {
    MPI_Win_unlock_all(retired);
    MOE_RETURN_IF_ERROR(MpiCall(MPI_Win_free(&retired), "MPI_Win_free"));
  }
  retired_windows_.clear();
  // Open MPI starts a rank's part 8-byte aligned (a segment header before it, at the same offset in
  // every process's mapping): 64 bytes more, and each part used from its first cache line.
  const int64_t part = SymmetricStride(bytes, board_words);
  MOE_ASSIGN_OR_RETURN(const int part_bytes, ToInt("symmetric", "bytes", part + 64));
  MPI_Info info = MPI_INFO_NULL;
  MPI_Info_create(&info);
  MPI_Info_set(info, "alloc_shared_noncontig", "true");  // each rank's part page-aligned, local
  void* base = nullptr;
  MPI_Win win = MPI_WIN_NULL;
  const int code = MPI_Win_allocate_shared(part_bytes, 1, info, data_.get(), &base, &win);
  MPI_Info_free(&info);
  MOE_RETURN_IF_ERROR(MpiCall(code, "MPI_Win_allocate_shared"));
  MPI_Win_set_errhandler(win, MPI_ERRORS_RETURN);
  std::vector<void*> peers;
  std::vector<int64_t*> boards;
  std::vector<uint64_t*> headers;
  for (int r = 0; r < size_; ++r) {
    MPI_Aint size = 0;
    int disp = 0;
    void* at = nullptr;
    MOE_RETURN_IF_ERROR(MpiCall(MPI_Win_shared_query(win, r, &size, &disp, &at),
                                "MPI_Win_shared_query"));
    const int64_t skip = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(at) % 64) % 64);
    if (static_cast<int64_t>(size) < skip + part) {
      return Internal("symmetric: rank " + std::to_string(r) + "'s part of the shared window is " +
                      std::to_string(static_cast<int64_t>(size)) + " bytes, less than the " +
                      std::to_string(skip + part) + " it needs");
    }
    char* first_line = static_cast<char*>(at) + skip;
    headers.push_back(reinterpret_cast<uint64_t*>(first_line));
    boards.push_back(reinterpret_cast<int64_t*>(first_line + kSymmetricHeaderBytes));
    peers.push_back(first_line + SymmetricDataOffset(board_words));
  }
  (void)base;
  std::memset(headers[static_cast<size_t>(rank_)], 0, static_cast<size_t>(part));
  MOE_RETURN_IF_ERROR(MpiCall(MPI_Win_lock_all(MPI_MODE_NOCHECK, win), "MPI_Win_lock_all"));
  MPI_Win_sync(win);
  // Every rank's part is zero before any rank writes into it.
  MOE_RETURN_IF_ERROR(Barrier());
  return std::unique_ptr<SymmetricBuffer>(
      std::make_unique<MpiSymmetric>(this, &retired_windows_, win, bytes, std::move(peers),
                                     board_words, std::move(boards), std::move(headers)));
}

}  // namespace moe::comm
