// Flag parsing shared by the command-line tools and the benchmarks (CLI11, header only: a target
// that includes this links CLI11::CLI11): bad flags are input errors, exit code 2, like a bad
// config; --help exits 0. The flags that override a config's sections live here too, so every
// tool spells them alike.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "proto/moe_config.pb.h"

namespace moe::flags {

// Parses argv into `app`. Returns -1 to go on, or the exit code after printing help (0) or
// CLI11's message naming the flag and the rule (2).
inline int ParseFlags(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return -1;
}

// --device / --precision: where the experts run (overrides the config's compute section; the
// config validation then checks the combination).
struct ComputeFlags {
  std::string device, precision;
};

inline void AddComputeFlags(CLI::App& app, ComputeFlags* f) {
  app.add_option("--device", f->device, "override compute.device: where the MoE layers run (cpu, cuda)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", f->precision, "override compute.expert_precision (fp32, bf16; bf16 needs cuda)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
}

inline void ApplyComputeFlags(const ComputeFlags& f, config::ComputeConfig* compute) {
  if (!f.device.empty()) compute->set_device(f.device == "cuda" ? config::CUDA : config::CPU);
  if (!f.precision.empty()) compute->set_expert_precision(f.precision == "bf16" ? config::BF16 : config::FP32);
}

}  // namespace moe::flags
