// Loopback backend: N ranks as threads in one process.
//
// A LoopbackWorld creates N communicators that share one rendezvous object; run each on its own
// thread (RunPerRank does that). Buffers are host memory (memcpy) or, in a CUDA build, device
// memory of the current device (cudaMemcpy device-to-device), chosen at creation, so one GPU can
// hold a simulated multi-rank world. Split works as on any backend.
//
// Data movement is "pull": every rank posts its buffers, waits until all ranks posted
// (arrival), copies what it receives straight out of the peers' buffers, then waits until every
// rank finished copying (departure) so no buffer is released while a peer still reads it.
// Deadlines: both waits use a condition variable with the call's deadline. Ranks that did not
// arrive are those that had not posted the operation when this rank's deadline expired. A rank
// whose deadline expired is recorded as aborted in the shared group, so a late peer that reaches
// the same operation (or any rank that waits on an aborted one) fails at once with kAborted
// instead of waiting for its own deadline.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "base/status.h"

namespace moe::comm {

struct LoopbackOptions {
  MemorySpace memory = MemorySpace::kHost;  // kDevice needs CUDA and a GPU
  Options options;
};

class LoopbackWorld {
 public:
  // kInvalidArgument for size < 1 or bad options; kFailedPrecondition for device memory without
  // a GPU.
  static StatusOr<LoopbackWorld> Create(int size, const LoopbackOptions& options);

  int size() const { return static_cast<int>(ranks_.size()); }
  // The communicator of rank r (0 <= r < size()); use each from one thread at a time.
  Communicator& rank(int r) { return *ranks_.at(static_cast<size_t>(r)); }

  // Runs fn(rank(r)) on size() threads, one per rank, and joins them.
  void RunPerRank(const std::function<void(Communicator&)>& fn);

 private:
  std::vector<std::unique_ptr<Communicator>> ranks_;
};

}  // namespace moe::comm
