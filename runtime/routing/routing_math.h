// The per-token arithmetic of routing and of the router's backward, written once for the CPU path
// (dispatch_plan.cc, losses.cc) and the GPU kernels (runtime/device/cuda/route.cu): selection order,
// GShard random routing's keep test, gate normalization, the gates' backward through the
// normalization, the softmax backward and the per-token parts of the loss gradients. Same code,
// same operation order, so for the same probs the device makes the CPU's decisions (the CPU tests
// exercise every function here). Semantics: docs/SEMANTICS.md.
//
// Plain pointers and no allocation: each function works on one token's row (E values) and its k
// slots.
#pragma once

#include <math.h>

#include <cstdint>

#include "proto/moe_config.pb.h"
#include "base/host_device.h"
#include "runtime/config/limits.h"

namespace moe::routing {

// First token of group g of S tokens in G contiguous groups (the first S % G hold one token more):
// GroupBounds(S, G)[g] (dispatch_plan.h) for one g.
MOE_HD inline int64_t GroupBegin(int64_t tokens, int64_t groups, int64_t g) {
  const int64_t q = tokens / groups, r = tokens % groups;
  return g * q + (g < r ? g : r);
}

// The group of token t (0 <= t < S, G <= S).
MOE_HD inline int64_t GroupOf(int64_t tokens, int64_t groups, int64_t t) {
  const int64_t q = tokens / groups, r = tokens % groups, big = r * (q + 1);
  return t < big ? t / (q + 1) : r + (t - big) / q;
}

// softplus(v) = log(1 + e^v), v itself above 20.
MOE_HD inline float Softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

// Noisy top-k score logit + eps·softplus(noise_in), rounded after the product and after the sum
// on either side (nvcc would otherwise fuse them into one FMA and change the routing).
MOE_HD inline float NoisyScore(float logit, float eps, float noise_in) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(logit, __fmul_rn(eps, Softplus(noise_in)));
#else
  return logit + eps * Softplus(noise_in);
#endif
}

// RankTopExperts keeps at most this many experts (top-k and the device router's k).
constexpr int32_t kMaxRankedExperts = limits::kMaxRankedExperts;

// Selection order: a higher score first, ties by the lower expert index.
MOE_HD inline bool Outranks(float score_a, int32_t a, float score_b, int32_t b) {
  return score_a > score_b || (score_a == score_b && a < b);
}

// The first `count` (1..kMaxRankedExperts, <= e) experts of one token in selection order of
// probs[j] + bias[j] (bias may be null), best first, into out[0..count). Insertion into a sorted
// list of `count`: most experts lose to the current last entry with one comparison. With
// group_size > 0 only the experts of the expert groups set in group_mask (expert j is in group
// j / group_size) compete (group-limited top-k; the mask must allow at least `count` experts).
MOE_HD inline void RankTopExperts(const float* probs, const float* bias, int32_t e, int32_t count,
                                  int32_t* out, int32_t group_size = 0,
                                  uint64_t group_mask = ~uint64_t{0}) {
  float top[kMaxRankedExperts];
  int32_t n = 0;
  for (int32_t j = 0; j < e; ++j) {
    if (group_size > 0 && ((group_mask >> (j / group_size)) & 1u) == 0) continue;
    const float score = probs[j] + (bias == nullptr ? 0.0f : bias[j]);
    if (n == count && !Outranks(score, j, top[n - 1], out[n - 1])) continue;
    int32_t pos = n < count ? n++ : count - 1;
    for (; pos > 0 && Outranks(score, j, top[pos - 1], out[pos - 1]); --pos) {
      out[pos] = out[pos - 1];
      top[pos] = top[pos - 1];
    }
    out[pos] = j;
    top[pos] = score;
  }
}

// Group-limited top-k: at most this many expert groups (a 64-bit mask), at most
// kMaxRankedExperts kept per token.
constexpr int32_t kMaxExpertGroups = limits::kMaxExpertGroups;

// Score of expert group g (experts [g·size, (g+1)·size)): the sum of its top `top` selection
// scores probs[j] + bias[j], added in float from the highest (DeepSeek-V3's group score).
MOE_HD inline float ExpertGroupScore(const float* probs, const float* bias, int32_t size,
                                     int32_t top, int32_t g) {
  int32_t best[kMaxRankedExperts];
  const float* p = probs + g * size;
  const float* b = bias == nullptr ? nullptr : bias + g * size;
  RankTopExperts(p, b, size, top, best);
  float acc = 0.0f;
  for (int32_t i = 0; i < top; ++i) acc += p[best[i]] + (b == nullptr ? 0.0f : b[best[i]]);
  return acc;
}

// The `keep` best of `groups` expert groups of one token by ExpertGroupScore (ties: lower group
// index), as a mask (bit g set = group g kept).
MOE_HD inline uint64_t ChooseExpertGroups(const float* probs, const float* bias, int32_t e,
                                          int32_t groups, int32_t keep, int32_t top) {
  float score[kMaxExpertGroups];
  int32_t best[kMaxRankedExperts];
  const int32_t size = e / groups;
  for (int32_t g = 0; g < groups; ++g) score[g] = ExpertGroupScore(probs, bias, size, top, g);
  RankTopExperts(score, nullptr, groups, keep, best);
  uint64_t mask = 0;
  for (int32_t i = 0; i < keep; ++i) mask |= uint64_t{1} << best[i];
  return mask;
}

// Sigmoid score s = 1 / (1 + e^-v) in float (router.score_function SIGMOID).
MOE_HD inline float Sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// GShard random routing: whether a token keeps its 2nd slot, from the raw gates of its two slots
// and its uniform draw u: u < 2·r1/(r0 + r1).
MOE_HD inline bool KeepsSecondSlot(float r0, float r1, double u) {
  const float g2 = r1 / (r0 + r1);
  return u < 2.0 * static_cast<double>(g2);
}

// One token's k slots after random routing and capacity: raw[j] = probs[final_expert[j]]; a kept
// slot (kept[j] != 0) gets its normalized gate times `scale` (router.scaling_factor) and its
// expert, a dropped one gate 0 and expert -1.
MOE_HD inline void TokenGates(config::GateNormalization norm, float scale, int32_t k,
                              const float* probs, const int32_t* final_expert, const uint8_t* kept,
                              float* raw, float* gate, int32_t* expert) {
  float sum_all = 0.0f, sum_kept = 0.0f;
  for (int32_t j = 0; j < k; ++j) {
    raw[j] = probs[final_expert[j]];
    sum_all += raw[j];
    if (kept[j] != 0) sum_kept += raw[j];
  }
  for (int32_t j = 0; j < k; ++j) {
    if (kept[j] == 0) {
      gate[j] = 0.0f;
      expert[j] = -1;
      continue;
    }
    const float r = raw[j];
    gate[j] = (norm == config::NONE           ? r
               : norm == config::TOPK_SOFTMAX ? r / sum_all
                                              : r / sum_kept) *
              scale;
    expert[j] = final_expert[j];
  }
}

// Sum of probs over a token's k selected experts, in double (the pre-capacity normalizer).
MOE_HD inline double SelectedSum(int32_t k, const float* probs, const int32_t* selected) {
  double sum = 0.0;
  for (int32_t j = 0; j < k; ++j) sum += probs[selected[j]];
  return sum;
}

// Pre-capacity gate g° of slot j (IMPORTANCE_CV): r_j, or r_j over the selected sum.
MOE_HD inline float PreCapacityGate(config::GateNormalization norm, int32_t k, const float* probs,
                                    const int32_t* selected, int32_t j) {
  const double r = probs[selected[j]];
  if (norm == config::NONE) return static_cast<float>(r);
  return static_cast<float>(r / SelectedSum(k, probs, selected));
}

// Backward of one token's gates: with dg_j = dgate_rows[slot_row[j]] (0 for a dropped slot,
// slot_row[j] < 0), adds d(gates)/d(raw gates) · dg into dprobs[slot_final[j]]. The gates carry
// the factor `scale`: g_j = scale·r_j/D, so dr_i = (scale·dg_i − Σ_j dg_j g_j) / D.
MOE_HD inline void AddGateGradients(config::GateNormalization norm, float scale, int32_t k,
                                    const int32_t* slot_row, const float* slot_gate,
                                    const float* slot_raw, const int32_t* slot_final,
                                    const float* dgate_rows, float* dprobs) {
  double dot = 0.0, denom = 0.0;
  for (int32_t j = 0; j < k; ++j) {
    const bool kept = slot_row[j] >= 0;
    const double dg = kept ? dgate_rows[slot_row[j]] : 0.0;
    dot += dg * slot_gate[j];
    if (norm == config::TOPK_SOFTMAX || kept) denom += slot_raw[j];
  }
  for (int32_t j = 0; j < k; ++j) {
    const bool kept = slot_row[j] >= 0;
    const double dg = kept ? dgate_rows[slot_row[j]] : 0.0;
    double dr = 0.0;
    if (norm == config::NONE) {
      dr = scale * dg;
    } else if (norm == config::TOPK_SOFTMAX || kept) {
      dr = (scale * dg - dot) / denom;
    }
    dprobs[slot_final[j]] += static_cast<float>(dr);
  }
}

// log Σ exp(row) in double, max-subtracted.
MOE_HD inline double LogSumExp(const float* row, int64_t n) {
  double mx = row[0];
  for (int64_t i = 1; i < n; ++i) mx = mx < row[i] ? static_cast<double>(row[i]) : mx;  // std::max
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += exp(static_cast<double>(row[i]) - mx);
  return mx + log(sum);
}

// z-loss gradient of one token of a group of n tokens: dlogits += w·2·lse·softmax(logits)/n, with
// w = z_loss_weight · loss scale / G.
MOE_HD inline void AddZLossGradient(int64_t e, const float* logits, double w, int64_t n,
                                    float* dlogits) {
  const double lse = LogSumExp(logits, e);
  const double zscale = w * 2.0 * lse / static_cast<double>(n);
  for (int64_t i = 0; i < e; ++i) {
    dlogits[i] += static_cast<float>(zscale * exp(static_cast<double>(logits[i]) - lse));
  }
}

// IMPORTANCE_CV gradient of one token, from its group's d(aux)/d(importance) dimp (E): through
// the pre-capacity gates of its k selected experts into dprobs.
MOE_HD inline void AddImportanceGradient(config::GateNormalization norm, int32_t k,
                                         const float* probs, const int32_t* selected,
                                         const double* dimp, float* dprobs) {
  if (norm == config::NONE) {
    for (int32_t j = 0; j < k; ++j) dprobs[selected[j]] += static_cast<float>(dimp[selected[j]]);
    return;
  }
  const double d = SelectedSum(k, probs, selected);
  double dot = 0.0;  // Σ_j dimp_j g°_j
  for (int32_t j = 0; j < k; ++j) dot += dimp[selected[j]] * probs[selected[j]] / d;
  for (int32_t j = 0; j < k; ++j) {
    dprobs[selected[j]] += static_cast<float>((dimp[selected[j]] - dot) / d);
  }
}

// Softmax backward of one row: dscores = probs ⊙ (dprobs − <dprobs, probs>), added into dlogits.
MOE_HD inline void SoftmaxBackward(int64_t e, const float* probs, const float* dprobs,
                                   float* dscores, float* dlogits) {
  double dot = 0.0;
  for (int64_t i = 0; i < e; ++i) dot += static_cast<double>(dprobs[i]) * probs[i];
  for (int64_t i = 0; i < e; ++i) {
    dscores[i] = static_cast<float>(probs[i] * (dprobs[i] - dot));
    dlogits[i] += dscores[i];
  }
}

// Sigmoid backward of one row: dscores = dprobs ⊙ s ⊙ (1 − s), added into dlogits.
MOE_HD inline void SigmoidBackward(int64_t e, const float* s, const float* dprobs, float* dscores,
                                   float* dlogits) {
  for (int64_t i = 0; i < e; ++i) {
    dscores[i] = static_cast<float>(static_cast<double>(dprobs[i]) * s[i] * (1.0 - s[i]));
    dlogits[i] += dscores[i];
  }
}

// The balance losses' distribution of a sigmoid row: P = s / Σ s. Their gradient a (E, w.r.t.
// P) reaches s as ds_i = (a_i − Σ_j a_j P_j) / Σ s, added into dprobs.
MOE_HD inline void AddNormalizedScoreGradient(int64_t e, const float* s, const float* a,
                                              float* dprobs) {
  double sum = 0.0, dot = 0.0;
  for (int64_t i = 0; i < e; ++i) sum += s[i];
  for (int64_t i = 0; i < e; ++i) dot += static_cast<double>(a[i]) * s[i];
  dot /= sum;
  for (int64_t i = 0; i < e; ++i) dprobs[i] += static_cast<float>((a[i] - dot) / sum);
}

// Noisy router: scores = logits + eps·softplus(noise_in), so d/d noise_in =
// dscores·eps·σ(noise_in).
MOE_HD inline void NoiseGradient(int64_t e, const float* dscores, const float* eps,
                                 const float* noise_in, float* dnoise) {
  for (int64_t i = 0; i < e; ++i) dnoise[i] = dscores[i] * eps[i] / (1.0f + expf(-noise_in[i]));
}

}  // namespace moe::routing
