// Config parsing, resolution and validation (runtime/config/config.h).
#include "runtime/config/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "base/file.h"
#include "runtime/config/limits.h"

namespace moe {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

// Collects text-format parse errors with line and column.
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (!text_.empty()) text_ += "; ";
    text_ += "line " + std::to_string(line + 1) + " column " + std::to_string(column + 1) + ": " +
             message;
  }
  void AddWarning(int, int, const std::string&) override {}
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

template <typename T>
std::string Str(T v) {
  std::ostringstream ss;
  ss << v;
  return ss.str();
}

// Small helpers that produce "<field>=<value> must <rule>".
struct Checker {
  Status status;
  template <typename T>
  void Require(bool ok, const std::string& field, T value, const std::string& rule) {
    if (status.ok() && !ok) status = InvalidArgument(field + "=" + Str(value) + " must " + rule);
  }
  void Finite(double v, const std::string& field) {
    Require(std::isfinite(v), field, v, "be a finite number");
  }
};

void FillDefaults(Message* msg) {
  const Descriptor* d = msg->GetDescriptor();
  const Reflection* r = msg->GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (f->is_repeated()) continue;
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      FillDefaults(r->MutableMessage(msg, f));
      continue;
    }
    if (r->HasField(*msg, f)) continue;
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_INT32: r->SetInt32(msg, f, r->GetInt32(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_INT64: r->SetInt64(msg, f, r->GetInt64(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_UINT32: r->SetUInt32(msg, f, r->GetUInt32(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_UINT64: r->SetUInt64(msg, f, r->GetUInt64(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_DOUBLE: r->SetDouble(msg, f, r->GetDouble(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_FLOAT: r->SetFloat(msg, f, r->GetFloat(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_BOOL: r->SetBool(msg, f, r->GetBool(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_ENUM: r->SetEnum(msg, f, r->GetEnum(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_STRING: r->SetString(msg, f, r->GetString(*msg, f)); break;
      case FieldDescriptor::CPPTYPE_MESSAGE: break;
    }
  }
}

Status ValidateLayer(const config::LayerConfig& l) {
  using config::RouterConfig;
  Checker c;
  c.Require(l.model_dim() > 0, "moe.model_dim", l.model_dim(), "be > 0");
  c.Require(l.num_experts() > 0, "moe.num_experts", l.num_experts(), "be > 0");
  c.Require(l.expert().hidden_dim() > 0, "moe.expert.hidden_dim", l.expert().hidden_dim(), "be > 0");
  c.Require(l.num_shared_experts() >= 0, "moe.num_shared_experts", l.num_shared_experts(), "be >= 0");
  c.Require(l.shared_hidden_dim() >= 0, "moe.shared_hidden_dim", l.shared_hidden_dim(), "be >= 0");
  // Keep every weight addressable with 32-bit BLAS dimensions.
  c.Require(static_cast<int64_t>(l.model_dim()) * std::max(l.expert().hidden_dim(), 1) < (int64_t{1} << 31),
            "moe.expert.hidden_dim", l.expert().hidden_dim(), "satisfy model_dim * hidden_dim < 2^31");
  const RouterConfig& r = l.router();
  const int e = l.num_experts();
  c.Finite(r.capacity_factor_train(), "moe.router.capacity_factor_train");
  c.Finite(r.capacity_factor_eval(), "moe.router.capacity_factor_eval");
  c.Require(r.min_capacity() >= 0, "moe.router.min_capacity", r.min_capacity(), "be >= 0");
  c.Require(r.num_local_groups() >= 1, "moe.router.num_local_groups", r.num_local_groups(), "be >= 1");
  c.Finite(r.aux_loss_weight(), "moe.router.aux_loss_weight");
  c.Require(r.aux_loss_weight() >= 0, "moe.router.aux_loss_weight", r.aux_loss_weight(), "be >= 0");
  c.Finite(r.z_loss_weight(), "moe.router.z_loss_weight");
  c.Require(r.z_loss_weight() >= 0, "moe.router.z_loss_weight", r.z_loss_weight(), "be >= 0");
  c.Finite(r.bias_update_rate(), "moe.router.bias_update_rate");
  c.Require(r.bias_update_rate() >= 0, "moe.router.bias_update_rate", r.bias_update_rate(), "be >= 0");
  switch (r.gate()) {
    case config::TOP1:
      c.Require(r.top_k() == 1, "moe.router.top_k", r.top_k(), "be 1 with gate TOP1");
      break;
    case config::TOPK:
    case config::NOISY_TOPK:
      c.Require(r.top_k() >= 1, "moe.router.top_k", r.top_k(), "be >= 1");
      c.Require(r.top_k() <= e, "moe.router.top_k", r.top_k(),
                "be <= moe.num_experts=" + std::to_string(e));
      break;
    case config::EXPERT_CHOICE:
      c.Require(r.aux_loss() == config::NO_AUX_LOSS, "moe.router.aux_loss",
                config::AuxLossKind_Name(r.aux_loss()), "be NO_AUX_LOSS with gate EXPERT_CHOICE");
      c.Require(!r.random_routing(), "moe.router.random_routing", r.random_routing(),
                "be false with gate EXPERT_CHOICE");
      c.Require(!r.reroute_overflow(), "moe.router.reroute_overflow", r.reroute_overflow(),
                "be false with gate EXPERT_CHOICE");
      c.Require(r.bias_update_rate() == 0, "moe.router.bias_update_rate", r.bias_update_rate(),
                "be 0 with gate EXPERT_CHOICE");
      c.Require(r.scaling_factor() == 1.0, "moe.router.scaling_factor", r.scaling_factor(),
                "be 1 with gate EXPERT_CHOICE");
      break;
    case config::SOFT: {
      // No selection, no drops, no balance losses: the top-k options do not apply.
      const std::string rule = "with gate SOFT (no selection, no drops, no balance losses)";
      c.Require(r.slots_per_expert() >= 1, "moe.router.slots_per_expert", r.slots_per_expert(),
                "be >= 1");
      c.Require(static_cast<int64_t>(e) * std::max(r.slots_per_expert(), 1) <= (int64_t{1} << 24),
                "moe.router.slots_per_expert", r.slots_per_expert(),
                "satisfy num_experts * slots_per_expert <= 2^24");
      c.Require(r.aux_loss() == config::NO_AUX_LOSS, "moe.router.aux_loss",
                config::AuxLossKind_Name(r.aux_loss()), "be NO_AUX_LOSS " + rule);
      c.Require(r.z_loss_weight() == 0, "moe.router.z_loss_weight", r.z_loss_weight(),
                "be 0 " + rule);
      c.Require(!r.random_routing(), "moe.router.random_routing", r.random_routing(),
                "be false " + rule);
      c.Require(!r.reroute_overflow(), "moe.router.reroute_overflow", r.reroute_overflow(),
                "be false " + rule);
      c.Require(r.bias_update_rate() == 0, "moe.router.bias_update_rate", r.bias_update_rate(),
                "be 0 " + rule);
      c.Require(r.normalization() == config::NONE, "moe.router.normalization",
                config::GateNormalization_Name(r.normalization()), "be NONE " + rule);
      c.Require(r.drop_policy() == config::POSITION, "moe.router.drop_policy",
                config::DropPolicy_Name(r.drop_policy()), "be POSITION " + rule);
      c.Require(r.num_expert_groups() == 1, "moe.router.num_expert_groups",
                r.num_expert_groups(), "be 1 " + rule);
      c.Require(r.score_function() == config::SOFTMAX, "moe.router.score_function",
                config::ScoreFunction_Name(r.score_function()), "be SOFTMAX " + rule);
      c.Require(r.scaling_factor() == 1.0, "moe.router.scaling_factor", r.scaling_factor(),
                "be 1 " + rule);
      break;
    }
  }
  if (r.gate() == config::NOISY_TOPK) {
    c.Require(r.normalization() == config::TOPK_SOFTMAX, "moe.router.normalization",
              config::GateNormalization_Name(r.normalization()),
              "be TOPK_SOFTMAX with gate NOISY_TOPK (softmax over the kept noisy logits)");
  }
  if (r.random_routing()) {
    c.Require(r.gate() != config::TOP1 && r.top_k() == 2, "moe.router.top_k", TopK(r),
              "be 2 when moe.router.random_routing is true");
  }
  c.Finite(r.scaling_factor(), "moe.router.scaling_factor");
  c.Require(r.scaling_factor() > 0, "moe.router.scaling_factor", r.scaling_factor(), "be > 0");
  if (r.score_function() == config::SIGMOID) {
    c.Require(r.gate() == config::TOP1 || r.gate() == config::TOPK, "moe.router.gate",
              config::GateKind_Name(r.gate()),
              "be TOP1 or TOPK with moe.router.score_function SIGMOID");
  }
  const bool per_expert_drops =
      r.drop_policy() == config::EXPERT_SCORE || r.drop_policy() == config::TOKEN_ORDER;
  if (per_expert_drops) {
    c.Require(!r.reroute_overflow(), "moe.router.reroute_overflow", r.reroute_overflow(),
              "be false with moe.router.drop_policy " +
                  config::DropPolicy_Name(r.drop_policy()) +
                  " (rerouting is defined for the slot-major placement)");
    c.Require(r.gate() != config::EXPERT_CHOICE, "moe.router.drop_policy",
              config::DropPolicy_Name(r.drop_policy()), "be POSITION with gate EXPERT_CHOICE");
  }
  c.Require(r.aux_sequence_length() >= 0, "moe.router.aux_sequence_length", r.aux_sequence_length(),
            "be >= 0");
  if (r.aux_loss() == config::SEQUENCE) {
    c.Require(r.aux_sequence_length() >= 1, "moe.router.aux_sequence_length",
              r.aux_sequence_length(), "be >= 1 with moe.router.aux_loss SEQUENCE");
  }
  if (r.aux_loss_scope() == config::GLOBAL) {
    c.Require(r.aux_loss() == config::SWITCH || r.aux_loss() == config::GSHARD ||
                  r.aux_loss() == config::SWITCH_TOPK,
              "moe.router.aux_loss", config::AuxLossKind_Name(r.aux_loss()),
              "be SWITCH, GSHARD or SWITCH_TOPK with moe.router.aux_loss_scope GLOBAL (f is "
              "counted over the world)");
  }
  const int groups = r.num_expert_groups(), per_token = r.groups_per_token();
  c.Require(groups >= 1, "moe.router.num_expert_groups", groups, "be >= 1");
  c.Require(groups <= limits::kMaxExpertGroups, "moe.router.num_expert_groups", groups,
            "be <= " + std::to_string(limits::kMaxExpertGroups));
  c.Require(per_token >= 1, "moe.router.groups_per_token", per_token, "be >= 1");
  c.Require(per_token <= groups, "moe.router.groups_per_token", per_token,
            "be <= moe.router.num_expert_groups=" + std::to_string(groups));
  if (c.status.ok() && groups > 1) {
    const int k = TopK(r);
    c.Require(e % groups == 0, "moe.router.num_expert_groups", groups,
              "divide moe.num_experts=" + std::to_string(e));
    c.Require(r.gate() != config::EXPERT_CHOICE, "moe.router.num_expert_groups", groups,
              "be 1 with gate EXPERT_CHOICE");
    c.Require(!r.reroute_overflow(), "moe.router.reroute_overflow", r.reroute_overflow(),
              "be false with moe.router.num_expert_groups > 1 (rerouting could leave the token's "
              "groups)");
    c.Require(k % per_token == 0, "moe.router.top_k", k,
              "be divisible by moe.router.groups_per_token=" + std::to_string(per_token));
    c.Require(k <= limits::kMaxRankedExperts, "moe.router.top_k", k,
              "be <= " + std::to_string(limits::kMaxRankedExperts) +
                  " with moe.router.num_expert_groups > 1");
    if (c.status.ok()) {
      c.Require(k / per_token <= e / groups, "moe.router.top_k", k,
                "be <= moe.router.groups_per_token * experts per group (" +
                    std::to_string(per_token) + " * " + std::to_string(e / groups) + ")");
    }
  }
  return c.status;
}

Status ValidateTrain(const MoeConfig& cfg) {
  Checker c;
  const auto& t = cfg.train();
  const auto& m = cfg.model();
  c.Require(m.context() >= 1, "model.context", m.context(), "be >= 1");
  c.Require(m.num_layers() >= 1, "model.num_layers", m.num_layers(), "be >= 1");
  c.Require(std::isfinite(m.init_std()) && m.init_std() > 0, "model.init_std", m.init_std(),
            "be a finite number > 0");
  c.Require(t.steps() >= 0, "train.steps", t.steps(), "be >= 0");
  c.Require(t.global_batch_tokens() >= 1, "train.global_batch_tokens", t.global_batch_tokens(), "be >= 1");
  c.Require(std::isfinite(t.lr()) && t.lr() > 0, "train.lr", t.lr(), "be a finite number > 0");
  c.Require(t.warmup_steps() >= 0, "train.warmup_steps", t.warmup_steps(), "be >= 0");
  c.Require(std::isfinite(t.weight_decay()) && t.weight_decay() >= 0, "train.weight_decay",
            t.weight_decay(), "be >= 0");
  c.Require(t.beta1() >= 0 && t.beta1() < 1, "train.beta1", t.beta1(), "be in [0, 1)");
  c.Require(t.beta2() >= 0 && t.beta2() < 1, "train.beta2", t.beta2(), "be in [0, 1)");
  c.Require(std::isfinite(t.eps()) && t.eps() > 0, "train.eps", t.eps(), "be > 0");
  c.Require(std::isfinite(t.grad_clip()) && t.grad_clip() >= 0, "train.grad_clip", t.grad_clip(),
            "be >= 0");
  c.Require(t.eval_fraction() >= 0 && t.eval_fraction() < 1, "train.eval_fraction",
            t.eval_fraction(), "be in [0, 1)");
  c.Require(t.eval_every() >= 0, "train.eval_every", t.eval_every(), "be >= 0");
  c.Require(t.eval_tokens() >= 1, "train.eval_tokens", t.eval_tokens(), "be >= 1");
  c.Require(t.checkpoint_every() >= 0, "train.checkpoint_every", t.checkpoint_every(), "be >= 0");
  if (!t.router_replay_dir().empty() || !t.router_record_dir().empty()) {
    const std::string field =
        t.router_replay_dir().empty() ? "train.router_record_dir" : "train.router_replay_dir";
    const auto& r = cfg.moe().router();
    c.Require(r.gate() != config::EXPERT_CHOICE && r.gate() != config::SOFT, field, "set",
              "be unset with gate " + config::GateKind_Name(r.gate()) +
                  " (replay records token-choice selections)");
  }
  if (!t.router_replay_dir().empty()) {
    c.Require(!cfg.moe().router().reroute_overflow(), "moe.router.reroute_overflow", true,
              "be false with train.router_replay_dir (a replayed selection is not rerouted)");
    c.Require(cfg.compute().device() == config::CPU, "train.router_replay_dir",
              t.router_replay_dir(), "be unset with compute.device=CUDA (replay runs on the CPU layer)");
  }
  c.Require(cfg.parallel().ep_size() >= 0, "parallel.ep_size", cfg.parallel().ep_size(), "be >= 0");
  {
    const auto& p = cfg.parallel();
    c.Require(p.num_redundant_experts() >= 0, "parallel.num_redundant_experts",
              p.num_redundant_experts(), "be >= 0");
    c.Require(p.rebalance_every() >= 0, "parallel.rebalance_every", p.rebalance_every(), "be >= 0");
    c.Require(p.rebalance_every() == 0 || p.num_redundant_experts() > 0, "parallel.rebalance_every",
              p.rebalance_every(),
              "be 0 without redundant experts (set parallel.num_redundant_experts > 0 to rebalance)");
    if (p.num_redundant_experts() > 0) {
      const auto gate = cfg.moe().router().gate();
      c.Require(gate != config::EXPERT_CHOICE && gate != config::SOFT,
                "parallel.num_redundant_experts", p.num_redundant_experts(),
                "be 0 with gate " + config::GateKind_Name(gate) +
                    " (replicas split token-choice rows)");
      c.Require(cfg.compute().device() == config::CPU, "parallel.num_redundant_experts",
                p.num_redundant_experts(), "be 0 with compute.device=CUDA (CPU layers only)");
    }
  }
  c.Require(cfg.parallel().pipeline_degree() >= 1 &&
                cfg.parallel().pipeline_degree() <= limits::kMaxPipelineDegree,
            "parallel.pipeline_degree", cfg.parallel().pipeline_degree(),
            "be in [1, " + std::to_string(limits::kMaxPipelineDegree) + "]");
  c.Require(std::isfinite(cfg.comm().deadline_seconds()) && cfg.comm().deadline_seconds() > 0,
            "comm.deadline_seconds", cfg.comm().deadline_seconds(), "be a finite number > 0");
  c.Require(cfg.comm().ranks_per_node() >= 0, "comm.ranks_per_node", cfg.comm().ranks_per_node(),
            "be >= 0");
  if (cfg.parallel().node_dedup()) {
    c.Require(cfg.comm().ranks_per_node() > 0, "parallel.node_dedup", "true",
              "run with the two-stage exchange (comm.ranks_per_node > 0): it deduplicates the "
              "rows that cross between nodes");
  }
  if (c.status.ok()) c.status = ValidateCompute(cfg.compute(), cfg.moe());
  if (cfg.has_topology()) {
    const auto& tp = cfg.topology();
    c.Require(tp.nodes() >= 1, "topology.nodes", tp.nodes(), "be >= 1");
    c.Require(tp.gpus_per_node() >= 1, "topology.gpus_per_node", tp.gpus_per_node(), "be >= 1");
    for (auto [v, name] : {std::pair{tp.intra_bandwidth_gbps(), "intra_bandwidth_gbps"},
                           std::pair{tp.inter_bandwidth_gbps(), "inter_bandwidth_gbps"},
                           std::pair{tp.gpu_tflops(), "gpu_tflops"},
                           std::pair{tp.gpu_memory_bandwidth_gbps(), "gpu_memory_bandwidth_gbps"}}) {
      c.Require(std::isfinite(v) && v > 0, std::string("topology.") + name, v, "be a finite number > 0");
    }
    for (auto [v, name] : {std::pair{tp.intra_latency_us(), "intra_latency_us"},
                           std::pair{tp.inter_latency_us(), "inter_latency_us"}}) {
      c.Require(std::isfinite(v) && v >= 0, std::string("topology.") + name, v, "be a finite number >= 0");
    }
  }
  return c.status;
}

// Fields without a meaningful default must be written in the file (checked before defaults fill).
Status CheckRequired(const MoeConfig& cfg) {
  if (!cfg.has_moe()) return InvalidArgument("moe must be set (the layer: model_dim, num_experts, expert)");
  const auto& l = cfg.moe();
  if (!l.has_model_dim()) return InvalidArgument("moe.model_dim must be set");
  if (!l.has_num_experts()) return InvalidArgument("moe.num_experts must be set");
  if (!l.expert().has_hidden_dim()) return InvalidArgument("moe.expert.hidden_dim must be set");
  return Status::Ok();
}

}  // namespace

config::LayerConfig ResolvedLayerConfig(const config::LayerConfig& layer) {
  config::LayerConfig resolved = layer;
  ResolveLayerConfig(&resolved);
  return resolved;
}

void ResolveLayerConfig(config::LayerConfig* layer) {
  auto* router = layer->mutable_router();
  if (router->gate() == config::TOP1 && !router->has_top_k()) router->set_top_k(1);
  if (router->gate() == config::NOISY_TOPK && !router->has_normalization()) {
    router->set_normalization(config::TOPK_SOFTMAX);
  }
  if ((router->gate() == config::EXPERT_CHOICE || router->gate() == config::SOFT) &&
      !router->has_aux_loss()) {
    router->set_aux_loss(config::NO_AUX_LOSS);
  }
  FillDefaults(layer);
}

void ResolveConfig(MoeConfig* cfg) {
  ResolveLayerConfig(cfg->mutable_moe());
  const bool had_topology = cfg->has_topology();
  FillDefaults(cfg);
  if (!had_topology) cfg->clear_topology();
}

Status ValidateCompute(const config::ComputeConfig& cp) {
  Checker c;
  c.Require(cp.gpu() >= -1, "compute.gpu", cp.gpu(), "be >= -1 (-1: the rank's index on its node mod device count)");
  c.Require(std::isfinite(cp.peak_tflops()) && cp.peak_tflops() >= 0, "compute.peak_tflops",
            cp.peak_tflops(), "be a finite number >= 0 (0: measure)");
  if (cp.expert_precision() == config::BF16) {
    c.Require(cp.device() == config::CUDA, "compute.expert_precision", "BF16",
              "be FP32 unless compute.device=CUDA (bf16 experts run on the GPU only)");
  }
  return c.status;
}

Status ValidateCompute(const config::ComputeConfig& cp, const config::LayerConfig& layer) {
  MOE_RETURN_IF_ERROR(ValidateCompute(cp));
  if (cp.expert_precision() != config::BF16) return Status::Ok();
  // bf16 experts: every expert's rows start 16-byte aligned in the grouped GEMMs (cuBLAS).
  Checker c;
  const std::string rule = "be a multiple of " + std::to_string(limits::kBf16DimMultiple) +
                           " with compute.expert_precision=BF16 (16-byte aligned bf16 rows)";
  c.Require(layer.model_dim() % limits::kBf16DimMultiple == 0, "moe.model_dim", layer.model_dim(),
            rule);
  c.Require(layer.expert().hidden_dim() % limits::kBf16DimMultiple == 0, "moe.expert.hidden_dim",
            layer.expert().hidden_dim(), rule);
  c.Require(layer.shared_hidden_dim() % limits::kBf16DimMultiple == 0, "moe.shared_hidden_dim",
            layer.shared_hidden_dim(), rule);
  return c.status;
}

Status ValidateConfig(const MoeConfig& cfg) {
  MOE_RETURN_IF_ERROR(ValidateLayer(cfg.moe()));
  return ValidateTrain(cfg);
}

Status ValidateForWorld(const MoeConfig& cfg, int world_size) {
  const int e = cfg.moe().num_experts();
  const int ep = cfg.parallel().ep_size() > 0 ? cfg.parallel().ep_size() : world_size;
  if (world_size % ep != 0) {
    return InvalidArgument("parallel.ep_size=" + std::to_string(ep) +
                           " must divide the world size " + std::to_string(world_size));
  }
  const int r = cfg.parallel().num_redundant_experts();
  if (r > 0) {
    if ((e + r) % ep != 0) {
      return InvalidArgument("parallel.num_redundant_experts: " + std::to_string(e) + " experts + " +
                             std::to_string(r) + " redundant = " + std::to_string(e + r) +
                             " physical experts must be divisible by the expert-parallel size " +
                             std::to_string(ep));
    }
    if (static_cast<int64_t>(r) > static_cast<int64_t>(e) * (ep - 1)) {
      return InvalidArgument("parallel.num_redundant_experts=" + std::to_string(r) +
                             " must be <= moe.num_experts x (expert-parallel size - 1) = " +
                             std::to_string(static_cast<int64_t>(e) * (ep - 1)) +
                             ": an expert has at most one replica per rank");
    }
  } else if (e % ep != 0) {
    return InvalidArgument("moe.num_experts=" + std::to_string(e) + " must be divisible by ep_size=" +
                           std::to_string(ep));
  }
  const int64_t shards = static_cast<int64_t>(world_size) * cfg.moe().router().num_local_groups();
  if (cfg.train().global_batch_tokens() % shards != 0) {
    return InvalidArgument("train.global_batch_tokens=" + std::to_string(cfg.train().global_batch_tokens()) +
                           " must be divisible by world size x moe.router.num_local_groups = " +
                           std::to_string(shards));
  }
  return Status::Ok();
}

Status ParseTextProto(const std::string& text, const std::string& name, google::protobuf::Message* msg) {
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, msg)) {
    return InvalidArgument(name + ": not a valid " + msg->GetDescriptor()->full_name() + " text proto: " +
                           errors.text());
  }
  return Status::Ok();
}

StatusOr<MoeConfig> ParseConfig(const std::string& text, const std::string& name) {
  MoeConfig cfg;
  MOE_RETURN_IF_ERROR(ParseTextProto(text, "config " + name, &cfg));
  MOE_RETURN_IF_ERROR(CheckRequired(cfg).WithContext("config " + name));
  ResolveConfig(&cfg);
  Status s = ValidateConfig(cfg);
  if (!s.ok()) return s.WithContext("config " + name);
  return cfg;
}

StatusOr<MoeConfig> LoadConfig(const std::string& path) {
  MOE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseConfig(text, path);
}

std::string ConfigToJson(const MoeConfig& cfg) {
  MoeConfig resolved = cfg;
  ResolveConfig(&resolved);
  google::protobuf::util::JsonPrintOptions opts;
  opts.preserve_proto_field_names = true;
  opts.always_print_primitive_fields = true;
  opts.add_whitespace = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(resolved, &out, opts);
  return out;
}

int64_t ComputeCapacity(const config::RouterConfig& cfg, int64_t num_experts, int64_t num_tokens,
                        int64_t num_groups, bool train) {
  const double cf = train ? cfg.capacity_factor_train() : cfg.capacity_factor_eval();
  const int64_t s_g = (num_tokens + num_groups - 1) / num_groups;
  const bool expert_choice = cfg.gate() == config::EXPERT_CHOICE;
  if (cf <= 0) return expert_choice ? s_g : 0;
  // An expert receives at most one slot per token of a group, so no capacity above S_g can change
  // the routing: C is capped at S_g (the double is only converted below that bound).
  const double k = expert_choice ? 1.0 : TopK(cfg);
  const double c = std::ceil(k * static_cast<double>(s_g) * cf / static_cast<double>(num_experts));
  const int64_t capped = c >= static_cast<double>(s_g) ? s_g : static_cast<int64_t>(c);
  return std::min(s_g, std::max<int64_t>(cfg.min_capacity(), capped));
}

}  // namespace moe
