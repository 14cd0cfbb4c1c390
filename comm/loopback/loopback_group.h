// Internal to the loopback backend: the rendezvous shared by the ranks of one loopback group.
// Operations are keyed by sequence number, so a fast rank may post operation n+1 while a slow one
// still copies out of operation n.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace moe::comm {

// One rank's contribution to one operation.
struct LoopbackPost {
  std::string op;  // "alltoall", "alltoallv", ...
  const void* send = nullptr;
  void* recv = nullptr;
  int64_t count = 0;
  DataType dtype = DataType::kUint8;
  ReduceOp reduce = ReduceOp::kSum;
  int root = 0;
  int color = 0;
  int key = 0;
  std::vector<int64_t> send_counts, send_displs, recv_counts, recv_displs;
};

// Result of a wait: ok, or the ranks it waited for (timed out) or that aborted (peer_aborted).
struct LoopbackWait {
  bool ok = false;
  bool peer_aborted = false;
  std::vector<int> ranks;
};

class LoopbackGroup {
 public:
  using Clock = std::chrono::steady_clock;

  LoopbackGroup(int size, MemorySpace memory) : size_(size), memory_(memory), aborted_(size) {}

  int size() const { return size_; }
  MemorySpace memory() const { return memory_; }

  // Posts `rank`'s part of operation `seq`; never blocks. Fails (peer_aborted) when a peer
  // already gave up on this operation.
  LoopbackWait Post(uint64_t seq, int rank, LoopbackPost post);
  // Waits until every rank posted `seq`. On success `posts` points at all posts, stable until
  // this rank calls Depart. On failure this rank has left the operation and is marked aborted.
  LoopbackWait AwaitArrival(uint64_t seq, int rank, Clock::time_point deadline,
                            const std::vector<LoopbackPost>** posts);
  // Marks `rank` done with `seq` and waits until every rank is done; then leaves it.
  LoopbackWait Depart(uint64_t seq, int rank, Clock::time_point deadline);
  // The group for `color` created by split operation `seq` (made by the first rank that asks).
  std::shared_ptr<LoopbackGroup> SplitGroup(uint64_t seq, int color, int members);

 private:
  struct Slot {
    std::vector<LoopbackPost> posts;
    std::vector<bool> posted, done, abandoned;
    int num_posted = 0;
    int num_done = 0;
    int num_left = 0;
    int num_abandoned = 0;  // ranks with abandoned set
    std::map<int, std::shared_ptr<LoopbackGroup>> split_groups;
  };
  Slot& SlotFor(uint64_t seq);                                   // requires mu_
  void Leave(uint64_t seq, Slot& slot, int rank, bool abandon);  // requires mu_

  const int size_;
  const MemorySpace memory_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<bool> aborted_;  // ranks that gave up on some operation; guarded by mu_
  int num_aborted_ = 0;        // ranks with aborted_ set; guarded by mu_
  std::map<uint64_t, Slot> slots_;
};

}  // namespace moe::comm
