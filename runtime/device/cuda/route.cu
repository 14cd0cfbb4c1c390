// Device routing (runtime/device/cuda/route.h). One kernel per stage, all on the caller's stream:
//   [noise: eps and noisy scores] -> softmax (one warp per row) -> select (one thread per token:
//   top-k by probs + bias, random routing, the drop-priority key, per-expert load)
//   -> [PROBABILITY: stable segmented sort of each group's tokens by key, descending (CUB)]
//   -> capacity (one block per (group, expert): a block-wide scan over the group's slots in
//   placement order gives each slot its position) -> row bases (one block: expert offsets and each
//   (group, expert)'s first row) -> gates (one thread per token: normalization, packed row,
//   metrics)
//   -> per-token row counts scanned into token_row_offset (CUB) -> layout (one thread per token:
//   row_token, row_gate, token_rows)
//   Expert choice instead of select .. layout: the probs scattered into one segment per (group,
//   expert) -> a stable segmented sort by prob, descending (CUB) -> row bases -> placement (one
//   thread per (group, expert, position < C): ranks, ec_token, row_token, row_gate) -> per-token
//   counts, scan, layout (rows in expert order)
//   -> the losses' per-group sums (one block per (group, expert), a deterministic block reduction)
//   -> one download of the counts and sums.
// Backward: one thread per token through routing_math.h's gate, loss and softmax backward.
// Each thread's work is a function of runtime/routing/route_steps.h, which the CPU test runs in this order.
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

#include "base/memory.h"
#include "experts/cuda/cublas_loader.h"
#include "base/clock.h"
#include "base/rng.h"
#include "runtime/config/config.h"
#include "runtime/device/cuda/route.h"
#include "runtime/routing/route_steps.h"
#include "runtime/routing/routing_math.h"

namespace moe::gpu {
namespace {

using experts::cuda::CudaCheck;
using route_steps::Count;
using route_steps::ImportanceTerm;
using route_steps::ProbTerm;
using route_steps::Top1Term;
using route_steps::ZTerm;

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

// Noisy top-k at training: eps and the noisy scores, one thread per element.
__global__ void NoiseKernel(const float* logits, const float* noise_in, int64_t n, int64_t e,
                            RouteContext ctx, float* eps, float* scores) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i < n) route_steps::NoiseElement(logits, noise_in, e, ctx, i, eps, scores);
}

__global__ void SelectKernel(route_steps::SelectArgs a) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t < a.tokens) route_steps::SelectToken(a, t);
}

__global__ void GroupOffsetsKernel(int64_t tokens, int64_t groups, int* offsets) {
  const int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (g <= groups) offsets[g] = static_cast<int>(GroupBegin(tokens, groups, g));
}

constexpr int kBlockThreads = 256;

// One block per (group, expert): the group's slots in placement order, chunk by chunk, a
// block-wide exclusive scan of the chunk's claims on this expert (route_steps::CapacityArgs; the
// CPU replays it lane by lane with route_steps::CapacityBlockOnHost).
__global__ void CapacityKernel(route_steps::CapacityArgs a) {
  using Scan = cub::BlockScan<int, kBlockThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t block = blockIdx.x;
  int64_t begin = 0;
  const int64_t slots = route_steps::CapacitySlots(a, block, &begin);
  int64_t carry = 0;
  for (int64_t base = 0; base < slots; base += kBlockThreads) {
    int64_t slot = -1;
    const int flag = route_steps::CapacityClaim(a, block, begin, slots, base + threadIdx.x, &slot);
    int before = 0, chunk = 0;
    Scan(temp).ExclusiveSum(flag, before, chunk);
    if (flag) route_steps::CapacityPlace(a, slot, carry, before);
    carry += chunk;
    __syncthreads();  // temp storage is reused by the next chunk
  }
  if (threadIdx.x == 0) route_steps::CapacityFinish(a, block, carry);
}

// One block: the row bases' three phases (route_steps::RowBaseOfExpert, ExpertOffsets,
// ShiftRowBase).
__global__ void RowBaseKernel(const int32_t* counts, int64_t groups, int64_t experts,
                              int64_t* expert_offset, int64_t* group_base, int64_t* counts64) {
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    route_steps::RowBaseOfExpert(counts, groups, experts, e, group_base, counts64, expert_offset);
  }
  __syncthreads();
  if (threadIdx.x == 0) route_steps::ExpertOffsets(experts, expert_offset);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    route_steps::ShiftRowBase(groups, experts, e, expert_offset, group_base);
  }
}

__global__ void GateKernel(route_steps::GateArgs a) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t < a.tokens) route_steps::GateToken(a, t);
}

__global__ void LayoutKernel(const int32_t* slot_row, const float* slot_gate,
                             const int64_t* token_row_offset, int64_t tokens, int64_t k,
                             int32_t* row_token, float* row_gate, int32_t* token_rows) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t < tokens) {
    route_steps::LayoutToken(slot_row, slot_gate, token_row_offset, k, t, row_token, row_gate,
                             token_rows);
  }
}

// Expert choice: the keys and tokens of every (group, expert) segment, one thread per S x E
// element.
__global__ void EcKeyKernel(const float* probs, int64_t tokens, int64_t groups, int64_t experts,
                            float* key, int32_t* token) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i < tokens * experts)
    route_steps::EcKeyElement(probs, tokens, groups, experts, i, key, token);
}

// Expert choice: each segment's offset and kept count (one thread per segment, and the end).
__global__ void EcSegmentKernel(int64_t tokens, int64_t groups, int64_t experts, int64_t capacity,
                                int* offsets, int32_t* counts) {
  const int64_t seg = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (seg <= groups * experts) {
    route_steps::EcSegment(tokens, groups, experts, capacity, seg, offsets, counts);
  }
}

// Expert choice: one thread per (segment, position < C).
__global__ void EcPlaceKernel(route_steps::EcPlaceArgs a, int64_t n) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i < n) route_steps::EcPlace(a, i);
}

__global__ void EcTokenKeptKernel(const int32_t* rank, int64_t tokens, int64_t experts,
                                  int64_t* token_kept) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t < tokens) token_kept[t] = route_steps::EcTokenKept(rank, experts, t);
}

__global__ void EcLayoutKernel(const int32_t* rank, const int64_t* group_base,
                               const int64_t* token_row_offset, int64_t tokens, int64_t groups,
                               int64_t experts, int32_t* token_rows) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t < tokens) {
    route_steps::EcLayoutToken(rank, group_base, token_row_offset, tokens, groups, experts, t,
                               token_rows);
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

__global__ void RouterBackwardKernel(route_steps::BackwardArgs a) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t < a.tokens) route_steps::RouterBackwardToken(a, t);
}

Status Launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::Ok();
  return Internal(std::string("CUDA ") + what + " launch: " + cudaGetErrorString(err));
}

unsigned Blocks(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

class CudaRouter final : public DeviceRouter {
 public:
  CudaRouter(const config::RouterConfig& cfg, int64_t experts, void* stream,
             MemoryResource* memory)
      : cfg_(cfg),
        stream_(static_cast<cudaStream_t>(stream)),
        e_(experts),
        ec_(cfg.gate() == config::EXPERT_CHOICE),
        k_(ec_ ? 0 : TopK(cfg)),
        g_(cfg.num_local_groups()),
        arena_(memory),
        summary_mem_(memory) {}

  Status Init() {
    // route_steps::Summary: one download per forward.
    summary_host_.resize(static_cast<size_t>(SummaryWords()));
    MOE_ASSIGN_OR_RETURN(summary_,
                         summary_mem_.Get(SummaryWords() * static_cast<int64_t>(sizeof(int64_t))));
    return Status::Ok();
  }

  const PlanRows& device_plan() const override { return dplan_; }
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
    // Rows, slots and (expert choice) the sort's items are int32 / int on the device.
    const int64_t items = ec_ ? s * e : s * k;
    if (items > (int64_t{1} << 31) - 1) {
      return InvalidArgument("the input has S=" + std::to_string(s) +
                             " tokens: " + (ec_ ? "S*E=" : "S*k=") + std::to_string(items) +
                             " must be < 2^31 on the device router");
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
    const int64_t capacity = ComputeCapacity(cfg_, e, s, g, ctx.train);
    MOE_RETURN_IF_ERROR(Carve(capacity));
    const route_steps::Summary l{e, g};
    int64_t* const words = static_cast<int64_t*>(summary_);
    int64_t *expert_offset = words + l.expert_offset(), *counts64 = words + l.counts(),
            *load = words + l.load(), *kept = words + l.kept(), *dropped = words + l.dropped();
    const auto doubles = [&](int64_t at) { return reinterpret_cast<double*>(words + at); };
    double *z = doubles(l.z()), *top1 = doubles(l.top1()), *prob_sums = doubles(l.probs()),
           *importance = doubles(l.importance());
    MOE_RETURN_IF_ERROR(CudaCheck(
        cudaMemsetAsync(summary_, 0, SummaryWords() * sizeof(int64_t), stream_), "cudaMemset"));
    MOE_RETURN_IF_ERROR(CudaCheck(
        cudaMemsetAsync(a_.position, 0xff, static_cast<size_t>(s * k) * sizeof(int32_t), stream_),
        "cudaMemset"));
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaMemsetAsync(a_.token_row_offset, 0, sizeof(int64_t), stream_), "cudaMemset"));
    if (ec_) {
      MOE_RETURN_IF_ERROR(CudaCheck(
          cudaMemsetAsync(a_.ec_rank, 0xff, static_cast<size_t>(s * e) * sizeof(int32_t), stream_),
          "cudaMemset"));
      MOE_RETURN_IF_ERROR(CudaCheck(
          cudaMemsetAsync(a_.ec_token, 0xff,
                          static_cast<size_t>(g * e * capacity) * sizeof(int32_t), stream_),
          "cudaMemset"));
    }

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

    if (ec_) {
      MOE_RETURN_IF_ERROR(ExpertChoice(capacity, expert_offset, counts64));
    } else {
      MOE_RETURN_IF_ERROR(
          TokenChoice(ctx, bias, capacity, expert_offset, counts64, load, kept, dropped));
    }

    // The losses' per-group sums (z always: it is reported even at weight 0).
    GroupSumKernel<<<static_cast<unsigned>(g), kBlockThreads, 0, stream_>>>(s, g, 1,
                                                                            ZTerm{logits, e}, z);
    MOE_RETURN_IF_ERROR(Launched("z-loss sums"));
    const auto grid = static_cast<unsigned>(g * e);
    switch (cfg_.aux_loss()) {
      case config::SWITCH:
      case config::GSHARD:
      case config::SWITCH_TOPK:
        GroupSumKernel<<<grid, kBlockThreads, 0, stream_>>>(
            s, g, e, Top1Term{a_.selected, k, cfg_.aux_loss() == config::SWITCH_TOPK ? k : 1},
            top1);
        GroupSumKernel<<<grid, kBlockThreads, 0, stream_>>>(s, g, e, ProbTerm{a_.probs, e},
                                                            prob_sums);
        break;
      case config::IMPORTANCE_CV:
        GroupSumKernel<<<grid, kBlockThreads, 0, stream_>>>(
            s, g, e, ImportanceTerm{a_.probs, a_.selected, e, k, cfg_.normalization()}, importance);
        break;
      case config::SEQUENCE:  // routes on the host (Supports)
      case config::NO_AUX_LOSS:
        break;
    }
    MOE_RETURN_IF_ERROR(Launched("aux-loss sums"));

    // One download, then the host's share: the plan's counts and metrics, the loss values. (Into
    // pageable memory the copy returns only when done: the wait is in it.)
    const double t1 = WallSeconds();
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaMemcpyAsync(summary_host_.data(), summary_, SummaryWords() * sizeof(int64_t),
                                  cudaMemcpyDeviceToHost, stream_),
                  "download of the routing counts"));
    MOE_RETURN_IF_ERROR(CudaCheck(cudaStreamSynchronize(stream_), "device router stream"));
    const double t2 = WallSeconds();
    route_steps::PlanFromSummary(summary_host_.data(), l, s, k, capacity, cfg_.normalization(), ec_,
                                 plan);
    group_sums_ = route_steps::LossSumsFromSummary(summary_host_.data(), l, s, cfg_.aux_loss(), k);
    *losses = LossesFromSums(group_sums_);
    rows_ = plan->num_rows();
    dplan_ = PlanRows{.rows = rows_,
                        .tokens = s,
                        .row_token = a_.row_token,
                        .row_gate = a_.row_gate,
                        .token_row_offset = a_.token_row_offset,
                        .token_rows = a_.token_rows};
    have_forward_ = true;
    host_seconds_ = (t1 - t0) + (WallSeconds() - t2);
    return Status::Ok();
  }

  // Token choice after the softmax: selection, drop priority, capacity, row bases, gates, the
  // per-token rows (the summary's expert_offset, counts and load/kept/dropped counters).
  Status TokenChoice(const RouteContext& ctx, const float* bias, int64_t capacity,
                     int64_t* expert_offset, int64_t* counts64, int64_t* load, int64_t* kept,
                     int64_t* dropped) {
    const int64_t s = s_, e = e_, k = k_, g = g_;
    const bool by_probability = cfg_.drop_policy() == config::PROBABILITY;
    constexpr int kThreads = 128;
    SelectKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(
        route_steps::SelectArgs{a_.probs, bias, s, e, k, cfg_.random_routing(), ctx, a_.selected,
                                a_.alive, a_.key, a_.iota, reinterpret_cast<Count*>(load)});
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
        route_steps::CapacityArgs{a_.selected, a_.alive, order, s, e, k, g, capacity,
                                  a_.position, a_.counts});
    MOE_RETURN_IF_ERROR(Launched("router capacity"));
    RowBaseKernel<<<1, kBlockThreads, 0, stream_>>>(a_.counts, g, e, expert_offset, a_.group_base,
                                                    counts64);
    MOE_RETURN_IF_ERROR(Launched("router row bases"));

    // Gates, packed rows, per-token rows.
    GateKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(route_steps::GateArgs{
        a_.probs, a_.selected, a_.position, a_.group_base, s, e, k, g, cfg_.normalization(),
        a_.slot_raw, a_.slot_gate, a_.slot_expert, a_.slot_row, a_.token_kept,
        reinterpret_cast<Count*>(kept), reinterpret_cast<Count*>(dropped),
        static_cast<float>(cfg_.scaling_factor())});
    MOE_RETURN_IF_ERROR(Launched("router gates"));
    MOE_RETURN_IF_ERROR(ScanTokenRows());
    LayoutKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(
        a_.slot_row, a_.slot_gate, a_.token_row_offset, s, k, a_.row_token, a_.row_gate,
        a_.token_rows);
    return Launched("router layout");
  }

  // Expert choice after the softmax: every (group, expert) segment of the probs sorted by prob
  // (stable, descending; CUB), its first min(C, n) tokens placed, the row bases, the per-token
  // rows in expert order (the summary's expert_offset and counts).
  Status ExpertChoice(int64_t capacity, int64_t* expert_offset, int64_t* counts64) {
    const int64_t s = s_, e = e_, g = g_, segs = g_ * e_;
    constexpr int kThreads = 128;
    EcKeyKernel<<<Blocks(s * e, kThreads), kThreads, 0, stream_>>>(a_.probs, s, g, e, a_.ec_key,
                                                                   a_.ec_token_in);
    MOE_RETURN_IF_ERROR(Launched("expert-choice keys"));
    EcSegmentKernel<<<Blocks(segs + 1, kThreads), kThreads, 0, stream_>>>(s, g, e, capacity,
                                                                          a_.offsets, a_.counts);
    MOE_RETURN_IF_ERROR(Launched("expert-choice segments"));
    size_t bytes = static_cast<size_t>(sort_bytes_);
    MOE_RETURN_IF_ERROR(CudaCheck(
        cub::DeviceSegmentedSort::StableSortPairsDescending(
            a_.sort_temp, bytes, static_cast<const float*>(a_.ec_key), a_.ec_key_sorted,
            static_cast<const int32_t*>(a_.ec_token_in), a_.ec_sorted, static_cast<int>(s * e),
            static_cast<int>(segs), static_cast<const int*>(a_.offsets),
            static_cast<const int*>(a_.offsets + 1), stream_),
        "expert-choice sort"));
    RowBaseKernel<<<1, kBlockThreads, 0, stream_>>>(a_.counts, g, e, expert_offset, a_.group_base,
                                                    counts64);
    MOE_RETURN_IF_ERROR(Launched("router row bases"));
    const int64_t places = segs * capacity;
    EcPlaceKernel<<<Blocks(places, kThreads), kThreads, 0, stream_>>>(
        route_steps::EcPlaceArgs{a_.probs, a_.ec_sorted, a_.offsets, a_.counts, a_.group_base, e,
                                 capacity, a_.ec_rank, a_.ec_token, a_.row_token, a_.row_gate},
        places);
    MOE_RETURN_IF_ERROR(Launched("expert-choice placement"));
    EcTokenKeptKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(a_.ec_rank, s, e,
                                                                     a_.token_kept);
    MOE_RETURN_IF_ERROR(Launched("expert-choice token counts"));
    MOE_RETURN_IF_ERROR(ScanTokenRows());
    EcLayoutKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(
        a_.ec_rank, a_.group_base, a_.token_row_offset, s, g, e, a_.token_rows);
    return Launched("expert-choice layout");
  }

  // token_row_offset[1 ..] = the inclusive scan of token_kept (token_row_offset[0] is zeroed).
  Status ScanTokenRows() {
    size_t bytes = static_cast<size_t>(scan_bytes_);
    return CudaCheck(cub::DeviceScan::InclusiveSum(a_.scan_temp, bytes,
                                                   static_cast<const int64_t*>(a_.token_kept),
                                                   a_.token_row_offset + 1, s_, stream_),
                     "per-token row scan");
  }

  Status Backward(const float* dgate_rows, LossScale loss_scale, float* dlogits,
                  float* dnoise) override {
    if (!have_forward_) return FailedPrecondition("DeviceRouter::Backward without a Forward");
    const double t0 = WallSeconds();
    const int64_t s = s_, e = e_, g = g_;
    // The per-group loss gradients (G x E) from the forward's sums, uploaded in one copy.
    packed_ = route_steps::PackLossGradients(cfg_, group_sums_, loss_scale, e);
    if (packed_.every || packed_.importance) {
      MOE_RETURN_IF_ERROR(CudaCheck(
          cudaMemcpyAsync(a_.coef, packed_.words.data(), packed_.words.size() * sizeof(int32_t),
                          cudaMemcpyHostToDevice, stream_),
          "upload of the loss gradients"));  // pageable: read by the time it returns
    }
    constexpr int kThreads = 128;
    RouterBackwardKernel<<<Blocks(s, kThreads), kThreads, 0, stream_>>>(route_steps::BackwardArgs{
        a_.probs,
        logits_,
        a_.eps,
        noise_in_,
        a_.slot_gate,
        a_.slot_raw,
        dgate_rows,
        a_.selected,
        a_.slot_row,
        ec_ ? a_.ec_rank : nullptr,
        a_.group_base,
        packed_.to_every_prob(a_.coef),
        packed_.dimportance(a_.coef),
        packed_.z_weight,
        s,
        e,
        k_,
        g,
        cfg_.normalization(),
        noisy_,
        a_.dprobs,
        a_.dscores,
        dlogits,
        dnoise,
        static_cast<float>(cfg_.scaling_factor())});
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
    if (ec_) MOE_RETURN_IF_ERROR(Down(&p->ec_token, a_.ec_token, g_ * e * p->capacity));
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
  int64_t SummaryWords() const { return route_steps::Summary{e_, g_}.words(); }

  // Lays out every S-sized array in the workspace (grown when S or the sort's needs grow).
  Status Carve(int64_t capacity) {
    const int64_t s = s_, e = e_, k = k_, g = g_;
    // Packed rows: at most one per slot, or (expert choice) C per (group, expert).
    const int64_t max_rows = ec_ ? g * e * capacity : s * k;
    size_t sort_bytes = 0, scan_bytes = 0;
    if (ec_) {
      MOE_RETURN_IF_ERROR(CudaCheck(
          cub::DeviceSegmentedSort::StableSortPairsDescending(
              nullptr, sort_bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
              static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
              static_cast<int>(s * e), static_cast<int>(g * e), static_cast<const int*>(nullptr),
              static_cast<const int*>(nullptr), stream_),
          "expert-choice sort size"));
    } else if (cfg_.drop_policy() == config::PROBABILITY) {
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
      a.row_token = c.Take<int32_t>(max_rows);
      a.row_gate = c.Take<float>(max_rows);
      a.token_rows = c.Take<int32_t>(max_rows);
      a.key = c.Take<float>(s);
      a.key_sorted = c.Take<float>(s);
      a.iota = c.Take<int32_t>(s);
      a.order = c.Take<int32_t>(s);
      a.token_kept = c.Take<int64_t>(s);
      a.token_row_offset = c.Take<int64_t>(s + 1);
      a.offsets = c.Take<int>((ec_ ? g * e : g) + 1);
      if (ec_) {
        a.ec_key = c.Take<float>(s * e);
        a.ec_key_sorted = c.Take<float>(s * e);
        a.ec_token_in = c.Take<int32_t>(s * e);
        a.ec_sorted = c.Take<int32_t>(s * e);
        a.ec_rank = c.Take<int32_t>(s * e);
        a.ec_token = c.Take<int32_t>(g * e * capacity);
      }
      a.counts = c.Take<int32_t>(g * e);
      a.group_base = c.Take<int64_t>(g * e);
      a.coef = c.Take<int32_t>(g * e * 3);
      a.sort_temp = c.Take<char>(sort_bytes_);
      a.scan_temp = c.Take<char>(scan_bytes_);
      return a;
    };
    MOE_ASSIGN_OR_RETURN(a_, arena_.Carve(layout));
    return Status::Ok();
  }

  template <typename T>
  Status Down(std::vector<T>* dst, const T* src, int64_t count) {
    dst->resize(static_cast<size_t>(count));
    if (count == 0) return Status::Ok();
    return CopyToHost(MemorySpace::kDevice, dst->data(), src,
                            count * static_cast<int64_t>(sizeof(T)));
  }
  Status DownTensor(Tensor* dst, const float* src) {
    if (dst->rows() != s_ || dst->cols() != e_) *dst = Tensor(s_, e_);
    return CopyToHost(MemorySpace::kDevice, dst->data(), src,
                            s_ * e_ * static_cast<int64_t>(sizeof(float)));
  }

  struct Arrays {
    float *scores = nullptr, *probs = nullptr, *eps = nullptr, *dprobs = nullptr,
          *dscores = nullptr, *slot_raw = nullptr, *slot_gate = nullptr, *row_gate = nullptr,
          *key = nullptr, *key_sorted = nullptr, *ec_key = nullptr, *ec_key_sorted = nullptr;
    int32_t *ec_token_in = nullptr, *ec_sorted = nullptr, *ec_rank = nullptr, *ec_token = nullptr;
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
  const int64_t e_;
  const bool ec_;  // expert choice (k_ = 0: no slots)
  const int64_t k_, g_;
  Workspace arena_, summary_mem_;
  void* summary_ = nullptr;
  std::vector<int64_t> summary_host_;
  route_steps::PackedLossGradients packed_;  // the last Backward's upload
  Arrays a_;
  int64_t sort_bytes_ = 0, scan_bytes_ = 0;

  // The last Forward.
  bool have_forward_ = false, noisy_ = false;
  double host_seconds_ = 0.0;
  int64_t s_ = 0, rows_ = 0;
  const float *logits_ = nullptr, *noise_in_ = nullptr;
  std::vector<GroupLossSums> group_sums_;
  PlanRows dplan_;
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
  if (router.gate() == config::SOFT) {
    why = "moe.router.gate=SOFT routes on the host (its softmax over each group's tokens)";
  } else if (router.reroute_overflow()) {
    why = "moe.router.reroute_overflow=true routes on the host (a sequential walk per group)";
  } else if (router.score_function() != config::SOFTMAX) {
    why = "moe.router.score_function=" + config::ScoreFunction_Name(router.score_function()) +
          " routes on the host";
  } else if (router.num_expert_groups() > 1) {
    why = "moe.router.num_expert_groups=" + std::to_string(router.num_expert_groups()) +
          " (group-limited top-k) routes on the host";
  } else if (router.gate() != config::EXPERT_CHOICE &&
             (router.drop_policy() == config::EXPERT_SCORE ||
              router.drop_policy() == config::TOKEN_ORDER)) {
    why = "moe.router.drop_policy=" + config::DropPolicy_Name(router.drop_policy()) +
          " routes on the host";
  } else if (router.aux_loss() == config::SEQUENCE) {
    why = "moe.router.aux_loss=SEQUENCE routes on the host";
  } else if (router.aux_loss_scope() != config::LOCAL) {
    why = "moe.router.aux_loss_scope=GLOBAL needs the world's counts (the CPU layer)";
  } else if (router.gate() != config::EXPERT_CHOICE && TopK(router) > routing::kMaxRankedExperts) {
    why = "moe.router.top_k=" + std::to_string(TopK(router)) + " is above the device router's " +
          std::to_string(routing::kMaxRankedExperts);
  }
  if (why_not != nullptr) *why_not = why;
  return why.empty();
}

StatusOr<std::unique_ptr<DeviceRouter>> DeviceRouter::Create(const config::RouterConfig& router,
                                                             int64_t num_experts, void* stream,
                                                             MemoryResource* memory) {
  std::string why;
  if (!Supports(router, &why)) return InvalidArgument("DeviceRouter: " + why);
  if (router.gate() != config::EXPERT_CHOICE && num_experts < TopK(router)) {
    return InvalidArgument("DeviceRouter: moe.num_experts=" + std::to_string(num_experts) +
                           " must be >= moe.router.top_k=" + std::to_string(TopK(router)));
  }
  auto r = std::make_unique<CudaRouter>(router, num_experts, stream,
                                        memory != nullptr ? memory
                                                          : DefaultResource(MemorySpace::kDevice));
  MOE_RETURN_IF_ERROR(r->Init());
  return std::unique_ptr<DeviceRouter>(std::move(r));
}

}  // namespace moe::gpu
