// The parameters of a MoE layer (runtime/layer/layer_params.h): shapes, init, shape checks,
// metrics.
#include "runtime/layer/layer_params.h"

#include <cmath>

#include "base/hash.h"
#include "base/rng.h"
#include "runtime/config/config.h"

namespace moe {
namespace {

experts::Activation ToActivation(config::Activation a) {
  switch (a) {
    case config::RELU: return experts::Activation::kRelu;
    case config::GELU_TANH: return experts::Activation::kGeluTanh;
    case config::SILU: return experts::Activation::kSilu;
  }
  return experts::Activation::kGeluTanh;
}

}  // namespace

experts::FfnShape ExpertShape(const config::LayerConfig& cfg) {
  experts::FfnShape s;
  s.model_dim = cfg.model_dim();
  s.hidden_dim = cfg.expert().hidden_dim();
  s.activation = ToActivation(cfg.expert().activation());
  s.swiglu = cfg.expert().kind() == config::SWIGLU;
  s.bias = cfg.expert().bias();
  return s;
}

experts::FfnShape SharedShape(const config::LayerConfig& cfg) {
  experts::FfnShape s = ExpertShape(cfg);
  s.hidden_dim = SharedHidden(cfg);
  return s;
}

void MoeLayerParams::Zero() {
  ForEach([](const std::string&, Tensor& t) { t.Fill(0.0f); });
}

void InitUniformByName(const std::string& name, uint64_t seed, double bound, Tensor* t) {
  const uint64_t id = Fnv1a64(name);
  for (int64_t i = 0; i < t->size(); ++i) {
    const double u = CounterUniform(seed, 0, id, RngStream::kInit, static_cast<uint64_t>(i));
    (*t)[i] = static_cast<float>((2.0 * u - 1.0) * bound);
  }
}

MoeLayerParams MakeLayerParams(const config::LayerConfig& cfg, int first_expert, int num_local_experts) {
  MoeLayerParams p;
  p.router = Tensor(cfg.model_dim(), RouterColumns(cfg));
  if (cfg.router().gate() == config::NOISY_TOPK) p.router_noise = Tensor(cfg.model_dim(), cfg.num_experts());
  p.first_expert = first_expert;
  const int local = num_local_experts < 0 ? cfg.num_experts() : num_local_experts;
  for (int e = 0; e < local; ++e) p.experts.push_back(experts::FfnParams::Zeros(ExpertShape(cfg)));
  for (int s = 0; s < cfg.num_shared_experts(); ++s) p.shared.push_back(experts::FfnParams::Zeros(SharedShape(cfg)));
  return p;
}

void InitLayerParams(const config::LayerConfig& cfg, uint64_t seed, MoeLayerParams* params) {
  const int64_t m = cfg.model_dim();
  params->ForEach([&](const std::string& name, Tensor& t) {
    // fan_in: rows of a weight matrix; for b1 the model dim, for b2 the hidden dim.
    int64_t fan_in = t.rows();
    if (name.size() > 3 && name.compare(name.size() - 3, 3, "_b1") == 0) fan_in = m;
    if (name.size() > 3 && name.compare(name.size() - 3, 3, "_b2") == 0) {
      fan_in = name.rfind("shared", 0) == 0 ? SharedHidden(cfg) : cfg.expert().hidden_dim();
    }
    InitUniformByName(name, seed, 1.0 / std::sqrt(static_cast<double>(fan_in)), &t);
  });
}

std::vector<ParamShape> ParamShapes(const MoeLayerParams& p) {
  std::vector<ParamShape> out;
  p.ForEach([&](const std::string& name, const Tensor& t) {
    out.push_back({name, t.rows(), t.cols()});
  });
  return out;
}

std::vector<ParamShape> LayerParamShapes(const config::LayerConfig& cfg, int first_expert,
                                         int num_local_experts, const std::vector<int>& expert_ids) {
  std::vector<ParamShape> out;
  const int64_t m = cfg.model_dim(), e = cfg.num_experts();
  out.push_back({"router", m, RouterColumns(cfg)});
  if (cfg.router().gate() == config::NOISY_TOPK) out.push_back({"router_noise", m, e});
  // FfnParams::Zeros's shapes, in MoeLayerParams::ForEach's order.
  const auto ffn = [&](const std::string& prefix, const experts::FfnShape& f) {
    out.push_back({prefix + "_w1", f.model_dim, f.hidden_dim});
    if (f.bias) out.push_back({prefix + "_b1", 1, f.hidden_dim});
    out.push_back({prefix + "_w2", f.hidden_dim, f.model_dim});
    if (f.bias) out.push_back({prefix + "_b2", 1, f.model_dim});
    if (f.swiglu) out.push_back({prefix + "_w3", f.model_dim, f.hidden_dim});
  };
  const int local = num_local_experts < 0 ? cfg.num_experts() : num_local_experts;
  const bool named = static_cast<int>(expert_ids.size()) == local;
  for (int i = 0; i < local; ++i) {
    ffn("expert_" + std::to_string(named ? expert_ids[static_cast<size_t>(i)] : first_expert + i),
        ExpertShape(cfg));
  }
  for (int i = 0; i < cfg.num_shared_experts(); ++i) ffn("shared_" + std::to_string(i), SharedShape(cfg));
  return out;
}

Status CheckParamShapes(const std::string& what, const MoeLayerParams& got,
                        const std::vector<ParamShape>& want) {
  const std::vector<ParamShape> have = ParamShapes(got);
  for (size_t i = 0; i < want.size(); ++i) {
    if (i >= have.size() || have[i].name != want[i].name) {
      return InvalidArgument(what + ": " + want[i].name + " is missing");
    }
    if (have[i].rows != want[i].rows || have[i].cols != want[i].cols) {
      return InvalidArgument(what + ": " + want[i].name + " is " + std::to_string(have[i].rows) +
                             "x" + std::to_string(have[i].cols) + ", must be " +
                             std::to_string(want[i].rows) + "x" + std::to_string(want[i].cols));
    }
  }
  if (have.size() > want.size())
    return InvalidArgument(what + ": unexpected " + have[want.size()].name);
  return Status::Ok();
}

report::LayerMetrics LayerMetricsOf(const DispatchPlan& plan, const RouterLosses& losses) {
  report::LayerMetrics mt;
  mt.set_aux_loss(losses.aux);
  mt.set_z_loss(losses.z);
  mt.set_dropped_slots(plan.dropped_slots);
  for (int64_t v : plan.kept_per_expert) mt.add_tokens_per_expert(v);
  for (int64_t v : plan.dropped_per_expert) mt.add_dropped_per_expert(v);
  mt.set_capacity(plan.capacity);
  mt.set_total_slots(plan.expert_choice ? plan.num_rows() : plan.num_tokens * plan.top_k);
  return mt;
}

}  // namespace moe
