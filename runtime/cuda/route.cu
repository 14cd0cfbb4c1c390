// Routing kernels. Softmax: one warp per row. Selection and gates: one thread per token (E is at
// most a few hundred). Capacity: one block per (group, expert), walking the group's slots in
// slot-major order (every first choice before any second choice) with a block-wide exclusive scan
// of "this slot picked me" flags, so a slot's position is the number of earlier slots of the group
// that picked the same expert.
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <string>

#include "runtime/cuda/route.h"

namespace moe::gpu {
namespace {

__global__ void SoftmaxKernel(const float* logits, int64_t rows, int64_t cols, float* probs) {
  const int64_t row = blockIdx.x * int64_t{blockDim.y} + threadIdx.y;
  if (row >= rows) return;
  const float* a = logits + row * cols;
  float* o = probs + row * cols;
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < cols; c += 32) mx = fmaxf(mx, a[c]);
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += 32) sum += expf(a[c] - mx);
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float inv = 1.0f / sum;
  for (int64_t c = threadIdx.x; c < cols; c += 32) o[c] = expf(a[c] - mx) * inv;
}

// k passes of an arg-max over the experts not yet taken; "better" = higher score, then lower index.
__global__ void SelectKernel(const float* probs, const float* bias, int64_t tokens, int64_t experts,
                             int64_t k, int32_t* selected) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= tokens) return;
  const float* p = probs + t * experts;
  int32_t* out = selected + t * k;
  for (int64_t j = 0; j < k; ++j) {
    int32_t best = -1;
    float best_score = 0.0f;
    for (int64_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int64_t q = 0; q < j; ++q) taken = taken || out[q] == e;
      if (taken) continue;
      const float score = p[e] + (bias == nullptr ? 0.0f : bias[e]);
      if (best < 0 || score > best_score) {  // ties keep the lower index (scanned first)
        best = static_cast<int32_t>(e);
        best_score = score;
      }
    }
    out[j] = best;
  }
}

__device__ __forceinline__ int64_t GroupBegin(int64_t tokens, int64_t groups, int64_t g) {
  const int64_t q = tokens / groups, r = tokens % groups;
  return g * q + (g < r ? g : r);
}

constexpr int kScanThreads = 256;

__global__ void CapacityKernel(const int32_t* selected, int64_t tokens, int64_t experts, int64_t k,
                               int64_t groups, int64_t capacity, int32_t* position,
                               int32_t* group_expert_count) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t g = blockIdx.x / experts;
  const int32_t e = static_cast<int32_t>(blockIdx.x % experts);
  const int64_t begin = GroupBegin(tokens, groups, g),
                n = GroupBegin(tokens, groups, g + 1) - begin;
  int carry = 0;  // slots of this (group, expert) seen so far
  // Slot-major walk: index i = j * n + (t - begin).
  for (int64_t base = 0; base < k * n; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    int64_t slot = -1;
    int flag = 0;
    if (i < k * n) {
      const int64_t j = i / n, t = begin + i % n;
      slot = t * k + j;
      flag = selected[slot] == e ? 1 : 0;
    }
    int before = 0, chunk = 0;
    Scan(temp).ExclusiveSum(flag, before, chunk);
    if (flag) {
      const int pos = carry + before;
      position[slot] = (capacity == 0 || pos < capacity) ? pos : -1;
    }
    carry += chunk;
    __syncthreads();  // temp storage is reused by the next chunk
  }
  if (threadIdx.x == 0) {
    group_expert_count[g * experts + e] =
        static_cast<int32_t>(capacity == 0 ? carry : (carry < capacity ? carry : capacity));
  }
}

// Gates per token in slot order, the CPU's sums: sum_all over the k slots, sum_kept over kept ones.
__global__ void GateKernel(const float* probs, int64_t tokens, int64_t experts, int64_t k,
                           config::GateNormalization norm, const int32_t* selected,
                           const int32_t* position, int32_t* slot_expert, float* slot_gate) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= tokens) return;
  float sum_all = 0.0f, sum_kept = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const float r = probs[t * experts + selected[t * k + j]];
    sum_all += r;
    if (position[t * k + j] >= 0) sum_kept += r;
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t slot = t * k + j;
    if (position[slot] < 0) {
      slot_expert[slot] = -1;
      slot_gate[slot] = 0.0f;
      continue;
    }
    const float r = probs[t * experts + selected[slot]];
    slot_expert[slot] = selected[slot];
    slot_gate[slot] = norm == config::NONE           ? r
                      : norm == config::TOPK_SOFTMAX ? __fdiv_rn(r, sum_all)
                                                     : __fdiv_rn(r, sum_kept);
  }
}

Status Launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::Ok();
  return Internal(std::string("CUDA ") + what + " launch: " + cudaGetErrorString(err));
}

unsigned Blocks(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

}  // namespace

Status SoftmaxRows(const float* logits, int64_t rows, int64_t cols, float* probs, void* stream) {
  if (rows < 0 || cols < 1) {
    return InvalidArgument("SoftmaxRows: rows=" + std::to_string(rows) +
                           " must be >= 0 and cols=" + std::to_string(cols) + " >= 1");
  }
  if (rows == 0) return Status::Ok();
  constexpr int kRowsPerBlock = 8;
  SoftmaxKernel<<<Blocks(rows, kRowsPerBlock), dim3(32, kRowsPerBlock), 0,
                  static_cast<cudaStream_t>(stream)>>>(logits, rows, cols, probs);
  return Launched("SoftmaxRows");
}

Status RouteTokenChoice(const TokenChoiceShape& s, const float* probs, const float* bias,
                        const TokenChoiceOutput& out, void* stream) {
  if (s.tokens < 0 || s.experts < 1 || s.top_k < 1 || s.top_k > s.experts || s.groups < 1 ||
      (s.tokens > 0 && s.groups > s.tokens) || s.capacity < 0 ||
      s.tokens * s.top_k > (int64_t{1} << 31) - 1 ||
      s.groups * s.experts > (int64_t{1} << 31) - 1) {
    return InvalidArgument(
        "RouteTokenChoice: need S >= 0, 1 <= k <= E, 1 <= G <= S, C >= 0 and S*k, G*E < 2^31 (S=" +
        std::to_string(s.tokens) + " E=" + std::to_string(s.experts) +
        " k=" + std::to_string(s.top_k) + " G=" + std::to_string(s.groups) +
        " C=" + std::to_string(s.capacity) + ")");
  }
  if (s.tokens == 0) return Status::Ok();
  auto st = static_cast<cudaStream_t>(stream);
  constexpr int kThreads = 128;
  SelectKernel<<<Blocks(s.tokens, kThreads), kThreads, 0, st>>>(probs, bias, s.tokens, s.experts,
                                                                s.top_k, out.selected);
  MOE_RETURN_IF_ERROR(Launched("RouteTokenChoice select"));
  CapacityKernel<<<static_cast<unsigned>(s.groups * s.experts), kScanThreads, 0, st>>>(
      out.selected, s.tokens, s.experts, s.top_k, s.groups, s.capacity, out.position,
      out.group_expert_count);
  MOE_RETURN_IF_ERROR(Launched("RouteTokenChoice capacity"));
  GateKernel<<<Blocks(s.tokens, kThreads), kThreads, 0, st>>>(
      probs, s.tokens, s.experts, s.top_k, s.normalization, out.selected, out.position,
      out.slot_expert, out.slot_gate);
  return Launched("RouteTokenChoice gates");
}

}  // namespace moe::gpu
