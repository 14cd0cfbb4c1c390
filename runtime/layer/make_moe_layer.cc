// MakeMoeLayer (runtime/layer/make_moe_layer.h).
#include "runtime/layer/make_moe_layer.h"

#include <string>
#include <utility>

#include "runtime/config/config.h"
#include "runtime/device/compute.h"

namespace moe {

ExchangeOptions ExchangeOptionsOf(const config::MoeConfig& cfg, int ranks_per_node) {
  return {.dropless = cfg.parallel().dropless_exchange(),
          .pipeline_degree = cfg.parallel().pipeline_degree(),
          .ranks_per_node = ranks_per_node,
          .bf16_wire = cfg.parallel().wire_dtype() == config::BF16,
          .node_dedup = cfg.parallel().node_dedup(),
          .transport = cfg.parallel().exchange_transport() == config::DIRECT
                           ? ExchangeTransport::kDirect
                       : cfg.parallel().exchange_transport() == config::ALLTOALL
                           ? ExchangeTransport::kAllToAll
                           : ExchangeTransport::kAuto};
}

StatusOr<std::unique_ptr<MoeLayer>> MakeMoeLayer(const config::LayerConfig& layer,
                                                 const config::ComputeConfig& compute,
                                                 const MoeLayerOptions& options) {
  MOE_RETURN_IF_ERROR(ValidateCompute(compute, layer));
  MOE_RETURN_IF_ERROR(ValidateExchangeOptions(options.exchange));
  const int experts = layer.num_experts();
  const int w = options.ep == nullptr ? 1 : options.ep->size();
  const bool redundant = options.placement.num_logical > 0;
  if (redundant) {
    if (options.ep == nullptr) {
      return InvalidArgument("parallel.num_redundant_experts needs an expert-parallel group");
    }
    if (options.placement.num_logical != experts || options.placement.num_ranks != w) {
      return InvalidArgument("MakeMoeLayer: the placement is for " +
                             std::to_string(options.placement.num_logical) + " experts on " +
                             std::to_string(options.placement.num_ranks) + " ranks, the layer has " +
                             std::to_string(experts) + " on " + std::to_string(w));
    }
  } else if (experts % w != 0) {
    return InvalidArgument("moe.num_experts=" + std::to_string(experts) +
                           " must be divisible by the " + std::to_string(w) +
                           " ranks of the expert-parallel group");
  }
  std::shared_ptr<Device> device = options.device;
  if (device == nullptr) {
    MOE_ASSIGN_OR_RETURN(device, MakeDevice(compute, options.local_rank, !options.host_routing));
  }
  if (options.ep != nullptr && options.ep->memory_space() != device->memory_space()) {
    return InvalidArgument(
        std::string("compute.device=") + (compute.device() == config::CUDA ? "CUDA" : "CPU") +
        " computes in " + MemorySpaceName(device->memory_space()) +
        " memory; the expert-parallel communicator (backend " +
        std::string(options.ep->backend()) + ") moves " +
        MemorySpaceName(options.ep->memory_space()) +
        " memory (CUDA needs NCCL, or loopback ranks in device memory)");
  }
  const experts::FfnShape shape = ExpertShape(layer);
  // This rank's experts: E / W of them, or its placement's physical experts.
  const int local = redundant ? options.placement.per_rank : experts / w;
  const int first = options.ep == nullptr ? 0 : options.ep->rank() * local;
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<ExpertCompute> compute_experts,
                       device->MakeExperts(shape, local));
  std::unique_ptr<ExpertExecutor> executor;
  if (options.ep == nullptr) {
    executor = std::make_unique<LocalExpertExecutor>(device.get(), shape, experts, options.exchange,
                                                     std::move(compute_experts));
  } else {
    auto parallel = std::make_unique<ExpertParallelExecutor>(
        device.get(), options.ep, shape, redundant ? options.placement.num_physical() : experts,
        options.exchange, std::move(compute_experts));
    if (Status s = parallel->EnableHierarchical(); !s.ok()) {
      return s.WithContext("comm.ranks_per_node=" +
                           std::to_string(options.exchange.ranks_per_node));
    }
    if (redundant) {
      executor = std::make_unique<RedundantExpertExecutor>(std::move(parallel), options.placement);
    } else {
      executor = std::move(parallel);
    }
  }
  // Redundant experts re-address the plan's rows on the host.
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MoeLayer> made,
                       MoeLayer::Create(layer, std::move(device), std::move(executor), first, local,
                                        /*host_plan=*/redundant));
  made->set_balance_communicator(options.balance);
  return made;
}

RedundantExpertExecutor* RedundantExecutorOf(MoeLayer* layer) {
  return dynamic_cast<RedundantExpertExecutor*>(layer->executor());
}

}  // namespace moe
