// Internal to the loopback backend: one rank of a LoopbackGroup. Create through LoopbackWorld.
#pragma once

#include <memory>
#include <string_view>

#include "comm/communicator.h"
#include "comm/loopback/loopback_group.h"
#include "base/memory.h"

namespace moe::comm {

class LoopbackCommunicator final : public Communicator {
 public:
  LoopbackCommunicator(std::shared_ptr<LoopbackGroup> group, int rank, Options options)
      : Communicator(options), group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  MemorySpace memory_space() const override { return group_->memory(); }
  std::string_view backend() const override { return "loopback"; }

  // Completes posted operation `seq` from the Wait of its request (see loopback_world.h).
  Status Complete(uint64_t seq, const std::string& op);

 protected:
  Status DoAllToAll(uint64_t seq, const void* send, void* recv, int64_t count,
                    DataType dtype) override;
  StatusOr<std::unique_ptr<Request>> DoStartAllToAllV(uint64_t seq,
                                                      const AllToAllVArgs& args) override;
  Status DoAllReduce(uint64_t seq, const void* send, void* recv, int64_t count, DataType dtype,
                     ReduceOp op) override;
  Status DoAllGather(uint64_t seq, const void* send, void* recv, int64_t count,
                     DataType dtype) override;
  Status DoBroadcast(uint64_t seq, void* buffer, int64_t count, DataType dtype, int root) override;
  Status DoBarrier(uint64_t seq) override;
  StatusOr<std::unique_ptr<Communicator>> DoSplit(uint64_t seq, int color, int key) override;
  // Host memory: one allocation for every rank, shared by their buffers.
  StatusOr<std::unique_ptr<SymmetricBuffer>> DoAllocateSymmetric(
      uint64_t seq, int64_t bytes, int64_t board_words) override;

 private:
  Status PostOrFail(uint64_t seq, LoopbackPost post);
  // Post + Complete.
  Status Run(uint64_t seq, LoopbackPost post);
  // The data movement of one operation, between arrival and departure.
  Status Move(uint64_t seq, const std::vector<LoopbackPost>& posts);
  Status MoveAllToAll(const std::vector<LoopbackPost>& posts);
  Status MoveAllToAllV(const std::vector<LoopbackPost>& posts);
  Status MoveAllGather(const std::vector<LoopbackPost>& posts);
  Status MoveBroadcast(const std::vector<LoopbackPost>& posts);
  // allreduce. Host memory: this rank's slice of the elements, reduced over every rank's input
  // and written into every rank's output. Device memory: everything, into reduce_result_ (host).
  Status ReduceToHost(const std::vector<LoopbackPost>& posts);
  Status FailPeers(const std::string& op, uint64_t seq, const LoopbackWait& wait);

  const std::shared_ptr<LoopbackGroup> group_;
  const int rank_;
  std::unique_ptr<Communicator> split_result_;  // handed out by DoSplit
  // allreduce: the reduced slice (host memory), or in device memory the whole result staged on
  // the host by Move and copied to reduce_target_ after departure (the target may be this rank's
  // input, which peers read until then).
  Workspace reduce_acc_, reduce_staging_;
  void* reduce_result_ = nullptr;
  int64_t reduce_bytes_ = 0;
  void* reduce_target_ = nullptr;
};

}  // namespace moe::comm
