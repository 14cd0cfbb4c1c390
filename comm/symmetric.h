// Symmetric buffers: the same number of bytes on every rank of a communicator whose ranks share
// memory, each rank able to load and store into every other rank's buffer directly (DeepEP's
// intranode buffers and NCCL's symmetric memory on GPUs; MPI-3 shared-memory windows between
// processes of one node; plain memory between ranks that are threads of one process).
//
//   auto buf = comm.AllocateSymmetric(bytes, /*board_words=*/2);  // collective, same sizes everywhere
//   memcpy(static_cast<char*>((*buf)->peer(p)) + offset, row, n);   // write into rank p's buffer
//   (*buf)->board()[0] = rows;                                       // publish a word of this rank's
//   (*buf)->Fence();                                     // every rank's writes are now visible
//   ... read (*buf)->local(), (*buf)->board(q)[0] ...
//
// Memory: peer(r) is in memory_space(). Host memory is loaded and stored by the host; device memory
// (the CUDA device's buffers: NCCL symmetric memory, or one cudaMalloc shared by the threads of the
// in-process backend) only by device copies and kernels, and a rank's device work writing into the
// buffers must be complete (its stream synchronized) before its Signal. The board is a few int64
// words per rank in host memory whatever memory_space() is: what ranks publish to each other to
// steer their writes (counts, displacements, flags). A rank writes only its own words (board()),
// between a Wait and its next Signal; rank q's words (board(q)) are read between this rank's Wait
// and its next Signal and are then those q wrote before its Signal of the same fence.
//
// Ordering: Fence() is a barrier with release / acquire semantics over every buffer of the group:
// every store a rank made into any rank's buffer or its board before its Fence happens-before every
// load any rank makes after its own Fence returns. Signal() + Wait() are the two halves of a Fence (a
// rank may compute between them). In memory every rank sees (host backends) each rank signals by
// raising its own counter to the fence's number and a fence completes when every rank's counter
// reached it; on NCCL a fence is an all-gather of the ranks' boards on the communicator. A rank that
// does not signal makes the others fail at the communicator's deadline, naming it:
//   "symmetric fence #3 deadline 2.0 s exceeded on rank 0: ranks [2] did not signal"
// (NCCL: the all-gather's deadline error) and the communicator is aborted as by any missed
// deadline: every later call of the buffer or the communicator fails at once.
//
// Lifetime: destroying a buffer never waits. Between threads (loopback) the ranks' buffers share
// one allocation, freed with the last of them. An MPI window or NCCL window is retired by the
// destructor and freed (a collective call) inside the communicator's next AllocateSymmetric, whose
// size all-reduce has shown that every rank is past the same destruction (ranks destroy and
// allocate their buffers in the same order, as for any collective); retired windows of a
// communicator that allocates no more are left to its destruction (MPI: MPI_Finalize). So a rank's
// memory is never freed while a peer may still write into it, and a dead peer never holds up the
// others' clean-up.
// A buffer must not outlive its communicator; one thread per rank uses it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/memory.h"
#include "base/status.h"

namespace moe::comm {

class Communicator;

class SymmetricBuffer {
 public:
  virtual ~SymmetricBuffer() = default;
  SymmetricBuffer(const SymmetricBuffer&) = delete;
  SymmetricBuffer& operator=(const SymmetricBuffer&) = delete;

  int rank() const { return rank_; }
  int size() const { return static_cast<int>(peers_.size()); }
  int64_t bytes() const { return bytes_; }
  MemorySpace memory_space() const { return space_; }
  // Rank r's buffer, addressable from this rank (64-byte aligned; zero when allocated).
  void* peer(int r) const { return peers_[static_cast<size_t>(r)]; }
  void* local() const { return peer(rank_); }
  // Host words published with each fence (zero when allocated): this rank's, and rank r's.
  int64_t board_words() const { return board_words_; }
  int64_t* board() const { return boards_[static_cast<size_t>(rank_)]; }
  const int64_t* board(int r) const { return boards_[static_cast<size_t>(r)]; }

  // Publishes this rank's stores and board (release) as fence number `fences() + 1`.
  Status Signal();
  // Waits (acquire) until every rank signalled the fence this rank last signalled.
  Status Wait();
  // Signal, then Wait.
  Status Fence();
  // Fences this rank completed.
  uint64_t fences() const { return completed_; }
  bool failed() const { return !failure_.empty(); }

 protected:
  // `peers[r]`: rank r's buffer in this address space (in `space`); `boards[r]`: rank r's board
  // words as this rank reads them. `comm` (which made the buffer and outlives it) gives the
  // deadline and is aborted when a fence misses it.
  SymmetricBuffer(Communicator* comm, int64_t bytes, MemorySpace space, std::vector<void*> peers,
                  int64_t board_words, std::vector<int64_t*> boards);
  Communicator* comm() const { return comm_; }
  double deadline_seconds() const { return deadline_seconds_; }

  // The fence's two halves, by backend: publish this rank's stores and board as fence `fence`;
  // wait until every rank published `fence`, making theirs visible (a deadline error names the
  // ranks that did not).
  virtual Status Arrive(uint64_t fence) = 0;
  virtual Status Await(uint64_t fence) = 0;

 private:
  Communicator* const comm_;
  const int rank_;
  const int64_t bytes_;
  const MemorySpace space_;
  const std::vector<void*> peers_;
  const int64_t board_words_;
  const std::vector<int64_t*> boards_;
  const double deadline_seconds_;
  uint64_t signalled_ = 0, completed_ = 0;
  std::string failure_;
};

// Fences through counters in host memory that every rank loads and stores (threads of a process,
// processes sharing a window): each rank's 64-byte header, whose first word is its counter.
class CountedSymmetricBuffer : public SymmetricBuffer {
 protected:
  CountedSymmetricBuffer(Communicator* comm, int64_t bytes, MemorySpace space,
                         std::vector<void*> peers, int64_t board_words,
                         std::vector<int64_t*> boards, std::vector<uint64_t*> headers);
  // Makes this rank's stores visible / peers' stores visible beyond what C++ atomics order (the
  // MPI backend's MPI_Win_sync); nothing by default.
  virtual void SyncMemory() {}

 private:
  Status Arrive(uint64_t fence) final;
  Status Await(uint64_t fence) final;
  // Waits until headers_[r][0] >= target for every rank r; the ranks that did not reach it by the
  // deadline are left in `missing`.
  bool WaitFor(uint64_t target, std::vector<int>* missing) const;

  const std::vector<uint64_t*> headers_;
};

// Host memory of one rank's part of a symmetric allocation (host backends): a 64-byte header, the
// board words rounded up to 64 bytes, then the buffer rounded up to 64 bytes (every part starts on
// a cache line). The board starts at kSymmetricHeaderBytes; SymmetricDataOffset: where the buffer
// starts.
inline constexpr int64_t kSymmetricHeaderBytes = 64;
inline int64_t RoundUp64(int64_t bytes) { return (bytes + 63) / 64 * 64; }
inline int64_t SymmetricDataOffset(int64_t board_words) {
  return kSymmetricHeaderBytes + RoundUp64(board_words * 8);
}
inline int64_t SymmetricStride(int64_t bytes, int64_t board_words) {
  return SymmetricDataOffset(board_words) + RoundUp64(bytes);
}

}  // namespace moe::comm
