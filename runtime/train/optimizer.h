// AdamW with linear warm-up then cosine decay (to 10% of the peak), decoupled weight decay on
// matrices only, and clipping by a global gradient norm computed by the caller (over all ranks).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "proto/moe_config.pb.h"
#include "base/tensor.h"
#include "runtime/train/byte_lm.h"

namespace moe {

class AdamW {
 public:
  explicit AdamW(const config::TrainConfig& cfg) : cfg_(cfg) {}

  // Learning rate at `step` (0-based).
  double LearningRate(int64_t step) const;
  // One update of every trainable parameter; `grad_scale` multiplies the gradients (clipping).
  void Step(const std::vector<ParamRef>& params, const std::vector<bool>& trainable, double lr,
            double grad_scale);

  // Optimizer state by parameter name (first and second moments) and the step count, for
  // checkpoints.
  struct Moments {
    Tensor m, v;
  };
  std::map<std::string, Moments>& state() { return state_; }
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }

 private:
  config::TrainConfig cfg_;
  std::map<std::string, Moments> state_;
  int64_t steps_ = 0;
};

}  // namespace moe
