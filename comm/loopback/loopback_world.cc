// LoopbackWorld: N loopback ranks and running them as threads (comm/loopback/loopback_world.h).
#include "comm/loopback/loopback_world.h"

#include <string>
#include <thread>

#include "comm/loopback/loopback_communicator.h"
#include "base/memory.h"

namespace moe::comm {

StatusOr<LoopbackWorld> LoopbackWorld::Create(int size, const LoopbackOptions& options) {
  if (size < 1) return InvalidArgument("loopback: size=" + std::to_string(size) + " must be >= 1");
  MOE_RETURN_IF_ERROR(ValidateOptions(options.options));
  if (options.memory == MemorySpace::kDevice && CudaDeviceCount() == 0) {
    return FailedPrecondition(
        "loopback: device memory needs a CUDA build and a GPU; cudaGetDeviceCount found none");
  }
  auto group = std::make_shared<LoopbackGroup>(size, options.memory);
  LoopbackWorld world;
  for (int r = 0; r < size; ++r) {
    world.ranks_.push_back(std::make_unique<LoopbackCommunicator>(group, r, options.options));
  }
  return world;
}

void LoopbackWorld::RunPerRank(const std::function<void(Communicator&)>& fn) {
  std::vector<std::thread> threads;
  threads.reserve(ranks_.size());
  for (auto& comm : ranks_) threads.emplace_back([&fn, &comm] { fn(*comm); });
  for (auto& t : threads) t.join();
}

}  // namespace moe::comm
