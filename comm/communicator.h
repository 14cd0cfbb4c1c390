// The Communicator contract: collective operations over a fixed group of ranks.
//
// One abstract interface, three backends:
//   backend    | buffers live in          | created by
//   -----------+--------------------------+------------------------------------------------
//   MPI        | host memory              | comm/mpi/mpi_communicator.h (under mpirun)
//   NCCL       | device memory (CUDA)     | comm/nccl/nccl_communicator.h (id over a bootstrap)
//   loopback   | host or device, chosen   | comm/loopback/loopback_world.h (ranks as threads)
// `memory_space()` reports where every buffer passed to this communicator must live; base/memory.h
// allocates and copies in a given space.
//
// Semantics shared by all backends:
// - Every rank of the group calls the same collectives in the same order (as in MPI). Each call
//   gets a sequence number (#1, #2, ...) per communicator; error messages name it.
// - Counts and displacements are in elements of `dtype`, never bytes. Displacements are offsets
//   from the buffer start. Send and receive regions must not overlap, except AllReduce, which
//   accepts send == recv (in place).
// - Blocking calls return when this rank's part is complete: its receive buffer holds the result
//   and its send buffer may be reused.
// - Asynchronous all-to-all(v) (StartAllToAllV) returns a Request; the buffers belong to the
//   communicator until Request::Wait() returns. This is the hook to overlap communication with
//   compute: start the exchange, compute, then Wait. On NCCL the operation is ordered on the
//   communicator's CUDA stream (NcclCommunicator::stream()), so device work queued after it on
//   that stream also sees its result without a host wait. MPI makes progress mostly inside MPI
//   calls, so on MPI the overlap is best-effort.
// - Deadlines: every blocking call (and Request::Wait) gives up after Options::deadline_seconds.
//   It then returns kDeadlineExceeded with a message naming the operation, its sequence number,
//   this rank and the ranks that did not arrive, e.g.
//     "alltoallv #17 deadline 2.0 s exceeded on rank 0: ranks [3] did not arrive"
//   and the communicator is aborted: every later call fails at once with kAborted. It never
//   hangs. How "did not arrive" is known differs per backend (see each backend's header).
// - Errors are Status values. User errors (negative counts, wrong vector lengths, null buffers
//   with nonzero counts, bad roots) are kInvalidArgument with a message naming the argument.
// - A Communicator is used by one thread at a time (one thread per rank).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "base/memory.h"
#include "base/status.h"
#include "comm/symmetric.h"

namespace moe::comm {

enum class DataType { kFloat32, kFloat64, kInt32, kInt64, kUint8 };
enum class ReduceOp { kSum, kMax, kMin };

// Bytes per element.
int64_t DataTypeSize(DataType dtype);
// "float32", "float64", "int32", "int64", "uint8".
const char* DataTypeName(DataType dtype);
// Accepts the names above (and "bytes" for uint8); kInvalidArgument otherwise.
StatusOr<DataType> ParseDataType(std::string_view name);
const char* ReduceOpName(ReduceOp op);

struct Options {
  // Upper bound on the wall time of every blocking call, in seconds (> 0).
  double deadline_seconds = 300.0;
};

// Validates options in one place ("deadline_seconds=0 must be > 0").
Status ValidateOptions(const Options& options);

// Handle to an asynchronous operation. Wait() blocks until the operation completes on this rank
// or its deadline (counted from the Wait call) expires; it returns the operation's status and may
// be called once. Destroying a Request that was not waited for waits for it (errors are dropped).
// A Request must not outlive its communicator. Requests of one communicator may be outstanding
// together; other collectives may be called meanwhile (all ranks in the same order).
//
// Stream ordering (device memory): StartAllToAllV's `after` stream makes the operation
// start only after the work queued on that stream before the call, and Then(stream) makes its
// completion a dependency of a stream, so a kernel that fills the send buffer, the all-to-all and
// the kernel that reads the receive buffer need no host synchronization between them. NCCL does
// both with events on the device (the host goes on); the loopback backend, which moves the data
// on the host, waits for `after` before it posts and completes the operation inside Then. Host
// memory communicators (MPI, loopback on the host) take neither: kInvalidArgument.
class Request {
 public:
  virtual ~Request() = default;
  virtual Status Wait() = 0;
  // Makes the completion of this operation a dependency of `stream`: work queued on it after this
  // call sees the result. Wait() must still be called once; it reports the operation's status.
  virtual Status Then(StreamHandle stream);
};

class Communicator {
 public:
  // Color that leaves a rank out of every group in Split (Split then yields nullptr).
  static constexpr int kNoColor = -1;

  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // This rank's index among the group's ranks on its node, and their number: what picks a rank's
  // GPU (compute.gpu = -1). MPI asks the library (MPI_COMM_TYPE_SHARED); ranks that are threads
  // of one process share its node (rank() and size()); an NCCL communicator has its bootstrap's.
  virtual int local_rank() const { return rank(); }
  virtual int local_size() const { return size(); }
  virtual MemorySpace memory_space() const = 0;
  // "mpi", "nccl", "loopback".
  virtual std::string_view backend() const = 0;

  const Options& options() const { return options_; }
  // True after a deadline expired or a backend error made this communicator unusable.
  bool aborted() const { return aborted_; }
  const std::string& abort_reason() const { return abort_reason_; }

  // Equal-count all-to-all: sends `count` elements to every rank (block for rank p at
  // send + p·count) and receives `count` from every rank (block from p at recv + p·count).
  Status AllToAll(const void* send, void* recv, int64_t count, DataType dtype);

  // Per-peer counts and displacements; every span has size() entries. send_counts[p] on this rank
  // must equal recv_counts[this rank] on rank p.
  Status AllToAllV(const void* send, std::span<const int64_t> send_counts,
                   std::span<const int64_t> send_displs, void* recv,
                   std::span<const int64_t> recv_counts, std::span<const int64_t> recv_displs,
                   DataType dtype);

  // Asynchronous AllToAllV. The spans are copied; the buffers must stay valid and untouched until
  // Wait() returns. `after` (device memory only; null: none): the operation starts after the work
  // queued on that CUDA stream before this call (see Request::Then).
  StatusOr<std::unique_ptr<Request>> StartAllToAllV(
      const void* send, std::span<const int64_t> send_counts, std::span<const int64_t> send_displs,
      void* recv, std::span<const int64_t> recv_counts, std::span<const int64_t> recv_displs,
      DataType dtype, StreamHandle after = nullptr);

  // recv[i] = op over ranks of send[i]; send == recv is allowed. Every rank gets the same bits.
  Status AllReduce(const void* send, void* recv, int64_t count, DataType dtype, ReduceOp op);
  // recv (size()·count elements) receives rank p's `count` elements at recv + p·count.
  Status AllGather(const void* send, void* recv, int64_t count, DataType dtype);
  // Copies `count` elements of `root`'s buffer into every rank's buffer.
  Status Broadcast(void* buffer, int64_t count, DataType dtype, int root);
  Status Barrier();
  // AllReduce / Broadcast of int64 words in host memory whatever memory_space() is (device memory:
  // staged through a device buffer), for the small control values collectives agree on.
  Status AllReduceWords(int64_t* words, int64_t count, ReduceOp op);
  Status BroadcastWords(int64_t* words, int64_t count, int root);

  // Collective: a buffer of `bytes` (>= 0) and a board of `board_words` (>= 0) int64 host words,
  // both the same on every rank, on every rank, each rank's addressable by all, with fences
  // (comm/symmetric.h). Needs ranks that share memory: kFailedPrecondition when they span nodes
  // (local_size() < size()). MPI: a shared-memory window (MPI_Win_allocate_shared); loopback: the
  // process's memory (host, or one cudaMalloc for device memory); NCCL: ncclMemAlloc + a symmetric
  // window (NCCL 2.28 or newer; kFailedPrecondition where NCCL's load/store team is not every rank).
  StatusOr<std::unique_ptr<SymmetricBuffer>> AllocateSymmetric(int64_t bytes,
                                                              int64_t board_words = 0);

  // Collective over this communicator: ranks with the same color form a new communicator, ordered
  // by (key, rank). color must be >= 0 or kNoColor (the rank gets nullptr). The new communicator
  // has this one's options and memory space.
  StatusOr<std::unique_ptr<Communicator>> Split(int color, int key);

 protected:
  friend class SymmetricBuffer;  // a missed fence aborts the communicator too
  explicit Communicator(Options options) : options_(options) {}

  // Backend hooks. Arguments are validated, the communicator is not aborted, and `seq` is the
  // operation's sequence number (same on every rank). Count vectors have size() entries.
  struct AllToAllVArgs {
    const void* send;
    std::span<const int64_t> send_counts, send_displs;
    void* recv;
    std::span<const int64_t> recv_counts, recv_displs;
    DataType dtype;
    StreamHandle after = nullptr;  // device memory: start after this stream's queued work
  };
  virtual Status DoAllToAll(uint64_t seq, const void* send, void* recv, int64_t count,
                            DataType dtype) = 0;
  virtual StatusOr<std::unique_ptr<Request>> DoStartAllToAllV(uint64_t seq,
                                                              const AllToAllVArgs& args) = 0;
  virtual Status DoAllReduce(uint64_t seq, const void* send, void* recv, int64_t count,
                             DataType dtype, ReduceOp op) = 0;
  virtual Status DoAllGather(uint64_t seq, const void* send, void* recv, int64_t count,
                             DataType dtype) = 0;
  virtual Status DoBroadcast(uint64_t seq, void* buffer, int64_t count, DataType dtype,
                             int root) = 0;
  virtual Status DoBarrier(uint64_t seq) = 0;
  virtual StatusOr<std::unique_ptr<Communicator>> DoSplit(uint64_t seq, int color, int key) = 0;
  // `bytes` and `board_words` are valid and the same on every rank, the ranks share a node.
  // Default: kUnimplemented naming the backend.
  virtual StatusOr<std::unique_ptr<SymmetricBuffer>> DoAllocateSymmetric(uint64_t seq,
                                                                         int64_t bytes,
                                                                         int64_t board_words);

  // Where AllReduceWords / BroadcastWords stage their host words for the collective: memory of
  // this communicator's space, or null where host words can be passed as they are (host memory;
  // the default for device memory is its DefaultResource).
  virtual MemoryResource* WordStaging() const;

  // Marks the communicator aborted and returns `status` (for `return Abort(DeadlineExceeded(..))`).
  Status Abort(Status status);

  // "alltoallv #17 deadline 2.0 s exceeded on rank 0: ranks [3] did not arrive" (`what` replaces
  // "did not arrive" for later phases of an operation).
  Status DeadlineError(std::string_view op, uint64_t seq, std::span<const int> missing,
                       std::string_view what = "did not arrive") const;
  // "alltoallv #17 deadline 2.0 s exceeded on rank 0".
  std::string DeadlinePrefix(std::string_view op, uint64_t seq) const;

 private:
  // Validates the common preconditions and returns the next sequence number.
  StatusOr<uint64_t> Begin(std::string_view op);

  const Options options_;
  bool aborted_ = false;
  std::string abort_reason_;
  uint64_t next_seq_ = 1;
};

// Makes this rank's communicator in device memory over the ranks of `group`, a host-memory
// communicator that was split from the world with (color, key): NCCL bootstrapped over `group`,
// or the same split of a device-memory loopback world (ranks sharing GPUs). `gpu` is this rank's
// CUDA device. Collective over `group`, or over the world where it splits. comm/world.h makes them;
// code that must not name a backend (the trainer) is handed one.
using DeviceCommunicatorFactory = std::function<StatusOr<std::unique_ptr<Communicator>>(
    Communicator& group, int color, int key, int gpu)>;

// "[0, 3, 5]".
std::string FormatRanks(std::span<const int> ranks);

}  // namespace moe::comm
