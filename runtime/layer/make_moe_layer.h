// MakeMoeLayer: the layer the config's compute section asks for — the one MoeLayer
// (runtime/layer/moe_layer.h) on the host device for compute.device=CPU, on the rank's GPU for
// CUDA (runtime/device/compute.h picks the device) — local, expert-parallel over a communicator of
// the expert-parallel group, or with redundant experts. The factory sits above the devices it
// picks from.
#pragma once

#include <memory>

#include "base/status.h"
#include "comm/communicator.h"
#include "proto/moe_config.pb.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/exchange/expert_placement.h"
#include "runtime/exchange/redundant_experts.h"
#include "runtime/layer/moe_layer.h"

namespace moe {

struct MoeLayerOptions {
  // The expert-parallel group: this rank holds experts [rank·E/W, (rank+1)·E/W) of its W ranks
  // (E % W == 0). In the device's memory: host memory for compute.device=CPU, device memory
  // (NCCL, or loopback ranks in device memory) for CUDA. nullptr: all E experts in this process.
  // Not owned; must outlive the layer.
  comm::Communicator* ep = nullptr;
  // parallel.dropless_exchange, parallel.pipeline_degree, parallel.wire_dtype and the EP group's
  // ranks per node (a local layer uses only the wire dtype). ExchangeOptionsOf(config) makes them.
  ExchangeOptions exchange;
  // This rank's index among the ranks on its node (Communicator::local_rank), for compute.gpu =
  // -1 (GPU = local_rank mod the visible devices).
  int local_rank = 0;
  // router.aux_loss_scope GLOBAL: the ranks whose tokens f is counted over (host memory).
  // nullptr: this process's groups. Not owned; must outlive the layer.
  comm::Communicator* balance = nullptr;
  // Redundant experts (with `ep`): the placement of the E + R physical experts over the EP group;
  // this rank holds its placement.per_rank physical experts (first_expert() = rank · per_rank) and
  // the layer runs a RedundantExpertExecutor (runtime/exchange/redundant_experts.h). Empty
  // (num_logical 0): no redundancy.
  ExpertPlacement placement;
  // compute.device=CUDA: route on the host even where the device router could.
  bool host_routing = false;
  // The device to compute on instead of the compute section's (a test's CheckedDevice). Shared
  // with the layer.
  std::shared_ptr<Device> device;
};

// The exchange options of a config: parallel.dropless_exchange, pipeline_degree, wire_dtype, and
// `ranks_per_node` of the EP group (EpRanksPerNode; 0: flat).
ExchangeOptions ExchangeOptionsOf(const config::MoeConfig& cfg, int ranks_per_node = 0);

// The RedundantExpertExecutor of a layer MakeMoeLayer made with a placement, null otherwise (to
// change the placement when rebalancing).
RedundantExpertExecutor* RedundantExecutorOf(MoeLayer* layer);

// kInvalidArgument for a compute section or communicator that does not fit; CUDA without a GPU or
// without a CUDA build fails with the reason.
StatusOr<std::unique_ptr<MoeLayer>> MakeMoeLayer(const config::LayerConfig& layer,
                                                 const config::ComputeConfig& compute,
                                                 const MoeLayerOptions& options = {});

}  // namespace moe
