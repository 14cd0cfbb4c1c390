// The CUDA Device (runtime/device/device.h): one GPU. Every operation is enqueued on the device's
// own CUDA stream — GEMMs on cuBLAS (fp32, no TF32), the row operations as kernels
// (runtime/device/cuda/permute.h), the experts' grouped FFN (experts/cuda/grouped_ffn.h, fp32 or
// bf16 operands with fp32 accumulation), and the routing steps: the router's GEMMs on the GPU,
// then routing on the device (runtime/device/cuda/route.h) where DeviceRouter supports the config,
// else the logits down and the host's routing code (the same decisions), the plan's arrays up.
// The host waits once per Forward, for the plan's counts (the grouped GEMM takes host problem
// sizes); everything else is stream-ordered, communicator requests included.
//
// Without a CUDA build MakeCudaDevice fails with kUnimplemented; without a visible GPU with
// kFailedPrecondition.
#pragma once

#include <memory>

#include "base/status.h"
#include "experts/cuda/grouped_ffn.h"
#include "runtime/device/device.h"

namespace moe {

struct CudaDeviceOptions {
  int gpu = 0;  // CUDA device index
  // Storage of the routed and shared experts' GEMM operands (fp32 accumulation either way). The
  // router is always fp32, so routing is the host's.
  experts::cuda::Precision precision = experts::cuda::Precision::kFloat32;
  // false: route on the host even where the device router could (the benchmarks' comparison).
  bool route_on_device = true;
};

StatusOr<std::shared_ptr<Device>> MakeCudaDevice(const CudaDeviceOptions& options);

}  // namespace moe
