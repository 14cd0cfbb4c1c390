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
// after which the buffer is unusable (every later call fails at once).
//
// Lifetime: destroying a buffer is collective — it waits (bounded by the deadline) until every
// rank reached its destructor, since peers may still write into this rank's memory; where a rank
// never comes, the memory is left allocated rather than freed under a writer.
// A buffer must not outlive its communicator; one thread per rank uses it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace moe::comm {

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
  // memory every rank sees — [0] its signal counter, [1] its departure flag. `deadline_seconds`
  // bounds every wait.
  SymmetricBuffer(int rank, int64_t bytes, std::vector<void*> peers, std::vector<uint64_t*> headers,
                  double deadline_seconds);
  // Collective departure (see Lifetime above): true when every rank arrived in time (false at
  // once when this buffer failed: its peers may never come).
  bool Depart();
  // Makes this rank's stores visible / peers' stores visible beyond what C++ atomics order (the
  // MPI backend's MPI_Win_sync); nothing by default.
  virtual void SyncMemory() {}

 private:
  // Waits until headers_[r][slot] >= target for every rank r; the ranks that did not reach it
  // by the deadline are left in `missing`.
  bool WaitFor(int slot, uint64_t target, std::vector<int>* missing) const;

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
