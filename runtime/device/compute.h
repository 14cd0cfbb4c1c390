// The config's compute section as a Device (runtime/device/device.h): the host for
// compute.device=CPU, else the GPU a rank uses and the precision its experts store their GEMM
// operands in (compute.device=CUDA; see proto/moe_config.proto).
#pragma once

#include <memory>

#include "base/status.h"
#include "experts/cuda/grouped_ffn.h"
#include "proto/moe_config.pb.h"
#include "runtime/device/device.h"

namespace moe {

// The CUDA device of the rank with index `local_rank` among its node's ranks
// (Communicator::local_rank) under compute.gpu (-1: local_rank mod the visible devices — ranks
// placed cyclically over nodes still get distinct GPUs); a clear error when no GPU is visible (or
// the build has no CUDA) or compute.gpu is not a visible device.
StatusOr<int> ComputeGpu(const config::ComputeConfig& compute, int local_rank);
// compute.expert_precision as the GPU experts' storage precision.
experts::cuda::Precision ComputePrecision(const config::ComputeConfig& compute);

// The device the compute section asks for, for the rank `local_rank` on its node (ComputeGpu).
// route_on_device false: a GPU routes on the host even where its device router could (a
// benchmark's comparison).
StatusOr<std::shared_ptr<Device>> MakeDevice(const config::ComputeConfig& compute, int local_rank,
                                             bool route_on_device = true);

}  // namespace moe
