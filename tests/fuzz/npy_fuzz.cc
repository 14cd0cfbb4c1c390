// libFuzzer target: the .npy reader (moe::ParseNpy is what ReadNpy runs on a file's bytes) and the
// float32 / int32 conversions that moe_layer and checkpoint loading apply next.
#include <cstddef>
#include <cstdint>

#include "base/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::StatusOr<moe::NpyArray> arr = moe::ParseNpy("fuzz.npy", data, size);
  if (!arr.ok()) return 0;
  // The parser promises the data matches the shape; check it, then convert.
  const size_t item = arr->dtype == moe::NpyDtype::kInt64 ? 8 : 4;
  if (arr->bytes.size() != static_cast<size_t>(arr->NumElements()) * item) __builtin_trap();
  moe::StatusOr<moe::Tensor> f = moe::NpyToTensor(*arr, "fuzz.npy");
  if (f.ok() && static_cast<size_t>(f->size()) * 4 != arr->bytes.size()) __builtin_trap();
  moe::StatusOr<moe::IntTensor> i = moe::NpyToIntTensor(*arr, "fuzz.npy");
  if (i.ok() && static_cast<size_t>(i->size()) * 4 != arr->bytes.size()) __builtin_trap();
  return 0;
}
