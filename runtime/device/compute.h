// The config's compute section as a device: which GPU a rank uses and in which precision its
// experts store their GEMM operands (compute.device=CUDA; see proto/moe_config.proto).
#pragma once

#include "experts/cuda/grouped_ffn.h"
#include "proto/moe_config.pb.h"
#include "base/status.h"

namespace moe {

// The CUDA device of `rank` under compute.gpu (-1: rank mod the visible devices); a clear error
// when no GPU is visible (or the build has no CUDA) or compute.gpu is not a visible device.
StatusOr<int> ComputeGpu(const config::ComputeConfig& compute, int rank);
// compute.expert_precision as the GPU experts' storage precision.
experts::cuda::Precision ComputePrecision(const config::ComputeConfig& compute);

}  // namespace moe
