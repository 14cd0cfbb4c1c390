// libFuzzer target: topology files (configs/topologies/*.textproto, moe_simulate --topology).
// Parses a TopologyConfig, validates it, and when valid builds the cost model for its own rank
// count (and one that does not match) and costs a flat and a hierarchical all-to-all.
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/config/config.h"
#include "runtime/sim/cost_model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::config::TopologyConfig topology;
  if (!moe::ParseTextProto(text, "fuzz topology", &topology).ok()) return 0;
  if (!moe::ValidateTopology(topology, 0).ok()) return 0;
  const int64_t ranks = static_cast<int64_t>(topology.nodes()) * topology.gpus_per_node();
  if (ranks > 64) {
    // Too big to cost a dense matrix quickly; the mismatch check must still answer cleanly.
    (void)moe::CostModel::Create(topology, 64);
    return 0;
  }
  const int n = static_cast<int>(ranks);
  (void)moe::CostModel::Create(topology, n + 1);  // must be a clean error (rank count mismatch)
  for (bool overlap : {true, false}) {
    moe::CostModelOptions options;
    options.overlap_link_classes = overlap;
    options.count_self = !overlap;
    moe::StatusOr<moe::CostModel> model = moe::CostModel::Create(topology, n, options);
    if (!model.ok()) continue;
    moe::TrafficMatrix bytes(static_cast<size_t>(n), std::vector<double>(static_cast<size_t>(n)));
    for (int s = 0; s < n; ++s) {
      for (int d = 0; d < n; ++d) bytes[static_cast<size_t>(s)][static_cast<size_t>(d)] = 1024.0 * ((s * 7 + d * 3) % 5);
    }
    (void)model->FlatAllToAllSeconds(bytes);
    (void)model->HierarchicalAllToAllSeconds(bytes);
    (void)model->AllReduceSeconds(1 << 20);
    (void)model->ComputeSeconds(std::vector<double>(static_cast<size_t>(n), 1e9));
  }
  return 0;
}
