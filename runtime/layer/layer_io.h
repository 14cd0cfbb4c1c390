// An MoE layer on NumPy files: reading and writing its parameters as one .npy file per tensor,
// named as in docs/SEMANTICS.md (router.npy, expert_<e>_w1.npy, shared_<s>_b2.npy, ...), and one
// whole call on files — what the moe_layer tool does (its flags are documented there).
#pragma once

#include <cstdint>
#include <string>

#include "proto/moe_config.pb.h"
#include "base/status.h"
#include "runtime/layer/moe_layer.h"

namespace moe {

// True for 1-D parameters (biases), which are stored as 1-D .npy arrays.
bool IsVectorParam(const std::string& name);

// Reads every parameter of `params` (shapes already set) from dir/<name>.npy, checking shapes.
Status ReadLayerParams(const std::string& dir, MoeLayerParams* params);
// Writes dir/<prefix><name>.npy for every parameter; creates dir.
Status WriteLayerParams(const std::string& dir, const MoeLayerParams& params,
                        const std::string& prefix = "");

// The routing of a plan as the tool writes it (routing_expert.npy, routing_gate.npy): token choice
// S x k experts and gates (-1 and 0 for a dropped slot); expert choice (G·E) x C token indices and
// their gates.
void RoutingArrays(const DispatchPlan& plan, IntTensor* experts, Tensor* gates);

struct LayerFilesOptions {
  std::string input;        // x (S x M float32 .npy)
  std::string weights;      // directory of weight files, or
  int64_t init_seed = -1;   // initialize from this seed and write them to out/weights/
  std::string grad_output;  // dy (S x M .npy): run the backward too
  std::string router_bias;  // aux-loss-free bias (E float32 .npy)
  bool train = false;       // training mode (train capacity factor, noise)
  int64_t step = 0;         // training step (counter-based randomness)
  int64_t token_offset = 0; // global index of the first token
  std::string out;          // output directory
  // The estimated memory of the call (runtime/config/memory_model.h) must stay below this; 0: the
  // machine's available memory. The weight files --init-seed writes must fit the free disk.
  int64_t max_memory = 0;
};

// Runs the layer of `cfg` (on compute.device: runtime/layer/make_moe_layer.h) on the files of
// `options` and writes into options.out: y.npy, routing_expert.npy, routing_gate.npy (S x k, or for
// expert choice (G·E) x C token indices), metrics.json, config.json; with grad_output dx.npy and
// grad_<weight>.npy; with train and a bias update rate, router_bias.npy.
Status RunLayerOnFiles(const config::MoeConfig& cfg, const LayerFilesOptions& options);

}  // namespace moe
