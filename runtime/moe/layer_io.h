// Reading and writing an MoE layer's parameters as one .npy file per tensor, named as in
// docs/SEMANTICS.md (router.npy, expert_<e>_w1.npy, shared_<s>_b2.npy, ...).
#pragma once

#include <string>

#include "runtime/base/status.h"
#include "runtime/moe/moe_layer.h"

namespace moe {

// True for 1-D parameters (biases), which are stored as 1-D .npy arrays.
bool IsVectorParam(const std::string& name);

// Reads every parameter of `params` (shapes already set) from dir/<name>.npy, checking shapes.
Status ReadLayerParams(const std::string& dir, MoeLayerParams* params);
// Writes dir/<prefix><name>.npy for every parameter; creates dir.
Status WriteLayerParams(const std::string& dir, const MoeLayerParams& params,
                        const std::string& prefix = "");

}  // namespace moe
