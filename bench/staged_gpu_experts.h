// The staged GPU experts, kept as the layer benchmark's baseline: an ExpertCompute of the host
// device whose rows and weights travel to the GPU every call, run by the grouped FFN
// (experts/cuda/grouped_ffn.h), with outputs and weight gradients coming back. The layer on the
// host device (runtime/layer/moe_layer.h) with these experts is what `moe_layer_bench --device
// cuda` calls the staged layer; the same layer on the CUDA device is what replaces it.
#pragma once

#include <memory>

#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "base/status.h"
#include "runtime/device/expert_compute.h"

namespace moe {

// The experts of `num_experts` local experts on compute.device: CpuExpertCompute for CPU, the
// staged GPU experts on device ComputeGpu(compute, rank) for CUDA (their GPU and cuBLAS are set up
// here, so a problem is reported at once). A clear error when CUDA is asked for and not built or
// no GPU is visible.
StatusOr<std::unique_ptr<ExpertCompute>> MakeStagedExpertCompute(const experts::FfnShape& shape,
                                                                 int num_experts,
                                                                 const config::ComputeConfig& compute,
                                                                 int rank);

}  // namespace moe
