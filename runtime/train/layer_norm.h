// LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * gamma + beta.
#pragma once

#include <vector>

#include "base/tensor.h"

namespace moe {

class LayerNorm {
 public:
  static constexpr float kEps = 1e-5f;

  // y (S x M) from x; keeps normalized x and 1/sigma for the backward.
  void Forward(MatrixView<const float> x, const Tensor& gamma, const Tensor& beta, Tensor* y);
  // dx (written) from dy; dgamma, dbeta accumulated.
  void Backward(MatrixView<const float> dy, const Tensor& gamma, Tensor* dx, Tensor* dgamma,
                Tensor* dbeta) const;

 private:
  Tensor xhat_;
  std::vector<float> inv_sigma_;
};

}  // namespace moe
