// ComputeGpu and ComputePrecision (runtime/device/compute.h).
#include "runtime/device/compute.h"

#include <string>

#include "base/memory.h"
#include "runtime/device/cuda/cuda_device.h"
#include "runtime/device/host_device.h"

namespace moe {

StatusOr<int> ComputeGpu(const config::ComputeConfig& compute, int local_rank) {
  const int devices = CudaDeviceCount();
  if (devices == 0) {
    return FailedPrecondition(
        "compute.device=CUDA: no CUDA device is visible to this process (or this build has no "
        "CUDA)");
  }
  const int gpu = compute.gpu() >= 0 ? compute.gpu() : local_rank % devices;
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

StatusOr<std::shared_ptr<Device>> MakeDevice(const config::ComputeConfig& compute, int local_rank,
                                             bool route_on_device) {
  if (compute.device() == config::CPU) return std::shared_ptr<Device>(std::make_shared<HostDevice>());
  MOE_ASSIGN_OR_RETURN(const int gpu, ComputeGpu(compute, local_rank));
  StatusOr<std::shared_ptr<Device>> made = MakeCudaDevice(
      {.gpu = gpu, .precision = ComputePrecision(compute), .route_on_device = route_on_device});
  if (!made.ok()) return made.status().WithContext("compute.device=CUDA");
  return made;
}

}  // namespace moe
