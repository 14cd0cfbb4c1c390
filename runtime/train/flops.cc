// Model FLOPs and the GEMM probe (runtime/train/flops.h).
#include "runtime/train/flops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "experts/cpu/blas.h"
#include "base/clock.h"
#include "runtime/config/config.h"

namespace moe {
namespace {

// Forward FLOPs of one FFN row of hidden size h: 2·M·H per projection (SwiGLU has three).
double FfnRowFlops(const config::LayerConfig& l, int64_t h) {
  const double proj = l.expert().kind() == config::SWIGLU ? 3.0 : 2.0;
  return proj * 2.0 * static_cast<double>(l.model_dim()) * static_cast<double>(h);
}

}  // namespace

StepFlops ModelFlops(const config::MoeConfig& cfg, int64_t tokens, int64_t expert_rows) {
  const config::LayerConfig& l = cfg.moe();
  const double s = static_cast<double>(tokens), m = l.model_dim();
  const double layers = cfg.model().num_layers();
  const bool noisy = l.router().gate() == config::NOISY_TOPK;
  constexpr double kFwdBwd = 3.0;  // backward: two products per forward product
  StepFlops f;
  f.router = kFwdBwd * layers * s * 2.0 * m * (RouterColumns(l) + (noisy ? l.num_experts() : 0));
  f.experts = kFwdBwd * static_cast<double>(expert_rows) * FfnRowFlops(l, l.expert().hidden_dim());
  f.shared = kFwdBwd * layers * s * l.num_shared_experts() * FfnRowFlops(l, SharedHidden(l));
  if (l.router().gate() == config::SOFT) {
    // Slot inputs Dᵀ·X and the combine C·Ỹ: 2·E·p·M each per token.
    f.soft_mix = kFwdBwd * layers * s * 2.0 * 2.0 * m * RouterColumns(l);
  }
  f.head = kFwdBwd * s * 2.0 * m * 256.0;
  return f;
}

double NominalFlopsPerToken(const config::MoeConfig& cfg, int64_t tokens_per_group) {
  const auto& r = cfg.moe().router();
  double rows_per_token = TopK(r);
  if (r.gate() == config::EXPERT_CHOICE) rows_per_token = std::max(r.capacity_factor_train(), 0.0);
  if (r.gate() == config::SOFT) {
    rows_per_token = static_cast<double>(RouterColumns(cfg.moe())) /
                     static_cast<double>(std::max<int64_t>(1, tokens_per_group));
  }
  // One token; the experts' rows as a fraction scaled up (ModelFlops is linear in both).
  constexpr int64_t kScale = 1 << 20;
  const StepFlops f = ModelFlops(
      cfg, kScale,
      static_cast<int64_t>(std::llround(rows_per_token * cfg.model().num_layers() * kScale)));
  return f.total() / kScale;
}

double ProbeGemmGflops(double seconds) {
  constexpr int64_t n = 512;
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n, 0.0f);
  const double flops = 2.0 * n * n * n;
  double best = 0.0, spent = 0.0;
  blas::Gemm(false, false, n, n, n, 1.0f, a.data(), b.data(), 0.0f, c.data());  // warm up
  for (int i = 0; i < 64 && (spent < seconds || i < 3); ++i) {
    const double t0 = WallSeconds();
    blas::Gemm(false, false, n, n, n, 1.0f, a.data(), b.data(), 0.0f, c.data());
    const double dt = WallSeconds() - t0;
    spent += dt;
    if (dt > 0) best = std::max(best, flops / dt / 1e9);
  }
  return best;
}

}  // namespace moe
