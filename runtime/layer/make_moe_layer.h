// MakeMoeLayer: the layer the config's compute section asks for — CpuMoeLayer
// (runtime/layer/cpu_moe_layer.h) for compute.device=CPU, DeviceMoeLayer
// (runtime/layer/device_moe_layer.h) on the rank's GPU for CUDA — local, or expert-parallel over a
// communicator of the expert-parallel group.
#pragma once

#include <memory>

#include "comm/communicator.h"
#include "proto/moe_config.pb.h"
#include "base/status.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/exchange/expert_placement.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/exchange/redundant_experts.h"

namespace moe {

struct MoeLayerOptions {
  // The expert-parallel group: this rank holds experts [rank·E/W, (rank+1)·E/W) of its W ranks
  // (E % W == 0). Host memory for the CPU layer, device memory for the device layer. nullptr: all
  // E experts in this process. Not owned; must outlive the layer.
  comm::Communicator* ep = nullptr;
  // parallel.dropless_exchange, parallel.pipeline_degree, parallel.wire_dtype and the EP group's
  // ranks per node (the device layer always exchanges exactly the kept rows, flat, in fp32; a
  // local CPU layer uses only the wire dtype).
  ExchangeOptions exchange;
  // This rank's index for compute.gpu = -1 (GPU = rank mod the visible devices).
  int rank = 0;
  // router.aux_loss_scope GLOBAL: the ranks whose tokens f is counted over (host memory; the CPU
  // layer only). nullptr: this process's groups. Not owned; must outlive the layer.
  comm::Communicator* balance = nullptr;
  // Redundant experts (CPU layer, with `ep`): the placement of the E + R physical experts over the
  // EP group; this rank holds its placement.per_rank physical experts (first_expert() = rank ·
  // per_rank) and the layer runs a RedundantExpertExecutor (runtime/exchange/redundant_experts.h).
  // Empty (num_logical 0): no redundancy.
  ExpertPlacement placement;
};

// The RedundantExpertExecutor of a layer MakeMoeLayer made with a placement, null otherwise (to
// change the placement when rebalancing).
RedundantExpertExecutor* RedundantExecutorOf(MoeLayer* layer);

// kInvalidArgument for a compute section or communicator that does not fit; CUDA without a GPU or
// without a CUDA build fails with the reason.
StatusOr<std::unique_ptr<MoeLayer>> MakeMoeLayer(const config::LayerConfig& layer,
                                                 const config::ComputeConfig& compute,
                                                 const MoeLayerOptions& options = {});

}  // namespace moe
