// The parts of experts/cuda/grouped_ffn.h that need no CUDA: the precision names, and Create()
// for builds without CUDA (the CUDA build defines it in grouped_ffn.cu).
#include "experts/cuda/grouped_ffn.h"

#if MOE_EXPERTS_HAVE_CUDA
#include "experts/cuda/cublas_loader.h"
#endif

namespace moe::experts::cuda {

const char* PrecisionName(Precision p) {
  switch (p) {
    case Precision::kFloat32:
      return "fp32";
    case Precision::kBfloat16:
      return "bf16";
  }
  return "?";
}

#if MOE_EXPERTS_HAVE_CUDA
Status LoadCublas() { return Cublas().status(); }
#else
namespace {
Status NoCuda() {
  return Unimplemented(
      "experts on a GPU need a CUDA build (configure with the CUDA toolkit present, "
      "MOE_WITH_CUDA=ON or AUTO)");
}
}  // namespace

Status LoadCublas() { return NoCuda(); }
StatusOr<std::unique_ptr<GroupedFfn> > GroupedFfn::Create(const FfnShape&, int, Precision, int,
                                                          void*, MemoryResource*) {
  return NoCuda();
}
#endif

}  // namespace moe::experts::cuda
