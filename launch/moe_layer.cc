// moe_layer: runs one MoE layer on NumPy files so anyone can cross-check it.
//
//   moe_layer --config layer.textproto --input x.npy [--weights DIR | --init-seed N]
//             [--grad-output dy.npy] [--train] [--step N] [--token-offset N]
//             [--router-bias b.npy] [--device cpu|cuda] [--precision fp32|bf16] --out DIR
//
// Outputs in --out: y.npy, routing_expert.npy, routing_gate.npy, metrics.json, config.json; with
// --grad-output also dx.npy and grad_<weight>.npy; with --init-seed the weights in DIR/weights/;
// with --train and a bias update rate, the updated router_bias.npy. --device cuda runs the
// device-resident layer (runtime/device_moe_layer.h).
#include "runtime/moe/moe_layer.h"

#include <google/protobuf/util/json_util.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>

#include "experts/cpu/blas.h"
#include "launch/cli.h"
#include "runtime/base/file.h"
#include "runtime/base/npy.h"
#include "runtime/moe/config.h"
#include "runtime/cuda/device_moe_layer.h"
#include "runtime/moe/expert_blocks.h"
#include "runtime/moe/expert_executor.h"
#include "runtime/moe/layer_io.h"

namespace {

struct Flags {
  std::string config, input, weights, grad_output, out, router_bias;
  int64_t init_seed = -1;
  bool train = false;
  int64_t step = 0;
  int64_t token_offset = 0;
  int threads = 1;
  moe::launch::ComputeFlags compute;
};

moe::Status WriteRouting(const std::string& out, const moe::DispatchPlan& p) {
  moe::IntTensor experts;
  moe::Tensor gates;
  if (p.expert_choice) {
    const int64_t rows = p.num_groups * p.num_experts, c = p.capacity;
    experts.Reset(rows, c);
    gates.Reset(rows, c);
    for (int64_t i = 0; i < rows * c; ++i) experts[i] = p.ec_token[i];
    // Gates: walk the packed rows, which are (expert, group, position) ordered.
    for (int64_t e = 0; e < p.num_experts; ++e) {
      int64_t row = p.expert_offset[e];
      for (int64_t g = 0; g < p.num_groups; ++g) {
        const int32_t n = p.group_expert_count[g * p.num_experts + e];
        for (int32_t pos = 0; pos < n; ++pos)
          gates((g * p.num_experts + e), pos) = p.row_gate[row++];
      }
    }
  } else {
    experts.Reset(p.num_tokens, p.top_k);
    gates.Reset(p.num_tokens, p.top_k);
    for (int64_t i = 0; i < p.num_tokens * p.top_k; ++i) {
      experts[i] = p.slot_expert[i];
      gates[i] = p.slot_gate[i];
    }
  }
  MOE_RETURN_IF_ERROR(moe::WriteNpy(out + "/routing_expert.npy", experts));
  return moe::WriteNpy(out + "/routing_gate.npy", gates);
}

// The layer under test: the CPU layer (experts on the CPU, or staged to a GPU), or with
// compute.device=CUDA the layer run whole on the device-resident layer (runtime/device_moe_layer.h:
// router GEMMs, permutes, experts and combine on the GPU). Same inputs, same output files.
moe::StatusOr<std::unique_ptr<moe::MoeLayer>> MakeLayer(const moe::MoeConfig& cfg) {
  const auto& layer_cfg = cfg.moe();
  if (cfg.compute().device() != moe::config::CUDA) {
    MOE_ASSIGN_OR_RETURN(
        auto compute, moe::MakeExpertCompute(moe::ExpertShape(layer_cfg), layer_cfg.num_experts(),
                                             cfg.compute(), /*rank=*/0));
    return std::make_unique<moe::MoeLayer>(
        layer_cfg, std::make_unique<moe::LocalExpertExecutor>(std::move(compute)), 0,
        layer_cfg.num_experts());
  }
  moe::DeviceLayerOptions options;
  MOE_ASSIGN_OR_RETURN(options.device, moe::ComputeGpu(cfg.compute(), /*rank=*/0));
  options.precision = moe::ComputePrecision(cfg.compute());
  auto device = moe::DeviceMoeLayer::Create(layer_cfg, options);
  if (!device.ok()) return device.status().WithContext("compute.device=CUDA");
  auto layer = std::make_unique<moe::MoeLayer>(layer_cfg);
  layer->UseDevice(std::move(device).value());
  return layer;
}

moe::Status Run(const Flags& f) {
  MOE_ASSIGN_OR_RETURN(moe::MoeConfig cfg, moe::LoadConfig(f.config));
  moe::launch::ApplyComputeFlags(f.compute, cfg.mutable_compute());
  MOE_RETURN_IF_ERROR(moe::ValidateConfig(cfg).WithContext("--device/--precision"));
  const auto& layer_cfg = cfg.moe();
  MOE_ASSIGN_OR_RETURN(moe::Tensor x, moe::ReadNpyFloat(f.input));
  if (x.cols() != layer_cfg.model_dim()) {
    return moe::InvalidArgument(
        "--input " + f.input + " has " + std::to_string(x.cols()) +
        " columns, must equal moe.model_dim=" + std::to_string(layer_cfg.model_dim()));
  }
  MOE_RETURN_IF_ERROR(moe::MakeDirs(f.out));
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<moe::MoeLayer> layer, MakeLayer(cfg));
  if (!f.weights.empty()) {
    MOE_RETURN_IF_ERROR(moe::ReadLayerParams(f.weights, &layer->params()).WithContext("--weights"));
  } else {
    moe::InitLayerParams(layer_cfg, static_cast<uint64_t>(f.init_seed), &layer->params());
    MOE_RETURN_IF_ERROR(moe::WriteLayerParams(f.out + "/weights", layer->params()));
  }
  if (!f.router_bias.empty()) {
    MOE_ASSIGN_OR_RETURN(moe::Tensor b,
                         moe::ReadNpyFloatShaped(f.router_bias, -1, layer_cfg.num_experts()));
    layer->router_bias().assign(b.data(), b.data() + b.size());
  }
  moe::RouteContext ctx;
  ctx.train = f.train;
  ctx.seed = cfg.seed();
  ctx.step = static_cast<uint64_t>(f.step);
  ctx.token_offset = f.token_offset;
  moe::Tensor y;
  MOE_RETURN_IF_ERROR(layer->Forward(x.view(), ctx, &y));
  MOE_RETURN_IF_ERROR(moe::WriteNpy(f.out + "/y.npy", y));
  MOE_RETURN_IF_ERROR(layer->FetchPlan());  // routed on the device: the slots come down
  MOE_RETURN_IF_ERROR(WriteRouting(f.out, layer->plan()));

  std::string json;
  google::protobuf::util::JsonPrintOptions opts;
  opts.preserve_proto_field_names = true;
  opts.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(layer->Metrics(), &json, opts);
  MOE_RETURN_IF_ERROR(moe::WriteFileAtomically(f.out + "/metrics.json", json + "\n"));
  MOE_RETURN_IF_ERROR(moe::WriteFileAtomically(f.out + "/config.json", moe::ConfigToJson(cfg)));

  if (!f.grad_output.empty()) {
    MOE_ASSIGN_OR_RETURN(moe::Tensor dy,
                         moe::ReadNpyFloatShaped(f.grad_output, y.rows(), y.cols()));
    moe::MoeLayerParams grads = moe::MakeLayerParams(layer_cfg);
    moe::Tensor dx;
    MOE_RETURN_IF_ERROR(layer->Backward(dy.view(), &dx, &grads));
    MOE_RETURN_IF_ERROR(moe::WriteNpy(f.out + "/dx.npy", dx));
    MOE_RETURN_IF_ERROR(moe::WriteLayerParams(f.out, grads, "grad_"));
  }
  if (f.train && layer_cfg.router().bias_update_rate() > 0) {
    layer->UpdateRouterBias();
    moe::Tensor b(1, layer_cfg.num_experts());
    for (int i = 0; i < layer_cfg.num_experts(); ++i)
      b[i] = layer->router_bias()[static_cast<size_t>(i)];
    MOE_RETURN_IF_ERROR(moe::WriteNpyVector(f.out + "/router_bias.npy", b));
  }
  return moe::Status::Ok();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Runs one MoE layer on .npy files (forward, optional backward)."};
  Flags f;
  app.add_option("--config", f.config, "layer config (.textproto)")->required();
  app.add_option("--input", f.input, "tokens x (S x M float32 .npy)")->required();
  auto* weights = app.add_option("--weights", f.weights, "directory with the weight .npy files");
  auto* seed = app.add_option("--init-seed", f.init_seed, "initialize weights from this seed")
                   ->check(CLI::NonNegativeNumber);
  weights->excludes(seed);
  app.add_option("--grad-output", f.grad_output, "dy (S x M float32 .npy): run the backward");
  app.add_flag("--train", f.train, "training mode (train capacity factor, noise)");
  app.add_option("--step", f.step, "training step (for counter-based randomness)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--token-offset", f.token_offset, "global index of the first token")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--router-bias", f.router_bias, "aux-loss-free bias (E float32 .npy)");
  app.add_option("--threads", f.threads, "OpenBLAS threads")->check(CLI::Range(1, 256));
  moe::launch::AddComputeFlags(app, &f.compute);
  app.add_option("--out", f.out, "output directory")->required();
  if (const int rc = moe::launch::ParseFlags(app, argc, argv); rc >= 0) return rc;
  if (f.weights.empty() && f.init_seed < 0) {
    std::fprintf(stderr, "moe_layer: one of --weights DIR or --init-seed N is required\n");
    return 2;
  }
  moe::blas::SetThreads(f.threads);
  const moe::Status s = Run(f);
  if (!s.ok()) {
    std::fprintf(stderr, "moe_layer: %s\n", s.ToString().c_str());
    return s.code() == moe::StatusCode::kInvalidArgument || s.code() == moe::StatusCode::kNotFound
               ? 2
               : 1;
  }
  return 0;
}
