// Layer parameters as .npy files and one layer call on files (runtime/layer/layer_io.h).
#include "runtime/layer/layer_io.h"

#include <google/protobuf/util/json_util.h>

#include <cstring>
#include <memory>

#include "base/file.h"
#include "base/npy.h"
#include "runtime/config/config.h"
#include "runtime/layer/host_layer_call.h"
#include "runtime/layer/make_moe_layer.h"
#include "runtime/config/memory_model.h"

namespace moe {

bool IsVectorParam(const std::string& name) {
  return name.size() > 3 && (name.compare(name.size() - 3, 3, "_b1") == 0 ||
                             name.compare(name.size() - 3, 3, "_b2") == 0);
}

Status ReadLayerParams(const std::string& dir, MoeLayerParams* params) {
  Status status;
  params->ForEach([&](const std::string& name, Tensor& t) {
    if (!status.ok()) return;
    const std::string path = dir + "/" + name + ".npy";
    StatusOr<Tensor> read = IsVectorParam(name) ? ReadNpyFloatShaped(path, -1, t.size())
                                                : ReadNpyFloatShaped(path, t.rows(), t.cols());
    if (!read.ok()) {
      status = read.status();
      return;
    }
    std::memcpy(t.data(), read->data(), sizeof(float) * static_cast<size_t>(t.size()));
  });
  return status;
}

Status WriteLayerParams(const std::string& dir, const MoeLayerParams& params, const std::string& prefix) {
  MOE_RETURN_IF_ERROR(MakeDirs(dir));
  Status status;
  params.ForEach([&](const std::string& name, const Tensor& t) {
    if (!status.ok()) return;
    const std::string path = dir + "/" + prefix + name + ".npy";
    status = IsVectorParam(name) ? WriteNpyVector(path, t) : WriteNpy(path, t);
  });
  return status;
}


void RoutingArrays(const DispatchPlan& p, IntTensor* experts, Tensor* gates) {
  if (p.expert_choice) {
    const int64_t rows = p.num_groups * p.num_experts, c = p.capacity;
    experts->Reset(rows, c);
    gates->Reset(rows, c);
    for (int64_t i = 0; i < rows * c; ++i) (*experts)[i] = p.ec_token[i];
    // Gates: walk the packed rows, which are (expert, group, position) ordered.
    for (int64_t e = 0; e < p.num_experts; ++e) {
      int64_t row = p.expert_offset[e];
      for (int64_t g = 0; g < p.num_groups; ++g) {
        const int32_t n = p.group_expert_count[g * p.num_experts + e];
        for (int32_t pos = 0; pos < n; ++pos) (*gates)((g * p.num_experts + e), pos) = p.row_gate[row++];
      }
    }
    return;
  }
  experts->Reset(p.num_tokens, p.top_k);
  gates->Reset(p.num_tokens, p.top_k);
  for (int64_t i = 0; i < p.num_tokens * p.top_k; ++i) {
    (*experts)[i] = p.slot_expert[i];
    (*gates)[i] = p.slot_gate[i];
  }
}

namespace {

Status WriteRouting(const std::string& out, const DispatchPlan& p) {
  IntTensor experts;
  Tensor gates;
  RoutingArrays(p, &experts, &gates);
  MOE_RETURN_IF_ERROR(WriteNpy(out + "/routing_expert.npy", experts));
  return WriteNpy(out + "/routing_gate.npy", gates);
}

}  // namespace

Status RunLayerOnFiles(const MoeConfig& cfg, const LayerFilesOptions& f) {
  const auto& layer_cfg = cfg.moe();
  MOE_ASSIGN_OR_RETURN(Tensor x, ReadNpyFloat(f.input));
  if (x.cols() != layer_cfg.model_dim()) {
    return InvalidArgument("--input " + f.input + " has " + std::to_string(x.cols()) +
                           " columns, must equal moe.model_dim=" +
                           std::to_string(layer_cfg.model_dim()));
  }
  // Refuse what does not fit before allocating anything or writing a file.
  const MemoryEstimate need = LayerCallMemory(layer_cfg, x.rows(), !f.grad_output.empty());
  MOE_RETURN_IF_ERROR(CheckMemory(need, f.max_memory > 0 ? f.max_memory : AvailableMemoryBytes(),
                                  "this layer call",
                                  f.max_memory > 0 ? "--max-memory" : "the available memory",
                                  "--max-memory"));
  if (f.weights.empty()) {
    int64_t files = 0;
    const int64_t bytes = LayerWeightFileBytes(layer_cfg, &files);
    const int64_t disk = FreeDiskBytes(f.out);
    if (disk >= 0 && bytes > disk) {
      return InvalidArgument("--init-seed would write " + std::to_string(files) +
                             " weight files of " + FormatBytes(static_cast<double>(bytes)) +
                             " to " + f.out + "/weights, more than the " +
                             FormatBytes(static_cast<double>(disk)) +
                             " free there; lower moe.num_experts or moe.expert.hidden_dim");
    }
  }
  MOE_RETURN_IF_ERROR(MakeDirs(f.out));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<MoeLayer> layer, MakeMoeLayer(layer_cfg, cfg.compute()));
  MoeLayerParams params = MakeLayerParams(layer_cfg);
  if (!f.weights.empty()) {
    MOE_RETURN_IF_ERROR(ReadLayerParams(f.weights, &params).WithContext("--weights"));
  } else {
    InitLayerParams(layer_cfg, static_cast<uint64_t>(f.init_seed), &params);
    MOE_RETURN_IF_ERROR(WriteLayerParams(f.out + "/weights", params));
  }
  MOE_RETURN_IF_ERROR(layer->SetParams(params));
  if (!f.router_bias.empty()) {
    MOE_ASSIGN_OR_RETURN(Tensor b, ReadNpyFloatShaped(f.router_bias, -1, layer_cfg.num_experts()));
    layer->router_bias().assign(b.data(), b.data() + b.size());
  }
  RouteContext ctx;
  ctx.train = f.train;
  ctx.seed = cfg.seed();
  ctx.step = static_cast<uint64_t>(f.step);
  ctx.token_offset = f.token_offset;
  HostLayerCall call(layer.get());
  Tensor y;
  MOE_RETURN_IF_ERROR(call.Forward(x.view(), ctx, &y));
  MOE_RETURN_IF_ERROR(WriteNpy(f.out + "/y.npy", y));
  MOE_RETURN_IF_ERROR(layer->FetchPlan());  // routed on the device: the slots come down
  if (layer_cfg.router().gate() == config::SOFT) {
    // Soft MoE: the combine weights C and the dispatch weights D (S x E·p) instead of slots.
    MOE_RETURN_IF_ERROR(WriteNpy(f.out + "/routing_gate.npy", layer->router_output().probs));
    MOE_RETURN_IF_ERROR(
        WriteNpy(f.out + "/routing_dispatch.npy", layer->router_output().dispatch));
  } else {
    MOE_RETURN_IF_ERROR(WriteRouting(f.out, layer->plan()));
  }

  std::string json;
  google::protobuf::util::JsonPrintOptions opts;
  opts.preserve_proto_field_names = true;
  opts.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(layer->Metrics(), &json, opts);
  MOE_RETURN_IF_ERROR(WriteFileAtomically(f.out + "/metrics.json", json + "\n"));
  MOE_RETURN_IF_ERROR(WriteFileAtomically(f.out + "/config.json", ConfigToJson(cfg)));

  if (!f.grad_output.empty()) {
    MOE_ASSIGN_OR_RETURN(Tensor dy, ReadNpyFloatShaped(f.grad_output, y.rows(), y.cols()));
    MoeLayerParams grads = MakeLayerParams(layer_cfg);
    Tensor dx;
    MOE_RETURN_IF_ERROR(call.Backward(dy.view(), &dx, &grads));
    MOE_RETURN_IF_ERROR(WriteNpy(f.out + "/dx.npy", dx));
    MOE_RETURN_IF_ERROR(WriteLayerParams(f.out, grads, "grad_"));
  }
  if (f.train && layer_cfg.router().bias_update_rate() > 0) {
    layer->UpdateRouterBias();
    Tensor b(1, layer_cfg.num_experts());
    for (int i = 0; i < layer_cfg.num_experts(); ++i) b[i] = layer->router_bias()[static_cast<size_t>(i)];
    MOE_RETURN_IF_ERROR(WriteNpyVector(f.out + "/router_bias.npy", b));
  }
  return Status::Ok();
}

}  // namespace moe
