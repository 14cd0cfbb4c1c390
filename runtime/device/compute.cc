// ComputeGpu and ComputePrecision (runtime/device/compute.h).
#include "runtime/device/compute.h"

#include <string>

#include "base/memory.h"

namespace moe {

StatusOr<int> ComputeGpu(const config::ComputeConfig& compute, int rank) {
  const int devices = CudaDeviceCount();
  if (devices == 0) {
    return FailedPrecondition(
        "compute.device=CUDA: no CUDA device is visible to this process (or this build has no "
        "CUDA)");
  }
  const int gpu = compute.gpu() >= 0 ? compute.gpu() : rank % devices;
  if (gpu >= devices) {
    return InvalidArgument("compute.gpu=" + std::to_string(gpu) + " must be < the " +
                           std::to_string(devices) + " visible CUDA device(s)");
  }
  return gpu;
}

experts::cuda::Precision ComputePrecision(const config::ComputeConfig& compute) {
  return compute.expert_precision() == config::BF16 ? experts::cuda::Precision::kBfloat16
                                                    : experts::cuda::Precision::kFloat32;
}

}  // namespace moe
