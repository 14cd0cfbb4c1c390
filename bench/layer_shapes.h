// The layer shapes the CPU layer benchmarks share (moe_layer_bench, moe_ep_layer_bench): a top-k
// layer of GELU-tanh FFN experts with capacity factor 1.25, and its config.
#pragma once

#include <string>
#include <vector>

#include "proto/moe_config.pb.h"
#include "runtime/config/config.h"

namespace moe::bench {

struct LayerShape {
  std::string name;
  int s, m, h, e, k;  // tokens (per rank), model dim, expert hidden dim, experts, top-k
};

// small, medium, fine-grained.
inline const std::vector<LayerShape>& CpuLayerShapes() {
  static const std::vector<LayerShape> shapes = {{"small", 1024, 256, 1024, 8, 2},
                                                 {"medium", 2048, 512, 1024, 16, 2},
                                                 {"fine-grained", 1024, 256, 256, 64, 6}};
  return shapes;
}

// The layer of `shape`: GELU-tanh experts, TOPK gate, capacity factor 1.25 in training.
inline config::LayerConfig LayerShapeConfig(const LayerShape& sh) {
  MoeConfig cfg;
  auto* l = cfg.mutable_moe();
  l->set_model_dim(sh.m);
  l->set_num_experts(sh.e);
  l->mutable_expert()->set_hidden_dim(sh.h);
  l->mutable_expert()->set_activation(config::GELU_TANH);
  l->mutable_router()->set_gate(config::TOPK);
  l->mutable_router()->set_top_k(sh.k);
  l->mutable_router()->set_capacity_factor_train(1.25);
  ResolveConfig(&cfg);
  return cfg.moe();
}

}  // namespace moe::bench
