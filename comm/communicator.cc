// The Communicator's argument checks, sequence numbers, deadline messages and Split
// (comm/communicator.h).
#include "comm/communicator.h"

#include <algorithm>
#include <cstdio>
#include <tuple>
#include <utility>

#include "comm/validate.h"

namespace moe::comm {

int64_t DataTypeSize(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32:
      return 4;
    case DataType::kFloat64:
      return 8;
    case DataType::kInt32:
      return 4;
    case DataType::kInt64:
      return 8;
    case DataType::kUint8:
      return 1;
  }
  return 0;
}

const char* DataTypeName(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32:
      return "float32";
    case DataType::kFloat64:
      return "float64";
    case DataType::kInt32:
      return "int32";
    case DataType::kInt64:
      return "int64";
    case DataType::kUint8:
      return "uint8";
  }
  return "unknown";
}

StatusOr<DataType> ParseDataType(std::string_view name) {
  for (const DataType d : {DataType::kFloat32, DataType::kFloat64, DataType::kInt32,
                           DataType::kInt64, DataType::kUint8}) {
    if (name == DataTypeName(d)) return d;
  }
  if (name == "bytes" || name == "byte") return DataType::kUint8;
  if (name == "float") return DataType::kFloat32;
  if (name == "double") return DataType::kFloat64;
  return InvalidArgument("dtype '" + std::string(name) +
                         "' is not one of float32, float64, int32, int64, uint8 (bytes)");
}

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "unknown";
}


Status ValidateOptions(const Options& options) {
  if (!(options.deadline_seconds > 0)) {
    return InvalidArgument("deadline_seconds=" + std::to_string(options.deadline_seconds) +
                           " must be > 0");
  }
  return Status::Ok();
}

std::string FormatRanks(std::span<const int> ranks) {
  std::string out = "[";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(ranks[i]);
  }
  return out + "]";
}

Status Communicator::Abort(Status status) {
  if (!aborted_) {
    aborted_ = true;
    abort_reason_ = status.message();
  }
  return status;
}

std::string Communicator::DeadlinePrefix(std::string_view op, uint64_t seq) const {
  char deadline[32];
  std::snprintf(deadline, sizeof(deadline), "%.1f", options_.deadline_seconds);
  return std::string(op) + " #" + std::to_string(seq) + " deadline " + deadline +
         " s exceeded on rank " + std::to_string(rank());
}

Status Communicator::DeadlineError(std::string_view op, uint64_t seq, std::span<const int> missing,
                                   std::string_view what) const {
  std::string msg = DeadlinePrefix(op, seq) + ": ";
  if (missing.empty()) {
    msg += "all ranks arrived but the operation did not complete";
  } else {
    msg += "ranks " + FormatRanks(missing) + " " + std::string(what);
  }
  return DeadlineExceeded(std::move(msg));
}

StatusOr<uint64_t> Communicator::Begin(std::string_view op) {
  if (aborted_) {
    return Aborted(std::string(op) + " on rank " + std::to_string(rank()) +
                   ": communicator was aborted earlier (" + abort_reason_ + ")");
  }
  return next_seq_++;
}

Status Communicator::AllToAll(const void* send, void* recv, int64_t count, DataType dtype) {
  MOE_RETURN_IF_ERROR(ValidateCount("alltoall", "count", count));
  MOE_RETURN_IF_ERROR(ValidateBuffer("alltoall", "send", send, count * size()));
  MOE_RETURN_IF_ERROR(ValidateBuffer("alltoall", "recv", recv, count * size()));
  MOE_ASSIGN_OR_RETURN(const uint64_t seq, Begin("alltoall"));
  return DoAllToAll(seq, send, recv, count, dtype);
}

StatusOr<std::unique_ptr<Request>> Communicator::StartAllToAllV(
    const void* send, std::span<const int64_t> send_counts, std::span<const int64_t> send_displs,
    void* recv, std::span<const int64_t> recv_counts, std::span<const int64_t> recv_displs,
    DataType dtype, StreamHandle after) {
  MOE_RETURN_IF_ERROR(ValidateVector("alltoallv", "send", send, send_counts, send_displs, size()));
  MOE_RETURN_IF_ERROR(ValidateVector("alltoallv", "recv", recv, recv_counts, recv_displs, size()));
  if (after != nullptr && memory_space() != MemorySpace::kDevice) {
    return InvalidArgument("alltoallv: after: stream ordering needs a device-memory communicator "
                           "(this " + std::string(backend()) + " one is in host memory)");
  }
  MOE_ASSIGN_OR_RETURN(const uint64_t seq, Begin("alltoallv"));
  return DoStartAllToAllV(seq, AllToAllVArgs{send, send_counts, send_displs, recv, recv_counts,
                                             recv_displs, dtype, after});
}

Status Request::Then(StreamHandle) {
  return InvalidArgument("Request::Then: stream ordering needs a device-memory communicator");
}

Status Communicator::AllToAllV(const void* send, std::span<const int64_t> send_counts,
                               std::span<const int64_t> send_displs, void* recv,
                               std::span<const int64_t> recv_counts,
                               std::span<const int64_t> recv_displs, DataType dtype) {
  MOE_ASSIGN_OR_RETURN(
      std::unique_ptr<Request> request,
      StartAllToAllV(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype));
  return request->Wait();
}

Status Communicator::AllReduce(const void* send, void* recv, int64_t count, DataType dtype,
                               ReduceOp op) {
  MOE_RETURN_IF_ERROR(ValidateCount("allreduce", "count", count));
  MOE_RETURN_IF_ERROR(ValidateBuffer("allreduce", "send", send, count));
  MOE_RETURN_IF_ERROR(ValidateBuffer("allreduce", "recv", recv, count));
  MOE_ASSIGN_OR_RETURN(const uint64_t seq, Begin("allreduce"));
  return DoAllReduce(seq, send, recv, count, dtype, op);
}

Status Communicator::AllGather(const void* send, void* recv, int64_t count, DataType dtype) {
  MOE_RETURN_IF_ERROR(ValidateCount("allgather", "count", count));
  MOE_RETURN_IF_ERROR(ValidateBuffer("allgather", "send", send, count));
  MOE_RETURN_IF_ERROR(ValidateBuffer("allgather", "recv", recv, count * size()));
  MOE_ASSIGN_OR_RETURN(const uint64_t seq, Begin("allgather"));
  return DoAllGather(seq, send, recv, count, dtype);
}

Status Communicator::Broadcast(void* buffer, int64_t count, DataType dtype, int root) {
  MOE_RETURN_IF_ERROR(ValidateCount("broadcast", "count", count));
  MOE_RETURN_IF_ERROR(ValidateBuffer("broadcast", "buffer", buffer, count));
  if (root < 0 || root >= size()) {
    return InvalidArgument("broadcast: root=" + std::to_string(root) + " must be in [0, " +
                           std::to_string(size()) + ")");
  }
  MOE_ASSIGN_OR_RETURN(const uint64_t seq, Begin("broadcast"));
  return DoBroadcast(seq, buffer, count, dtype, root);
}

Status Communicator::Barrier() {
  MOE_ASSIGN_OR_RETURN(const uint64_t seq, Begin("barrier"));
  return DoBarrier(seq);
}

StatusOr<std::unique_ptr<Communicator>> Communicator::Split(int color, int key) {
  if (color < 0 && color != kNoColor) {
    return InvalidArgument("split: color=" + std::to_string(color) +
                           " must be >= 0 or kNoColor (-1)");
  }
  MOE_ASSIGN_OR_RETURN(const uint64_t seq, Begin("split"));
  return DoSplit(seq, color, key);
}

namespace {

// Runs `collective` on `count` int64 words: in place, or on a copy in `staging`'s memory.
template <typename Collective>
Status OnHostWords(MemoryResource* staging, int64_t* words, int64_t count, Collective collective) {
  if (staging == nullptr) return collective(words);
  const int64_t bytes = std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(int64_t));
  MOE_ASSIGN_OR_RETURN(void* staged, staging->Allocate(bytes));
  Status status = CopyFromHost(staging->space(), staged, words, bytes);
  if (status.ok()) status = collective(staged);
  if (status.ok()) status = CopyToHost(staging->space(), words, staged, bytes);
  staging->Free(staged, bytes);
  return status;
}

}  // namespace

MemoryResource* Communicator::WordStaging() const {
  return memory_space() == MemorySpace::kHost ? nullptr : DefaultResource(memory_space());
}

Status Communicator::AllReduceWords(int64_t* words, int64_t count, ReduceOp op) {
  return OnHostWords(WordStaging(), words, count, [&](void* at) {
    return AllReduce(at, at, count, DataType::kInt64, op);
  });
}

Status Communicator::BroadcastWords(int64_t* words, int64_t count, int root) {
  return OnHostWords(WordStaging(), words, count,
                     [&](void* at) { return Broadcast(at, count, DataType::kInt64, root); });
}

StatusOr<std::unique_ptr<SymmetricBuffer>> Communicator::AllocateSymmetric(int64_t bytes,
                                                                            int64_t board_words) {
  if (bytes < 0) {
    return InvalidArgument("symmetric: bytes=" + std::to_string(bytes) + " must be >= 0");
  }
  if (board_words < 0) {
    return InvalidArgument("symmetric: board_words=" + std::to_string(board_words) +
                           " must be >= 0");
  }
  if (local_size() < size()) {
    return FailedPrecondition("symmetric: the " + std::to_string(size()) + " ranks of this " +
                              std::string(backend()) + " communicator span nodes (" +
                              std::to_string(local_size()) + " share rank " +
                              std::to_string(rank()) + "'s): a symmetric buffer needs ranks that "
                              "share memory (split by node first)");
  }
  // Every rank must ask for the same sizes: one all-reduce of (x, -x) by max for both.
  int64_t range[4] = {bytes, -bytes, board_words, -board_words};
  MOE_RETURN_IF_ERROR(AllReduceWords(range, 4, ReduceOp::kMax));
  for (const auto& [name, value, at] : {std::tuple{"bytes", bytes, 0}, {"board_words", board_words, 2}}) {
    const int64_t most = range[at], least = -range[at + 1];
    if (most != least) {
      return InvalidArgument("symmetric: " + std::string(name) + "=" + std::to_string(value) +
                             " on rank " + std::to_string(rank()) + ", but the ranks ask for " +
                             std::to_string(least) + " to " + std::to_string(most) +
                             ": every rank must pass the same " + name);
    }
  }
  MOE_ASSIGN_OR_RETURN(const uint64_t seq, Begin("symmetric"));
  return DoAllocateSymmetric(seq, bytes, board_words);
}

StatusOr<std::unique_ptr<SymmetricBuffer>> Communicator::DoAllocateSymmetric(uint64_t, int64_t,
                                                                             int64_t) {
  return Unimplemented("symmetric: the " + std::string(backend()) +
                       " backend has no symmetric buffers");
}

}  // namespace moe::comm
