// Device routing (runtime/cuda/route.h). One kernel per stage, all on the caller's stream:
//   [noise: eps and noisy scores] -> softmax (one warp per row) -> select (one thread per token:
//   top-k by probs + bias, random routing, the drop-priority key, per-expert load)
//   -> [PROBABILITY: stable segmented sort of each group's tokens by key, descending (CUB)]
//   -> capacity (one block per (group, expert): a block-wide scan over the group's slots in
//   placement order gives each slot its position) -> row bases (one block: expert offsets and each
//   (group, expert)'s first row) -> gates (one thread per token: normalization, packed row,
//   metrics)
//   -> per-token row counts scanned into token_row_offset (CUB) -> layout (one thread per token:
//   row_token, row_gate, token_rows)
//   -> the losses' per-group sums (one block per (group, expert), a deterministic block reduction)
//   -> one download of the counts and sums.
// Backward: one thread per token through routing_math.h's gate, loss and softmax backward.
//
// The S-sized arrays are carved from one device workspace, grown to the largest call.
#include <cuda_runtime.h>

#include <algorithm>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>
#include <string>
#include <utility>
#include <vector>

#include "comm/memory.h"
#include "experts/cuda/cublas_loader.h"
#include "runtime/base/clock.h"
#include "runtime/base/rng.h"
#include "runtime/config.h"
#include "runtime/cuda/route.h"
#include "runtime/routing_math.h"

namespace moe::gpu {
namespace {

using experts::cuda::CudaCheck;
using Count = unsigned long long;  // atomicAdd's 64-bit integer type

using routing::GroupBegin;
using routing::GroupOf;

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

// Noisy top-k at training: eps[t, i] = CounterNormal(seed, step, token, kRouterNoise, i) and
// scores = logits + eps·softplus(noise_in), as FinishRouter.
__global__ void NoiseKernel(const float* logits, const float* noise_in, int64_t n, int64_t e,
                            RouteContext ctx, float* eps, float* scores) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= n) return;
  const auto token = static_cast<uint64_t>(ctx.token_offset + i / e);
  const float v = CounterNormal(ctx.seed, ctx.step, token, RngStream::kRouterNoise,
                                static_cast<uint64_t>(i % e));
  eps[i] = v;
  scores[i] = routing::NoisyScore(logits[i], v, noise_in[i]);
}

struct SelectArgs {
  const float* probs;
  const float* bias;  // E or null
  int64_t tokens, experts, k;
  bool random_routing;
  RouteContext ctx;
  int32_t* selected;  // S*k
  uint8_t* alive;     // S*k: not dropped by random routing
  float* key;         // S: slot 0's raw gate (the PROBABILITY priority)
  int32_t* iota;      // S: t
  Count* load;        // E: selected slots per expert
};

__global__ void SelectKernel(SelectArgs a) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= a.tokens) return;
  const float* p = a.probs + t * a.experts;
  int32_t top[routing::kMaxRankedExperts];
  const auto k = static_cast<int32_t>(a.k);
  routing::RankTopExperts(p, a.bias, static_cast<int32_t>(a.experts), k, top);
  for (int32_t j = 0; j < k; ++j) {
    a.selected[t * k + j] = top[j];
    a.alive[t * k + j] = 1;
    atomicAdd(&a.load[top[j]], Count{1});
  }
  if (a.random_routing) {
    const double u =
        CounterUniform(a.ctx.seed, a.ctx.step, static_cast<uint64_t>(a.ctx.token_offset + t),
                       RngStream::kRoutingUniform);
    if (!routing::KeepsSecondSlot(p[top[0]], p[top[1]], u)) a.alive[t * k + 1] = 0;
  }
  a.key[t] = p[top[0]];
  a.iota[t] = static_cast<int32_t>(t);
}

__global__ void GroupOffsetsKernel(int64_t tokens, int64_t groups, int* offsets) {
  const int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (g <= groups) offsets[g] = static_cast<int>(GroupBegin(tokens, groups, g));
}

constexpr int kBlockThreads = 256;

// One block per (group, expert): walks the group's slots in placement order — slot-major (every
// slot 0 before any slot 1), tokens in `order` within a slot (null: position order) — with a
// block-wide exclusive scan of "this live slot picked me", so a slot's position is the number of
// earlier live slots of the group that picked the same expert; past capacity it is dropped (-1).
__global__ void CapacityKernel(const int32_t* selected, const uint8_t* alive, const int32_t* order,
                               int64_t tokens, int64_t experts, int64_t k, int64_t groups,
                               int64_t capacity, int32_t* position, int32_t* group_expert_count) {
  using Scan = cub::BlockScan<int, kBlockThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t g = blockIdx.x / experts;
  const auto e = static_cast<int32_t>(blockIdx.x % experts);
  const int64_t begin = GroupBegin(tokens, groups, g),
                n = GroupBegin(tokens, groups, g + 1) - begin;
  int carry = 0;
  for (int64_t base = 0; base < k * n; base += kBlockThreads) {
    const int64_t i = base + threadIdx.x;
    int64_t slot = -1;
    int flag = 0;
    if (i < k * n) {
      const int64_t j = i / n, at = begin + i % n;
      slot = (order == nullptr ? at : order[at]) * k + j;
      flag = alive[slot] != 0 && selected[slot] == e ? 1 : 0;
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
    group_expert_count[blockIdx.x] =
        static_cast<int32_t>(capacity == 0 ? carry : (carry < capacity ? carry : capacity));
  }
}

// One block: expert_offset (E + 1), each (group, expert)'s first packed row (group_base, G x E:
// expert, then group, then position), and the counts as int64 for the host.
__global__ void RowBaseKernel(const int32_t* counts, int64_t groups, int64_t experts,
                              int64_t* expert_offset, int64_t* group_base, int64_t* counts64) {
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int64_t running = 0;
    for (int64_t g = 0; g < groups; ++g) {
      group_base[g * experts + e] = running;
      counts64[g * experts + e] = counts[g * experts + e];
      running += counts[g * experts + e];
    }
    expert_offset[e + 1] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    expert_offset[0] = 0;
    for (int64_t e = 0; e < experts; ++e) expert_offset[e + 1] += expert_offset[e];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    for (int64_t g = 0; g < groups; ++g) group_base[g * experts + e] += expert_offset[e];
  }
}

struct GateArgs {
  const float* probs;
  const int32_t* selected;
  const int32_t* position;
  const int64_t* group_base;
  int64_t tokens, experts, k, groups;
  config::GateNormalization norm;
  float *slot_raw, *slot_gate;
  int32_t *slot_expert, *slot_row;
  int64_t* token_kept;    // S: kept slots per token
  Count *kept, *dropped;  // E
};

__global__ void GateKernel(GateArgs a) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= a.tokens) return;
  const auto k = static_cast<int32_t>(a.k);
  const int64_t first = t * k, g = GroupOf(a.tokens, a.groups, t);
  uint8_t kept[routing::kMaxRankedExperts];
  for (int32_t j = 0; j < k; ++j) kept[j] = a.position[first + j] >= 0 ? 1 : 0;
  routing::TokenGates(a.norm, k, a.probs + t * a.experts, a.selected + first, kept,
                      a.slot_raw + first, a.slot_gate + first, a.slot_expert + first);
  int64_t n = 0;
  for (int32_t j = 0; j < k; ++j) {
    const int32_t e = a.selected[first + j];
    if (kept[j] == 0) {
      a.slot_row[first + j] = -1;
      atomicAdd(&a.dropped[e], Count{1});
      continue;
    }
    a.slot_row[first + j] =
        static_cast<int32_t>(a.group_base[g * a.experts + e] + a.position[first + j]);
    atomicAdd(&a.kept[e], Count{1});
    ++n;
  }
  a.token_kept[t] = n;
}

// Per token, its kept slots' rows in slot order (token_rows) and each row's token and gate.
__global__ void LayoutKernel(const int32_t* slot_row, const float* slot_gate,
                             const int64_t* token_row_offset, int64_t tokens, int64_t k,
                             int32_t* row_token, float* row_gate, int32_t* token_rows) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= tokens) return;
  int64_t at = token_row_offset[t];
  for (int64_t j = 0; j < k; ++j) {
    const int32_t r = slot_row[t * k + j];
    if (r < 0) continue;
    token_rows[at++] = r;
    row_token[r] = static_cast<int32_t>(t);
    row_gate[r] = slot_gate[t * k + j];
  }
}

// out[g * cols + c] = Σ over the tokens t of group g of term(t, c), one block per (g, c) with a
// block reduction (the same order every run).
template <typename Term>
__global__ void GroupSumKernel(int64_t tokens, int64_t groups, int64_t cols, Term term,
                               double* out) {
  using Reduce = cub::BlockReduce<double, kBlockThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const int64_t g = blockIdx.x / cols, c = blockIdx.x % cols;
  const int64_t end = GroupBegin(tokens, groups, g + 1);
  double v = 0.0;
  for (int64_t t = GroupBegin(tokens, groups, g) + threadIdx.x; t < end; t += kBlockThreads) {
    v += term(t, c);
  }
  const double total = Reduce(temp).Sum(v);
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

struct ZTerm {  // logsumexp(logits[t])²
  const float* logits;
  int64_t e;
  __device__ double operator()(int64_t t, int64_t) const {
    const double lse = routing::LogSumExp(logits + t * e, e);
    return lse * lse;
  }
};
struct Top1Term {  // [slot 0 of t picked c]
  const int32_t* selected;
  int64_t k;
  __device__ double operator()(int64_t t, int64_t c) const {
    return selected[t * k] == c ? 1.0 : 0.0;
  }
};
struct ProbTerm {  // probs[t, c]
  const float* probs;
  int64_t e;
  __device__ double operator()(int64_t t, int64_t c) const { return probs[t * e + c]; }
};
struct ImportanceTerm {  // Σ_j [selected[t, j] = c] · g°_j
  const float* probs;
  const int32_t* selected;
  int64_t e, k;
  config::GateNormalization norm;
  __device__ double operator()(int64_t t, int64_t c) const {
    double v = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      if (selected[t * k + j] != c) continue;
      v += routing::PreCapacityGate(norm, static_cast<int32_t>(k), probs + t * e, selected + t * k,
                                    static_cast<int32_t>(j));
    }
    return v;
  }
};

struct BackwardArgs {
  const float *probs, *logits, *eps, *noise_in, *slot_gate, *slot_raw, *dgate_rows;
  const int32_t *selected, *slot_row;
  const float* to_every_prob;  // G x E or null
  const double* dimportance;   // G x E or null
  double z_weight;
  int64_t tokens, experts, k, groups;
  config::GateNormalization norm;
  bool noisy;
  float *dprobs, *dscores, *dlogits, *dnoise;
};

// RouterScoreGradients for one token per thread, in the CPU's order: gate gradients into dprobs,
// the z-loss into dlogits, the aux loss into dprobs, the softmax backward, the noise.
__global__ void RouterBackwardKernel(BackwardArgs a) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= a.tokens) return;
  const int64_t e = a.experts, row = t * e, first = t * a.k;
  const auto k = static_cast<int32_t>(a.k);
  const int64_t g = GroupOf(a.tokens, a.groups, t);
  const int64_t n = GroupBegin(a.tokens, a.groups, g + 1) - GroupBegin(a.tokens, a.groups, g);
  float* dp = a.dprobs + row;
  float* dl = a.dlogits + row;
  for (int64_t i = 0; i < e; ++i) dp[i] = dl[i] = 0.0f;
  routing::AddGateGradients(a.norm, k, a.slot_row + first, a.slot_gate + first, a.slot_raw + first,
                            a.selected + first, a.dgate_rows, dp);
  if (a.z_weight != 0.0) routing::AddZLossGradient(e, a.logits + row, a.z_weight, n, dl);
  if (a.to_every_prob != nullptr) {
    for (int64_t i = 0; i < e; ++i) dp[i] += a.to_every_prob[g * e + i];
  }
  if (a.dimportance != nullptr) {
    routing::AddImportanceGradient(a.norm, k, a.probs + row, a.selected + first,
                                   a.dimportance + g * e, dp);
  }
  routing::SoftmaxBackward(e, a.probs + row, dp, a.dscores + row, dl);
  if (a.noisy) {
    routing::NoiseGradient(e, a.dscores + row, a.eps + row, a.noise_in + row, a.dnoise + row);
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

// Carves typed arrays out of one allocation, each 256-byte aligned: a sizing pass (base null)
// then the real one.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* Take(int64_t count) {
    T* p = base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + used_);
    used_ += (std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(T)) + 255) / 256 * 256;
    return p;
  }
  int64_t used() const { return used_; }

 private:
  char* base_;
  int64_t used_ = 0;
};

class CudaRouter final : public DeviceRouter {
 public:
  CudaRouter(const config::RouterConfig& cfg, int64_t experts, void* stream)
      : cfg_(cfg),
        stream_(static_cast<cudaStream_t>(stream)),
        e_(experts),
        k_(TopK(cfg)),
        g_(cfg.num_local_groups()) {}

  Status Init() {
    // [expert_offset E+1 | counts G·E | load E | kept E | dropped E] int64, then
    // [z G | top1 G·E | probs G·E | importance G·E] double: one download per forward.
    summary_host_.resize(static_cast<size_t>(SummaryWords()));
    MOE_ASSIGN_OR_RETURN(summary_,
                         summary_mem_.Get(SummaryWords() * static_cast<int64_t>(sizeof(int64_t))));
    return Status::Ok();
  }

  const DevicePlan& device_plan() const override { return dplan_; }
  double host_seconds() const override { return host_seconds_; }

  Status Forward(const float* logits, const float* noise_in, const float* bias, int64_t tokens,
                 const RouteContext& ctx, DispatchPlan* plan, RouterLosses* losses) override {
    const double t0 = WallSeconds();
    const int64_t s = tokens, e = e_, k = k_, g = g_;
    if (s < g) {
      return InvalidArgument(
          "the input has S=" + std::to_string(s) +
          " tokens, fewer than moe.router.num_local_groups=" + std::to_string(g));
    }
    if (s * k > (int64_t{1} << 31) - 1) {
      return InvalidArgument("the input has S=" + std::to_string(s) + " tokens: S*k=" +
                             std::to_string(s * k) + " must be < 2^31 on the device router");
    }
    have_forward_ = false;
    s_ = s;
    logits_ = logits;
    noise_in_ = noise_in;
    noisy_ = RouterIsNoisy(cfg_, ctx);
    if (noisy_ && noise_in == nullptr) {
      return InvalidArgument(
          "DeviceRouter::Forward: the noisy router (NOISY_TOPK at training) needs "
          "noise_in");
    }
    const bool by_probability = cfg_.drop_policy() == config::PROBABILITY;
    MOE_RETURN_IF_ERROR(Carve(by_probability));
    const int64_t capacity = ComputeCapacity(cfg_, e, s, g, ctx.train);
    int64_t* const sum_i = static_cast<int64_t*>(summary_);
    int64_t *expert_offset = sum_i, *counts64 = sum_i + e + 1, *load = counts64 + g * e,
            *kept = load + e, *dropped = kept + e;
    double* const sum_d = reinterpret_cast<double*>(dropped + e);
    double *z = sum_d, *top1 = z + g, *prob_sums = top1 + g * e, *importance = prob_sums + g * e;
    MOE_RETURN_IF_ERROR(CudaCheck(
        cudaMemsetAsync(summary_, 0, SummaryWords() * sizeof(int64_t), stream_), "cudaMemset"));
    MOE_RETURN_IF_ERROR(CudaCheck(
        cudaMemsetAsync(a_.position, 0xff, static_cast<size_t>(s * k) * sizeof(int32_t), stream_),
        "cudaMemset"));
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaMemsetAsync(a_.token_row_offset, 0, sizeof(int64_t), stream_), "cudaMemset"));

    // Router: noise, softmax.
    const float* scores = logits;
    if (noisy_) {
      constexpr int kThreads = 256;
      NoiseKernel<<<Blocks(s * e, kThreads), kThreads, 0, stream_>>>(logits, noise_in, s * e, e,
                                                                     ctx, a_.eps, a_.scores);
      MOE_RETURN_IF_ERROR(Launched("router noise"));
      scores = a_.scores;
    }
    MOE_RETURN_IF_ERROR(SoftmaxRows(scores, s, e, a_.probs, stream_));

    // Selection, drop priority, capacity.
    constexpr int kThreads = 128;
    SelectKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(
        SelectArgs{a_.probs, bias, s, e, k, cfg_.random_routing(), ctx, a_.selected, a_.alive,
                   a_.key, a_.iota, reinterpret_cast<Count*>(load)});
    MOE_RETURN_IF_ERROR(Launched("router select"));
    const int32_t* order = nullptr;
    if (by_probability) {
      GroupOffsetsKernel<<<Blocks(g + 1, kThreads), kThreads, 0, stream_>>>(s, g, a_.offsets);
      MOE_RETURN_IF_ERROR(Launched("router group offsets"));
      size_t bytes = static_cast<size_t>(sort_bytes_);
      MOE_RETURN_IF_ERROR(CudaCheck(cub::DeviceSegmentedSort::StableSortPairsDescending(
                                        a_.sort_temp, bytes, static_cast<const float*>(a_.key),
                                        a_.key_sorted, static_cast<const int32_t*>(a_.iota),
                                        a_.order, s, g, static_cast<const int*>(a_.offsets),
                                        static_cast<const int*>(a_.offsets + 1), stream_),
                                    "drop-priority sort"));
      order = a_.order;
    }
    CapacityKernel<<<static_cast<unsigned>(g * e), kBlockThreads, 0, stream_>>>(
        a_.selected, a_.alive, order, s, e, k, g, capacity, a_.position, a_.counts);
    MOE_RETURN_IF_ERROR(Launched("router capacity"));
    RowBaseKernel<<<1, kBlockThreads, 0, stream_>>>(a_.counts, g, e, expert_offset, a_.group_base,
                                                    counts64);
    MOE_RETURN_IF_ERROR(Launched("router row bases"));

    // Gates, packed rows, per-token rows.
    GateKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(
        GateArgs{a_.probs, a_.selected, a_.position, a_.group_base, s, e, k, g,
                 cfg_.normalization(), a_.slot_raw, a_.slot_gate, a_.slot_expert, a_.slot_row,
                 a_.token_kept, reinterpret_cast<Count*>(kept), reinterpret_cast<Count*>(dropped)});
    MOE_RETURN_IF_ERROR(Launched("router gates"));
    size_t bytes = static_cast<size_t>(scan_bytes_);
    MOE_RETURN_IF_ERROR(
        CudaCheck(cub::DeviceScan::InclusiveSum(a_.scan_temp, bytes,
                                                static_cast<const int64_t*>(a_.token_kept),
                                                a_.token_row_offset + 1, s, stream_),
                  "per-token row scan"));
    LayoutKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(
        a_.slot_row, a_.slot_gate, a_.token_row_offset, s, k, a_.row_token, a_.row_gate,
        a_.token_rows);
    MOE_RETURN_IF_ERROR(Launched("router layout"));

    // The losses' per-group sums (z always: it is reported even at weight 0).
    GroupSumKernel<<<static_cast<unsigned>(g), kBlockThreads, 0, stream_>>>(s, g, 1,
                                                                            ZTerm{logits, e}, z);
    MOE_RETURN_IF_ERROR(Launched("z-loss sums"));
    const auto grid = static_cast<unsigned>(g * e);
    switch (cfg_.aux_loss()) {
      case config::SWITCH:
      case config::GSHARD:
        GroupSumKernel<<<grid, kBlockThreads, 0, stream_>>>(s, g, e, Top1Term{a_.selected, k},
                                                            top1);
        GroupSumKernel<<<grid, kBlockThreads, 0, stream_>>>(s, g, e, ProbTerm{a_.probs, e},
                                                            prob_sums);
        break;
      case config::IMPORTANCE_CV:
        GroupSumKernel<<<grid, kBlockThreads, 0, stream_>>>(
            s, g, e, ImportanceTerm{a_.probs, a_.selected, e, k, cfg_.normalization()}, importance);
        break;
      case config::NO_AUX_LOSS:
        break;
    }
    MOE_RETURN_IF_ERROR(Launched("aux-loss sums"));

    // One download, then the host's share: the plan's counts and metrics, the loss values.
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaMemcpyAsync(summary_host_.data(), summary_, SummaryWords() * sizeof(int64_t),
                                  cudaMemcpyDeviceToHost, stream_),
                  "download of the routing counts"));
    const double t1 = WallSeconds();
    MOE_RETURN_IF_ERROR(CudaCheck(cudaStreamSynchronize(stream_), "device router stream"));
    const double t2 = WallSeconds();
    FillPlan(capacity, plan);
    group_sums_ = SumsFromSummary();
    *losses = LossesFromSums(group_sums_);
    rows_ = plan->num_rows();
    dplan_ = DevicePlan{.rows = rows_,
                        .tokens = s,
                        .row_token = a_.row_token,
                        .row_gate = a_.row_gate,
                        .token_row_offset = a_.token_row_offset,
                        .token_rows = a_.token_rows};
    have_forward_ = true;
    host_seconds_ = (t1 - t0) + (WallSeconds() - t2);
    return Status::Ok();
  }

  Status Backward(const float* dgate_rows, double loss_scale, float* dlogits,
                  float* dnoise) override {
    if (!have_forward_) return FailedPrecondition("DeviceRouter::Backward without a Forward");
    const double t0 = WallSeconds();
    const int64_t s = s_, e = e_, g = g_;
    // The per-group loss gradients (G x E) from the forward's sums, uploaded in one copy.
    std::vector<GroupLossGradient> grads;
    for (const GroupLossSums& sums : group_sums_) {
      grads.push_back(LossGradientFromSums(cfg_, sums, loss_scale, g));
    }
    const bool every = !grads[0].to_every_prob.empty(), imp = !grads[0].dimportance.empty();
    coef_host_.assign(static_cast<size_t>(g * e * 3), 0);  // g·e doubles + g·e floats, rounded up
    auto* dimp_host = reinterpret_cast<double*>(coef_host_.data());
    auto* every_host = reinterpret_cast<float*>(coef_host_.data() + g * e * 2);
    for (int64_t gr = 0; gr < g; ++gr) {
      for (int64_t i = 0; i < e; ++i) {
        if (imp) dimp_host[gr * e + i] = grads[gr].dimportance[i];
        if (every) every_host[gr * e + i] = grads[gr].to_every_prob[i];
      }
    }
    if (every || imp) {
      MOE_RETURN_IF_ERROR(
          CudaCheck(cudaMemcpyAsync(a_.coef, coef_host_.data(), coef_host_.size() * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, stream_),
                    "upload of the loss gradients"));  // pageable: read by the time it returns
    }
    auto* coef = reinterpret_cast<char*>(a_.coef);
    constexpr int kThreads = 128;
    RouterBackwardKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(
        BackwardArgs{a_.probs,
                     logits_,
                     a_.eps,
                     noise_in_,
                     a_.slot_gate,
                     a_.slot_raw,
                     dgate_rows,
                     a_.selected,
                     a_.slot_row,
                     every ? reinterpret_cast<const float*>(coef + g * e * 8) : nullptr,
                     imp ? reinterpret_cast<const double*>(coef) : nullptr,
                     grads[0].z_weight,
                     s,
                     e,
                     k_,
                     g,
                     cfg_.normalization(),
                     noisy_,
                     a_.dprobs,
                     a_.dscores,
                     dlogits,
                     dnoise});
    host_seconds_ = WallSeconds() - t0;
    return Launched("router backward");
  }

  Status Fetch(DispatchPlan* p, RouterOutput* router) override {
    if (!have_forward_) return FailedPrecondition("DeviceRouter::Fetch without a Forward");
    const int64_t s = s_, e = e_, slots = s_ * k_, rows = rows_;
    // The copies below run on the legacy stream, which does not wait for a non-blocking one.
    MOE_RETURN_IF_ERROR(CudaCheck(cudaStreamSynchronize(stream_), "device router stream"));
    MOE_RETURN_IF_ERROR(Down(&p->selected, a_.selected, slots));
    p->slot_final = p->selected;
    MOE_RETURN_IF_ERROR(Down(&p->slot_expert, a_.slot_expert, slots));
    MOE_RETURN_IF_ERROR(Down(&p->slot_raw, a_.slot_raw, slots));
    MOE_RETURN_IF_ERROR(Down(&p->slot_gate, a_.slot_gate, slots));
    MOE_RETURN_IF_ERROR(Down(&p->slot_row, a_.slot_row, slots));
    MOE_RETURN_IF_ERROR(Down(&p->row_token, a_.row_token, rows));
    MOE_RETURN_IF_ERROR(Down(&p->row_gate, a_.row_gate, rows));
    MOE_RETURN_IF_ERROR(Down(&p->token_rows, a_.token_rows, rows));
    MOE_RETURN_IF_ERROR(Down(&p->token_row_offset, a_.token_row_offset, s + 1));
    p->row_expert.assign(static_cast<size_t>(rows), -1);
    for (int64_t ex = 0; ex < e; ++ex) {
      for (int64_t r = p->expert_offset[ex]; r < p->expert_offset[ex + 1]; ++r) {
        p->row_expert[r] = static_cast<int32_t>(ex);
      }
    }
    router->noisy = noisy_;
    MOE_RETURN_IF_ERROR(DownTensor(&router->logits, logits_));
    MOE_RETURN_IF_ERROR(DownTensor(&router->probs, a_.probs));
    if (noisy_) {
      MOE_RETURN_IF_ERROR(DownTensor(&router->noise_in, noise_in_));
      MOE_RETURN_IF_ERROR(DownTensor(&router->eps, a_.eps));
    } else {
      router->noise_in = Tensor();
      router->eps = Tensor();
    }
    return Status::Ok();
  }

 private:
  int64_t SummaryWords() const { return (e_ + 1) + g_ * e_ + 3 * e_ + g_ + 3 * g_ * e_; }

  // Lays out every S-sized array in the workspace (grown when S or the sort's needs grow).
  Status Carve(bool by_probability) {
    const int64_t s = s_, e = e_, k = k_, g = g_;
    size_t sort_bytes = 0, scan_bytes = 0;
    if (by_probability) {
      MOE_RETURN_IF_ERROR(CudaCheck(
          cub::DeviceSegmentedSort::StableSortPairsDescending(
              nullptr, sort_bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
              static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), s, g,
              static_cast<const int*>(nullptr), static_cast<const int*>(nullptr), stream_),
          "drop-priority sort size"));
    }
    MOE_RETURN_IF_ERROR(CudaCheck(
        cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                      static_cast<int64_t*>(nullptr), s, stream_),
        "per-token row scan size"));
    sort_bytes_ = static_cast<int64_t>(sort_bytes);
    scan_bytes_ = static_cast<int64_t>(scan_bytes);
    const auto layout = [&](Carver& c) {
      Arrays a;
      a.scores = c.Take<float>(s * e);
      a.probs = c.Take<float>(s * e);
      a.eps = c.Take<float>(s * e);
      a.dprobs = c.Take<float>(s * e);
      a.dscores = c.Take<float>(s * e);
      a.selected = c.Take<int32_t>(s * k);
      a.alive = c.Take<uint8_t>(s * k);
      a.position = c.Take<int32_t>(s * k);
      a.slot_raw = c.Take<float>(s * k);
      a.slot_gate = c.Take<float>(s * k);
      a.slot_expert = c.Take<int32_t>(s * k);
      a.slot_row = c.Take<int32_t>(s * k);
      a.row_token = c.Take<int32_t>(s * k);
      a.row_gate = c.Take<float>(s * k);
      a.token_rows = c.Take<int32_t>(s * k);
      a.key = c.Take<float>(s);
      a.key_sorted = c.Take<float>(s);
      a.iota = c.Take<int32_t>(s);
      a.order = c.Take<int32_t>(s);
      a.token_kept = c.Take<int64_t>(s);
      a.token_row_offset = c.Take<int64_t>(s + 1);
      a.offsets = c.Take<int>(g + 1);
      a.counts = c.Take<int32_t>(g * e);
      a.group_base = c.Take<int64_t>(g * e);
      a.coef = c.Take<int32_t>(g * e * 3);
      a.sort_temp = c.Take<char>(sort_bytes_);
      a.scan_temp = c.Take<char>(scan_bytes_);
      return a;
    };
    Carver sizing(nullptr);
    layout(sizing);
    MOE_ASSIGN_OR_RETURN(void* base, arena_.Get(sizing.used()));
    Carver real(static_cast<char*>(base));
    a_ = layout(real);
    return Status::Ok();
  }

  void FillPlan(int64_t capacity, DispatchPlan* p) const {
    const int64_t s = s_, e = e_, g = g_;
    const int64_t* w = summary_host_.data();
    *p = DispatchPlan();
    p->num_tokens = s;
    p->num_experts = e;
    p->top_k = k_;
    p->num_groups = g;
    p->capacity = capacity;
    p->normalization = cfg_.normalization();
    p->group_begin = GroupBounds(s, g);
    p->expert_offset.assign(w, w + e + 1);
    w += e + 1;
    p->group_expert_count.resize(static_cast<size_t>(g * e));
    for (int64_t i = 0; i < g * e; ++i) p->group_expert_count[i] = static_cast<int32_t>(w[i]);
    w += g * e;
    p->load_per_expert.assign(w, w + e);
    p->kept_per_expert.assign(w + e, w + 2 * e);
    p->dropped_per_expert.assign(w + 2 * e, w + 3 * e);
    for (int64_t v : p->dropped_per_expert) p->dropped_slots += v;
  }

  std::vector<GroupLossSums> SumsFromSummary() const {
    const int64_t e = e_, g = g_;
    const auto* d = reinterpret_cast<const double*>(summary_host_.data() + (e + 1) + g * e + 3 * e);
    const double *z = d, *top1 = z + g, *probs = top1 + g * e, *importance = probs + g * e;
    std::vector<GroupLossSums> out(static_cast<size_t>(g));
    for (int64_t gr = 0; gr < g; ++gr) {
      GroupLossSums& o = out[static_cast<size_t>(gr)];
      o.tokens = GroupBegin(s_, g, gr + 1) - GroupBegin(s_, g, gr);
      o.z = z[gr];
      switch (cfg_.aux_loss()) {
        case config::SWITCH:
        case config::GSHARD:
          o.top1.assign(top1 + gr * e, top1 + (gr + 1) * e);
          o.probs.assign(probs + gr * e, probs + (gr + 1) * e);
          break;
        case config::IMPORTANCE_CV:
          o.importance.assign(importance + gr * e, importance + (gr + 1) * e);
          break;
        case config::NO_AUX_LOSS:
          break;
      }
    }
    return out;
  }

  template <typename T>
  Status Down(std::vector<T>* dst, const T* src, int64_t count) {
    dst->resize(static_cast<size_t>(count));
    if (count == 0) return Status::Ok();
    return comm::CopyToHost(comm::MemorySpace::kDevice, dst->data(), src,
                            count * static_cast<int64_t>(sizeof(T)));
  }
  Status DownTensor(Tensor* dst, const float* src) {
    if (dst->rows() != s_ || dst->cols() != e_) *dst = Tensor(s_, e_);
    return comm::CopyToHost(comm::MemorySpace::kDevice, dst->data(), src,
                            s_ * e_ * static_cast<int64_t>(sizeof(float)));
  }

  struct Arrays {
    float *scores = nullptr, *probs = nullptr, *eps = nullptr, *dprobs = nullptr,
          *dscores = nullptr, *slot_raw = nullptr, *slot_gate = nullptr, *row_gate = nullptr,
          *key = nullptr, *key_sorted = nullptr;
    int32_t *selected = nullptr, *position = nullptr, *slot_expert = nullptr, *slot_row = nullptr,
            *row_token = nullptr, *token_rows = nullptr, *iota = nullptr, *order = nullptr,
            *counts = nullptr, *coef = nullptr;
    uint8_t* alive = nullptr;
    int64_t *token_kept = nullptr, *token_row_offset = nullptr, *group_base = nullptr;
    int* offsets = nullptr;
    char *sort_temp = nullptr, *scan_temp = nullptr;
  };

  const config::RouterConfig cfg_;
  cudaStream_t stream_;
  const int64_t e_, k_, g_;
  comm::Workspace arena_{comm::MemorySpace::kDevice}, summary_mem_{comm::MemorySpace::kDevice};
  void* summary_ = nullptr;
  std::vector<int64_t> summary_host_;
  std::vector<int32_t> coef_host_;
  Arrays a_;
  int64_t sort_bytes_ = 0, scan_bytes_ = 0;

  // The last Forward.
  bool have_forward_ = false, noisy_ = false;
  double host_seconds_ = 0.0;
  int64_t s_ = 0, rows_ = 0;
  const float *logits_ = nullptr, *noise_in_ = nullptr;
  std::vector<GroupLossSums> group_sums_;
  DevicePlan dplan_;
};

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

bool DeviceRouter::Supports(const config::RouterConfig& router, std::string* why_not) {
  std::string why;
  if (router.gate() == config::EXPERT_CHOICE) {
    why = "moe.router.gate=EXPERT_CHOICE routes on the host";
  } else if (router.reroute_overflow()) {
    why = "moe.router.reroute_overflow=true routes on the host (a sequential walk per group)";
  } else if (TopK(router) > routing::kMaxRankedExperts) {
    why = "moe.router.top_k=" + std::to_string(TopK(router)) + " is above the device router's " +
          std::to_string(routing::kMaxRankedExperts);
  }
  if (why_not != nullptr) *why_not = why;
  return why.empty();
}

StatusOr<std::unique_ptr<DeviceRouter>> DeviceRouter::Create(const config::RouterConfig& router,
                                                             int64_t num_experts, void* stream) {
  std::string why;
  if (!Supports(router, &why)) return InvalidArgument("DeviceRouter: " + why);
  if (num_experts < TopK(router)) {
    return InvalidArgument("DeviceRouter: moe.num_experts=" + std::to_string(num_experts) +
                           " must be >= moe.router.top_k=" + std::to_string(TopK(router)));
  }
  auto r = std::make_unique<CudaRouter>(router, num_experts, stream);
  MOE_RETURN_IF_ERROR(r->Init());
  return std::unique_ptr<DeviceRouter>(std::move(r));
}

}  // namespace moe::gpu
