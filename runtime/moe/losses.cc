// The router's losses and their gradients (runtime/moe/losses.h).
#include "runtime/moe/losses.h"

#include <cmath>
#include <vector>

#include "runtime/base/tensor.h"
#include "runtime/moe/routing_math.h"

namespace moe {
namespace {

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

// The sums of group g that `cfg`'s losses need (z only with `with_z`, the aux loss's only with
// `with_aux`).
GroupLossSums SumsOfGroup(const config::RouterConfig& cfg, const DispatchPlan& p,
                          const Tensor& probs, const Tensor& logits, int64_t g, bool with_z,
                          bool with_aux) {
  const int64_t e = p.num_experts, k = p.top_k, b = p.group_begin[g], n = p.group_size(g);
  GroupLossSums sums;
  sums.tokens = n;
  if (with_z) {
    for (int64_t t = b; t < b + n; ++t) {
      const double lse = routing::LogSumExp(logits.row(t), e);
      sums.z += lse * lse;
    }
  }
  // Expert choice is balanced by construction; validation forbids an aux loss.
  if (!with_aux || p.expert_choice) return sums;
  switch (cfg.aux_loss()) {
    case config::SWITCH:
    case config::GSHARD:
    case config::SWITCH_TOPK:
      sums.slots = cfg.aux_loss() == config::SWITCH_TOPK ? k : 1;
      sums.top1.assign(static_cast<size_t>(e), 0.0);
      sums.probs.assign(static_cast<size_t>(e), 0.0);
      for (int64_t t = b; t < b + n; ++t) {
        for (int64_t j = 0; j < sums.slots; ++j) sums.top1[p.selected[t * k + j]] += 1.0;
        if (cfg.score_function() == config::SIGMOID) {  // P = s / Σ s
          double sum = 0.0;
          for (int64_t i = 0; i < e; ++i) sum += probs(t, i);
          for (int64_t i = 0; i < e; ++i) sums.probs[i] += probs(t, i) / sum;
        } else {
          for (int64_t i = 0; i < e; ++i) sums.probs[i] += probs(t, i);
        }
      }
      break;
    case config::IMPORTANCE_CV:
      sums.importance = Importance(p, probs, g);
      break;
    case config::NO_AUX_LOSS:
      break;
  }
  return sums;
}

// Mean and population variance of v.
void MeanVariance(const std::vector<double>& v, double* mean, double* var) {
  const double e = static_cast<double>(v.size());
  *mean = 0.0;
  *var = 0.0;
  for (double x : v) *mean += x;
  *mean /= e;
  for (double x : v) *var += (x - *mean) * (x - *mean);
  *var /= e;
}

}  // namespace

float PreCapacityGate(const DispatchPlan& p, const Tensor& probs, int64_t t, int64_t j) {
  return routing::PreCapacityGate(p.normalization, static_cast<int32_t>(p.top_k), probs.row(t),
                                  &p.selected[t * p.top_k], static_cast<int32_t>(j));
}

RouterLosses LossesFromSums(const std::vector<GroupLossSums>& groups) {
  RouterLosses out;
  for (const GroupLossSums& g : groups) {
    const double n = static_cast<double>(g.tokens);
    out.z += g.z / n;
    if (!g.top1.empty()) {
      double aux = 0.0;
      for (size_t i = 0; i < g.top1.size(); ++i) aux += (g.top1[i] / n) * (g.probs[i] / n);
      out.aux += static_cast<double>(g.top1.size()) / static_cast<double>(g.slots) * aux;
    } else if (!g.importance.empty()) {
      double mean = 0.0, var = 0.0;
      MeanVariance(g.importance, &mean, &var);
      out.aux += mean > 0.0 ? var / (mean * mean) : 0.0;
    }
  }
  out.aux /= static_cast<double>(groups.size());
  out.z /= static_cast<double>(groups.size());
  return out;
}

GroupLossGradient LossGradientFromSums(const config::RouterConfig& cfg, const GroupLossSums& g,
                                       double scale, int64_t num_groups) {
  GroupLossGradient out;
  const double inv_g = scale / static_cast<double>(num_groups);
  const double aw = cfg.aux_loss_weight();
  out.z_weight = cfg.z_loss_weight() * inv_g;
  if (aw == 0.0) return out;
  const int64_t n = g.tokens;
  if (!g.top1.empty()) {
    const double e = static_cast<double>(g.top1.size()) / static_cast<double>(g.slots);
    out.to_every_prob.resize(g.top1.size());
    for (size_t i = 0; i < g.top1.size(); ++i) {
      out.to_every_prob[i] = static_cast<float>(aw * inv_g * e * (g.top1[i] / n) / n);
    }
  } else if (!g.importance.empty()) {
    const auto e = static_cast<int64_t>(g.importance.size());
    double mean = 0.0, var = 0.0;
    MeanVariance(g.importance, &mean, &var);
    if (mean <= 0.0) return out;
    // d(var / mean^2)/d imp_i = 2 (imp_i - mean) / (E mean^2) - 2 var / (E mean^3).
    out.dimportance.resize(g.importance.size());
    for (int64_t i = 0; i < e; ++i) {
      out.dimportance[i] = aw * inv_g *
                           (2.0 * (g.importance[i] - mean) / (e * mean * mean) -
                            2.0 * var / (e * mean * mean * mean));
    }
  }
  return out;
}

RouterLosses ComputeRouterLosses(const config::RouterConfig& cfg, const DispatchPlan& p,
                                 const Tensor& probs, const Tensor& logits) {
  std::vector<GroupLossSums> sums;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    sums.push_back(SumsOfGroup(cfg, p, probs, logits, g, /*with_z=*/true, /*with_aux=*/true));
  }
  return LossesFromSums(sums);
}

void AccumulateRouterLossGradients(const config::RouterConfig& cfg, const DispatchPlan& p,
                                   const Tensor& probs, const Tensor& logits, double scale,
                                   Tensor* dprobs, Tensor* dlogits) {
  const int64_t e = p.num_experts, k = p.top_k;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int64_t b = p.group_begin[g], n = p.group_size(g);
    const GroupLossSums sums =
        SumsOfGroup(cfg, p, probs, logits, g, /*with_z=*/false, cfg.aux_loss_weight() != 0.0);
    const GroupLossGradient grad = LossGradientFromSums(cfg, sums, scale, p.num_groups);
    for (int64_t t = b; t < b + n; ++t) {
      // d/dlogits (lse^2 mean) = 2 lse softmax(logits) / n.
      if (grad.z_weight != 0.0) routing::AddZLossGradient(e, logits.row(t), grad.z_weight, n, dlogits->row(t));
      if (!grad.to_every_prob.empty() && cfg.score_function() == config::SIGMOID) {
        routing::AddNormalizedScoreGradient(e, probs.row(t), grad.to_every_prob.data(),
                                            dprobs->row(t));
      } else if (!grad.to_every_prob.empty()) {
        float* row = dprobs->row(t);
        for (int64_t i = 0; i < e; ++i) row[i] += grad.to_every_prob[i];
      }
      if (!grad.dimportance.empty()) {
        routing::AddImportanceGradient(p.normalization, static_cast<int32_t>(k), probs.row(t),
                                       &p.selected[t * k], grad.dimportance.data(), dprobs->row(t));
      }
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
      const int64_t first = t * k;
      routing::AddGateGradients(p.normalization, static_cast<float>(cfg.scaling_factor()),
                                static_cast<int32_t>(k), &p.slot_row[first],
                                &p.slot_gate[first], &p.slot_raw[first], &p.slot_final[first],
                                dgate_rows.data(), dprobs.row(t));
    }
  }
  AccumulateRouterLossGradients(cfg, p, router.probs, router.logits, loss_scale, &dprobs, &dlogits);
  // Softmax backward: dscores = probs * (dprobs - <dprobs, probs>); sigmoid: dprobs * s (1 - s).
  Tensor& dscores = out->dscores;
  ResizeTensor(&dscores, s, e);
  for (int64_t t = 0; t < s; ++t) {
    if (cfg.score_function() == config::SIGMOID) {
      routing::SigmoidBackward(e, router.probs.row(t), dprobs.row(t), dscores.row(t),
                               dlogits.row(t));
    } else {
      routing::SoftmaxBackward(e, router.probs.row(t), dprobs.row(t), dscores.row(t),
                               dlogits.row(t));
    }
  }
  if (!router.noisy) {
    out->dnoise = Tensor();
    return;
  }
  // scores = logits + eps * softplus(noise_in): d/d noise_in = dscores * eps * sigmoid(noise_in).
  ResizeTensor(&out->dnoise, s, e);
  for (int64_t t = 0; t < s; ++t) {
    routing::NoiseGradient(e, dscores.row(t), router.eps.row(t), router.noise_in.row(t),
                           out->dnoise.row(t));
  }
}

}  // namespace moe
