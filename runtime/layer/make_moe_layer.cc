// MakeMoeLayer (runtime/layer/make_moe_layer.h).
#include "runtime/layer/make_moe_layer.h"

#include <string>

#include "runtime/layer/device_moe_layer.h"
#include "runtime/device/compute.h"
#include "runtime/config/config.h"
#include "runtime/device/cpu_expert_compute.h"
#include "runtime/layer/cpu_moe_layer.h"

namespace moe {

StatusOr<std::unique_ptr<MoeLayer>> MakeMoeLayer(const config::LayerConfig& layer,
                                                 const config::ComputeConfig& compute,
                                                 const MoeLayerOptions& options) {
  MOE_RETURN_IF_ERROR(ValidateCompute(compute));
  MOE_RETURN_IF_ERROR(ValidateExchangeOptions(options.exchange));
  const int experts = layer.num_experts();
  const int w = options.ep == nullptr ? 1 : options.ep->size();
  const bool redundant = options.placement.num_logical > 0;
  if (redundant) {
    if (compute.device() != config::CPU || options.ep == nullptr) {
      return InvalidArgument("parallel.num_redundant_experts needs the CPU layer, expert-parallel");
    }
    if (options.placement.num_logical != experts || options.placement.num_ranks != w) {
      return InvalidArgument("MakeMoeLayer: the placement is for " +
                             std::to_string(options.placement.num_logical) + " experts on " +
                             std::to_string(options.placement.num_ranks) + " ranks, the layer has " +
                             std::to_string(experts) + " on " + std::to_string(w));
    }
    const experts::FfnShape shape = ExpertShape(layer);
    const int per_rank = options.placement.per_rank;
    auto inner = std::make_unique<ExpertParallelExecutor>(
        options.ep, shape, options.placement.num_physical(), options.exchange,
        std::make_unique<CpuExpertCompute>(shape));
    if (Status s = inner->EnableHierarchical(); !s.ok()) {
      return s.WithContext("comm.ranks_per_node=" +
                           std::to_string(options.exchange.ranks_per_node));
    }
    auto ep_layer = std::make_unique<CpuMoeLayer>(
        layer, std::make_unique<RedundantExpertExecutor>(std::move(inner), options.placement),
        options.ep->rank() * per_rank, per_rank);
    ep_layer->set_balance_communicator(options.balance);
    return std::unique_ptr<MoeLayer>(std::move(ep_layer));
  }
  if (experts % w != 0) {
    return InvalidArgument("moe.num_experts=" + std::to_string(experts) +
                           " must be divisible by the " + std::to_string(w) +
                           " ranks of the expert-parallel group");
  }
  const int local = experts / w, first = options.ep == nullptr ? 0 : options.ep->rank() * local;
  if (compute.device() == config::CPU) {
    const experts::FfnShape shape = ExpertShape(layer);
    if (options.ep == nullptr) {
      auto local_layer = std::make_unique<CpuMoeLayer>(
          layer, std::make_unique<LocalExpertExecutor>(shape, experts, options.exchange), 0,
          experts);
      local_layer->set_balance_communicator(options.balance);
      return std::unique_ptr<MoeLayer>(std::move(local_layer));
    }
    auto executor = std::make_unique<ExpertParallelExecutor>(
        options.ep, shape, experts, options.exchange, std::make_unique<CpuExpertCompute>(shape));
    if (Status s = executor->EnableHierarchical(); !s.ok()) {
      return s.WithContext("comm.ranks_per_node=" +
                           std::to_string(options.exchange.ranks_per_node));
    }
    auto ep_layer = std::make_unique<CpuMoeLayer>(layer, std::move(executor), first, local);
    ep_layer->set_balance_communicator(options.balance);
    return std::unique_ptr<MoeLayer>(std::move(ep_layer));
  }
  if (layer.router().gate() == config::SOFT) {
    return InvalidArgument("moe.router.gate=SOFT runs on the CPU layer only (compute.device=CPU)");
  }
  if (layer.router().aux_loss_scope() == config::GLOBAL) {
    return InvalidArgument("moe.router.aux_loss_scope=GLOBAL runs on the CPU layer only "
                           "(compute.device=CPU)");
  }
  if (options.exchange.bf16_wire) {
    return InvalidArgument("parallel.wire_dtype=BF16 runs on the CPU layer only (compute.device="
                           "CPU); the device layer exchanges fp32 rows");
  }
  if (options.exchange.ranks_per_node > 0 && options.ep != nullptr) {
    return InvalidArgument("comm.ranks_per_node=" +
                           std::to_string(options.exchange.ranks_per_node) +
                           ": the hierarchical exchange runs on the CPU layer only (compute.device="
                           "CPU); the device layer exchanges flat");
  }
  DeviceLayerOptions device;
  MOE_ASSIGN_OR_RETURN(device.device, ComputeGpu(compute, options.rank));
  device.precision = ComputePrecision(compute);
  device.comm = options.ep;
  device.pipeline_degree = options.exchange.pipeline_degree;
  StatusOr<std::unique_ptr<DeviceMoeLayer>> made = DeviceMoeLayer::Create(layer, device);
  if (!made.ok()) return made.status().WithContext("compute.device=CUDA");
  return std::unique_ptr<MoeLayer>(std::move(made).value());
}

RedundantExpertExecutor* RedundantExecutorOf(MoeLayer* layer) {
  auto* cpu = dynamic_cast<CpuMoeLayer*>(layer);
  return cpu == nullptr ? nullptr : dynamic_cast<RedundantExpertExecutor*>(cpu->executor());
}

}  // namespace moe
