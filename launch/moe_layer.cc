// moe_layer: runs one MoE layer on NumPy files so anyone can cross-check it.
//
//   moe_layer --config layer.textproto --input x.npy [--weights DIR | --init-seed N]
//             [--grad-output dy.npy] [--train] [--step N] [--token-offset N]
//             [--router-bias b.npy] [--device cpu|cuda] [--precision fp32|bf16] --out DIR
//
// Outputs in --out: y.npy, routing_expert.npy, routing_gate.npy (Soft MoE: routing_gate.npy and
// routing_dispatch.npy, its combine and dispatch weights), metrics.json, config.json; with
// --grad-output also dx.npy and grad_<weight>.npy; with --init-seed the weights in DIR/weights/;
// with --train and a bias update rate, the updated router_bias.npy. --device cuda runs the
// device-resident layer (runtime/layer/device_moe_layer.h). A thin main: flags and config, then
// RunLayerOnFiles (runtime/layer/layer_io.h).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "experts/cpu/blas.h"
#include "runtime/config/flags.h"
#include "runtime/config/config.h"
#include "runtime/layer/layer_io.h"
#include "runtime/config/memory_model.h"

namespace {

struct Flags {
  std::string config;
  int threads = 1;
  moe::flags::ComputeFlags compute;
  moe::LayerFilesOptions files;
};

moe::Status Run(const std::string& config, const moe::flags::ComputeFlags& compute,
                const moe::LayerFilesOptions& files) {
  MOE_ASSIGN_OR_RETURN(moe::MoeConfig cfg, moe::LoadConfig(config));
  moe::flags::ApplyComputeFlags(compute, cfg.mutable_compute());
  MOE_RETURN_IF_ERROR(moe::ValidateConfig(cfg).WithContext("--device/--precision"));
  return moe::RunLayerOnFiles(cfg, files);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Runs one MoE layer on .npy files (forward, optional backward)."};
  Flags f;
  app.add_option("--config", f.config, "layer config (.textproto)")->required();
  app.add_option("--input", f.files.input, "tokens x (S x M float32 .npy)")->required();
  auto* weights = app.add_option("--weights", f.files.weights, "directory with the weight .npy files");
  auto* seed = app.add_option("--init-seed", f.files.init_seed, "initialize weights from this seed")
                   ->check(CLI::NonNegativeNumber);
  weights->excludes(seed);
  app.add_option("--grad-output", f.files.grad_output, "dy (S x M float32 .npy): run the backward");
  app.add_flag("--train", f.files.train, "training mode (train capacity factor, noise)");
  app.add_option("--step", f.files.step, "training step (for counter-based randomness)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--token-offset", f.files.token_offset, "global index of the first token")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--router-bias", f.files.router_bias, "aux-loss-free bias (E float32 .npy)");
  app.add_option("--threads", f.threads, "OpenBLAS threads")->check(CLI::Range(1, 256));
  moe::flags::AddComputeFlags(app, &f.compute);
  app.add_option("--out", f.files.out, "output directory")->required();
  std::string max_memory;
  app.add_option("--max-memory", max_memory,
                 "refuse a call whose estimated memory is above this (e.g. 8G; default: the "
                 "machine's available memory)");
  if (const int rc = moe::flags::ParseFlags(app, argc, argv); rc >= 0) return rc;
  if (f.files.weights.empty() && f.files.init_seed < 0) {
    std::fprintf(stderr, "moe_layer: one of --weights DIR or --init-seed N is required\n");
    return 2;
  }
  if (!max_memory.empty()) {
    moe::StatusOr<int64_t> bytes = moe::ParseByteSize("--max-memory", max_memory);
    if (!bytes.ok()) {
      std::fprintf(stderr, "moe_layer: %s\n", bytes.status().ToString().c_str());
      return 2;
    }
    f.files.max_memory = *bytes;
  }
  moe::blas::SetThreads(f.threads);
  const moe::Status s = Run(f.config, f.compute, f.files);
  if (!s.ok()) {
    std::fprintf(stderr, "moe_layer: %s\n", s.ToString().c_str());
    return s.code() == moe::StatusCode::kInvalidArgument || s.code() == moe::StatusCode::kNotFound
               ? 2
               : 1;
  }
  return 0;
}
