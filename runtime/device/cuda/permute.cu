// Permute kernels: one block per packed row (gather, gradient) or per token (combine). Rows are
// moved as float4 when the row width and the base pointers allow it (16-byte loads and stores).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "runtime/device/cuda/permute.h"

namespace moe::gpu {
namespace {

constexpr int kThreads = 256;

bool Vec4(int64_t cols, const void* a, const void* b) {
  return cols % 4 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

template <typename V>
__global__ void GatherKernel(const V* x, const int32_t* row_token, int64_t cols_v, V* packed) {
  const int64_t r = blockIdx.x;
  const V* src = x + row_token[r] * cols_v;
  V* dst = packed + r * cols_v;
  for (int64_t c = threadIdx.x; c < cols_v; c += blockDim.x) dst[c] = src[c];
}

__device__ __forceinline__ float Fma(float g, float y, float acc) { return fmaf(g, y, acc); }
__device__ __forceinline__ float4 Fma(float g, float4 y, float4 acc) {
  return make_float4(fmaf(g, y.x, acc.x), fmaf(g, y.y, acc.y), fmaf(g, y.z, acc.z),
                     fmaf(g, y.w, acc.w));
}
template <typename V>
__device__ __forceinline__ V Zero();
template <>
__device__ __forceinline__ float Zero<float>() {
  return 0.0f;
}
template <>
__device__ __forceinline__ float4 Zero<float4>() {
  return make_float4(0.f, 0.f, 0.f, 0.f);
}

// One block per token: out[t] (+)= Σ gate · packed[r] over the token's rows, in plan order.
template <typename V>
__global__ void CombineKernel(const V* packed, const int64_t* token_row_offset,
                              const int32_t* token_rows, const float* gate, int64_t cols_v,
                              bool accumulate, V* out) {
  const int64_t t = blockIdx.x;
  const int64_t begin = token_row_offset[t], end = token_row_offset[t + 1];
  for (int64_t c = threadIdx.x; c < cols_v; c += blockDim.x) {
    V acc = accumulate ? out[t * cols_v + c] : Zero<V>();
    for (int64_t i = begin; i < end; ++i) {
      const int32_t r = token_rows[i];
      acc = Fma(gate == nullptr ? 1.0f : gate[r], packed[r * cols_v + c], acc);
    }
    out[t * cols_v + c] = acc;
  }
}

// One block per packed row: the scaled copy and the dot product (block reduction).
__global__ void GateGradKernel(const float* dy, const float* packed_y, const int32_t* row_token,
                               const float* gate, int64_t cols, float* packed_dy, float* dgate) {
  __shared__ float warp_sums[kThreads / 32];
  const int64_t r = blockIdx.x;
  const float* d = dy + row_token[r] * cols;
  const float* y = packed_y + r * cols;
  float* pd = packed_dy + r * cols;
  const float g = gate[r];
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float dv = d[c];
    pd[c] = g * dv;
    dot = fmaf(dv, y[c], dot);
  }
  for (int off = 16; off > 0; off /= 2) dot += __shfl_down_sync(0xffffffffu, dot, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    dgate[r] = total;
  }
}

__global__ void AddKernel(float* out, const float* in, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] += in[i];
  }
}

Status Launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::Ok();
  return Internal(std::string("CUDA ") + what + " launch: " + cudaGetErrorString(err));
}

Status CheckSizes(const DevicePlan& plan, int64_t cols, const char* what) {
  if (cols < 1 || plan.rows < 0 || plan.tokens < 0 || plan.rows > (int64_t{1} << 31) - 1 ||
      plan.tokens > (int64_t{1} << 31) - 1) {
    return InvalidArgument(std::string(what) + ": cols=" + std::to_string(cols) +
                           " must be >= 1 and rows=" + std::to_string(plan.rows) +
                           ", tokens=" + std::to_string(plan.tokens) + " in [0, 2^31)");
  }
  return Status::Ok();
}

}  // namespace

Status PermuteRows(const DevicePlan& plan, const float* x, int64_t cols, float* packed,
                   void* stream) {
  MOE_RETURN_IF_ERROR(CheckSizes(plan, cols, "PermuteRows"));
  if (plan.rows == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const auto grid = static_cast<unsigned>(plan.rows);
  if (Vec4(cols, x, packed)) {
    GatherKernel<float4><<<grid, kThreads, 0, s>>>(reinterpret_cast<const float4*>(x),
                                                   plan.row_token, cols / 4,
                                                   reinterpret_cast<float4*>(packed));
  } else {
    GatherKernel<float><<<grid, kThreads, 0, s>>>(x, plan.row_token, cols, packed);
  }
  return Launched("PermuteRows");
}

Status UnpermuteRows(const DevicePlan& plan, const float* packed_y, int64_t cols, bool with_gates,
                     bool accumulate, float* out, void* stream) {
  MOE_RETURN_IF_ERROR(CheckSizes(plan, cols, "UnpermuteRows"));
  if (plan.tokens == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const auto grid = static_cast<unsigned>(plan.tokens);
  const float* gate = with_gates ? plan.row_gate : nullptr;
  if (Vec4(cols, packed_y, out)) {
    CombineKernel<float4><<<grid, kThreads, 0, s>>>(
        reinterpret_cast<const float4*>(packed_y), plan.token_row_offset, plan.token_rows, gate,
        cols / 4, accumulate, reinterpret_cast<float4*>(out));
  } else {
    CombineKernel<float><<<grid, kThreads, 0, s>>>(packed_y, plan.token_row_offset, plan.token_rows,
                                                   gate, cols, accumulate, out);
  }
  return Launched("UnpermuteRows");
}

Status PermuteGradRows(const DevicePlan& plan, const float* dy, const float* packed_y, int64_t cols,
                       float* packed_dy, float* dgate, void* stream) {
  MOE_RETURN_IF_ERROR(CheckSizes(plan, cols, "PermuteGradRows"));
  if (plan.rows == 0) return Status::Ok();
  GateGradKernel<<<static_cast<unsigned>(plan.rows), kThreads, 0,
                   static_cast<cudaStream_t>(stream)>>>(dy, packed_y, plan.row_token, plan.row_gate,
                                                        cols, packed_dy, dgate);
  return Launched("PermuteGradRows");
}

Status AddInto(float* out, const float* in, int64_t n, void* stream) {
  if (n < 0) return InvalidArgument("AddInto: n=" + std::to_string(n) + " must be >= 0");
  if (n == 0) return Status::Ok();
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65536);
  AddKernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, in, n);
  return Launched("AddInto");
}

}  // namespace moe::gpu
