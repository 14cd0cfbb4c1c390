// The byte-level MoE language model (runtime/train/byte_lm.h).
#include "runtime/train/byte_lm.h"

#include <cmath>
#include <cstring>

#include "experts/cpu/blas.h"
#include "base/rng.h"
#include "runtime/config/config.h"
#include "base/tensor.h"

namespace moe {
namespace {

constexpr int kVocab = 256;

}  // namespace

StatusOr<std::unique_ptr<ByteLm>> ByteLm::Create(const config::MoeConfig& cfg,
                                                 const LayerFactory& make_layer, int first_expert,
                                                 int num_local_experts) {
  std::unique_ptr<ByteLm> lm(new ByteLm(cfg, first_expert, num_local_experts));
  for (size_t l = 0; l < lm->blocks_.size(); ++l) {
    Block& b = lm->blocks_[l];
    MOE_ASSIGN_OR_RETURN(b.moe, make_layer(static_cast<int>(l)));
    if (b.moe->first_expert() != first_expert || b.moe->num_local_experts() != num_local_experts) {
      return InvalidArgument("ByteLm: layer " + std::to_string(l) + " holds experts from " +
                             std::to_string(b.moe->first_expert()) + " (" +
                             std::to_string(b.moe->num_local_experts()) + "), the model " +
                             std::to_string(first_expert) + " (" +
                             std::to_string(num_local_experts) + ")");
    }
    b.call = std::make_unique<HostLayerCall>(b.moe.get());
  }
  return lm;
}

ByteLm::ByteLm(const config::MoeConfig& cfg, int first_expert, int num_local_experts)
    : cfg_(cfg), m_(cfg.moe().model_dim()) {
  const int t = cfg.model().context();
  embed_ = Tensor(static_cast<int64_t>(t) * kVocab, m_);
  embed_grad_ = Tensor(embed_.rows(), m_);
  blocks_.resize(static_cast<size_t>(cfg.model().num_layers()));
  for (size_t l = 0; l < blocks_.size(); ++l) {
    Block& b = blocks_[l];
    b.ln_gamma = Tensor(1, m_, 1.0f);
    b.ln_beta = Tensor(1, m_);
    b.ln_gamma_grad = Tensor(1, m_);
    b.ln_beta_grad = Tensor(1, m_);
    b.params = MakeLayerParams(cfg.moe(), first_expert, num_local_experts);
    b.grads = MakeLayerParams(cfg.moe(), first_expert, num_local_experts);
  }
  final_gamma_ = Tensor(1, m_, 1.0f);
  final_beta_ = Tensor(1, m_);
  final_gamma_grad_ = Tensor(1, m_);
  final_beta_grad_ = Tensor(1, m_);
  out_w_ = Tensor(m_, kVocab);
  out_b_ = Tensor(1, kVocab);
  out_w_grad_ = Tensor(m_, kVocab);
  out_b_grad_ = Tensor(1, kVocab);
}

void ByteLm::Init() {
  const uint64_t seed = cfg_.seed();
  const double std = cfg_.model().init_std();
  InitUniformByName("embed", seed, std * std::sqrt(3.0), &embed_);
  InitUniformByName("out_w", seed, 1.0 / std::sqrt(static_cast<double>(m_)), &out_w_);
  out_b_.Fill(0.0f);
  final_gamma_.Fill(1.0f);
  final_beta_.Fill(0.0f);
  for (size_t l = 0; l < blocks_.size(); ++l) {
    blocks_[l].ln_gamma.Fill(1.0f);
    blocks_[l].ln_beta.Fill(0.0f);
    InitLayerParams(cfg_.moe(), SplitMix64(seed ^ (0x100 + l)), &blocks_[l].params);
    blocks_[l].moe->router_bias().assign(static_cast<size_t>(cfg_.moe().num_experts()), 0.0f);
  }
}

std::vector<ParamRef> ByteLm::Params() {
  std::vector<ParamRef> out;
  out.push_back({"embed", &embed_, &embed_grad_, -1});
  for (size_t l = 0; l < blocks_.size(); ++l) {
    Block& b = blocks_[l];
    const std::string prefix = "block_" + std::to_string(l) + "_";
    out.push_back({prefix + "ln_gamma", &b.ln_gamma, &b.ln_gamma_grad, -1});
    out.push_back({prefix + "ln_beta", &b.ln_beta, &b.ln_beta_grad, -1});
    std::vector<std::pair<std::string, Tensor*>> values, grads;
    b.params.ForEach([&](const std::string& n, Tensor& v) { values.emplace_back(n, &v); });
    b.grads.ForEach([&](const std::string& n, Tensor& g) { grads.emplace_back(n, &g); });
    int slot = -1;
    std::string last_expert;
    for (size_t i = 0; i < values.size(); ++i) {
      const std::string& n = values[i].first;
      int expert = -1;
      if (n.rfind("expert_", 0) == 0) {
        expert = std::stoi(n.substr(7));
        // A new slot begins at each new "expert_<id>_" prefix (ForEach visits slots in order).
        const std::string id = n.substr(0, n.find('_', 7));
        if (id != last_expert) ++slot;
        last_expert = id;
      }
      out.push_back({prefix + "moe_" + n, values[i].second, grads[i].second, expert,
                     expert >= 0 ? static_cast<int>(l) : -1, expert >= 0 ? slot : -1});
    }
  }
  out.push_back({"final_ln_gamma", &final_gamma_, &final_gamma_grad_, -1});
  out.push_back({"final_ln_beta", &final_beta_, &final_beta_grad_, -1});
  out.push_back({"out_w", &out_w_, &out_w_grad_, -1});
  out.push_back({"out_b", &out_b_, &out_b_grad_, -1});
  return out;
}

std::vector<MoeLayer*> ByteLm::MoeLayers() {
  std::vector<MoeLayer*> out;
  for (Block& b : blocks_) out.push_back(b.moe.get());
  return out;
}

void ByteLm::ZeroGrad() {
  for (ParamRef& p : Params()) p.grad->Fill(0.0f);
}

int64_t ByteLm::TotalParameters() const {
  const auto& l = cfg_.moe();
  const experts::FfnParams one = experts::FfnParams::Zeros(ExpertShape(l));
  const experts::FfnParams shared = experts::FfnParams::Zeros(SharedShape(l));
  int64_t per_layer = 2 * m_ + m_ * RouterColumns(l) * (l.router().gate() == config::NOISY_TOPK ? 2 : 1) +
                      l.num_experts() * one.NumParameters() +
                      l.num_shared_experts() * shared.NumParameters();
  return embed_.size() + static_cast<int64_t>(blocks_.size()) * per_layer + 2 * m_ + out_w_.size() +
         out_b_.size();
}

int64_t ByteLm::ActiveParametersPerToken() const {
  const auto& l = cfg_.moe();
  const experts::FfnParams one = experts::FfnParams::Zeros(ExpertShape(l));
  const experts::FfnParams shared = experts::FfnParams::Zeros(SharedShape(l));
  // Soft MoE: every token's output mixes every expert's slots.
  const int64_t k = l.router().gate() == config::EXPERT_CHOICE
                        ? static_cast<int64_t>(std::ceil(l.router().capacity_factor_train()))
                    : l.router().gate() == config::SOFT ? l.num_experts()
                                                         : TopK(l.router());
  const int64_t per_layer = 2 * m_ + m_ * RouterColumns(l) + k * one.NumParameters() +
                            l.num_shared_experts() * shared.NumParameters();
  // One token reads T rows of the embedding tables.
  return static_cast<int64_t>(cfg_.model().context()) * m_ +
         static_cast<int64_t>(blocks_.size()) * per_layer + 2 * m_ + out_w_.size() + out_b_.size();
}

Status ByteLm::Forward(const LmBatch& batch, const RouteContext& ctx, int64_t global_tokens,
                       double loss_groups_scale, LmStepStats* stats) {
  const int64_t s = batch.tokens, t = cfg_.model().context();
  if (batch.context != t || static_cast<int64_t>(batch.context_bytes.size()) != s * t ||
      static_cast<int64_t>(batch.targets.size()) != s) {
    return InvalidArgument("batch shape does not match model.context=" + std::to_string(t));
  }
  have_forward_ = false;
  batch_ = batch;
  const size_t nl = blocks_.size();
  h_.resize(nl + 1);
  ResizeTensor(&h_[0], s, m_);
  for (int64_t i = 0; i < s; ++i) {
    float* out = h_[0].row(i);
    std::memcpy(out, embed_.row(batch.context_bytes[i * t]), sizeof(float) * static_cast<size_t>(m_));
    for (int64_t j = 1; j < t; ++j) {
      const float* e = embed_.row(j * kVocab + batch.context_bytes[i * t + j]);
      for (int64_t c = 0; c < m_; ++c) out[c] += e[c];
    }
  }
  *stats = LmStepStats();
  stats->tokens_per_expert.assign(static_cast<size_t>(cfg_.moe().num_experts()), 0);
  const auto& router = cfg_.moe().router();
  for (size_t l = 0; l < nl; ++l) {
    Block& b = blocks_[l];
    b.ln.Forward(h_[l].view(), b.ln_gamma, b.ln_beta, &b.ln_out);
    RouteContext lctx = ctx;
    lctx.seed = SplitMix64(ctx.seed ^ (0x200 + l));
    if (ctx.replay_selected != nullptr) {  // num_layers x S x k: this layer's slice
      lctx.replay_selected = ctx.replay_selected + static_cast<int64_t>(l) * s * TopK(router);
    }
    b.moe->set_loss_gradient_scale(loss_groups_scale);
    // The optimizer changed the parameters since the last step (a device layer uploads them).
    MOE_RETURN_IF_ERROR(b.moe->SetParams(b.params));
    MOE_RETURN_IF_ERROR(b.call->Forward(b.ln_out.view(), lctx, &b.moe_out));
    ResizeTensor(&h_[l + 1], s, m_);
    for (int64_t i = 0; i < s * m_; ++i) h_[l + 1][i] = h_[l][i] + b.moe_out[i];
    const RouterLosses& losses = b.moe->losses();
    stats->aux += losses.aux;
    stats->z += losses.z;
    const DispatchPlan& p = b.moe->plan();
    stats->dropped_slots += p.dropped_slots;
    stats->total_slots += p.expert_choice ? p.num_rows() : p.num_tokens * p.top_k;
    for (size_t e = 0; e < p.kept_per_expert.size(); ++e) stats->tokens_per_expert[e] += p.kept_per_expert[e];
  }
  final_ln_.Forward(h_[nl].view(), final_gamma_, final_beta_, &final_out_);
  ResizeTensor(&probs_, s, kVocab);
  for (int64_t i = 0; i < s; ++i) {
    float* row = probs_.row(i);
    for (int c = 0; c < kVocab; ++c) row[c] = out_b_[c];
  }
  blas::Gemm(false, false, s, kVocab, m_, 1.0f, final_out_.data(), out_w_.data(), 1.0f, probs_.data());
  double ce = 0.0;
  for (int64_t i = 0; i < s; ++i) {
    float* row = probs_.row(i);
    float mx = row[0];
    for (int c = 1; c < kVocab; ++c) mx = std::max(mx, row[c]);
    double sum = 0.0;
    for (int c = 0; c < kVocab; ++c) sum += std::exp(static_cast<double>(row[c] - mx));
    const double lse = mx + std::log(sum);
    ce += lse - row[batch.targets[i]];
    for (int c = 0; c < kVocab; ++c) row[c] = static_cast<float>(std::exp(row[c] - lse));
  }
  stats->ce_sum = ce;
  ce_scale_ = 1.0 / static_cast<double>(global_tokens);
  stats->objective_local = ce * ce_scale_ + loss_groups_scale * (router.aux_loss_weight() * stats->aux +
                                                                 router.z_loss_weight() * stats->z);
  have_forward_ = true;
  return Status::Ok();
}

Status ByteLm::Backward() {
  if (!have_forward_) return FailedPrecondition("ByteLm::Backward called without a Forward");
  const int64_t s = batch_.tokens, t = cfg_.model().context();
  const size_t nl = blocks_.size();
  // dlogits = (softmax - onehot) / global_tokens.
  Tensor dlogits(s, kVocab);
  for (int64_t i = 0; i < s; ++i) {
    const float* p = probs_.row(i);
    float* d = dlogits.row(i);
    for (int c = 0; c < kVocab; ++c) d[c] = static_cast<float>(p[c] * ce_scale_);
    d[batch_.targets[i]] -= static_cast<float>(ce_scale_);
  }
  blas::Gemm(true, false, m_, kVocab, s, 1.0f, final_out_.data(), dlogits.data(), 1.0f, out_w_grad_.data());
  for (int64_t i = 0; i < s; ++i) {
    for (int c = 0; c < kVocab; ++c) out_b_grad_[c] += dlogits(i, c);
  }
  Tensor dfinal(s, m_), dh;
  blas::Gemm(false, true, s, m_, kVocab, 1.0f, dlogits.data(), out_w_.data(), 0.0f, dfinal.data());
  final_ln_.Backward(dfinal.view(), final_gamma_, &dh, &final_gamma_grad_, &final_beta_grad_);
  Tensor dmoe_in, dln_in;
  for (size_t l = nl; l-- > 0;) {
    Block& b = blocks_[l];
    // h_{l+1} = h_l + MoE(LN(h_l)): dh_l = dh + LN^T(MoE^T(dh)).
    MOE_RETURN_IF_ERROR(b.call->Backward(dh.view(), &dmoe_in, &b.grads));
    b.ln.Backward(dmoe_in.view(), b.ln_gamma, &dln_in, &b.ln_gamma_grad, &b.ln_beta_grad);
    for (int64_t i = 0; i < s * m_; ++i) dh[i] += dln_in[i];
  }
  for (int64_t i = 0; i < s; ++i) {
    const float* d = dh.row(i);
    for (int64_t j = 0; j < t; ++j) {
      float* g = embed_grad_.row(j * kVocab + batch_.context_bytes[i * t + j]);
      for (int64_t c = 0; c < m_; ++c) g[c] += d[c];
    }
  }
  return Status::Ok();
}

}  // namespace moe
