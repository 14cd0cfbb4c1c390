// The MoE layer with its data on one GPU: parameters, activations and gradients live in device
// memory for the whole call; the caller hands device pointers in and gets device pointers back.
// The production form of the single-GPU layer (issue "GPU path"), against which the layer
// benchmark compares PyTorch on the same GPU.
//
// Data flow of one call (every stage one cuBLAS call or one kernel, all on one CUDA stream):
//   logits = x·Wg (cuBLAS, fp32; and x·Wnoise for the noisy router at training)
//   -> routing on the device (runtime/device/cuda/route.h: softmax, selection, random routing, capacity
//      with either drop policy, gates — or expert choice —, packed-row layout, the losses' sums),
//      with one small
//      download (the per-(group, expert) counts, metrics and loss sums) — or, for what the device
//      router does not do (reroute_overflow, token choice with k > 16) or with
//      DeviceLayerOptions::route_on_device false, the logits to the host, FinishRouter +
//      BuildDispatchPlan + losses there (the CPU layer's code) and the plan's index arrays up
//   -> PermuteRows -> grouped expert FFN (experts/cuda/grouped_ffn.h; fp32 or bf16) -> shared
//      experts on all tokens -> UnpermuteRows (gated, in slot order).
// Backward: PermuteGradRows (dY rows and the gates' gradients) -> grouped FFN backward -> shared
// experts -> UnpermuteRows (dX) -> the router's backward (on the device; or the gates' gradients
// down, RouterScoreGradients on the host, dlogits up) -> dWg += xᵀ·dlogits, dX += dlogits·Wgᵀ
// (cuBLAS).
//
// The grouped GEMM needs each expert's row count on the host (cublasGemmGroupedBatchedEx takes
// host problem sizes), so one synchronization per forward is in the design; routing on the device
// makes it the only one and leaves no S x E traffic (docs/GPU_NOTES.md).
//
// Expert parallelism (DeviceLayerOptions::comm) adds a W x L counts all-to-all per forward, then
// the rows' all-to-alls on device buffers in pipeline_degree chunks (runtime/moe/ep_row_maps.h): chunk
// j + 1's dispatch is in flight while chunk j's experts run, and chunk j's combine while chunk
// j + 1's run — Tutel's overlap, with each chunk a part of the grouped FFN of its own.
//
// Without a CUDA build Create() fails with kUnimplemented; without a visible GPU with
// kFailedPrecondition.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "experts/cuda/grouped_ffn.h"
#include "proto/moe_config.pb.h"
#include "proto/report.pb.h"
#include "base/status.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/routing/losses.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/routing/router.h"

namespace moe {

struct DeviceLayerOptions {
  int device = 0;  // CUDA device index
  // Storage of the routed and shared experts' GEMM operands (fp32 accumulation either way). The
  // router is always fp32, so routing is that of the CPU layer.
  experts::cuda::Precision precision = experts::cuda::Precision::kFloat32;
  // Expert parallelism: with a communicator of W ranks (device memory: NCCL, or loopback ranks
  // with memory=kDevice sharing GPUs), this rank holds experts [rank·E/W, (rank+1)·E/W) and the
  // expert step becomes dispatch all-to-all -> regroup -> grouped FFN -> regroup back -> combine
  // all-to-all, all on device buffers (E % W == 0). nullptr: all E experts here. Not owned.
  comm::Communicator* comm = nullptr;
  // With comm: chunks per exchange, 1..16 (parallel.pipeline_degree); 1 = one all-to-all each way.
  // Results equal those of 1 chunk up to the order of the expert weight-gradient sums.
  int pipeline_degree = 1;
  // Route on the device when gpu::DeviceRouter::Supports the router config (else on the host, the
  // CPU layer's code). false: always on the host.
  bool route_on_device = true;
};

class DeviceMoeLayer : public MoeLayer {
 public:
  // A layer holding all E experts of `cfg` (or, with options.comm, its rank's E/W) on
  // `options.device`. Parameters are zero until SetParams.
  static StatusOr<std::unique_ptr<DeviceMoeLayer>> Create(const config::LayerConfig& cfg,
                                                          const DeviceLayerOptions& options);

  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  // Backward leaving the parameter gradients on the device (AddGradients brings them down).
  using MoeLayer::Backward;
  Status Backward(const float* dy, float* dx) { return Backward(dy, dx, nullptr); }

  // The cudaStream_t all work is ordered on: enqueue producers of x / dy and consumers of y / dx on
  // it, or synchronize.
  virtual void* stream() const = 0;
  // Seconds the last Forward and the Backward after it spent in host work, excluding copies and
  // waits: routing on the host, FinishRouter, the plan, the losses, staging the plan and
  // RouterScoreGradients; on the device, the plan's counts and the losses from their sums.
  virtual double host_seconds() const = 0;
  // Whether this layer routes on the device (DeviceLayerOptions::route_on_device and a router
  // config the device router supports). Then plan() holds the counts and metrics only (sizes,
  // capacity, group bounds, expert_offset, group_expert_count, per-expert kept/dropped/load) and
  // router_output() is empty until FetchPlan (which waits).
  virtual bool routes_on_device() const = 0;
};

}  // namespace moe
