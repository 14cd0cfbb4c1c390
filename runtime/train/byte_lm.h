// A byte-level language model built from MoE layers, the model moe_train trains:
//   x_t = sum_i Emb_i[byte_{t-T+i}]   (T position-specific tables of 256 x M)
//   h  <- h + MoE_l(LayerNorm_l(h))    for each of the L blocks
//   logits = LayerNorm_f(h) W_out + b_out   (256 classes), cross-entropy on the next byte,
// plus each layer's aux and z losses (weights from the router config).
//
// In expert parallelism every rank builds the model with its own expert shard and MoE layers that
// exchange rows (runtime/layer/make_moe_layer.h); the model keeps every parameter, expert shards
// included, on the host (the optimizer and checkpoints read them there) and runs the MoE layers
// through HostLayerCall, so a device layer gets its parameters and activations copied up and its
// outputs and gradients copied down each call; the loss on a rank is its tokens' cross-entropy divided by the *global* token
// count, so gradients summed over ranks are the gradients of the global mean.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "proto/moe_config.pb.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/train/layer_norm.h"
#include "runtime/layer/host_layer_call.h"
#include "runtime/layer/moe_layer.h"

namespace moe {

// One trainable tensor with its gradient. `expert_id` >= 0 for expert tensors (sharded by expert;
// the logical id), -1 for replicated ones; expert tensors also name their MoE block and their
// local slot in it (with redundant experts a slot holds one replica of expert_id).
struct ParamRef {
  std::string name;
  Tensor* value;
  Tensor* grad;
  int expert_id;
  int layer = -1;
  int slot = -1;
};

struct LmBatch {
  int64_t tokens = 0;
  int context = 0;
  std::vector<uint8_t> context_bytes;  // tokens x context, oldest first
  std::vector<uint8_t> targets;        // tokens
};

struct LmStepStats {
  double ce_sum = 0.0;   // sum of cross-entropy over this rank's tokens (nats)
  double aux = 0.0;      // sum over layers of the layer's aux loss (unweighted)
  double z = 0.0;        // sum over layers of the z-loss (unweighted)
  double objective_local = 0.0;  // this rank's share of the objective
  int64_t dropped_slots = 0;
  int64_t total_slots = 0;
  std::vector<int64_t> tokens_per_expert;  // summed over layers
};

// Makes MoE layer `layer` of the model (each holding the same experts).
using LayerFactory = std::function<StatusOr<std::unique_ptr<MoeLayer>>(int layer)>;

class ByteLm {
 public:
  // Holds experts [first_expert, first_expert + num_local_experts) of every layer: those of the
  // layers `make_layer` makes.
  static StatusOr<std::unique_ptr<ByteLm>> Create(const config::MoeConfig& cfg,
                                                  const LayerFactory& make_layer, int first_expert,
                                                  int num_local_experts);

  // Deterministic init from cfg.seed (identical on every rank for every tensor it holds).
  void Init();

  // Forward on this rank's batch. global_tokens: tokens over all data-parallel ranks this step;
  // loss_groups_scale: 1 / (number of ranks whose groups' losses are averaged), see MoeLayer.
  Status Forward(const LmBatch& batch, const RouteContext& ctx, int64_t global_tokens,
                 double loss_groups_scale, LmStepStats* stats);
  // Backward of the last Forward; accumulates into the gradients.
  Status Backward();
  void ZeroGrad();

  std::vector<ParamRef> Params();
  std::vector<MoeLayer*> MoeLayers();
  // The parameters of MoE layer l (host; what the layer computes with).
  MoeLayerParams& LayerParams(size_t l) { return blocks_[l].params; }
  MoeLayerParams& LayerGrads(size_t l) { return blocks_[l].grads; }
  // Redundant experts: the logical expert of each local expert slot of MoE layer l (names,
  // initialization and checkpoints follow it).
  void SetExpertIds(size_t l, const std::vector<int>& ids) {
    blocks_[l].params.expert_ids = ids;
    blocks_[l].grads.expert_ids = ids;
  }
  int64_t TotalParameters() const;   // all experts of the model, counted once
  int64_t ActiveParametersPerToken() const;  // parameters one token passes through

 private:
  ByteLm(const config::MoeConfig& cfg, int first_expert, int num_local_experts);

  config::MoeConfig cfg_;
  int64_t m_;
  Tensor embed_, embed_grad_;  // (T * 256) x M
  struct Block {
    Tensor ln_gamma, ln_beta, ln_gamma_grad, ln_beta_grad;
    LayerNorm ln;
    std::unique_ptr<MoeLayer> moe;
    std::unique_ptr<HostLayerCall> call;  // runs moe on this model's host tensors
    MoeLayerParams params, grads;
    Tensor ln_out, moe_out;
  };
  std::vector<Block> blocks_;
  Tensor final_gamma_, final_beta_, final_gamma_grad_, final_beta_grad_;
  LayerNorm final_ln_;
  Tensor out_w_, out_b_, out_w_grad_, out_b_grad_;

  // Saved by Forward.
  LmBatch batch_;
  std::vector<Tensor> h_;  // h_[l] = input of block l; h_[L] = final hidden
  Tensor final_out_, probs_;
  double ce_scale_ = 0.0;
  bool have_forward_ = false;
};

}  // namespace moe
