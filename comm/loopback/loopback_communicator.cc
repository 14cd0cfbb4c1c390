// The loopback backend: one rank of an in-process world (comm/loopback/loopback_communicator.h).
#include "comm/loopback/loopback_communicator.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "comm/host_reduce.h"

namespace moe::comm {
namespace {

const char* Bytes(const void* p) { return static_cast<const char*>(p); }
char* Bytes(void* p) { return static_cast<char*>(p); }

// Async request of the loopback backend: the post is done; Wait completes it.
class LoopbackRequest final : public Request {
 public:
  LoopbackRequest(LoopbackCommunicator* comm, uint64_t seq, std::string op)
      : comm_(comm), seq_(seq), op_(std::move(op)) {}
  ~LoopbackRequest() override {
    if (!waited_) (void)Wait();
  }
  Status Wait() override {
    if (waited_) return FailedPrecondition(op_ + " #" + std::to_string(seq_) + ": waited twice");
    waited_ = true;
    if (completed_) return std::move(result_);
    return comm_->Complete(seq_, op_);
  }
  // The data moves on the host: complete the operation now, so work queued on `stream` afterwards
  // sees it; Wait() then reports the result.
  Status Then(StreamHandle stream) override {
    if (comm_->memory_space() != MemorySpace::kDevice) return Request::Then(stream);
    if (waited_ || completed_) {
      return FailedPrecondition(op_ + " #" + std::to_string(seq_) + ": Then after completion");
    }
    completed_ = true;
    result_ = comm_->Complete(seq_, op_);
    return result_;
  }

 private:
  LoopbackCommunicator* const comm_;
  const uint64_t seq_;
  const std::string op_;
  bool waited_ = false;
  bool completed_ = false;  // by Then
  Status result_;
};

std::string Mismatch(const std::string& op, uint64_t seq, int rank, const std::string& what) {
  return op + " #" + std::to_string(seq) + " on rank " + std::to_string(rank) + ": " + what;
}

// Every rank's header, board and buffer in one allocation, shared by the ranks' SymmetricBuffers
// (threads of one process): it is freed with the last of them, so no rank frees memory a peer still
// writes. In device memory the buffers are one device allocation beside it (zeroed).
struct SharedBlock {
  SharedBlock(int ranks, int64_t bytes, int64_t board_words, MemorySpace space)
      : space(space),
        stride(SymmetricStride(space == MemorySpace::kHost ? bytes : 0, board_words)),
        device_stride(RoundUp64(bytes)),
        base(static_cast<char*>(std::aligned_alloc(64, static_cast<size_t>(ranks * stride)))) {
    if (base != nullptr) std::memset(base, 0, static_cast<size_t>(ranks * stride));
  }
  ~SharedBlock() { std::free(base); }
  SharedBlock(const SharedBlock&) = delete;
  SharedBlock& operator=(const SharedBlock&) = delete;

  // Rank r's header, board and buffer.
  char* part(int r) const { return base + r * stride; }
  void* buffer(int r, int64_t board_words) const {
    return space == MemorySpace::kHost ? part(r) + SymmetricDataOffset(board_words)
                                       : device.as<char>() + r * device_stride;
  }

  const MemorySpace space;
  const int64_t stride, device_stride;
  char* const base;
  Buffer device;  // device memory: every rank's buffer
};

class InProcessSymmetric final : public CountedSymmetricBuffer {
 public:
  InProcessSymmetric(Communicator* comm, std::shared_ptr<SharedBlock> block, int64_t bytes,
                     int64_t board_words)
      : CountedSymmetricBuffer(comm, bytes, block->space, Buffers(*block, comm->size(), board_words),
                               board_words, Boards(*block, comm->size()),
                               Headers(*block, comm->size())),
        block_(std::move(block)) {}

 private:
  static std::vector<void*> Buffers(const SharedBlock& block, int size, int64_t board_words) {
    std::vector<void*> buffers;
    for (int r = 0; r < size; ++r) buffers.push_back(block.buffer(r, board_words));
    return buffers;
  }
  static std::vector<int64_t*> Boards(const SharedBlock& block, int size) {
    std::vector<int64_t*> boards;
    for (int r = 0; r < size; ++r) {
      boards.push_back(reinterpret_cast<int64_t*>(block.part(r) + kSymmetricHeaderBytes));
    }
    return boards;
  }
  static std::vector<uint64_t*> Headers(const SharedBlock& block, int size) {
    std::vector<uint64_t*> headers;
    for (int r = 0; r < size; ++r) headers.push_back(reinterpret_cast<uint64_t*>(block.part(r)));
    return headers;
  }

  const std::shared_ptr<SharedBlock> block_;
};

// Rank 0's block: the host parts, and in device memory the zeroed device buffers.
StatusOr<std::shared_ptr<SharedBlock>> MakeSharedBlock(int ranks, int64_t bytes,
                                                       int64_t board_words, MemorySpace space) {
  auto block = std::make_shared<SharedBlock>(ranks, bytes, board_words, space);
  if (block->base == nullptr) {
    return Internal("symmetric: allocating " + std::to_string(ranks * block->stride) +
                    " bytes of host memory failed");
  }
  if (space == MemorySpace::kDevice) {
    const int64_t device_bytes = std::max<int64_t>(ranks * block->device_stride, 64);
    const std::vector<char> zeros(static_cast<size_t>(device_bytes), 0);
    MOE_ASSIGN_OR_RETURN(block->device, Buffer::FromHost(space, zeros.data(), device_bytes));
  }
  return block;
}

}  // namespace

Status LoopbackCommunicator::FailPeers(const std::string& op, uint64_t seq,
                                       const LoopbackWait& wait) {
  return Abort(Aborted(op + " #" + std::to_string(seq) + " on rank " + std::to_string(rank_) +
                       ": ranks " + FormatRanks(wait.ranks) +
                       " gave up (deadline or abort), so it can never complete"));
}

Status LoopbackCommunicator::PostOrFail(uint64_t seq, LoopbackPost post) {
  const std::string op = post.op;
  const LoopbackWait posted = group_->Post(seq, rank_, std::move(post));
  if (!posted.ok) return FailPeers(op, seq, posted);
  return Status::Ok();
}

Status LoopbackCommunicator::Run(uint64_t seq, LoopbackPost post) {
  const std::string op = post.op;
  MOE_RETURN_IF_ERROR(PostOrFail(seq, std::move(post)));
  return Complete(seq, op);
}

Status LoopbackCommunicator::Complete(uint64_t seq, const std::string& op) {
  const auto deadline =
      LoopbackGroup::Clock::now() + std::chrono::duration_cast<LoopbackGroup::Clock::duration>(
                                        std::chrono::duration<double>(options().deadline_seconds));
  const std::vector<LoopbackPost>* posts = nullptr;
  const LoopbackWait arrival = group_->AwaitArrival(seq, rank_, deadline, &posts);
  if (!arrival.ok) {
    if (arrival.peer_aborted) return FailPeers(op, seq, arrival);
    return Abort(DeadlineError(op, seq, arrival.ranks));
  }
  const Status moved = Move(seq, *posts);
  const LoopbackWait departure = group_->Depart(seq, rank_, deadline);
  if (!departure.ok) return Abort(DeadlineError(op, seq, departure.ranks, "did not complete"));
  if (moved.ok() && reduce_target_ != nullptr) {
    MOE_RETURN_IF_ERROR(
        CopyFromHost(memory_space(), reduce_target_, reduce_result_, reduce_bytes_));
  }
  reduce_target_ = nullptr;
  return moved;
}

Status LoopbackCommunicator::Move(uint64_t seq, const std::vector<LoopbackPost>& posts) {
  const LoopbackPost& mine = posts[static_cast<size_t>(rank_)];
  for (int p = 0; p < size(); ++p) {
    const LoopbackPost& peer = posts[static_cast<size_t>(p)];
    if (peer.op != mine.op) {
      return InvalidArgument(Mismatch(mine.op, seq, rank_,
                                      "rank " + std::to_string(p) + " called " + peer.op +
                                          " as the same operation; collectives must be called "
                                          "in the same order on every rank"));
    }
    if (peer.dtype != mine.dtype) {
      return InvalidArgument(Mismatch(mine.op, seq, rank_,
                                      "rank " + std::to_string(p) + " uses dtype " +
                                          DataTypeName(peer.dtype) + ", this rank " +
                                          DataTypeName(mine.dtype)));
    }
  }
  const std::string& op = mine.op;
  if (op == "alltoall") return MoveAllToAll(posts);
  if (op == "alltoallv") return MoveAllToAllV(posts);
  if (op == "allgather") return MoveAllGather(posts);
  if (op == "broadcast") return MoveBroadcast(posts);
  if (op == "allreduce") {
    MOE_RETURN_IF_ERROR(ReduceToHost(posts));
    if (memory_space() == MemorySpace::kDevice) reduce_target_ = mine.recv;
    return Status::Ok();
  }
  if (op == "split") {
    if (mine.color == kNoColor) return Status::Ok();
    std::vector<std::pair<int, int>> members;  // (key, old rank)
    for (int p = 0; p < size(); ++p) {
      if (posts[static_cast<size_t>(p)].color == mine.color) {
        members.emplace_back(posts[static_cast<size_t>(p)].key, p);
      }
    }
    std::sort(members.begin(), members.end());
    const auto me = std::find(members.begin(), members.end(), std::make_pair(mine.key, rank_));
    const int new_rank = static_cast<int>(me - members.begin());
    split_result_ = std::make_unique<LoopbackCommunicator>(
        group_->SplitGroup(seq, mine.color, static_cast<int>(members.size())), new_rank, options());
    return Status::Ok();
  }
  return Status::Ok();  // barrier: arrival is all it needs
}

Status LoopbackCommunicator::MoveAllToAll(const std::vector<LoopbackPost>& posts) {
  const LoopbackPost& mine = posts[static_cast<size_t>(rank_)];
  const int64_t block = mine.count * DataTypeSize(mine.dtype);
  for (int p = 0; p < size(); ++p) {
    const LoopbackPost& peer = posts[static_cast<size_t>(p)];
    if (peer.count != mine.count) {
      return InvalidArgument("alltoall on rank " + std::to_string(rank_) +
                             ": count=" + std::to_string(mine.count) + " but rank " +
                             std::to_string(p) + " passed count=" + std::to_string(peer.count));
    }
    MOE_RETURN_IF_ERROR(CopyBytes(memory_space(), Bytes(mine.recv) + p * block,
                                  Bytes(peer.send) + rank_ * block, block));
  }
  return Status::Ok();
}

Status LoopbackCommunicator::MoveAllToAllV(const std::vector<LoopbackPost>& posts) {
  const LoopbackPost& mine = posts[static_cast<size_t>(rank_)];
  const int64_t es = DataTypeSize(mine.dtype);
  const auto r = static_cast<size_t>(rank_);
  for (int p = 0; p < size(); ++p) {
    const LoopbackPost& peer = posts[static_cast<size_t>(p)];
    const auto pi = static_cast<size_t>(p);
    if (peer.send_counts[r] != mine.recv_counts[pi]) {
      return InvalidArgument("alltoallv on rank " + std::to_string(rank_) + ": recv_counts[" +
                             std::to_string(p) + "]=" + std::to_string(mine.recv_counts[pi]) +
                             " but rank " + std::to_string(p) + " sends " +
                             std::to_string(peer.send_counts[r]) + " elements");
    }
    MOE_RETURN_IF_ERROR(CopyBytes(memory_space(), Bytes(mine.recv) + mine.recv_displs[pi] * es,
                                  Bytes(peer.send) + peer.send_displs[r] * es,
                                  mine.recv_counts[pi] * es));
  }
  return Status::Ok();
}

Status LoopbackCommunicator::MoveAllGather(const std::vector<LoopbackPost>& posts) {
  const LoopbackPost& mine = posts[static_cast<size_t>(rank_)];
  const int64_t block = mine.count * DataTypeSize(mine.dtype);
  for (int p = 0; p < size(); ++p) {
    const LoopbackPost& peer = posts[static_cast<size_t>(p)];
    if (peer.count != mine.count) {
      return InvalidArgument("allgather on rank " + std::to_string(rank_) +
                             ": count=" + std::to_string(mine.count) + " but rank " +
                             std::to_string(p) + " passed count=" + std::to_string(peer.count));
    }
    MOE_RETURN_IF_ERROR(CopyBytes(memory_space(), Bytes(mine.recv) + p * block, peer.send, block));
  }
  return Status::Ok();
}

Status LoopbackCommunicator::MoveBroadcast(const std::vector<LoopbackPost>& posts) {
  const LoopbackPost& mine = posts[static_cast<size_t>(rank_)];
  const LoopbackPost& root = posts[static_cast<size_t>(mine.root)];
  if (root.root != mine.root || root.count != mine.count) {
    return InvalidArgument(
        "broadcast on rank " + std::to_string(rank_) + ": root=" + std::to_string(mine.root) +
        " count=" + std::to_string(mine.count) + " but rank " + std::to_string(mine.root) +
        " passed root=" + std::to_string(root.root) + " count=" + std::to_string(root.count));
  }
  if (mine.root == rank_) return Status::Ok();
  return CopyBytes(memory_space(), mine.recv, root.recv, mine.count * DataTypeSize(mine.dtype));
}

Status LoopbackCommunicator::ReduceToHost(const std::vector<LoopbackPost>& posts) {
  const LoopbackPost& mine = posts[static_cast<size_t>(rank_)];
  const int64_t bytes = mine.count * DataTypeSize(mine.dtype);
  for (int p = 0; p < size(); ++p) {
    const LoopbackPost& peer = posts[static_cast<size_t>(p)];
    if (peer.count != mine.count || peer.reduce != mine.reduce) {
      return InvalidArgument(
          "allreduce on rank " + std::to_string(rank_) + ": count=" + std::to_string(mine.count) +
          " op=" + ReduceOpName(mine.reduce) + " but rank " + std::to_string(p) +
          " passed count=" + std::to_string(peer.count) + " op=" + ReduceOpName(peer.reduce));
    }
  }
  if (memory_space() == MemorySpace::kHost) {
    // Rank r reduces slice r of the elements (over every rank's input, in rank order) and writes
    // it into every rank's output: each slice is read and written by one rank only, so in-place
    // buffers are safe, and the world does W·count work instead of W²·count. The outputs are
    // complete once every rank has departed.
    const int64_t es = DataTypeSize(mine.dtype), w = size();
    const int64_t lo = mine.count * rank_ / w, n = mine.count * (rank_ + 1) / w - lo;
    if (n == 0) return Status::Ok();
    MOE_ASSIGN_OR_RETURN(void* const acc, reduce_acc_.Get(n * es));
    std::memcpy(acc, Bytes(posts[0].send) + lo * es, static_cast<size_t>(n * es));
    for (int p = 1; p < size(); ++p) {
      HostReduceInto(acc, Bytes(posts[static_cast<size_t>(p)].send) + lo * es, n, mine.dtype,
                     mine.reduce);
    }
    for (const LoopbackPost& peer : posts) {
      std::memcpy(Bytes(peer.recv) + lo * es, acc, static_cast<size_t>(n * es));
    }
    return Status::Ok();
  }
  // Device memory: every rank reduces everything in rank order, staged on the host (the same
  // bits on every rank), and copies the result to its output after departing.
  MOE_ASSIGN_OR_RETURN(void* const acc, reduce_acc_.Get(bytes));
  MOE_RETURN_IF_ERROR(CopyToHost(memory_space(), acc, posts[0].send, bytes));
  for (int p = 1; p < size(); ++p) {
    const void* in = posts[static_cast<size_t>(p)].send;
    if (memory_space() == MemorySpace::kDevice) {
      MOE_ASSIGN_OR_RETURN(void* const staged, reduce_staging_.Get(bytes));
      MOE_RETURN_IF_ERROR(CopyToHost(memory_space(), staged, in, bytes));
      in = staged;
    }
    HostReduceInto(acc, in, mine.count, mine.dtype, mine.reduce);
  }
  reduce_result_ = acc;
  reduce_bytes_ = bytes;
  return Status::Ok();
}

Status LoopbackCommunicator::DoAllToAll(uint64_t seq, const void* send, void* recv, int64_t count,
                                        DataType dtype) {
  LoopbackPost post{.op = "alltoall", .send = send, .recv = recv, .count = count, .dtype = dtype};
  return Run(seq, std::move(post));
}

StatusOr<std::unique_ptr<Request>> LoopbackCommunicator::DoStartAllToAllV(
    uint64_t seq, const AllToAllVArgs& args) {
  // Peers copy from this rank's send buffer once every rank has posted: the work that fills it
  // must be done by then.
  if (args.after != nullptr) MOE_RETURN_IF_ERROR(SynchronizeStream(args.after));
  LoopbackPost post{.op = "alltoallv", .send = args.send, .recv = args.recv, .dtype = args.dtype};
  post.send_counts.assign(args.send_counts.begin(), args.send_counts.end());
  post.send_displs.assign(args.send_displs.begin(), args.send_displs.end());
  post.recv_counts.assign(args.recv_counts.begin(), args.recv_counts.end());
  post.recv_displs.assign(args.recv_displs.begin(), args.recv_displs.end());
  MOE_RETURN_IF_ERROR(PostOrFail(seq, std::move(post)));
  return std::unique_ptr<Request>(std::make_unique<LoopbackRequest>(this, seq, "alltoallv"));
}

Status LoopbackCommunicator::DoAllReduce(uint64_t seq, const void* send, void* recv, int64_t count,
                                         DataType dtype, ReduceOp op) {
  LoopbackPost post{
      .op = "allreduce", .send = send, .recv = recv, .count = count, .dtype = dtype, .reduce = op};
  return Run(seq, std::move(post));
}

Status LoopbackCommunicator::DoAllGather(uint64_t seq, const void* send, void* recv, int64_t count,
                                         DataType dtype) {
  LoopbackPost post{.op = "allgather", .send = send, .recv = recv, .count = count, .dtype = dtype};
  return Run(seq, std::move(post));
}

Status LoopbackCommunicator::DoBroadcast(uint64_t seq, void* buffer, int64_t count, DataType dtype,
                                         int root) {
  LoopbackPost post{
      .op = "broadcast", .recv = buffer, .count = count, .dtype = dtype, .root = root};
  return Run(seq, std::move(post));
}

Status LoopbackCommunicator::DoBarrier(uint64_t seq) {
  return Run(seq, LoopbackPost{.op = "barrier"});
}

StatusOr<std::unique_ptr<Communicator>> LoopbackCommunicator::DoSplit(uint64_t seq, int color,
                                                                      int key) {
  MOE_RETURN_IF_ERROR(Run(seq, LoopbackPost{.op = "split", .color = color, .key = key}));
  return std::move(split_result_);
}

StatusOr<std::unique_ptr<SymmetricBuffer>> LoopbackCommunicator::DoAllocateSymmetric(
    uint64_t /*seq*/, int64_t bytes, int64_t board_words) {
  // Rank 0 allocates and broadcasts the address of its reference (0 if it failed); every rank
  // copies the reference, and a barrier keeps rank 0's alive until then (if the barrier fails it is
  // left, not freed).
  std::shared_ptr<SharedBlock>* held = nullptr;
  Status made;
  if (rank_ == 0) {
    StatusOr<std::shared_ptr<SharedBlock>> block =
        MakeSharedBlock(size(), bytes, board_words, memory_space());
    if (block.ok()) {
      held = new std::shared_ptr<SharedBlock>(std::move(*block));
    } else {
      made = block.status();
    }
  }
  int64_t address = static_cast<int64_t>(reinterpret_cast<uintptr_t>(held));
  MOE_RETURN_IF_ERROR(BroadcastWords(&address, 1, 0));
  MOE_RETURN_IF_ERROR(made);
  if (address == 0) return Internal("symmetric: rank 0 could not allocate the buffers");
  std::shared_ptr<SharedBlock> block =
      *reinterpret_cast<std::shared_ptr<SharedBlock>*>(static_cast<uintptr_t>(address));
  const Status copied = Barrier();
  if (rank_ == 0 && copied.ok()) delete held;
  MOE_RETURN_IF_ERROR(copied);
  return std::unique_ptr<SymmetricBuffer>(
      std::make_unique<InProcessSymmetric>(this, std::move(block), bytes, board_words));
}

}  // namespace moe::comm
