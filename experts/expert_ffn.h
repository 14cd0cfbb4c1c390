// The expert feed-forward network, on rows of tokens (CPU, OpenBLAS).
//
//   FFN:    h = x W1 + b1;  a = act(h);            y = a W2 + b2
//   SwiGLU: h = x W1 + b1;  u = x W3;  a = silu(h) * u;  y = a W2 + b2
//
// Weights are row-major: W1, W3 are M x H, W2 is H x M, b1 is 1 x H, b2 is 1 x M (biases empty when
// the shape has no bias). Knows nothing of routing or communication.
#pragma once

#include <cstdint>

#include "base/tensor.h"

namespace moe::experts {

enum class Activation { kRelu, kGeluTanh, kSilu };

struct FfnShape {
  int64_t model_dim = 0;   // M
  int64_t hidden_dim = 0;  // H
  Activation activation = Activation::kGeluTanh;
  bool swiglu = false;
  bool bias = true;
};

struct FfnParams {
  Tensor w1, b1, w2, b2, w3;

  // Allocates zero tensors of the right shapes (biases / w3 empty when unused).
  static FfnParams Zeros(const FfnShape& shape);
  int64_t NumParameters() const { return w1.size() + b1.size() + w2.size() + b2.size() + w3.size(); }
};

// Per-call saved activations for the backward, each rows x H (u only for SwiGLU), carved by the caller.
struct FfnSaved {
  MatrixView<float> h, a, u;
};

// y = FFN(x) (accumulate: y += FFN(x)). Fills `saved` for the backward.
void FfnForward(const FfnShape& shape, const FfnParams& p, MatrixView<const float> x,
                MatrixView<float> y, bool accumulate, const FfnSaved& saved);

// Backward of FfnForward given dy (rows x M). Accumulates weight gradients into `grads`;
// writes (accumulate_dx: adds) the input gradient into dx. `scratch1`/`scratch2` are rows x H
// scratch buffers (scratch2 used only for SwiGLU).
void FfnBackward(const FfnShape& shape, const FfnParams& p, MatrixView<const float> x,
                 const FfnSaved& saved, MatrixView<const float> dy, MatrixView<float> dx,
                 bool accumulate_dx, FfnParams* grads, MatrixView<float> scratch1,
                 MatrixView<float> scratch2);

// Elementwise activation helpers (exposed for tests).
float ActivationValue(Activation act, float h);
float ActivationDerivative(Activation act, float h);

}  // namespace moe::experts
