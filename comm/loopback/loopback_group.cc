// The loopback world's shared rendezvous (comm/loopback/loopback_group.h).
#include "comm/loopback/loopback_group.h"

#include <chrono>
#include <thread>
#include <utility>

namespace moe::comm {
namespace {

// Before sleeping on the condition variable, re-check `ready` for a short while, yielding the core
// between checks: a condition-variable wake-up costs tens of microseconds, more than most
// rendezvous take when every rank is running.
template <typename Ready>
bool SpinBriefly(std::unique_lock<std::mutex>& lock, LoopbackGroup::Clock::time_point deadline,
                 Ready&& ready) {
  const auto until = std::min(deadline, LoopbackGroup::Clock::now() + std::chrono::microseconds(200));
  while (!ready()) {
    if (LoopbackGroup::Clock::now() >= until) return false;
    lock.unlock();
    std::this_thread::yield();
    lock.lock();
  }
  return true;
}

}  // namespace

LoopbackGroup::Slot& LoopbackGroup::SlotFor(uint64_t seq) {
  auto [it, inserted] = slots_.try_emplace(seq);
  Slot& slot = it->second;
  if (inserted) {
    slot.posts.resize(static_cast<size_t>(size_));
    slot.posted.assign(static_cast<size_t>(size_), false);
    slot.done.assign(static_cast<size_t>(size_), false);
    slot.abandoned.assign(static_cast<size_t>(size_), false);
  }
  return slot;
}

void LoopbackGroup::Leave(uint64_t seq, Slot& slot, int rank, bool abandon) {
  if (abandon) {
    if (!slot.abandoned[static_cast<size_t>(rank)]) ++slot.num_abandoned;
    slot.abandoned[static_cast<size_t>(rank)] = true;
    if (!aborted_[static_cast<size_t>(rank)]) ++num_aborted_;
    aborted_[static_cast<size_t>(rank)] = true;
  }
  if (++slot.num_left == size_) slots_.erase(seq);
  if (abandon) cv_.notify_all();  // waiters fail fast on aborted ranks
}

LoopbackWait LoopbackGroup::Post(uint64_t seq, int rank, LoopbackPost post) {
  std::lock_guard<std::mutex> lock(mu_);
  Slot& slot = SlotFor(seq);
  LoopbackWait result;
  for (int p = 0; p < size_ && slot.num_abandoned > 0; ++p) {
    if (slot.abandoned[static_cast<size_t>(p)]) result.ranks.push_back(p);
  }
  if (!result.ranks.empty()) {
    result.peer_aborted = true;
    Leave(seq, slot, rank, /*abandon=*/true);
    return result;
  }
  slot.posts[static_cast<size_t>(rank)] = std::move(post);
  slot.posted[static_cast<size_t>(rank)] = true;
  // Wake the waiters only when it matters to them (a thundering herd costs a lot on few cores).
  if (++slot.num_posted == size_) cv_.notify_all();
  result.ok = true;
  return result;
}

LoopbackWait LoopbackGroup::AwaitArrival(uint64_t seq, int rank, Clock::time_point deadline,
                                         const std::vector<LoopbackPost>** posts) {
  std::unique_lock<std::mutex> lock(mu_);
  Slot& slot = slots_.at(seq);
  LoopbackWait result;
  // Ready when all posted; fails fast when a rank that has not posted is aborted (it never will)
  // or when everyone posted but someone already gave up on this operation. While a rank is merely
  // missing, keep waiting: the deadline error then names the ranks that did not arrive.
  const auto ready_or_failed = [&] {
    // No rank gave up anywhere (the common case): a counter decides, no scan over the ranks.
    if (num_aborted_ == 0 && slot.num_abandoned == 0) return slot.num_posted == size_;
    result.ranks.clear();
    const bool all_posted = slot.num_posted == size_;
    for (int p = 0; p < size_; ++p) {
      const auto pi = static_cast<size_t>(p);
      const bool gave_up = (all_posted && slot.abandoned[pi]) || (!slot.posted[pi] && aborted_[pi]);
      if (gave_up) result.ranks.push_back(p);
    }
    if (!result.ranks.empty()) {
      result.peer_aborted = true;
      return true;
    }
    return slot.num_posted == size_;
  };
  const bool woke =
      SpinBriefly(lock, deadline, ready_or_failed) || cv_.wait_until(lock, deadline, ready_or_failed);
  if (woke && !result.peer_aborted) {
    *posts = &slot.posts;
    result.ok = true;
    return result;
  }
  if (!woke) {
    result.ranks.clear();
    for (int p = 0; p < size_; ++p) {
      if (!slot.posted[static_cast<size_t>(p)]) result.ranks.push_back(p);
    }
  }
  Leave(seq, slot, rank, /*abandon=*/true);
  return result;
}

LoopbackWait LoopbackGroup::Depart(uint64_t seq, int rank, Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  Slot& slot = slots_.at(seq);
  slot.done[static_cast<size_t>(rank)] = true;
  if (++slot.num_done == size_) cv_.notify_all();
  LoopbackWait result;
  const auto all_done = [&] { return slot.num_done == size_; };
  result.ok = SpinBriefly(lock, deadline, all_done) || cv_.wait_until(lock, deadline, all_done);
  if (!result.ok) {
    for (int p = 0; p < size_; ++p) {
      if (!slot.done[static_cast<size_t>(p)]) result.ranks.push_back(p);
    }
  }
  Leave(seq, slot, rank, /*abandon=*/!result.ok);
  return result;
}

std::shared_ptr<LoopbackGroup> LoopbackGroup::SplitGroup(uint64_t seq, int color, int members) {
  std::lock_guard<std::mutex> lock(mu_);
  std::shared_ptr<LoopbackGroup>& group = slots_.at(seq).split_groups[color];
  if (group == nullptr) group = std::make_shared<LoopbackGroup>(members, memory_);
  return group;
}

}  // namespace moe::comm
