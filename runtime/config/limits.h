// The project's fixed limits on config values, in one place: config validation (config.cc) refuses
// what exceeds them, and the code that sizes arrays by them (routing_math.h, the exchange's
// chunk schedule) takes them from here.
#pragma once

#include <cstdint>

namespace moe::limits {

// parallel.pipeline_degree: chunks per exchange (each chunk a part of the experts' saved state).
inline constexpr int kMaxPipelineDegree = 16;
// router.top_k: experts ranked per token (the device router's per-thread arrays).
inline constexpr int32_t kMaxRankedExperts = 16;
// router.num_expert_groups: expert groups of group-limited top-k (a 64-bit mask).
inline constexpr int32_t kMaxExpertGroups = 64;

// compute.expert_precision=BF16: model_dim and the experts' hidden dims are multiples of this, so
// every expert's bf16 rows start 16-byte aligned in the grouped GEMMs (the grouped FFN's rule,
// experts/cuda/grouped_ffn.h).
inline constexpr int32_t kBf16DimMultiple = 8;

}  // namespace moe::limits
