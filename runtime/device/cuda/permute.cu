// Row kernels of the CUDA device (runtime/device/cuda/permute.h): one block per row (gather, gate
// gradient) or per token (combine), grid-stride loops for the casts. Rows move as float4 when the
// row width and the base pointers allow it (16-byte loads and stores).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "runtime/device/cuda/permute.h"
#include "runtime/device/row_steps.h"

namespace moe::gpu {
namespace {

constexpr int kThreads = 256;

bool Vec4(int64_t cols, const void* a, const void* b) {
  return cols % 4 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

__device__ __forceinline__ float RoundBf16(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// Row i of the gather: fp32 rows, scaled and rounded as the format says.
__global__ void GatherKernel(RowGather g) {
  const int64_t i = blockIdx.x;
  const int64_t to = row_steps::GatherDestination(g, i), from = row_steps::GatherSource(g, i);
  const float scale = from >= 0 ? row_steps::GatherScale(g, i) : 0.0f;
  const float* src = from >= 0 ? g.src + from * g.cols : nullptr;
  if (g.format == RowFormat::kBf16) {
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(g.dst) + to * g.cols;
    for (int64_t c = threadIdx.x; c < g.cols; c += blockDim.x) {
      dst[c] = __float2bfloat16_rn(src == nullptr ? 0.0f : __fmul_rn(scale, src[c]));
    }
    return;
  }
  float* dst = static_cast<float*>(g.dst) + to * g.cols;
  const bool round = g.format == RowFormat::kRoundedBf16;
  for (int64_t c = threadIdx.x; c < g.cols; c += blockDim.x) {
    float v = src == nullptr ? 0.0f : __fmul_rn(scale, src[c]);
    dst[c] = round ? RoundBf16(v) : v;
  }
}

// The unscaled fp32 gather, 16 bytes at a time.
__global__ void GatherCopyKernel4(RowGather g) {
  const int64_t i = blockIdx.x, cols4 = g.cols / 4;
  const int64_t to = row_steps::GatherDestination(g, i), from = row_steps::GatherSource(g, i);
  float4* dst = static_cast<float4*>(g.dst) + to * cols4;
  const float4* src = from >= 0 ? reinterpret_cast<const float4*>(g.src) + from * cols4 : nullptr;
  for (int64_t c = threadIdx.x; c < cols4; c += blockDim.x) {
    dst[c] = src == nullptr ? make_float4(0.f, 0.f, 0.f, 0.f) : src[c];
  }
}

// One block per token: y[t] += Σ gate · row over the token's rows, in plan order.
__global__ void CombineKernel(RowCombine c) {
  const int64_t t = blockIdx.x;
  const int64_t begin = row_steps::TokenRowsBegin(c.plan, t),
                end = row_steps::TokenRowsEnd(c.plan, t);
  float* out = c.y + t * c.cols;
  for (int64_t k = threadIdx.x; k < c.cols; k += blockDim.x) {
    float acc = out[k];
    for (int64_t i = begin; i < end; ++i) {
      const int32_t r = c.plan.token_rows[i];
      float v = row_steps::ReturnedRow(c.returned, r, c.cols)[k];
      if (c.returned.round_bf16) v = RoundBf16(v);
      acc = c.gated ? fmaf(c.plan.row_gate[r], v, acc) : acc + v;
    }
    out[k] = acc;
  }
}

// One block per plan row: dy[token] · returned row (block reduction).
__global__ void GateGradKernel(GateGradient g) {
  __shared__ float warp_sums[kThreads / 32];
  const int64_t r = blockIdx.x;
  const float* d = g.dy + g.plan.row_token[r] * g.cols;
  const float* y = row_steps::ReturnedRow(g.returned, r, g.cols);
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < g.cols; c += blockDim.x) {
    dot = fmaf(d[c], g.returned.round_bf16 ? RoundBf16(y[c]) : y[c], dot);
  }
  for (int off = 16; off > 0; off /= 2) dot += __shfl_down_sync(0xffffffffu, dot, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    g.dgate[r] = total;
  }
}

__global__ void CastKernel(CastKind kind, const void* src, void* dst, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    switch (kind) {
      case CastKind::kToBf16:
        static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(static_cast<const float*>(src)[i]);
        break;
      case CastKind::kFromBf16:
        static_cast<float*>(dst)[i] = __bfloat162float(static_cast<const __nv_bfloat16*>(src)[i]);
        break;
      case CastKind::kRoundBf16:
        static_cast<float*>(dst)[i] = RoundBf16(static_cast<const float*>(src)[i]);
        break;
    }
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

Status CheckRows(int64_t rows, int64_t cols, const char* what) {
  if (cols < 1 || rows < 0 || rows > kMaxDeviceRows) {
    return InvalidArgument(std::string(what) + ": cols=" + std::to_string(cols) +
                           " must be >= 1 and rows=" + std::to_string(rows) + " in [0, 2^31)");
  }
  return Status::Ok();
}

unsigned Blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65536));
}

}  // namespace

Status GatherRows(const RowGather& g, void* stream) {
  MOE_RETURN_IF_ERROR(CheckRows(g.rows, g.cols, "GatherRows"));
  if (g.rows == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const auto grid = static_cast<unsigned>(g.rows);
  if (g.format == RowFormat::kFloat32 && g.row_gate == nullptr && Vec4(g.cols, g.src, g.dst)) {
    GatherCopyKernel4<<<grid, kThreads, 0, s>>>(g);
  } else {
    GatherKernel<<<grid, kThreads, 0, s>>>(g);
  }
  return Launched("GatherRows");
}

Status CombineRows(const RowCombine& c, void* stream) {
  MOE_RETURN_IF_ERROR(CheckRows(c.plan.tokens, c.cols, "CombineRows"));
  if (c.plan.tokens == 0) return Status::Ok();
  CombineKernel<<<static_cast<unsigned>(c.plan.tokens), kThreads, 0,
                  static_cast<cudaStream_t>(stream)>>>(c);
  return Launched("CombineRows");
}

Status GateGradients(const GateGradient& g, void* stream) {
  MOE_RETURN_IF_ERROR(CheckRows(g.plan.rows, g.cols, "GateGradients"));
  if (g.plan.rows == 0) return Status::Ok();
  GateGradKernel<<<static_cast<unsigned>(g.plan.rows), kThreads, 0,
                   static_cast<cudaStream_t>(stream)>>>(g);
  return Launched("GateGradients");
}

Status Cast(CastKind kind, const void* src, void* dst, int64_t count, void* stream) {
  if (count < 0) return InvalidArgument("Cast: count=" + std::to_string(count) + " must be >= 0");
  if (count == 0) return Status::Ok();
  CastKernel<<<Blocks(count), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(kind, src, dst,
                                                                                 count);
  return Launched("Cast");
}

Status AddInto(float* out, const float* in, int64_t n, void* stream) {
  if (n < 0) return InvalidArgument("AddInto: n=" + std::to_string(n) + " must be >= 0");
  if (n == 0) return Status::Ok();
  AddKernel<<<Blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(out, in, n);
  return Launched("AddInto");
}

}  // namespace moe::gpu
