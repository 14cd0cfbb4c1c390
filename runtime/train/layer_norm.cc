// LayerNorm forward and backward (runtime/train/layer_norm.h).
#include "runtime/train/layer_norm.h"

#include <cmath>

#include "base/tensor.h"

namespace moe {

void LayerNorm::Forward(MatrixView<const float> x, const Tensor& gamma, const Tensor& beta, Tensor* y) {
  const int64_t s = x.rows(), m = x.cols();
  ResizeTensor(&xhat_, s, m);
  ResizeTensor(y, s, m);
  inv_sigma_.resize(static_cast<size_t>(s));
  for (int64_t t = 0; t < s; ++t) {
    const float* in = x.row(t);
    double mean = 0.0;
    for (int64_t c = 0; c < m; ++c) mean += in[c];
    mean /= static_cast<double>(m);
    double var = 0.0;
    for (int64_t c = 0; c < m; ++c) var += (in[c] - mean) * (in[c] - mean);
    var /= static_cast<double>(m);
    const float inv = static_cast<float>(1.0 / std::sqrt(var + kEps));
    inv_sigma_[t] = inv;
    float* xh = xhat_.row(t);
    float* out = y->row(t);
    for (int64_t c = 0; c < m; ++c) {
      xh[c] = static_cast<float>(in[c] - mean) * inv;
      out[c] = xh[c] * gamma[c] + beta[c];
    }
  }
}

void LayerNorm::Backward(MatrixView<const float> dy, const Tensor& gamma, Tensor* dx, Tensor* dgamma,
                         Tensor* dbeta) const {
  const int64_t s = dy.rows(), m = dy.cols();
  ResizeTensor(dx, s, m);
  for (int64_t t = 0; t < s; ++t) {
    const float* d = dy.row(t);
    const float* xh = xhat_.row(t);
    double mean_g = 0.0, mean_gx = 0.0;
    for (int64_t c = 0; c < m; ++c) {
      const double g = static_cast<double>(d[c]) * gamma[c];
      mean_g += g;
      mean_gx += g * xh[c];
      (*dgamma)[c] += d[c] * xh[c];
      (*dbeta)[c] += d[c];
    }
    mean_g /= static_cast<double>(m);
    mean_gx /= static_cast<double>(m);
    float* out = dx->row(t);
    for (int64_t c = 0; c < m; ++c) {
      const double g = static_cast<double>(d[c]) * gamma[c];
      out[c] = static_cast<float>(inv_sigma_[t] * (g - mean_g - xh[c] * mean_gx));
    }
  }
}

}  // namespace moe
