// moe_simulate's job (runtime/sim/simulate_job.h): the simulation, its outputs and the tables.
#include "runtime/sim/simulate_job.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <sstream>
#include <utility>
#include <vector>

#include "runtime/config/memory_model.h"
#include "base/file.h"
#include "runtime/config/config.h"
#include "runtime/sim/cost_model.h"
#include "runtime/sim/simulate.h"

namespace moe {
namespace {

// A file named by a flag that cannot be read or parsed is bad input (exit code 2), whatever the
// reason.
Status AsInputError(const Status& s) {
  return s.ok() || s.code() == StatusCode::kInvalidArgument ? s : InvalidArgument(s.message());
}

// Writes DIR/name atomically (a failure names the file and the reason).
Status WriteOut(const std::string& dir, const std::string& name, const std::string& text) {
  return WriteFileAtomically(dir + "/" + name, text);
}

// 1-rank runs at the batch per rank of 1, 2 and 4 ranks (and the run's own, when different).
StatusOr<ComputeCalibration> Calibrate(const MoeConfig& cfg, int ranks, const SimulateJobOptions& o,
                                       const comm::WorldFactory& make_world) {
  std::vector<int64_t> tokens;
  for (int n : {1, 2, 4, ranks}) {
    const int64_t t = cfg.train().global_batch_tokens() / n;
    if (t > 0 && std::find(tokens.begin(), tokens.end(), t) == tokens.end()) tokens.push_back(t);
  }
  return CalibrateCompute(cfg, tokens, o.warmup + o.calibration_steps, o.warmup, make_world);
}

void PrintHost(const HostValidation& v) {
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

// Loopback rows of the validation: moe_comm_bench sweeps -> alpha, beta; then the runs.
Status Validate(const MoeConfig& cfg, const SimulateJobOptions& o, const comm::WorldFactory& make_world) {
  MOE_ASSIGN_OR_RETURN(const ComputeCalibration cal, Calibrate(cfg, 4, o, make_world));
  std::printf("compute calibration (1-rank loopback runs at %zu batch sizes): %.3f ms + %.3f us/token + %.3f us/expert row\n",
              cal.tokens.size(), cal.fixed_seconds * 1e3, cal.per_token_seconds * 1e6, cal.per_row_seconds * 1e6);
  PrintHostHeader();
  std::ostringstream js;
  js << "{\"backend\": \"loopback\", \"cores\": " << o.cores << ", \"rows\": [";
  int i = 0;
  for (int ranks : {1, 2, 4}) {
    HostModel host;
    host.cores = o.cores;
    for (const char* op : {"alltoall", "allreduce"}) {
      const std::string out = o.out + "/bench_loopback_" + op + "_" + std::to_string(ranks) + ".jsonl";
      const std::string cmd = "'" + o.comm_bench + "' --backend loopback --ranks " + std::to_string(ranks) + " --op " + op +
                              (std::string(op) == "alltoall" ? " -d float32 -b 1K -e 1M" : " -d float64 -b 8 -e 1M") +
                              " -f 2 -n 50 -w 5 -c 0 -J '" + out + "' > /dev/null";
      std::remove(out.c_str());
      if (std::system(cmd.c_str()) != 0) return Internal("sweep failed: " + cmd);
      MOE_ASSIGN_OR_RETURN(const CallCost fit, FitBenchFile(out));
      (std::string(op) == "alltoall" ? host.alltoall : host.allreduce) = fit;
    }
    MOE_ASSIGN_OR_RETURN(const SimulationResult run, RunSimulation(cfg, ranks, true, make_world));
    MOE_ASSIGN_OR_RETURN(const HostValidation v, PredictHost(run, host, cal, o.warmup));
    PrintHost(v);
    js << (i++ ? ",\n  " : "\n  ") << HostPredictionJson(v, host, cal);
  }
  js << "]}\n";
  MOE_RETURN_IF_ERROR(WriteOut(o.out, "validate.json", js.str()));
  std::printf("wrote %s/validate.json\n", o.out.c_str());
  return Status::Ok();
}

// The target cluster of --topology, with the simulated ranks placed node-major on it.
StatusOr<std::pair<config::TopologyConfig, CostModel>> TargetModel(const SimulateJobOptions& o) {
  StatusOr<config::TopologyConfig> loaded = LoadTopology(o.topology);
  MOE_RETURN_IF_ERROR(AsInputError(loaded.status()));
  config::TopologyConfig target = std::move(loaded).value();
  const int p = o.gpus_per_node > 0 ? o.gpus_per_node : std::min(target.gpus_per_node(), o.ranks);
  if (o.ranks % p != 0) {
    return InvalidArgument("--ranks=" + std::to_string(o.ranks) + " must be a multiple of the ranks per node (" +
                           std::to_string(p) + ", topology.gpus_per_node or --gpus-per-node)");
  }
  const int64_t cluster_ranks = static_cast<int64_t>(target.nodes()) * target.gpus_per_node();
  if (o.ranks > cluster_ranks) {
    return InvalidArgument("--ranks=" + std::to_string(o.ranks) + " exceeds topology " + target.name() +
                           " (nodes * gpus_per_node = " + std::to_string(cluster_ranks) + ")");
  }
  target.set_gpus_per_node(p);
  target.set_nodes(o.ranks / p);
  CostModelOptions mo;
  mo.gemm_efficiency = o.efficiency;
  MOE_ASSIGN_OR_RETURN(CostModel model, CostModel::Create(target, o.ranks, mo));
  return std::make_pair(std::move(target), std::move(model));
}

void PrintMeasured(const SimulationResult& run, int ranks) {
  const auto& last = run.metrics(run.num_steps() - 1, 0);
  std::printf("moe_simulate: %d ranks, %d steps, final loss %.6f, drop %.1f%%, imbalance %.2f\n", ranks,
              run.num_steps(), last.loss(), 100 * last.drop_fraction(), last.imbalance());
  std::printf("measured (mean per step, this machine):\n%6s %12s %12s %12s\n", "rank", "experts_ms", "a2a_ms", "step_ms");
  for (int r = 0; r < ranks; ++r) {
    double e = 0, a = 0, st = 0;
    for (int s = 0; s < run.num_steps(); ++s) {
      e += run.metrics(s, r).expert_seconds() / run.num_steps();
      a += run.metrics(s, r).alltoall_seconds() / run.num_steps();
      st += run.metrics(s, r).step_seconds() / run.num_steps();
    }
    std::printf("%6d %12.3f %12.3f %12.3f\n", r, e * 1e3, a * 1e3, st * 1e3);
  }
}

Status PredictTarget(const SimulationResult& run, const MoeConfig& cfg, const SimulateJobOptions& o,
                     const config::TopologyConfig& target, const CostModel& model) {
  MOE_ASSIGN_OR_RETURN(const StepPrediction flat, PredictCluster(run, cfg, model, false));
  MOE_ASSIGN_OR_RETURN(const StepPrediction hier, PredictCluster(run, cfg, model, true));
  const int pipeline_degree = cfg.parallel().pipeline_degree();
  std::printf(
      "predicted on %s as %d node(s) x %d GPU(s), pipeline degree %d (mean per step, microseconds; "
      "dispatch, combine and experts are the serial sums over forward + backward and all layers, "
      "overlap what the pipeline hides of them; step = their sum + other - overlap):\n",
      target.name().c_str(), target.nodes(), target.gpus_per_node(), pipeline_degree);
  std::printf("%-14s %12s %12s %12s %12s %12s %12s\n", "all-to-all", "dispatch", "combine",
              "experts", "other", "overlap", "step");
  // The two-stage row prices the job's node-deduplicated dispatches as such where it ran them.
  const bool dedup = cfg.parallel().node_dedup() && cfg.comm().ranks_per_node() == model.gpus_per_node();
  for (const auto& [name, p] : {std::pair<const char*, StepPrediction>{"flat", flat},
                                {dedup ? "hier. dedup" : "hierarchical", hier}}) {
    std::printf("%-14s %12.3f %12.3f %12.3f %12.3f %12.3f %12.3f\n", name, p.dispatch_seconds * 1e6,
                p.combine_seconds * 1e6, p.experts_seconds * 1e6, p.other_seconds * 1e6,
                p.overlap_seconds * 1e6, p.total() * 1e6);
  }
  const NodeTraffic node = MeanNodeTraffic(run, target.gpus_per_node());
  std::printf(
      "dispatch + combine rows per rank and step (mean): %.1f KB to its node's other ranks, %.1f KB "
      "to other nodes%s\n",
      node.intra_bytes / 1024.0, node.inter_bytes / 1024.0,
      cfg.moe().router().num_expert_groups() > 1
          ? (" (group-limited: " + std::to_string(cfg.moe().router().groups_per_token()) + " of " +
             std::to_string(cfg.moe().router().num_expert_groups()) + " expert groups per token)")
                .c_str()
          : "");
  MOE_RETURN_IF_ERROR(WriteOut(o.out, "predicted.json",
                               PredictedJson(target, o.ranks, o.efficiency, pipeline_degree, flat, hier)));
  std::printf("wrote %s/predicted.json\n", o.out.c_str());
  return Status::Ok();
}

}  // namespace

StatusOr<bool> AccountPadding(const config::MoeConfig& cfg, const SimulateJobOptions& o, int ranks) {
  if (o.padding == "materialize") return false;
  const bool cpu = cfg.compute().device() != config::CUDA;
  if (o.padding == "account") {
    if (!cpu) return InvalidArgument("--padding account needs compute.device CPU");
    return true;
  }
  if (o.padding == "auto") return cpu && ranks > 64;
  return InvalidArgument("--padding=" + o.padding + " must be auto, materialize or account");
}

Status RunSimulateJob(const MoeConfig& cfg, const SimulateJobOptions& o, const comm::WorldFactory& make_world) {
  if (!(o.efficiency > 0 && o.efficiency <= 1)) {
    return InvalidArgument("--efficiency=" + std::to_string(o.efficiency) + " must be in (0, 1]");
  }
  if (o.bench_alltoall.empty() != o.bench_allreduce.empty()) {
    return InvalidArgument("--bench-alltoall and --bench-allreduce go together");
  }
  {
    // Every simulated rank lives in this process: refuse what does not fit before writing.
    MOE_ASSIGN_OR_RETURN(const bool accounted, AccountPadding(cfg, o, o.ranks));
    MemoryEstimate all;
    all.AddAll(TrainRankMemory(cfg, o.ranks, accounted), o.ranks);
    all.AddAll(SimulatorMemory(cfg, o.ranks), 1);
    MOE_RETURN_IF_ERROR(CheckMemory(
        all, o.max_memory > 0 ? o.max_memory : AvailableMemoryBytes(),
        "this simulation (" + std::to_string(o.ranks) + " ranks in one process)",
        o.max_memory > 0 ? "--max-memory" : "the available memory", "--max-memory"));
  }
  std::error_code ec;
  std::filesystem::create_directories(o.out, ec);
  if (ec) return InvalidArgument("--out " + o.out + ": " + ec.message());
  if (o.validate) return Validate(cfg, o, make_world);

  std::optional<std::pair<config::TopologyConfig, CostModel>> target;
  if (!o.topology.empty()) {
    MOE_ASSIGN_OR_RETURN(auto made, TargetModel(o));
    target.emplace(std::move(made));
  }
  HostModel host;
  if (!o.bench_alltoall.empty()) {
    host.cores = o.cores;
    for (const auto& [path, cost] : {std::pair{&o.bench_alltoall, &host.alltoall},
                                      std::pair{&o.bench_allreduce, &host.allreduce}}) {
      StatusOr<CallCost> fit = FitBenchFile(*path);
      MOE_RETURN_IF_ERROR(AsInputError(fit.status()));
      *cost = *fit;
    }
  }

  MOE_ASSIGN_OR_RETURN(const bool account_padding, AccountPadding(cfg, o, o.ranks));
  if (account_padding) {
    std::printf("moe_simulate: capacity padding accounted, not materialized (--padding %s)\n",
                o.padding.c_str());
  }
  MOE_ASSIGN_OR_RETURN(const SimulationResult run,
                       RunSimulation(cfg, o.ranks, !o.verbose, make_world, account_padding));
  for (const auto& [name, text] : {std::pair<const char*, std::string>{"measured.json", MeasuredJson(run, cfg)},
                                    {"expert_load.svg", ExpertLoadSvg(run)},
                                    {"rank_time.svg", RankTimeSvg(run)}}) {
    MOE_RETURN_IF_ERROR(WriteOut(o.out, name, text));
  }
  PrintMeasured(run, o.ranks);
  std::printf("wrote %s/measured.json, expert_load.svg, rank_time.svg\n", o.out.c_str());

  if (!o.bench_alltoall.empty()) {
    MOE_ASSIGN_OR_RETURN(const ComputeCalibration cal, Calibrate(cfg, o.ranks, o, make_world));
    MOE_ASSIGN_OR_RETURN(const HostValidation v, PredictHost(run, host, cal, o.warmup));
    std::printf("this host (%d cores), predicted vs this run (per step):\n", host.cores);
    PrintHostHeader();
    PrintHost(v);
    MOE_RETURN_IF_ERROR(WriteOut(o.out, "host_predicted.json", HostPredictionJson(v, host, cal)));
    std::printf("wrote %s/host_predicted.json\n", o.out.c_str());
  }
  if (!target) return Status::Ok();
  MOE_RETURN_IF_ERROR(PredictTarget(run, cfg, o, target->first, target->second));
  if (cfg.parallel().num_redundant_experts() <= 0) return Status::Ok();
  // The same job without redundant experts, on the same cluster: what the replicas buy.
  MoeConfig plain = cfg;
  plain.mutable_parallel()->set_num_redundant_experts(0);
  plain.mutable_parallel()->set_rebalance_every(0);
  if (Status s = ValidateForWorld(plain, o.ranks); !s.ok()) {
    std::printf("without redundant experts: not simulated (%s)\n", s.message().c_str());
    return Status::Ok();
  }
  MOE_ASSIGN_OR_RETURN(const SimulationResult without,
                       RunSimulation(plain, o.ranks, !o.verbose, make_world, account_padding));
  for (const bool hier : {false, true}) {
    MOE_ASSIGN_OR_RETURN(const StepPrediction with_r, PredictCluster(run, cfg, target->second, hier));
    MOE_ASSIGN_OR_RETURN(const StepPrediction no_r,
                         PredictCluster(without, plain, target->second, hier));
    std::printf(
        "redundant experts (%s all-to-all): step %.3f us with %d redundant experts (experts %.3f, "
        "dispatch + combine %.3f), %.3f us without (experts %.3f, dispatch + combine %.3f): "
        "x%.3f\n",
        hier ? "hierarchical" : "flat", with_r.total() * 1e6, cfg.parallel().num_redundant_experts(),
        with_r.experts_seconds * 1e6, (with_r.dispatch_seconds + with_r.combine_seconds) * 1e6,
        no_r.total() * 1e6, no_r.experts_seconds * 1e6,
        (no_r.dispatch_seconds + no_r.combine_seconds) * 1e6,
        with_r.total() > 0 ? no_r.total() / with_r.total() : 0.0);
  }
  return Status::Ok();
}

}  // namespace moe
