// The router's losses and their gradients (runtime/routing/losses.h).
#include "runtime/routing/losses.h"

#include <cmath>
#include <vector>

#include "base/tensor.h"
#include "runtime/routing/routing_math.h"

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

// Adds one token's balance distribution P into acc (E): the probs (softmax) or s / Σ s (sigmoid).
void AddBalanceProbs(config::ScoreFunction f, const float* s, int64_t e, double* acc) {
  if (f == config::SIGMOID) {
    double sum = 0.0;
    for (int64_t i = 0; i < e; ++i) sum += s[i];
    for (int64_t i = 0; i < e; ++i) acc[i] += s[i] / sum;
    return;
  }
  for (int64_t i = 0; i < e; ++i) acc[i] += s[i];
}

// (E / slots) Σ_i (top1_i / f_tokens)(probs_i / n) over E values: the Switch-style balance loss.
double SwitchLoss(const double* top1, const double* probs, int64_t e, int64_t slots,
                  double f_tokens, double n) {
  double aux = 0.0;
  for (int64_t i = 0; i < e; ++i) aux += (top1[i] / f_tokens) * (probs[i] / n);
  return static_cast<double>(e) / static_cast<double>(slots) * aux;
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
        AddBalanceProbs(cfg.score_function(), probs.row(t), e, sums.probs.data());
      }
      break;
    case config::SEQUENCE: {
      const int64_t len = cfg.aux_sequence_length();
      const int64_t seqs = (n + len - 1) / len;
      sums.slots = k;
      sums.sequence_length = len;
      sums.seq_tokens.assign(static_cast<size_t>(seqs), 0);
      sums.seq_top1.assign(static_cast<size_t>(seqs * e), 0.0);
      sums.seq_probs.assign(static_cast<size_t>(seqs * e), 0.0);
      for (int64_t t = b; t < b + n; ++t) {
        const int64_t q = (t - b) / len;
        ++sums.seq_tokens[q];
        for (int64_t j = 0; j < k; ++j) sums.seq_top1[q * e + p.selected[t * k + j]] += 1.0;
        AddBalanceProbs(cfg.score_function(), probs.row(t), e, &sums.seq_probs[q * e]);
      }
      break;
    }
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
  if (groups.empty()) return out;  // no router losses (gate SOFT)
  for (const GroupLossSums& g : groups) {
    const double n = static_cast<double>(g.tokens);
    out.z += g.z / n;
    if (!g.top1.empty()) {
      const auto e = static_cast<int64_t>(g.top1.size());
      out.aux += SwitchLoss(g.top1.data(), g.probs.data(), e, g.slots,
                            g.f_tokens > 0.0 ? g.f_tokens : n, n);
    } else if (!g.seq_tokens.empty()) {
      const auto seqs = static_cast<int64_t>(g.seq_tokens.size());
      const int64_t e = static_cast<int64_t>(g.seq_top1.size()) / seqs;
      double aux = 0.0;
      for (int64_t q = 0; q < seqs; ++q) {
        const auto tq = static_cast<double>(g.seq_tokens[q]);
        aux += SwitchLoss(&g.seq_top1[q * e], &g.seq_probs[q * e], e, g.slots, tq, tq);
      }
      out.aux += aux / static_cast<double>(seqs);
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
                                       LossScale scale, int64_t num_groups) {
  GroupLossGradient out;
  const double inv_g = scale.aux / static_cast<double>(num_groups);
  const double aw = cfg.aux_loss_weight();
  out.z_weight = cfg.z_loss_weight() * (scale.z / static_cast<double>(num_groups));
  if (aw == 0.0) return out;
  const int64_t n = g.tokens;
  if (!g.top1.empty()) {
    const double e = static_cast<double>(g.top1.size()) / static_cast<double>(g.slots);
    const double f_tokens = g.f_tokens > 0.0 ? g.f_tokens : static_cast<double>(n);
    out.to_every_prob.resize(g.top1.size());
    for (size_t i = 0; i < g.top1.size(); ++i) {
      out.to_every_prob[i] = static_cast<float>(aw * inv_g * e * (g.top1[i] / f_tokens) / n);
    }
  } else if (!g.seq_tokens.empty()) {
    // aux_g = mean over sequences q of (E/k) Σ_i (c_qi / T_q)(Σ_{t in q} P_ti / T_q).
    const auto seqs = static_cast<int64_t>(g.seq_tokens.size());
    const int64_t e = static_cast<int64_t>(g.seq_top1.size()) / seqs;
    const double ek = static_cast<double>(e) / static_cast<double>(g.slots);
    out.sequence_length = g.sequence_length;
    out.to_every_prob.resize(g.seq_top1.size());
    for (int64_t q = 0; q < seqs; ++q) {
      const auto tq = static_cast<double>(g.seq_tokens[q]);
      for (int64_t i = 0; i < e; ++i) {
        out.to_every_prob[q * e + i] = static_cast<float>(
            aw * inv_g * ek * (g.seq_top1[q * e + i] / tq) / tq / static_cast<double>(seqs));
      }
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

std::vector<GroupLossSums> RouterLossSums(const config::RouterConfig& cfg, const DispatchPlan& p,
                                          const Tensor& probs, const Tensor& logits) {
  std::vector<GroupLossSums> sums;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    sums.push_back(SumsOfGroup(cfg, p, probs, logits, g, /*with_z=*/true, /*with_aux=*/true));
  }
  return sums;
}

RouterLosses ComputeRouterLosses(const config::RouterConfig& cfg, const DispatchPlan& p,
                                 const Tensor& probs, const Tensor& logits) {
  return LossesFromSums(RouterLossSums(cfg, p, probs, logits));
}

std::vector<double> BalanceCounts(const std::vector<GroupLossSums>& groups) {
  std::vector<double> out;
  double tokens = 0.0;
  for (const GroupLossSums& g : groups) {
    if (out.empty()) out.assign(g.top1.size(), 0.0);
    for (size_t i = 0; i < g.top1.size() && i < out.size(); ++i) out[i] += g.top1[i];
    tokens += static_cast<double>(g.tokens);
  }
  out.push_back(tokens);
  return out;
}

void SetGlobalBalanceCounts(const std::vector<double>& world, std::vector<GroupLossSums>* groups) {
  for (GroupLossSums& g : *groups) {
    if (g.top1.empty()) continue;
    g.top1.assign(world.begin(), world.end() - 1);
    g.f_tokens = world.back();
  }
}

void AccumulateRouterLossGradients(const config::RouterConfig& cfg, const DispatchPlan& p,
                                   const Tensor& probs, const Tensor& logits, LossScale scale,
                                   Tensor* dprobs, Tensor* dlogits,
                                   const std::vector<GroupLossSums>* forward_sums) {
  const int64_t e = p.num_experts, k = p.top_k;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int64_t b = p.group_begin[g], n = p.group_size(g);
    const GroupLossSums sums =
        forward_sums != nullptr
            ? (*forward_sums)[static_cast<size_t>(g)]
            : SumsOfGroup(cfg, p, probs, logits, g, /*with_z=*/false, cfg.aux_loss_weight() != 0.0);
    const GroupLossGradient grad = LossGradientFromSums(cfg, sums, scale, p.num_groups);
    for (int64_t t = b; t < b + n; ++t) {
      // d/dlogits (lse^2 mean) = 2 lse softmax(logits) / n.
      if (grad.z_weight != 0.0) routing::AddZLossGradient(e, logits.row(t), grad.z_weight, n, dlogits->row(t));
      if (!grad.to_every_prob.empty()) {
        const float* a = grad.to_every_prob.data() +
                         (grad.sequence_length > 0 ? (t - b) / grad.sequence_length * e : 0);
        float* row = dprobs->row(t);
        if (cfg.score_function() == config::SIGMOID) {
          routing::AddNormalizedScoreGradient(e, probs.row(t), a, row);
        } else {
          for (int64_t i = 0; i < e; ++i) row[i] += a[i];
        }
      }
      if (!grad.dimportance.empty()) {
        routing::AddImportanceGradient(p.normalization, static_cast<int32_t>(k), probs.row(t),
                                       &p.selected[t * k], grad.dimportance.data(), dprobs->row(t));
      }
    }
  }
}

void RouterScoreGradients(const config::RouterConfig& cfg, const DispatchPlan& p,
                          const RouterOutput& router, const float* dgate_rows,
                          LossScale loss_scale, RouterGradients* out,
                          const std::vector<GroupLossSums>* sums) {
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
                                dgate_rows, dprobs.row(t));
    }
  }
  AccumulateRouterLossGradients(cfg, p, router.probs, router.logits, loss_scale, &dprobs, &dlogits,
                                sums);
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
