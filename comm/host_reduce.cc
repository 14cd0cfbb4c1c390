// Element-wise reductions of host buffers (comm/host_reduce.h).
#include "comm/host_reduce.h"

#include <algorithm>

namespace moe::comm {
namespace {

template <typename T>
void ReduceTyped(T* acc, const T* in, int64_t count, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      for (int64_t i = 0; i < count; ++i) acc[i] = static_cast<T>(acc[i] + in[i]);
      return;
    case ReduceOp::kMax:
      for (int64_t i = 0; i < count; ++i) acc[i] = std::max(acc[i], in[i]);
      return;
    case ReduceOp::kMin:
      for (int64_t i = 0; i < count; ++i) acc[i] = std::min(acc[i], in[i]);
      return;
  }
}

}  // namespace

void HostReduceInto(void* acc, const void* in, int64_t count, DataType dtype, ReduceOp op) {
  switch (dtype) {
    case DataType::kFloat32:
      return ReduceTyped(static_cast<float*>(acc), static_cast<const float*>(in), count, op);
    case DataType::kFloat64:
      return ReduceTyped(static_cast<double*>(acc), static_cast<const double*>(in), count, op);
    case DataType::kInt32:
      return ReduceTyped(static_cast<int32_t*>(acc), static_cast<const int32_t*>(in), count, op);
    case DataType::kInt64:
      return ReduceTyped(static_cast<int64_t*>(acc), static_cast<const int64_t*>(in), count, op);
    case DataType::kUint8:
      return ReduceTyped(static_cast<uint8_t*>(acc), static_cast<const uint8_t*>(in), count, op);
  }
}

}  // namespace moe::comm
