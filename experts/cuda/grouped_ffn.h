// The FFNs of L local experts on one GPU, over contiguous row blocks: rows [offsets[e],
// offsets[e+1]) go through expert e — the GPU counterpart of runtime/device/cpu_expert_compute.h, same math as
// experts/cpu/ffn.cc (see expert_ffn.h).
//
// Stages, one small kernel or one cuBLAS call each:
//   up:    HU = X · Wup          grouped GEMM (cublasGemmGroupedBatchedEx), Wup = W1, or [W1 | W3]
//                                (M x 2H, one GEMM for SwiGLU's two projections)
//   act:   H += b1; A = act(H)   (SwiGLU: A = silu(H) · U)       one fused elementwise kernel
//   down:  Y = A · W2 + b2       grouped GEMM, then the bias (and the bf16 -> fp32 widening) kernel
// Backward: dW2 += Aᵀ·dY, db2 += Σ dY, dA = dY·W2ᵀ (grouped), dHU = dA · act'(H) (kernel),
// db1 += Σ dH, dWup += Xᵀ·dHU, dX = dHU · Wupᵀ (grouped). Weight-gradient GEMMs run per expert
// (cublasGemmEx, fp32 output and accumulation, beta = 1) because the grouped call has no
// bf16-in/fp32-out form.
//
// Precision: kFloat32 keeps everything in fp32 (cuBLAS default math: no TF32); kBfloat16 stores
// weights, X, HU, A and dY in bf16, accumulates every GEMM in fp32, keeps fp32 master weights on
// the host and fp32 gradients on the device. Inputs and outputs of Forward/Backward are fp32.
//
// All device work is ordered on one CUDA stream (the object's own, or the caller's);
// Upload/Download synchronize with it. Without a CUDA build Create() fails with kUnimplemented.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "base/memory.h"
#include "base/status.h"
#include "experts/expert_ffn.h"

namespace moe::experts::cuda {

enum class Precision { kFloat32, kBfloat16 };
const char* PrecisionName(Precision p);

// Loads cuBLAS now (Create does it on first use; it is not linked, see cuda/cublas_loader.h).
// Needs no GPU. kUnimplemented without a CUDA build.
Status LoadCublas();

class GroupedFfn {
 public:
  // bf16 experts' model_dim and hidden_dim are multiples of this (see Create).
  static constexpr int kBf16Multiple = 8;

  // `device`: the CUDA device index used by every call (the calling thread's device is set to it).
  // `stream`: a cudaStream_t on that device to order all work on (not owned; it must outlive the
  // object), or nullptr for a stream of the object's own. `memory`: where the workspaces come
  // from (a stream-ordered allocator on `stream`, as the CUDA device's), or nullptr for cudaMalloc.
  // kBfloat16 needs model_dim and hidden_dim multiples of 8: every per-expert operand of the
  // grouped GEMMs then starts 16-byte aligned, as cuBLAS wants of bf16 pointers.
  static StatusOr<std::unique_ptr<GroupedFfn>> Create(const FfnShape& shape, int num_experts,
                                                      Precision precision, int device,
                                                      void* stream = nullptr,
                                                      MemoryResource* memory = nullptr);
  virtual ~GroupedFfn() = default;

  // The cudaStream_t every call is ordered on.
  virtual void* stream() const = 0;

  // Copies the experts' (fp32, host) weights to the device: params[e] is local expert e.
  virtual Status SetWeights(std::span<const FfnParams> params) = 0;

  // Independent forwards (pipeline chunks) that may all run before their backwards: `part` in
  // [0, kMaxParts) names the saved activations a Forward writes and its Backward reads.
  static constexpr int kMaxParts = 16;

  // Sizes what Forward(part) and Backward(part) of up to `rows` rows use, so that neither
  // allocates: the pipelined executor reserves every chunk before the call's first exchange
  // (an allocation while exchanges are in flight may wait for the whole device).
  virtual Status Reserve(int part, int64_t rows) = 0;

  // y = FFN_e(x) for each row block. x and y are device pointers, rows x M fp32 (rows =
  // offsets.back()); offsets has L + 1 non-decreasing entries starting at 0. x must stay
  // unchanged until the part's Backward.
  virtual Status Forward(int part, const std::vector<int64_t>& offsets, const float* x,
                         float* y) = 0;
  Status Forward(const std::vector<int64_t>& offsets, const float* x, float* y) {
    return Forward(0, offsets, x, y);
  }
  // dx (device, rows x M) from dy (device, rows x M) for the rows of the part's last Forward;
  // weight gradients are accumulated on the device.
  virtual Status Backward(int part, const float* dy, float* dx) = 0;
  Status Backward(const float* dy, float* dx) { return Backward(0, dy, dx); }
  // Adds the device-accumulated gradients into grads[e] (host, shapes of FfnParams::Zeros) and
  // zeroes them on the device.
  virtual Status AddGradients(std::span<FfnParams> grads) = 0;

  // Host <-> device copies on this object's stream; return when the copy is complete.
  virtual Status Upload(void* device_dst, const void* host_src, int64_t bytes) = 0;
  virtual Status Download(void* host_dst, const void* device_src, int64_t bytes) = 0;
};

}  // namespace moe::experts::cuda
