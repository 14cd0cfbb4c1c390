// moe_simulate: runs an N-rank expert-parallel training job as N threads (loopback backend, CPU)
// with the same Trainer, model and config as moe_train, records what it measured and predicts the
// step time on a target cluster, or on this machine, with the cost models of runtime/sim/cost_model.h.
// A thin main: flags and config, then runtime/sim/simulate_job.h on loopback worlds.
//
//   moe_simulate --config configs/tiny_lm.textproto --ranks 4 [--steps 20]
//                [--topology configs/topologies/dgx_h100_8x8.textproto] --out DIR
//   moe_simulate --config configs/tiny_lm.textproto --ranks 4 --bench-alltoall A.jsonl
//                --bench-allreduce R.jsonl [--cores 2] --out DIR          (this host's step time)
//   moe_simulate --config configs/tiny_lm.textproto --validate --out DIR  (loopback, 1/2/4 ranks)
//
// --topology reads a standalone moe.config.TopologyConfig text file (configs/topologies/). The N
// simulated ranks are placed node-major on that cluster's link parameters: min(gpus_per_node, N)
// ranks per node (override with --gpus-per-node), N / that many nodes.
//
// --bench-alltoall / --bench-allreduce take moe_comm_bench -J output (all-to-all and float64
// all-reduce sweeps of the backend and rank count to predict); with both, the step time of this
// run on this host is predicted (runtime/sim/cost_model.h, "The step on one shared-memory host") with
// the compute calibrated from 1-rank runs, and written to DIR/host_predicted.json. --validate does
// that for the loopback backend at 1, 2 and 4 ranks, running the sweeps with moe_comm_bench (found
// next to this binary, or --comm-bench), and writes DIR/validate.json; the MPI rows come from
// tests/simulate/validate_cost_model.py.
//
// Outputs: DIR/measured.json, DIR/expert_load.svg, DIR/rank_time.svg, with --topology
// DIR/predicted.json (+ a table on stdout).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>

#include "comm/world.h"
#include "experts/cpu/blas.h"
#include "runtime/config/flags.h"
#include "runtime/config/config.h"
#include "runtime/config/memory_model.h"
#include "runtime/sim/simulate_job.h"

namespace {

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "moe_simulate: %s\n", message.c_str());
  return code;
}

// moe_comm_bench next to this binary.
std::string CommBenchNextTo(const char* argv0) {
  std::filesystem::path self = std::filesystem::weakly_canonical(std::filesystem::path(argv0));
  return (self.parent_path() / "moe_comm_bench").string();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Simulates an N-rank expert-parallel MoE training job on threads and predicts it on a cluster."};
  std::string config_path, data;
  int steps = -1;
  moe::flags::ComputeFlags compute;
  moe::SimulateJobOptions o;
  o.cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--config", config_path, "training config (.textproto)")->required();
  app.add_option("--ranks", o.ranks, "simulated ranks (loopback threads)")->check(CLI::Range(1, 1024));
  app.add_option("--steps", steps, "override train.steps")->check(CLI::PositiveNumber);
  app.add_option("--topology", o.topology, "target cluster: a moe.config.TopologyConfig text file");
  app.add_option("--gpus-per-node", o.gpus_per_node, "ranks per node on the target (default min(gpus_per_node, N))")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--efficiency", o.efficiency, "expert GEMM efficiency (fraction of gpu_tflops)");
  app.add_option("--data", data, "override train.data_path");
  moe::flags::AddComputeFlags(app, &compute);
  app.add_option("--out", o.out, "output directory")->required();
  app.add_option("--bench-alltoall", o.bench_alltoall, "moe_comm_bench -J all-to-all sweep of this host (with --bench-allreduce)");
  app.add_option("--bench-allreduce", o.bench_allreduce, "moe_comm_bench -J all-reduce sweep of this host");
  app.add_option("--cores", o.cores, "cores of this host the ranks share (default: all)")->check(CLI::Range(1, 1 << 20));
  app.add_option("--warmup", o.warmup, "steps left out of host predictions and calibration")->check(CLI::Range(0, 1 << 20));
  app.add_option("--comm-bench", o.comm_bench, "moe_comm_bench binary for --validate (default: next to this one)");
  app.add_option("--calibration-steps", o.calibration_steps,
                 "measured steps of each 1-rank calibration run (default 25; fewer for large configs)")
      ->check(CLI::Range(1, 1 << 20));
  app.add_flag("--validate", o.validate, "predict this machine's loopback runs at 1, 2, 4 ranks and compare");
  app.add_flag("--verbose", o.verbose, "progress lines of the trainer");
  app.add_option("--padding", o.padding,
                 "capacity padding: materialize, account (recorded, not moved), or auto (account "
                 "above 64 ranks)")
      ->check(CLI::IsMember({"auto", "materialize", "account"}));
  std::string max_memory;
  app.add_option("--max-memory", max_memory,
                 "memory the simulated ranks may take together (e.g. 8G; default: the available "
                 "memory)");
  if (const int rc = moe::flags::ParseFlags(app, argc, argv); rc >= 0) return rc;
  if (!max_memory.empty()) {
    moe::StatusOr<int64_t> bytes = moe::ParseByteSize("--max-memory", max_memory);
    if (!bytes.ok()) return Fail(bytes.status().ToString(), 2);
    o.max_memory = *bytes;
  }
  moe::blas::SetThreads(1);
  if (o.comm_bench.empty()) o.comm_bench = CommBenchNextTo(argv[0]);

  auto cfg = moe::LoadConfig(config_path);
  if (!cfg.ok()) return Fail(cfg.status().ToString(), 2);
  if (steps > 0) cfg->mutable_train()->set_steps(steps);
  if (!data.empty()) cfg->mutable_train()->set_data_path(data);
  moe::flags::ApplyComputeFlags(compute, cfg->mutable_compute());
  if (moe::Status s = moe::ValidateConfig(*cfg); !s.ok()) {
    return Fail(s.WithContext("config " + config_path).ToString(), 2);
  }
  // Loopback ranks; with compute.device=CUDA the device layers exchange over a twin world in device
  // memory (every rank on the GPUs there are, several on one: NCCL would refuse that).
  const moe::comm::WorldFactory make_world = [&](int ranks) {
    moe::comm::WorldOptions w;
    w.backend = "loopback";
    w.ranks = ranks;
    w.options.deadline_seconds = cfg->comm().deadline_seconds();
    w.device_twin = cfg->compute().device() == moe::config::CUDA;
    return moe::comm::MakeWorld(w);
  };
  const moe::Status s = moe::RunSimulateJob(*cfg, o, make_world);
  if (!s.ok()) return Fail(s.ToString(), moe::comm::ExitCodeOf(s));
  return 0;
}
