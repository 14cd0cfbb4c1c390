#include "runtime/losses.h"

#include <cmath>
#include <vector>

#include "runtime/expert_blocks.h"

namespace moe {
namespace {

double LogSumExp(const float* row, int64_t n) {
  double mx = row[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, static_cast<double>(row[i]));
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(row[i]) - mx);
  return mx + std::log(sum);
}

// Sum over the k selected experts of probs (the pre-capacity normalizer).
double SelectedSum(const DispatchPlan& p, const Tensor& probs, int64_t t) {
  double sum = 0.0;
  for (int64_t j = 0; j < p.top_k; ++j) sum += probs(t, p.selected[t * p.top_k + j]);
  return sum;
}

// Importance per expert of group g (sum of pre-capacity gates).
std::vector<double> Importance(const DispatchPlan& p, const Tensor& probs, int64_t g) {
  std::vector<double> imp(static_cast<size_t>(p.num_experts), 0.0);
  for (int64_t t = p.group_begin[g]; t < p.group_begin[g + 1]; ++t) {
    for (int64_t j = 0; j < p.top_k; ++j) {
      imp[p.selected[t * p.top_k + j]] += PreCapacityGate(p, probs, t, j);
    }
  }
  return imp;
}

}  // namespace

float PreCapacityGate(const DispatchPlan& p, const Tensor& probs, int64_t t, int64_t j) {
  const double r = probs(t, p.selected[t * p.top_k + j]);
  if (p.normalization == config::NONE) return static_cast<float>(r);
  return static_cast<float>(r / SelectedSum(p, probs, t));
}

RouterLosses ComputeRouterLosses(const config::RouterConfig& cfg, const DispatchPlan& p,
                                 const Tensor& probs, const Tensor& logits) {
  RouterLosses out;
  const int64_t e = p.num_experts, k = p.top_k;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int64_t b = p.group_begin[g], n = p.group_size(g);
    double z = 0.0;
    for (int64_t t = b; t < b + n; ++t) {
      const double lse = LogSumExp(logits.row(t), e);
      z += lse * lse;
    }
    out.z += z / static_cast<double>(n);
    if (p.expert_choice) continue;  // balanced by construction; validation forbids an aux loss
    switch (cfg.aux_loss()) {
      case config::SWITCH:
      case config::GSHARD: {
        std::vector<double> f(static_cast<size_t>(e), 0.0), pm(static_cast<size_t>(e), 0.0);
        for (int64_t t = b; t < b + n; ++t) {
          f[p.selected[t * k]] += 1.0;
          for (int64_t i = 0; i < e; ++i) pm[i] += probs(t, i);
        }
        double aux = 0.0;
        for (int64_t i = 0; i < e; ++i) aux += (f[i] / n) * (pm[i] / n);
        out.aux += static_cast<double>(e) * aux;
        break;
      }
      case config::IMPORTANCE_CV: {
        const std::vector<double> imp = Importance(p, probs, g);
        double mean = 0.0, var = 0.0;
        for (double v : imp) mean += v;
        mean /= static_cast<double>(e);
        for (double v : imp) var += (v - mean) * (v - mean);
        var /= static_cast<double>(e);
        out.aux += mean > 0.0 ? var / (mean * mean) : 0.0;
        break;
      }
      case config::NO_AUX_LOSS:
        break;
    }
  }
  out.aux /= static_cast<double>(p.num_groups);
  out.z /= static_cast<double>(p.num_groups);
  return out;
}

void AccumulateRouterLossGradients(const config::RouterConfig& cfg, const DispatchPlan& p,
                                   const Tensor& probs, const Tensor& logits, double scale,
                                   Tensor* dprobs, Tensor* dlogits) {
  const int64_t e = p.num_experts, k = p.top_k;
  const double inv_g = scale / static_cast<double>(p.num_groups);
  const double zw = cfg.z_loss_weight(), aw = cfg.aux_loss_weight();
  std::vector<double> soft(static_cast<size_t>(e));
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int64_t b = p.group_begin[g], n = p.group_size(g);
    if (zw != 0.0) {
      // d/dlogits (lse^2 mean) = 2 lse softmax(logits) / n.
      for (int64_t t = b; t < b + n; ++t) {
        const float* row = logits.row(t);
        const double lse = LogSumExp(row, e);
        const double zscale = zw * inv_g * 2.0 * lse / static_cast<double>(n);
        for (int64_t i = 0; i < e; ++i) {
          (*dlogits)(t, i) +=
              static_cast<float>(zscale * std::exp(static_cast<double>(row[i]) - lse));
        }
      }
    }
    if (aw == 0.0 || p.expert_choice) continue;
    switch (cfg.aux_loss()) {
      case config::SWITCH:
      case config::GSHARD: {
        std::vector<double> f(static_cast<size_t>(e), 0.0);
        for (int64_t t = b; t < b + n; ++t) f[p.selected[t * k]] += 1.0;
        for (int64_t t = b; t < b + n; ++t) {
          for (int64_t i = 0; i < e; ++i) {
            (*dprobs)(t, i) +=
                static_cast<float>(aw * inv_g * static_cast<double>(e) * (f[i] / n) / n);
          }
        }
        break;
      }
      case config::IMPORTANCE_CV: {
        const std::vector<double> imp = Importance(p, probs, g);
        double mean = 0.0, var = 0.0;
        for (double v : imp) mean += v;
        mean /= static_cast<double>(e);
        if (mean <= 0.0) break;
        for (double v : imp) var += (v - mean) * (v - mean);
        var /= static_cast<double>(e);
        // d(var / mean^2)/d imp_i = 2 (imp_i - mean) / (E mean^2) - 2 var / (E mean^3).
        std::vector<double> dimp(static_cast<size_t>(e));
        for (int64_t i = 0; i < e; ++i) {
          dimp[i] =
              aw * inv_g *
              (2.0 * (imp[i] - mean) / (e * mean * mean) - 2.0 * var / (e * mean * mean * mean));
        }
        for (int64_t t = b; t < b + n; ++t) {
          // g°_j = r_j (NONE) or r_j / D with D = sum of the k selected r.
          if (p.normalization == config::NONE) {
            for (int64_t j = 0; j < k; ++j) {
              const int32_t ex = p.selected[t * k + j];
              (*dprobs)(t, ex) += static_cast<float>(dimp[ex]);
            }
            continue;
          }
          const double d = SelectedSum(p, probs, t);
          double dot = 0.0;  // sum_j dg_j g_j
          for (int64_t j = 0; j < k; ++j) {
            const int32_t ex = p.selected[t * k + j];
            dot += dimp[ex] * probs(t, ex) / d;
          }
          for (int64_t j = 0; j < k; ++j) {
            const int32_t ex = p.selected[t * k + j];
            (*dprobs)(t, ex) += static_cast<float>((dimp[ex] - dot) / d);
          }
        }
        break;
      }
      case config::NO_AUX_LOSS:
        break;
    }
  }
}

void RouterScoreGradients(const config::RouterConfig& cfg, const DispatchPlan& p,
                          const RouterOutput& router, const std::vector<float>& dgate_rows,
                          double loss_scale, RouterGradients* out) {
  const int64_t s = p.num_tokens, e = p.num_experts, k = p.top_k;
  Tensor& dprobs = out->dprobs;
  Tensor& dlogits = out->dlogits;
  ResizeTensor(&dprobs, s, e);
  ResizeTensor(&dlogits, s, e);
  dprobs.Fill(0.0f);
  dlogits.Fill(0.0f);
  if (p.expert_choice) {
    for (int64_t r = 0; r < p.num_rows(); ++r)
      dprobs(p.row_token[r], p.row_expert[r]) += dgate_rows[r];
  } else {
    for (int64_t t = 0; t < s; ++t) {
      double dot = 0.0, denom = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = t * k + j;
        const bool kept = p.slot_row[slot] >= 0;
        const double dg = kept ? dgate_rows[p.slot_row[slot]] : 0.0;
        dot += dg * p.slot_gate[slot];
        if (p.normalization == config::TOPK_SOFTMAX || kept) denom += p.slot_raw[slot];
      }
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = t * k + j;
        const bool kept = p.slot_row[slot] >= 0;
        const double dg = kept ? dgate_rows[p.slot_row[slot]] : 0.0;
        double dr = 0.0;
        if (p.normalization == config::NONE) {
          dr = dg;
        } else if (p.normalization == config::TOPK_SOFTMAX || kept) {
          dr = (dg - dot) / denom;
        }
        dprobs(t, p.slot_final[slot]) += static_cast<float>(dr);
      }
    }
  }
  AccumulateRouterLossGradients(cfg, p, router.probs, router.logits, loss_scale, &dprobs, &dlogits);
  // Softmax backward: dscores = probs * (dprobs - <dprobs, probs>).
  Tensor& dscores = out->dscores;
  ResizeTensor(&dscores, s, e);
  for (int64_t t = 0; t < s; ++t) {
    double dot = 0.0;
    for (int64_t i = 0; i < e; ++i) dot += static_cast<double>(dprobs(t, i)) * router.probs(t, i);
    for (int64_t i = 0; i < e; ++i) {
      dscores(t, i) = static_cast<float>(router.probs(t, i) * (dprobs(t, i) - dot));
      dlogits(t, i) += dscores(t, i);
    }
  }
  if (!router.noisy) {
    out->dnoise = Tensor();
    return;
  }
  // scores = logits + eps * softplus(noise_in): d/d noise_in = dscores * eps * sigmoid(noise_in).
  ResizeTensor(&out->dnoise, s, e);
  for (int64_t t = 0; t < s; ++t) {
    for (int64_t i = 0; i < e; ++i) {
      const float n = router.noise_in(t, i);
      out->dnoise(t, i) = dscores(t, i) * router.eps(t, i) / (1.0f + std::exp(-n));
    }
  }
}

}  // namespace moe
