// runtime/device/cuda/*.h in builds without CUDA: every call is kUnimplemented.
#include <string>

#include "runtime/device/cuda/cuda_device.h"
#include "runtime/device/cuda/permute.h"
#include "runtime/device/cuda/route.h"

namespace moe::gpu {
namespace {
Status NoCuda(const char* what) {
  return Unimplemented(std::string(what) + ": device kernels need a CUDA build (MOE_HAVE_CUDA)");
}
}  // namespace

Status GatherRows(const RowGather&, void*) { return NoCuda("GatherRows"); }
Status CombineRows(const RowCombine&, void*) { return NoCuda("CombineRows"); }
Status GateGradients(const GateGradient&, void*) { return NoCuda("GateGradients"); }
Status Cast(CastKind, const void*, void*, int64_t, void*) { return NoCuda("Cast"); }
Status AddInto(float*, const float*, int64_t, void*) { return NoCuda("AddInto"); }
Status SoftmaxRows(const float*, int64_t, int64_t, float*, void*) { return NoCuda("SoftmaxRows"); }
bool DeviceRouter::Supports(const config::RouterConfig&, std::string* why_not) {
  if (why_not != nullptr) *why_not = "device routing needs a CUDA build (MOE_HAVE_CUDA)";
  return false;
}
StatusOr<std::unique_ptr<DeviceRouter>> DeviceRouter::Create(const config::RouterConfig&, int64_t,
                                                             void*, MemoryResource*) {
  return NoCuda("DeviceRouter");
}

}  // namespace moe::gpu

namespace moe {
StatusOr<std::shared_ptr<Device>> MakeCudaDevice(const CudaDeviceOptions&) {
  return Unimplemented(
      "compute.device=CUDA needs a CUDA build (configure with the CUDA toolkit present, "
      "MOE_WITH_CUDA=ON or AUTO)");
}
}  // namespace moe
