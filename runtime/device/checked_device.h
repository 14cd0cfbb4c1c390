// CheckedDevice: the host device run as a stand-in for a GPU, so that a CPU test fails where a GPU
// would race (docs/ARCHITECTURE.md "The checked host device"):
//  - memory: host memory handed out as device memory — memory_space() is kDevice, so the layer
//    stages, uploads, downloads and keeps its gradients on the device as it does on a GPU; fresh
//    and freed allocations are poisoned (0xFF bytes: NaN floats, -1 integers);
//  - work: every operation is deferred onto a stream — the compute stream, or the communication
//    stream of a CheckedCommunicator — and runs, in stream order, only when the host waits for it
//    (Synchronize, Download, a request's Wait, a blocking collective) or when an operation that
//    runs needs it;
//  - order: events are the only order between the streams (an all-to-all's `after`, Request::Then)
//    besides the host's waits; every operation declares the byte ranges it reads and writes, and
//    an access that no stream order, event or host wait orders after a conflicting earlier one —
//    a free too: it is ordered on the compute stream, as the CUDA device's cudaFreeAsync, so it
//    conflicts with work of another stream not ordered before it — fails with an error naming both
//    operations ("checked device: GatherRows (operation 14, compute stream) reads
//    1536 bytes that alltoallv #1 (operation 12, communication stream) writes, with no stream
//    order, event or host wait between them");
//  - allocation: none while a communication operation is in flight (on a GPU an allocation may
//    wait for the whole device, and cudaMalloc next to NCCL kernels can hang): the error names the
//    allocation and the exchange. The experts take device memory as the GPU's grouped FFN does
//    (growing at Forward and Backward unless ExpertCompute::Reserve sized them).
// The operations themselves are the host device's (HostDevice, CpuExpertCompute,
// StagedHostRouting): results are the host layer's bit for bit when the layer orders its work.
// One thread per device (a rank); not for production.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/memory.h"
#include "base/status.h"
#include "comm/communicator.h"
#include "runtime/device/device.h"
#include "runtime/device/host_device.h"

namespace moe {

class CheckedDevice final : public Device {
 public:
  enum StreamId { kCompute = 0, kComm = 1 };
  static constexpr int kStreams = 2;
  using Clock = std::array<uint64_t, kStreams>;
  // A byte range an operation reads or writes.
  struct Access {
    const void* begin;
    int64_t bytes;
    bool write;
  };

  CheckedDevice();
  ~CheckedDevice() override;

  std::string_view name() const override { return "checked-host"; }
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  MemoryResource* memory() override;
  StreamHandle stream() const override { return const_cast<CheckedDevice*>(this); }

  Status Upload(void* dst, const void* host_src, int64_t bytes) override;
  Status Download(void* host_dst, const void* src, int64_t bytes) override;
  Status Copy(void* dst, const void* src, int64_t bytes) override;
  Status Zero(void* dst, int64_t bytes) override;
  Status Synchronize() override;

  Status Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float* a, const float* b, float beta, float* c) override;
  Status GatherRows(const RowGather& g) override;
  Status CombineRows(const RowCombine& c) override;
  Status GateGradients(const GateGradient& g) override;
  Status Cast(CastKind kind, const void* src, void* dst, int64_t count) override;

  StatusOr<std::unique_ptr<ExpertCompute>> MakeExperts(const experts::FfnShape& shape,
                                                       int count) override;
  StatusOr<std::unique_ptr<LayerRouting>> MakeRouting(const config::LayerConfig& layer,
                                                      bool host_plan) override;

  Status BeginTiming() override { return Status::Ok(); }
  Status EndTiming() override { return Status::Ok(); }
  StatusOr<double> TakeTimedSeconds() override { return 0.0; }

  // ---- The scheduler, for the components built on it (experts, communicator) ----
  // Defers `run` onto `stream` after checking `accesses` against every access the host has not
  // waited for; returns the operation's id.
  StatusOr<uint64_t> Enqueue(StreamId stream, std::string name, std::vector<Access> accesses,
                             std::function<Status()> run);
  // The position of `stream` now (an event recorded there), and `stream` waiting for one.
  Clock RecordEvent(StreamId stream) const { return clocks_[stream]; }
  // The event right after operation `id`.
  Clock EventAfter(uint64_t id) const;
  void WaitEvent(StreamId stream, const Clock& event);
  // The host runs everything up to operation `id` and knows it complete; its status.
  Status WaitFor(uint64_t id);
  // The host runs everything queued on `stream`.
  Status Flush(StreamId stream);
  // The host reads or writes `accesses` directly (a blocking collective on device buffers):
  // fails unless every conflicting access is one the host waited for.
  Status HostAccess(std::string_view name, const std::vector<Access>& accesses);

 private:
  struct Op;
  class Memory;
  Status RunUntil(int stream, uint64_t position);
  Status Check(const Op& op) const;
  void Prune();
  // The allocation holding p: its end (for arrays whose extent only the allocation bounds).
  const char* AllocationEnd(const void* p) const;
  Access ToEnd(const void* p) const;
  // Fails (sticky) while a communication operation is in flight.
  Status CheckAllocation(int64_t bytes);
  void OnFree(void* p, int64_t bytes);
  std::string Describe(const Op& op) const;

  HostDevice cpu_;  // the operations themselves
  std::unique_ptr<Memory> memory_;
  std::map<const char*, int64_t> allocations_;  // live allocations: begin -> bytes
  std::vector<std::pair<void*, int64_t>> kept_;  // freed under queued work: never released
  std::map<void*, int64_t> pending_frees_;        // frees queued, not yet run
  std::array<std::deque<std::shared_ptr<Op>>, kStreams> queues_;
  std::vector<std::shared_ptr<Op>> live_;  // operations the host has not waited for
  std::map<uint64_t, std::shared_ptr<Op>> ops_;  // by id, until the host waited for them
  std::array<Clock, kStreams> clocks_{};
  Clock host_{};
  uint64_t next_id_ = 1;
  Status failed_;  // sticky: the first failure (an operation's, or a bad free)
};

// A communicator over `inner` (host memory; one rank of a world) for a rank whose layer runs on
// `device`: it reports device memory; a stream-ordered all-to-all (StartAllToAllV with `after` =
// the device's stream) is an operation on the device's communication stream that waits for the
// compute stream's work queued before it, reads its send rows and writes its receive rows when it
// runs; Request::Then makes the compute stream wait for it; Wait runs it. Blocking calls run the
// communication stream's queued work first (in issue order, as NCCL's stream would) and check
// their device buffers as host accesses. Deadlines are the inner communicator's. Symmetric
// buffers are the inner communicator's, reported as device memory; a fence's signal fails unless
// the host waited for every operation that reads or writes any rank's buffer (on a GPU the peers
// would go on while this rank's stream still works on them).
// `drop_then` (a test's planted bug): the Then of the drop_then-th stream-ordered all-to-all
// (1-based; 0: none) is ignored — one missing event wait.
std::unique_ptr<comm::Communicator> MakeCheckedCommunicator(CheckedDevice* device,
                                                            comm::Communicator* inner,
                                                            int drop_then = 0);

}  // namespace moe
