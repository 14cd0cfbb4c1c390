// runtime/cuda/*.h in builds without CUDA: every call is kUnimplemented.
#include <string>

#include "runtime/cuda/permute.h"
#include "runtime/cuda/route.h"

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
Status SoftmaxRows(const float*, int64_t, int64_t, float*, void*) { return NoCuda("SoftmaxRows"); }
Status RouteTokenChoice(const TokenChoiceShape&, const float*, const float*,
                        const TokenChoiceOutput&, void*) {
  return NoCuda("RouteTokenChoice");
}

}  // namespace moe::gpu
