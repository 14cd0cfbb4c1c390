// Symmetric buffers' fences (comm/symmetric.h).
#include "comm/symmetric.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <utility>

#include "comm/communicator.h"

namespace moe::comm {
namespace {

// A rank's fence counter: the first word of its header.
std::atomic_ref<uint64_t> Counter(uint64_t* header) { return std::atomic_ref<uint64_t>(*header); }

}  // namespace

SymmetricBuffer::SymmetricBuffer(Communicator* comm, int64_t bytes, MemorySpace space,
                                 std::vector<void*> peers, int64_t board_words,
                                 std::vector<int64_t*> boards)
    : comm_(comm),
      rank_(comm->rank()),
      bytes_(bytes),
      space_(space),
      peers_(std::move(peers)),
      board_words_(board_words),
      boards_(std::move(boards)),
      deadline_seconds_(comm->options().deadline_seconds) {}

Status SymmetricBuffer::Signal() {
  if (!failed() && comm_->aborted()) {
    failure_ = "its communicator was aborted earlier (" + comm_->abort_reason() + ")";
  }
  if (failed()) return Aborted("symmetric fence on rank " + std::to_string(rank_) + ": " + failure_);
  if (signalled_ != completed_) {
    return FailedPrecondition("symmetric fence #" + std::to_string(signalled_) + " on rank " +
                              std::to_string(rank_) + ": Signal called again before its Wait");
  }
  const Status arrived = Arrive(signalled_ + 1);
  if (!arrived.ok()) {
    failure_ = arrived.message();
    return comm_->Abort(arrived);
  }
  ++signalled_;
  return Status::Ok();
}

Status SymmetricBuffer::Wait() {
  if (failed()) return Aborted("symmetric fence on rank " + std::to_string(rank_) + ": " + failure_);
  if (signalled_ == completed_) {
    return FailedPrecondition("symmetric fence on rank " + std::to_string(rank_) +
                              ": Wait called without a Signal before it");
  }
  const Status awaited = Await(signalled_);
  if (!awaited.ok()) {
    failure_ = awaited.message();
    return comm_->Abort(awaited);
  }
  completed_ = signalled_;
  return Status::Ok();
}

Status SymmetricBuffer::Fence() {
  MOE_RETURN_IF_ERROR(Signal());
  return Wait();
}

CountedSymmetricBuffer::CountedSymmetricBuffer(Communicator* comm, int64_t bytes,
                                               MemorySpace space, std::vector<void*> peers,
                                               int64_t board_words, std::vector<int64_t*> boards,
                                               std::vector<uint64_t*> headers)
    : SymmetricBuffer(comm, bytes, space, std::move(peers), board_words, std::move(boards)),
      headers_(std::move(headers)) {}

bool CountedSymmetricBuffer::WaitFor(uint64_t target, std::vector<int>* missing) const {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration<double>(deadline_seconds());
  for (int64_t spins = 0;; ++spins) {
    bool all = true;
    for (int r = 0; r < size() && all; ++r) {
      all = Counter(headers_[static_cast<size_t>(r)]).load(std::memory_order_acquire) >= target;
    }
    if (all) return true;
    if (Clock::now() > deadline) {
      missing->clear();
      for (int r = 0; r < size(); ++r) {
        if (Counter(headers_[static_cast<size_t>(r)]).load(std::memory_order_acquire) < target) {
          missing->push_back(r);
        }
      }
      return missing->empty();  // all arrived at the last moment
    }
    // Ranks may outnumber cores (tests oversubscribe): give the core away, then sleep a little.
    if (spins < 1000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

Status CountedSymmetricBuffer::Arrive(uint64_t fence) {
  SyncMemory();
  Counter(headers_[static_cast<size_t>(rank())]).store(fence, std::memory_order_release);
  return Status::Ok();
}

Status CountedSymmetricBuffer::Await(uint64_t fence) {
  std::vector<int> missing;
  if (!WaitFor(fence, &missing)) {
    char deadline[32];
    std::snprintf(deadline, sizeof(deadline), "%.1f", deadline_seconds());
    return DeadlineExceeded("symmetric fence #" + std::to_string(fence) + " deadline " + deadline +
                            " s exceeded on rank " + std::to_string(rank()) + ": ranks " +
                            FormatRanks(missing) + " did not signal");
  }
  SyncMemory();
  return Status::Ok();
}

}  // namespace moe::comm
