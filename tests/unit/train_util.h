// A tiny training job shared by the training and fault tests: 2 MoE layers, M=16, 4 experts,
// top-2, 64 tokens per step over the repository's corpus (MOE_TEST_CORPUS).
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "runtime/config/config.h"

namespace moe::testing {

inline MoeConfig TinyTrainConfig(int steps, int groups, int ep_size = 0) {
  StatusOr<MoeConfig> cfg = ParseConfig(
      "moe { model_dim: 16 num_experts: 4 expert { hidden_dim: 24 activation: GELU_TANH }"
      "  router { gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY capacity_factor_train: 1.0"
      "           min_capacity: 1 aux_loss: SWITCH aux_loss_weight: 0.01 z_loss_weight: 0.001"
      "           bias_update_rate: 0.001 num_local_groups: " + std::to_string(groups) + " } }"
      "model { context: 4 num_layers: 2 init_std: 0.1 }"
      "parallel { ep_size: " + std::to_string(ep_size) + " }"
      "train { steps: " + std::to_string(steps) + " global_batch_tokens: 64 lr: 0.01 warmup_steps: 2"
      "        weight_decay: 0.01 data_path: '" MOE_TEST_CORPUS "' eval_every: 0 }"
      "comm { deadline_seconds: 60 } seed: 99",
      "tiny");
  EXPECT_TRUE(cfg.ok()) << cfg.status().ToString();
  return cfg.ok() ? *cfg : MoeConfig();
}

}  // namespace moe::testing
