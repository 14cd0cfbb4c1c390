// runtime/device/cuda/*.h in builds without CUDA: every call is kUnimplemented.
#include <string>

#include "runtime/device/cuda/permute.h"
#include "runtime/device/cuda/route.h"

namespace moe::gpu {
namespace {
Status NoCuda(const char* what) {
  return Unimplemented(std::string(what) + ": device kernels need a CUDA build (MOE_HAVE_CUDA)");
}
}  // namespace

Status PermuteRows(const DevicePlan&, const float*, int64_t, float*, void*) {
  return NoCuda("PermuteRows");
}
Status UnpermuteRows(const DevicePlan&, const float*, int64_t, bool, bool, float*, void*) {
  return NoCuda("UnpermuteRows");
}
Status PermuteGradRows(const DevicePlan&, const float*, const float*, int64_t, float*, float*,
                       void*) {
  return NoCuda("PermuteGradRows");
}
Status AddInto(float*, const float*, int64_t, void*) { return NoCuda("AddInto"); }
Status SoftmaxRows(const float*, int64_t, int64_t, float*, void*) { return NoCuda("SoftmaxRows"); }
bool DeviceRouter::Supports(const config::RouterConfig&, std::string* why_not) {
  if (why_not != nullptr) *why_not = "device routing needs a CUDA build (MOE_HAVE_CUDA)";
  return false;
}
StatusOr<std::unique_ptr<DeviceRouter>> DeviceRouter::Create(const config::RouterConfig&, int64_t,
                                                             void*) {
  return NoCuda("DeviceRouter");
}

}  // namespace moe::gpu
