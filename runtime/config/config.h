// Loading and validating configs (protobuf text format). Validation lives here and only here:
// every error names the field path, the value and the rule, e.g.
//   "moe.router.top_k=5 must be <= moe.num_experts=4".
#pragma once

#include <string>

#include "proto/moe_config.pb.h"
#include "base/status.h"

namespace moe {

using config::MoeConfig;

// Parses text-format `text` into `msg` (any message type); errors name `name`, line and column.
Status ParseTextProto(const std::string& text, const std::string& name, google::protobuf::Message* msg);

// Parses text-format `text` (`name` is used in messages), fills defaults, validates.
StatusOr<MoeConfig> ParseConfig(const std::string& text, const std::string& name);
// Reads and parses a .textproto file.
StatusOr<MoeConfig> LoadConfig(const std::string& path);

// Checks every rule that does not depend on the world; fills derived defaults (see ResolveConfig).
Status ValidateConfig(const MoeConfig& cfg);
// The compute section alone (part of ValidateConfig; also for callers that build one directly).
Status ValidateCompute(const config::ComputeConfig& compute);
// The compute section for `layer`: also the layer dimensions bf16 experts need.
Status ValidateCompute(const config::ComputeConfig& compute, const config::LayerConfig& layer);
// Rules that depend on the number of ranks (expert placement).
Status ValidateForWorld(const MoeConfig& cfg, int world_size);

// Sets every unset field to its default and resolves kind-dependent defaults (TOP1 → k = 1,
// NOISY_TOPK → TOPK_SOFTMAX, EXPERT_CHOICE → no aux loss), so that the result can be written out
// (JSON, checkpoint manifest) and read by tools that do not know protobuf defaults.
void ResolveConfig(MoeConfig* cfg);
// The layer part of ResolveConfig (used by MoeLayer, which may be built from an unparsed config).
void ResolveLayerConfig(config::LayerConfig* layer);
// A resolved copy of `layer`.
config::LayerConfig ResolvedLayerConfig(const config::LayerConfig& layer);

// Capacity per (group, expert) for a call of S tokens in G groups: 0 means dropless
// (docs/SEMANTICS.md "Capacity").
int64_t ComputeCapacity(const config::RouterConfig& cfg, int64_t num_experts, int64_t num_tokens,
                        int64_t num_groups, bool train);

// Protobuf JSON with snake_case names and every field present.
std::string ConfigToJson(const MoeConfig& cfg);

// Convenience accessors.
inline int TopK(const config::RouterConfig& r) {
  return r.gate() == config::TOP1 ? 1 : r.top_k();
}
// Columns of the router weight (router.npy is M x this): E, or E * slots_per_expert for SOFT.
inline int RouterColumns(const config::LayerConfig& l) {
  return l.router().gate() == config::SOFT ? l.num_experts() * l.router().slots_per_expert()
                                           : l.num_experts();
}
inline int SharedHidden(const config::LayerConfig& l) {
  return l.shared_hidden_dim() > 0 ? l.shared_hidden_dim() : l.expert().hidden_dim();
}

}  // namespace moe
