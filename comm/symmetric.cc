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

std::atomic_ref<uint64_t> Slot(uint64_t* header, int slot) { return std::atomic_ref<uint64_t>(header[slot]); }

}  // namespace

int64_t SymmetricStride(int64_t bytes) {
  return kSymmetricHeaderBytes + (bytes + 63) / 64 * 64;
}

SymmetricBuffer::SymmetricBuffer(Communicator* comm, int64_t bytes, std::vector<void*> peers,
                                 std::vector<uint64_t*> headers)
    : comm_(comm),
      rank_(comm->rank()),
      bytes_(bytes),
      peers_(std::move(peers)),
      headers_(std::move(headers)),
      deadline_seconds_(comm->options().deadline_seconds) {}

bool SymmetricBuffer::WaitFor(int slot, uint64_t target, std::vector<int>* missing) const {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration<double>(deadline_seconds_);
  for (int64_t spins = 0;; ++spins) {
    bool all = true;
    for (int r = 0; r < size() && all; ++r) {
      all = Slot(headers_[static_cast<size_t>(r)], slot).load(std::memory_order_acquire) >= target;
    }
    if (all) return true;
    if (Clock::now() > deadline) {
      missing->clear();
      for (int r = 0; r < size(); ++r) {
        if (Slot(headers_[static_cast<size_t>(r)], slot).load(std::memory_order_acquire) < target) {
          missing->push_back(r);
        }
      }
      if (missing->empty()) return true;  // they arrived at the last moment
      return false;
    }
    // Ranks may outnumber cores (tests oversubscribe): give the core away, then sleep a little.
    if (spins < 1000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

Status SymmetricBuffer::Signal() {
  if (!failed() && comm_->aborted()) {
    failure_ = "its communicator was aborted earlier (" + comm_->abort_reason() + ")";
  }
  if (failed()) return Aborted("symmetric fence on rank " + std::to_string(rank_) + ": " + failure_);
  if (signalled_ != completed_) {
    return FailedPrecondition("symmetric fence #" + std::to_string(signalled_) + " on rank " +
                              std::to_string(rank_) + ": Signal called again before its Wait");
  }
  SyncMemory();
  ++signalled_;
  Slot(headers_[static_cast<size_t>(rank_)], 0).store(signalled_, std::memory_order_release);
  return Status::Ok();
}

Status SymmetricBuffer::Wait() {
  if (failed()) return Aborted("symmetric fence on rank " + std::to_string(rank_) + ": " + failure_);
  if (signalled_ == completed_) {
    return FailedPrecondition("symmetric fence on rank " + std::to_string(rank_) +
                              ": Wait called without a Signal before it");
  }
  std::vector<int> missing;
  if (!WaitFor(0, signalled_, &missing)) {
    char deadline[32];
    std::snprintf(deadline, sizeof(deadline), "%.1f", deadline_seconds_);
    failure_ = "symmetric fence #" + std::to_string(signalled_) + " deadline " + deadline +
               " s exceeded on rank " + std::to_string(rank_) + ": ranks " + FormatRanks(missing) +
               " did not signal";
    return comm_->Abort(DeadlineExceeded(failure_));
  }
  SyncMemory();
  completed_ = signalled_;
  return Status::Ok();
}

Status SymmetricBuffer::Fence() {
  MOE_RETURN_IF_ERROR(Signal());
  return Wait();
}

}  // namespace moe::comm
