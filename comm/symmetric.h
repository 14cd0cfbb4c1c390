// Symmetric buffers: the same number of bytes on every rank of a communicator whose ranks share
// memory, each rank able to load and store into every other rank's buffer directly (DeepEP's
// intranode buffers and NCCL's symmetric memory on GPUs; MPI-3 shared-memory windows between
// processes of one node; plain memory between ranks that are threads of one process).
//
//   auto buf = comm.AllocateSymmetric(bytes);           // collective, same `bytes` on every rank
//   memcpy(static_cast<char*>((*buf)->peer(p)) + offset, row, n);   // write into rank p's buffer
//   (*buf)->Fence();                                     // every rank's writes are now visible
//   ... read (*buf)->local() ...
//
// Ordering: Fence() is a barrier with release / acquire semantics over every buffer of the group:
// every store a rank made into any rank's buffer before its Fence happens-before every load any
// rank makes after its own Fence returns. Signal() + Wait() are the two halves of a Fence (a rank
// may compute between them). Each rank signals by raising its own counter, in shared memory, to
// the fence's number; a fence completes when every rank's counter reached it. A rank that does
// not signal makes the others fail at the communicator's deadline, naming it:
//   "symmetric fence #3 deadline 2.0 s exceeded on rank 0: ranks [2] did not signal"
// and the communicator is aborted as by any missed deadline: every later call of the buffer or the
// communicator fails at once.
//
// Lifetime: destroying a buffer never waits. Between threads (loopback) the ranks' buffers share
// one allocation, freed with the last of them. An MPI window is retired by the destructor and
// freed (a collective call) inside the communicator's next AllocateSymmetric, whose size
// all-reduce has shown that every rank is past the same destruction (ranks destroy and allocate
// their buffers in the same order, as for any collective); retired windows of a communicator that
// allocates no more are left to MPI_Finalize. So a rank's memory is never freed while a peer may
// still write into it, and a dead peer never holds up the others' clean-up.
// A buffer must not outlive its communicator; one thread per rank uses it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

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
  // Rank r's buffer, addressable from this rank (64-byte aligned; zero when allocated).
  void* peer(int r) const { return peers_[static_cast<size_t>(r)]; }
  void* local() const { return peer(rank_); }

  // Publishes this rank's stores (release) as fence number `fences() + 1`.
  Status Signal();
  // Waits (acquire) until every rank signalled the fence this rank last signalled.
  Status Wait();
  // Signal, then Wait.
  Status Fence();
  // Fences this rank completed.
  uint64_t fences() const { return completed_; }
  bool failed() const { return !failure_.empty(); }

 protected:
  // `peers[r]`: rank r's buffer in this address space; `headers[r]`: rank r's 64-byte header, in
  // memory every rank sees, whose first word is its signal counter. `comm` (which made
  // the buffer and outlives it) gives the deadline and is aborted when a fence misses it.
  SymmetricBuffer(Communicator* comm, int64_t bytes, std::vector<void*> peers,
                  std::vector<uint64_t*> headers);
  // Makes this rank's stores visible / peers' stores visible beyond what C++ atomics order (the
  // MPI backend's MPI_Win_sync); nothing by default.
  virtual void SyncMemory() {}

 private:
  // Waits until headers_[r][slot] >= target for every rank r; the ranks that did not reach it
  // by the deadline are left in `missing`.
  bool WaitFor(int slot, uint64_t target, std::vector<int>* missing) const;

  Communicator* const comm_;
  const int rank_;
  const int64_t bytes_;
  const std::vector<void*> peers_;
  const std::vector<uint64_t*> headers_;
  const double deadline_seconds_;
  uint64_t signalled_ = 0, completed_ = 0;
  std::string failure_;
};

// Bytes of one rank's part of a symmetric allocation of `bytes`: a 64-byte header, then the buffer
// rounded up to 64 bytes (every rank's buffer starts on a cache line).
inline constexpr int64_t kSymmetricHeaderBytes = 64;
int64_t SymmetricStride(int64_t bytes);

}  // namespace moe::comm
