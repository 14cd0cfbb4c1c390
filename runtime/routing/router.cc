// The router: logits, noise, softmax and their backward (runtime/routing/router.h).
#include "runtime/routing/router.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "experts/cpu/blas.h"
#include "base/rng.h"
#include "base/tensor.h"

namespace moe {

void SoftmaxRows(MatrixView<const float> in, MatrixView<float> out) {
  const int64_t cols = in.cols();
  for (int64_t r = 0; r < in.rows(); ++r) {
    const float* a = in.row(r);
    float* o = out.row(r);
    float mx = a[0];
    for (int64_t c = 1; c < cols; ++c) mx = std::max(mx, a[c]);
    float sum = 0.0f;
    for (int64_t c = 0; c < cols; ++c) {
      o[c] = std::exp(a[c] - mx);
      sum += o[c];
    }
    const float inv = 1.0f / sum;
    for (int64_t c = 0; c < cols; ++c) o[c] = o[c] * inv;
  }
}

void SoftmaxColumnsPerGroup(MatrixView<const float> in, int64_t groups, MatrixView<float> out) {
  const int64_t cols = in.cols();
  std::vector<float> mx(static_cast<size_t>(cols)), sum(static_cast<size_t>(cols));
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b = routing::GroupBegin(in.rows(), groups, g),
                  end = routing::GroupBegin(in.rows(), groups, g + 1);
    for (int64_t c = 0; c < cols; ++c) mx[c] = in.row(b)[c];
    for (int64_t r = b + 1; r < end; ++r) {
      for (int64_t c = 0; c < cols; ++c) mx[c] = std::max(mx[c], in.row(r)[c]);
    }
    std::fill(sum.begin(), sum.end(), 0.0f);
    for (int64_t r = b; r < end; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        out.row(r)[c] = std::exp(in.row(r)[c] - mx[c]);
        sum[c] += out.row(r)[c];
      }
    }
    for (int64_t c = 0; c < cols; ++c) sum[c] = 1.0f / sum[c];
    for (int64_t r = b; r < end; ++r) {
      for (int64_t c = 0; c < cols; ++c) out.row(r)[c] = out.row(r)[c] * sum[c];
    }
  }
}

void SoftRouterGradients(const RouterOutput& router, int64_t groups, MatrixView<const float> dc,
                         MatrixView<const float> dd, Tensor* dlogits) {
  const Tensor& c_w = router.probs;
  const Tensor& d_w = router.dispatch;
  const int64_t s = c_w.rows(), cols = c_w.cols();
  ResizeTensor(dlogits, s, cols);
  for (int64_t t = 0; t < s; ++t) {
    double dot = 0.0;
    for (int64_t c = 0; c < cols; ++c) dot += static_cast<double>(dc(t, c)) * c_w(t, c);
    for (int64_t c = 0; c < cols; ++c) {
      (*dlogits)(t, c) = static_cast<float>(c_w(t, c) * (dc(t, c) - dot));
    }
  }
  std::vector<double> coldot(static_cast<size_t>(cols));
  for (int64_t gr = 0; gr < groups; ++gr) {
    const int64_t b = routing::GroupBegin(s, groups, gr), end = routing::GroupBegin(s, groups, gr + 1);
    std::fill(coldot.begin(), coldot.end(), 0.0);
    for (int64_t t = b; t < end; ++t) {
      for (int64_t c = 0; c < cols; ++c) coldot[c] += static_cast<double>(dd(t, c)) * d_w(t, c);
    }
    for (int64_t t = b; t < end; ++t) {
      for (int64_t c = 0; c < cols; ++c) {
        (*dlogits)(t, c) += static_cast<float>(d_w(t, c) * (dd(t, c) - coldot[c]));
      }
    }
  }
}

void ComputeRouter(const config::RouterConfig& cfg, MatrixView<const float> x,
                   MatrixView<const float> wg, MatrixView<const float> wnoise,
                   const RouteContext& ctx, RouterOutput* out) {
  const int64_t s = x.rows(), m = x.cols(), e = wg.cols();
  ResizeTensor(&out->logits, s, e);  // fully overwritten below
  blas::Gemm(false, false, s, e, m, 1.0f, x.data(), wg.data(), 0.0f, out->logits.data());
  if (RouterIsNoisy(cfg, ctx)) {
    ResizeTensor(&out->noise_in, s, e);  // fully overwritten below
    blas::Gemm(false, false, s, e, m, 1.0f, x.data(), wnoise.data(), 0.0f, out->noise_in.data());
  }
  FinishRouter(cfg, ctx, out);
}

void FinishRouter(const config::RouterConfig& cfg, const RouteContext& ctx, RouterOutput* out) {
  const int64_t s = out->logits.rows(), e = out->logits.cols();
  ResizeTensor(&out->probs, s, e);  // fully overwritten below
  out->noisy = RouterIsNoisy(cfg, ctx);
  if (!out->noisy) {
    out->noise_in = Tensor();
    out->eps = Tensor();
    if (cfg.score_function() == config::SIGMOID) {
      for (int64_t i = 0; i < s * e; ++i) out->probs[i] = routing::Sigmoid(out->logits[i]);
    } else {
      SoftmaxRows(out->logits.view(), out->probs.view());
    }
    if (cfg.gate() == config::SOFT) {
      if (s < cfg.num_local_groups()) return;  // BuildDispatchPlan reports it
      ResizeTensor(&out->dispatch, s, e);  // fully overwritten below
      SoftmaxColumnsPerGroup(out->logits.view(), cfg.num_local_groups(), out->dispatch.view());
    } else {
      out->dispatch = Tensor();
    }
    return;
  }
  ResizeTensor(&out->eps, s, e);  // fully overwritten below
  Tensor scores(s, e);
  for (int64_t t = 0; t < s; ++t) {
    const uint64_t token = static_cast<uint64_t>(ctx.token_offset + t);
    for (int64_t j = 0; j < e; ++j) {
      const float eps = CounterNormal(ctx.seed, ctx.step, token, RngStream::kRouterNoise,
                                      static_cast<uint64_t>(j));
      out->eps(t, j) = eps;
      scores(t, j) = routing::NoisyScore(out->logits(t, j), eps, out->noise_in(t, j));
    }
  }
  SoftmaxRows(scores.view(), out->probs.view());
}

}  // namespace moe
