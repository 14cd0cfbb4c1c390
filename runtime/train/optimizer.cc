// AdamW with warm-up and cosine decay (runtime/train/optimizer.h).
#include "runtime/train/optimizer.h"

#include <cmath>

namespace moe {

double AdamW::LearningRate(int64_t step) const {
  const double peak = cfg_.lr();
  const int64_t warmup = cfg_.warmup_steps();
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const int64_t total = std::max<int64_t>(cfg_.steps(), warmup + 1);
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
  return peak * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * progress)));
}

void AdamW::Step(const std::vector<ParamRef>& params, const std::vector<bool>& trainable, double lr,
                 double grad_scale) {
  ++steps_;
  const double b1 = cfg_.beta1(), b2 = cfg_.beta2(), eps = cfg_.eps(), wd = cfg_.weight_decay();
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(steps_));
  const double c2 = 1.0 - std::pow(b2, static_cast<double>(steps_));
  for (size_t i = 0; i < params.size(); ++i) {
    if (!trainable[i]) continue;
    const ParamRef& p = params[i];
    Moments& st = state_[p.name];
    if (st.m.size() != p.value->size()) {
      st.m = Tensor(p.value->rows(), p.value->cols());
      st.v = Tensor(p.value->rows(), p.value->cols());
    }
    const bool decay = wd > 0.0 && p.value->rows() > 1 && p.value->cols() > 1;
    float* w = p.value->data();
    const float* g = p.grad->data();
    float* m = st.m.data();
    float* v = st.v.data();
    for (int64_t j = 0; j < p.value->size(); ++j) {
      const double gj = static_cast<double>(g[j]) * grad_scale;
      m[j] = static_cast<float>(b1 * m[j] + (1.0 - b1) * gj);
      v[j] = static_cast<float>(b2 * v[j] + (1.0 - b2) * gj * gj);
      double upd = (m[j] / c1) / (std::sqrt(v[j] / c2) + eps);
      if (decay) upd += wd * w[j];
      w[j] = static_cast<float>(w[j] - lr * upd);
    }
  }
}

}  // namespace moe
