// moe_simulate: runs an N-rank expert-parallel training job as N threads (loopback backend, CPU)
// with the same Trainer, model and config as moe_train, records what it measured and predicts the
// step time on a target cluster, or on this machine, with the cost models of runtime/cost_model.h.
// A thin main: the logic is in runtime/simulate.h.
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
// run on this host is predicted (runtime/cost_model.h, "The step on one shared-memory host") with
// the compute calibrated from 1-rank runs, and written to DIR/host_predicted.json. --validate does
// that for the loopback backend at 1, 2 and 4 ranks, running the sweeps with moe_comm_bench (found
// next to this binary, or --comm-bench), and writes DIR/validate.json; the MPI rows come from
// tests/simulate/validate_cost_model.py.
//
// Outputs: DIR/measured.json, DIR/expert_load.svg, DIR/rank_time.svg, with --topology
// DIR/predicted.json (+ a table on stdout).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "experts/cpu/blas.h"
#include "launch/cli.h"
#include "runtime/base/file.h"
#include "runtime/moe/config.h"
#include "runtime/sim/cost_model.h"
#include "runtime/sim/simulate.h"

namespace {

using moe::Status;
using moe::StatusOr;

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "moe_simulate: %s\n", message.c_str());
  return code;
}

struct Flags {
  std::string config, topology, out, data, bench_alltoall, bench_allreduce, comm_bench;
  int ranks = 1, steps = -1, gpus_per_node = 0, warmup = 5;
  int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  bool validate = false, verbose = false;
  double efficiency = 0.6;
  moe::launch::ComputeFlags compute;
};

// Writes DIR/name atomically (a failure names the file and the reason).
Status WriteOut(const std::string& dir, const std::string& name, const std::string& text) {
  return moe::WriteFileAtomically(dir + "/" + name, text);
}

// 1-rank runs at the batch per rank of 1, 2 and 4 ranks (and the run's own, when different).
StatusOr<moe::ComputeCalibration> Calibrate(const moe::MoeConfig& cfg, int ranks, const Flags& f) {
  std::vector<int64_t> tokens;
  for (int n : {1, 2, 4, ranks}) {
    const int64_t t = cfg.train().global_batch_tokens() / n;
    if (t > 0 && std::find(tokens.begin(), tokens.end(), t) == tokens.end()) tokens.push_back(t);
  }
  return moe::CalibrateCompute(cfg, tokens, f.warmup + 25, f.warmup);
}

void PrintHost(const moe::HostValidation& v) {
  const auto& p = v.predicted;
  const double err = v.measured_step_seconds > 0 ? 100.0 * (p.total() - v.measured_step_seconds) / v.measured_step_seconds : 0;
  std::printf("%6d %10.3f %10.3f %10.3f %10.3f %10.3f %10.3f %12.3f %12.3f %+8.1f\n", v.ranks,
              p.compute_mean_seconds * 1e3, p.wait_seconds * 1e3, p.oversubscription_seconds * 1e3,
              p.alltoall_seconds * 1e3, p.allreduce_seconds * 1e3, p.compute_seconds() * 1e3, p.total() * 1e3,
              v.measured_step_seconds * 1e3, err);
}

void PrintHostHeader() {
  std::printf("%6s %10s %10s %10s %10s %10s %10s %12s %12s %8s\n", "ranks", "comp_ms", "wait_ms", "oversub_ms",
              "a2a_ms", "allred_ms", "compute_ms", "pred_ms", "meas_ms", "err%");
}

std::string CommBenchPath(const Flags& f, const char* argv0) {
  if (!f.comm_bench.empty()) return f.comm_bench;
  std::filesystem::path self = std::filesystem::weakly_canonical(std::filesystem::path(argv0));
  return (self.parent_path() / "moe_comm_bench").string();
}

// Loopback rows of the validation: moe_comm_bench sweeps -> alpha, beta; then the runs.
int Validate(const Flags& f, const moe::MoeConfig& cfg, const char* argv0) {
  const std::string bench = CommBenchPath(f, argv0);
  auto cal = Calibrate(cfg, 4, f);
  if (!cal.ok()) return Fail(cal.status().ToString(), 1);
  std::printf("compute calibration (1-rank loopback runs at %zu batch sizes): %.3f ms + %.3f us/token + %.3f us/expert row\n",
              cal->tokens.size(), cal->fixed_seconds * 1e3, cal->per_token_seconds * 1e6, cal->per_row_seconds * 1e6);
  PrintHostHeader();
  std::ostringstream js;
  js << "{\"backend\": \"loopback\", \"cores\": " << f.cores << ", \"rows\": [";
  int i = 0;
  for (int ranks : {1, 2, 4}) {
    moe::HostModel host;
    host.cores = f.cores;
    for (const char* op : {"alltoall", "allreduce"}) {
      const std::string out = f.out + "/bench_loopback_" + op + "_" + std::to_string(ranks) + ".jsonl";
      const std::string cmd = "'" + bench + "' --backend loopback --ranks " + std::to_string(ranks) + " --op " + op +
                              (std::string(op) == "alltoall" ? " -d float32 -b 1K -e 1M" : " -d float64 -b 8 -e 1M") +
                              " -f 2 -n 50 -w 5 -c 0 -J '" + out + "' > /dev/null";
      std::remove(out.c_str());
      if (std::system(cmd.c_str()) != 0) return Fail("sweep failed: " + cmd, 1);
      auto fit = moe::FitBenchFile(out);
      if (!fit.ok()) return Fail(fit.status().ToString(), 1);
      (std::string(op) == "alltoall" ? host.alltoall : host.allreduce) = *fit;
    }
    auto run = moe::RunSimulation(cfg, ranks, true);
    if (!run.ok()) return Fail(run.status().ToString(), 1);
    auto v = moe::PredictHost(*run, host, *cal, f.warmup);
    if (!v.ok()) return Fail(v.status().ToString(), 1);
    PrintHost(*v);
    js << (i++ ? ",\n  " : "\n  ") << moe::HostPredictionJson(*v, host, *cal);
  }
  js << "]}\n";
  if (Status s = WriteOut(f.out, "validate.json", js.str()); !s.ok()) return Fail(s.ToString(), 1);
  std::printf("wrote %s/validate.json\n", f.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Simulates an N-rank expert-parallel MoE training job on threads and predicts it on a cluster."};
  Flags f;
  app.add_option("--config", f.config, "training config (.textproto)")->required();
  app.add_option("--ranks", f.ranks, "simulated ranks (loopback threads)")->check(CLI::Range(1, 1024));
  app.add_option("--steps", f.steps, "override train.steps")->check(CLI::PositiveNumber);
  app.add_option("--topology", f.topology, "target cluster: a moe.config.TopologyConfig text file");
  app.add_option("--gpus-per-node", f.gpus_per_node, "ranks per node on the target (default min(gpus_per_node, N))")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--efficiency", f.efficiency, "expert GEMM efficiency (fraction of gpu_tflops)");
  app.add_option("--data", f.data, "override train.data_path");
  moe::launch::AddComputeFlags(app, &f.compute);
  app.add_option("--out", f.out, "output directory")->required();
  app.add_option("--bench-alltoall", f.bench_alltoall, "moe_comm_bench -J all-to-all sweep of this host (with --bench-allreduce)");
  app.add_option("--bench-allreduce", f.bench_allreduce, "moe_comm_bench -J all-reduce sweep of this host");
  app.add_option("--cores", f.cores, "cores of this host the ranks share (default: all)")->check(CLI::Range(1, 1 << 20));
  app.add_option("--warmup", f.warmup, "steps left out of host predictions and calibration")->check(CLI::Range(0, 1 << 20));
  app.add_option("--comm-bench", f.comm_bench, "moe_comm_bench binary for --validate (default: next to this one)");
  app.add_flag("--validate", f.validate, "predict this machine's loopback runs at 1, 2, 4 ranks and compare");
  app.add_flag("--verbose", f.verbose, "progress lines of the trainer");
  if (const int rc = moe::launch::ParseFlags(app, argc, argv); rc >= 0) return rc;
  moe::blas::SetThreads(1);

  auto cfg = moe::LoadConfig(f.config);
  if (!cfg.ok()) return Fail(cfg.status().ToString(), 2);
  if (f.steps > 0) cfg->mutable_train()->set_steps(f.steps);
  if (!f.data.empty()) cfg->mutable_train()->set_data_path(f.data);
  moe::launch::ApplyComputeFlags(f.compute, cfg->mutable_compute());
  if (Status s = moe::ValidateConfig(*cfg); !s.ok()) return Fail(s.WithContext("config " + f.config).ToString(), 2);
  if (!(f.efficiency > 0 && f.efficiency <= 1)) return Fail("--efficiency=" + std::to_string(f.efficiency) + " must be in (0, 1]", 2);
  if (f.bench_alltoall.empty() != f.bench_allreduce.empty()) {
    return Fail("--bench-alltoall and --bench-allreduce go together", 2);
  }
  std::error_code ec;
  std::filesystem::create_directories(f.out, ec);
  if (ec) return Fail("--out " + f.out + ": " + ec.message(), 2);
  if (f.validate) return Validate(f, *cfg, argv[0]);

  moe::config::TopologyConfig target;
  std::optional<moe::CostModel> model;
  if (!f.topology.empty()) {
    auto t = moe::LoadTopology(f.topology);
    if (!t.ok()) return Fail(t.status().ToString(), 2);
    target = *t;
    const int p = f.gpus_per_node > 0 ? f.gpus_per_node : std::min(target.gpus_per_node(), f.ranks);
    if (f.ranks % p != 0) {
      return Fail("--ranks=" + std::to_string(f.ranks) + " must be a multiple of the ranks per node (" +
                  std::to_string(p) + ", topology.gpus_per_node or --gpus-per-node)", 2);
    }
    const int64_t cluster_ranks = static_cast<int64_t>(target.nodes()) * target.gpus_per_node();
    if (f.ranks > cluster_ranks) {
      return Fail("--ranks=" + std::to_string(f.ranks) + " exceeds topology " + target.name() +
                  " (nodes * gpus_per_node = " + std::to_string(cluster_ranks) + ")", 2);
    }
    target.set_gpus_per_node(p);
    target.set_nodes(f.ranks / p);
    moe::CostModelOptions o;
    o.gemm_efficiency = f.efficiency;
    auto m = moe::CostModel::Create(target, f.ranks, o);
    if (!m.ok()) return Fail(m.status().ToString(), 2);
    model.emplace(*m);
  }
  moe::HostModel host;
  if (!f.bench_alltoall.empty()) {
    host.cores = f.cores;
    auto a = moe::FitBenchFile(f.bench_alltoall);
    if (!a.ok()) return Fail(a.status().ToString(), 2);
    auto r = moe::FitBenchFile(f.bench_allreduce);
    if (!r.ok()) return Fail(r.status().ToString(), 2);
    host.alltoall = *a;
    host.allreduce = *r;
  }

  auto run = moe::RunSimulation(*cfg, f.ranks, !f.verbose);
  if (!run.ok()) return Fail(run.status().ToString(), run.status().code() == moe::StatusCode::kInvalidArgument ? 2 : 1);
  for (const auto& [name, text] : {std::pair<const char*, std::string>{"measured.json", moe::MeasuredJson(*run, *cfg)},
                                    {"expert_load.svg", moe::ExpertLoadSvg(*run)},
                                    {"rank_time.svg", moe::RankTimeSvg(*run)}}) {
    if (Status s = WriteOut(f.out, name, text); !s.ok()) return Fail(s.ToString(), 1);
  }
  const auto& last = run->metrics(run->num_steps() - 1, 0);
  std::printf("moe_simulate: %d ranks, %d steps, final loss %.6f, drop %.1f%%, imbalance %.2f\n", f.ranks,
              run->num_steps(), last.loss(), 100 * last.drop_fraction(), last.imbalance());
  std::printf("measured (mean per step, this machine):\n%6s %12s %12s %12s\n", "rank", "experts_ms", "a2a_ms", "step_ms");
  for (int r = 0; r < f.ranks; ++r) {
    double e = 0, a = 0, st = 0;
    for (int s = 0; s < run->num_steps(); ++s) {
      e += run->metrics(s, r).expert_seconds() / run->num_steps();
      a += run->metrics(s, r).alltoall_seconds() / run->num_steps();
      st += run->metrics(s, r).step_seconds() / run->num_steps();
    }
    std::printf("%6d %12.3f %12.3f %12.3f\n", r, e * 1e3, a * 1e3, st * 1e3);
  }
  std::printf("wrote %s/measured.json, expert_load.svg, rank_time.svg\n", f.out.c_str());

  if (!f.bench_alltoall.empty()) {
    auto cal = Calibrate(*cfg, f.ranks, f);
    if (!cal.ok()) return Fail(cal.status().ToString(), 1);
    auto v = moe::PredictHost(*run, host, *cal, f.warmup);
    if (!v.ok()) return Fail(v.status().ToString(), 1);
    std::printf("this host (%d cores), predicted vs this run (per step):\n", host.cores);
    PrintHostHeader();
    PrintHost(*v);
    if (Status s = WriteOut(f.out, "host_predicted.json", moe::HostPredictionJson(*v, host, *cal)); !s.ok()) {
      return Fail(s.ToString(), 1);
    }
    std::printf("wrote %s/host_predicted.json\n", f.out.c_str());
  }
  if (!model) return 0;

  auto flat = moe::PredictCluster(*run, *cfg, *model, false);
  auto hier = moe::PredictCluster(*run, *cfg, *model, true);
  if (!flat.ok() || !hier.ok()) return Fail((flat.ok() ? hier.status() : flat.status()).ToString(), 1);
  const int pipeline_degree = cfg->parallel().pipeline_degree();
  std::printf(
      "predicted on %s as %d node(s) x %d GPU(s), pipeline degree %d (mean per step, microseconds; "
      "dispatch, combine and experts are the serial sums over forward + backward and all layers, "
      "overlap what the pipeline hides of them; step = their sum + other - overlap):\n",
      target.name().c_str(), target.nodes(), target.gpus_per_node(), pipeline_degree);
  std::printf("%-14s %12s %12s %12s %12s %12s %12s\n", "all-to-all", "dispatch", "combine",
              "experts", "other", "overlap", "step");
  for (const auto& [name, p] : {std::pair<const char*, moe::StepPrediction>{"flat", *flat}, {"hierarchical", *hier}}) {
    std::printf("%-14s %12.3f %12.3f %12.3f %12.3f %12.3f %12.3f\n", name, p.dispatch_seconds * 1e6,
                p.combine_seconds * 1e6, p.experts_seconds * 1e6, p.other_seconds * 1e6,
                p.overlap_seconds * 1e6, p.total() * 1e6);
  }
  if (Status s = WriteOut(
          f.out, "predicted.json",
          moe::PredictedJson(target, f.ranks, f.efficiency, pipeline_degree, *flat, *hier));
      !s.ok()) {
    return Fail(s.ToString(), 1);
  }
  std::printf("wrote %s/predicted.json\n", f.out.c_str());
  return 0;
}
