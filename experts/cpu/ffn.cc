// CPU expert FFN: GEMMs through OpenBLAS, activations as vectorizable elementwise loops.
#include <cmath>

#include "experts/cpu/blas.h"
#include "experts/cpu/fast_math.h"
#include "experts/expert_ffn.h"

namespace moe::experts {
namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// Sets each row of y to the bias row (or zero without bias).
void BroadcastRows(const Tensor& bias, MatrixView<float> y) {
  for (int64_t r = 0; r < y.rows(); ++r) {
    float* row = y.row(r);
    if (bias.size() == 0) {
      for (int64_t c = 0; c < y.cols(); ++c) row[c] = 0.0f;
    } else {
      const float* b = bias.data();
      for (int64_t c = 0; c < y.cols(); ++c) row[c] = b[c];
    }
  }
}

// Adds the bias row to each row of y.
void AddRows(const Tensor& bias, MatrixView<float> y) {
  if (bias.size() == 0) return;
  const float* b = bias.data();
  for (int64_t r = 0; r < y.rows(); ++r) {
    float* row = y.row(r);
    for (int64_t c = 0; c < y.cols(); ++c) row[c] += b[c];
  }
}

// Column sums of m accumulated into g (1 x cols), when g is not empty.
void AccumulateColumnSums(MatrixView<const float> m, Tensor* g) {
  if (g->size() == 0) return;
  float* out = g->data();
  for (int64_t r = 0; r < m.rows(); ++r) {
    const float* row = m.row(r);
    for (int64_t c = 0; c < m.cols(); ++c) out[c] += row[c];
  }
}

void Activate(Activation act, const float* __restrict h, float* __restrict a, int64_t n) {
  switch (act) {
    case Activation::kRelu:
      for (int64_t i = 0; i < n; ++i) a[i] = h[i] > 0.0f ? h[i] : 0.0f;
      break;
    case Activation::kGeluTanh:
      for (int64_t i = 0; i < n; ++i) {
        const float x = h[i];
        a[i] = 0.5f * x * (1.0f + FastTanh(kGeluC * (x + kGeluA * x * x * x)));
      }
      break;
    case Activation::kSilu:
      for (int64_t i = 0; i < n; ++i) a[i] = h[i] * FastSigmoid(h[i]);
      break;
  }
}

// d[i] *= act'(h[i]).
void MultiplyByDerivative(Activation act, const float* __restrict h, float* __restrict d, int64_t n) {
  switch (act) {
    case Activation::kRelu:
      for (int64_t i = 0; i < n; ++i) d[i] = h[i] > 0.0f ? d[i] : 0.0f;
      break;
    case Activation::kGeluTanh:
      for (int64_t i = 0; i < n; ++i) {
        const float x = h[i];
        const float t = FastTanh(kGeluC * (x + kGeluA * x * x * x));
        const float dt = kGeluC * (1.0f + 3.0f * kGeluA * x * x);
        d[i] *= 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dt;
      }
      break;
    case Activation::kSilu:
      for (int64_t i = 0; i < n; ++i) {
        const float s = FastSigmoid(h[i]);
        d[i] *= s * (1.0f + h[i] * (1.0f - s));
      }
      break;
  }
}

}  // namespace

float ActivationValue(Activation act, float h) {
  float a = 0.0f;
  Activate(act, &h, &a, 1);
  return a;
}

float ActivationDerivative(Activation act, float h) {
  float d = 1.0f;
  MultiplyByDerivative(act, &h, &d, 1);
  return d;
}

FfnParams FfnParams::Zeros(const FfnShape& s) {
  FfnParams p;
  p.w1 = Tensor(s.model_dim, s.hidden_dim);
  p.w2 = Tensor(s.hidden_dim, s.model_dim);
  if (s.bias) {
    p.b1 = Tensor(1, s.hidden_dim);
    p.b2 = Tensor(1, s.model_dim);
  }
  if (s.swiglu) p.w3 = Tensor(s.model_dim, s.hidden_dim);
  return p;
}

void FfnForward(const FfnShape& s, const FfnParams& p, MatrixView<const float> x,
                MatrixView<float> y, bool accumulate, const FfnSaved& saved) {
  const int64_t rows = x.rows();
  if (rows == 0) return;
  const int64_t m = s.model_dim, h = s.hidden_dim;
  // h = x W1, then row by row (while the row is in cache) h += b1 and a = act(h).
  blas::Gemm(false, false, rows, h, m, 1.0f, x.data(), p.w1.data(), 0.0f, saved.h.data());
  if (s.swiglu) {
    blas::Gemm(false, false, rows, h, m, 1.0f, x.data(), p.w3.data(), 0.0f, saved.u.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict hv = saved.h.row(r);
    float* __restrict av = saved.a.row(r);
    if (p.b1.size() > 0) {
      const float* __restrict b = p.b1.data();
      for (int64_t c = 0; c < h; ++c) hv[c] += b[c];
    }
    if (s.swiglu) {
      const float* __restrict uv = saved.u.row(r);
      for (int64_t c = 0; c < h; ++c) av[c] = hv[c] * FastSigmoid(hv[c]) * uv[c];
    } else {
      Activate(s.activation, hv, av, h);
    }
  }
  if (accumulate) {
    AddRows(p.b2, y);
    blas::Gemm(false, false, rows, m, h, 1.0f, saved.a.data(), p.w2.data(), 1.0f, y.data());
  } else {
    BroadcastRows(p.b2, y);
    blas::Gemm(false, false, rows, m, h, 1.0f, saved.a.data(), p.w2.data(), 1.0f, y.data());
  }
}

void FfnBackward(const FfnShape& s, const FfnParams& p, MatrixView<const float> x,
                 const FfnSaved& saved, MatrixView<const float> dy, MatrixView<float> dx,
                 bool accumulate_dx, FfnParams* g, MatrixView<float> scratch1,
                 MatrixView<float> scratch2) {
  const int64_t rows = x.rows();
  if (rows == 0) return;
  const int64_t m = s.model_dim, h = s.hidden_dim;
  // dW2 += a^T dy; db2 += colsum(dy); da = dy W2^T.
  blas::Gemm(true, false, h, m, rows, 1.0f, saved.a.data(), dy.data(), 1.0f, g->w2.data());
  AccumulateColumnSums(dy, &g->b2);
  float* dh = scratch1.data();
  blas::Gemm(false, true, rows, h, m, 1.0f, dy.data(), p.w2.data(), 0.0f, dh);
  // Row by row (while the row is in cache): dh = da * act'(h), and db1 += dh.
  float* __restrict db1 = g->b1.size() > 0 ? g->b1.data() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict dr = dh + r * h;
    const float* __restrict hv = saved.h.row(r);
    if (s.swiglu) {
      // a = silu(h) * u: du = da * silu(h); dh = da * u * silu'(h).
      float* __restrict du = scratch2.row(r);
      const float* __restrict uv = saved.u.row(r);
      for (int64_t c = 0; c < h; ++c) {
        const float sg = FastSigmoid(hv[c]);
        const float da = dr[c];
        du[c] = da * hv[c] * sg;
        dr[c] = da * uv[c] * sg * (1.0f + hv[c] * (1.0f - sg));
      }
    } else {
      MultiplyByDerivative(s.activation, hv, dr, h);
    }
    if (db1 != nullptr) {
      for (int64_t c = 0; c < h; ++c) db1[c] += dr[c];
    }
  }
  if (s.swiglu) {
    const float* du = scratch2.data();
    blas::Gemm(true, false, m, h, rows, 1.0f, x.data(), du, 1.0f, g->w3.data());
    blas::Gemm(false, true, rows, m, h, 1.0f, du, p.w3.data(), accumulate_dx ? 1.0f : 0.0f,
               dx.data());
    accumulate_dx = true;
  }
  blas::Gemm(true, false, m, h, rows, 1.0f, x.data(), dh, 1.0f, g->w1.data());
  blas::Gemm(false, true, rows, m, h, 1.0f, dh, p.w1.data(), accumulate_dx ? 1.0f : 0.0f,
             dx.data());
}

}  // namespace moe::experts
