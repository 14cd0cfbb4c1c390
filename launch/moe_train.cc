// moe_train: trains the byte-level MoE language model with expert parallelism.
//
//   mpirun -n N moe_train --config configs/tiny_lm.textproto          (MPI, one process per rank)
//   moe_train --config configs/tiny_lm.textproto --backend loopback --ranks N   (threads)
//   moe_train --config x.textproto --backend nccl --ranks N --device cuda   (threads, a GPU each)
//
// A thin main: flags and config, a world (comm/world.h), then runtime/train/trainer.h on every rank.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "base/memory.h"
#include "comm/world.h"
#include "experts/cpu/blas.h"
#include "runtime/config/flags.h"
#include "runtime/config/config.h"
#include "runtime/config/memory_model.h"
#include "runtime/train/fault_injection.h"
#include "runtime/train/trainer.h"

namespace {

struct Flags {
  std::string config;
  std::string backend;
  int ranks = 1;
  bool resume = false;
  int local_groups = 0;
  int pipeline_degree = 0;
  std::string exchange;  // "", "capacity" or "real-rows"
  std::string transport;  // "", "auto", "alltoall" or "direct"
  int redundant_experts = -1;
  int rebalance_every = -1;
  int checkpoint_every = -1;
  bool node_dedup = false;
  int ranks_per_node = -1;
  int steps = -1;
  std::string metrics, checkpoint_dir, data, router_record_dir, router_replay_dir, max_memory;
  bool quiet = false;
  int log_every = 1;
  double deadline = -1;
  std::string inject_fault;
  moe::flags::ComputeFlags compute;
};

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "moe_train: %s\n", message.c_str());
  return code;
}

moe::StatusOr<moe::MoeConfig> LoadWithOverrides(const Flags& f) {
  MOE_ASSIGN_OR_RETURN(moe::MoeConfig cfg, moe::LoadConfig(f.config));
  if (f.local_groups > 0) cfg.mutable_moe()->mutable_router()->set_num_local_groups(f.local_groups);
  if (f.pipeline_degree > 0) cfg.mutable_parallel()->set_pipeline_degree(f.pipeline_degree);
  if (!f.exchange.empty()) cfg.mutable_parallel()->set_dropless_exchange(f.exchange == "real-rows");
  if (!f.transport.empty()) {
    cfg.mutable_parallel()->set_exchange_transport(f.transport == "direct"     ? moe::config::DIRECT
                                                   : f.transport == "alltoall" ? moe::config::ALLTOALL
                                                                               : moe::config::AUTO);
  }
  if (f.redundant_experts >= 0) {
    cfg.mutable_parallel()->set_num_redundant_experts(f.redundant_experts);
    if (f.redundant_experts == 0 && f.rebalance_every < 0) {
      cfg.mutable_parallel()->set_rebalance_every(0);  // nothing to rebalance
    }
  }
  if (f.rebalance_every >= 0) cfg.mutable_parallel()->set_rebalance_every(f.rebalance_every);
  if (f.ranks_per_node >= 0) cfg.mutable_comm()->set_ranks_per_node(f.ranks_per_node);
  if (f.steps >= 0) cfg.mutable_train()->set_steps(f.steps);
  if (!f.metrics.empty()) cfg.mutable_train()->set_metrics_path(f.metrics);
  if (!f.router_record_dir.empty()) cfg.mutable_train()->set_router_record_dir(f.router_record_dir);
  if (!f.router_replay_dir.empty()) cfg.mutable_train()->set_router_replay_dir(f.router_replay_dir);
  if (!f.checkpoint_dir.empty()) cfg.mutable_train()->set_checkpoint_dir(f.checkpoint_dir);
  if (f.checkpoint_every >= 0) cfg.mutable_train()->set_checkpoint_every(f.checkpoint_every);
  if (f.node_dedup) cfg.mutable_parallel()->set_node_dedup(true);
  if (!f.data.empty()) cfg.mutable_train()->set_data_path(f.data);
  if (f.deadline >= 0) cfg.mutable_comm()->set_deadline_seconds(f.deadline);
  moe::flags::ApplyComputeFlags(f.compute, cfg.mutable_compute());
  MOE_RETURN_IF_ERROR(moe::ValidateConfig(cfg).WithContext("config " + f.config));
  return cfg;
}

moe::StatusOr<moe::TrainOptions> MakeOptions(const Flags& f, bool process_per_rank) {
  moe::TrainOptions options;
  options.resume = f.resume;
  options.quiet = f.quiet;
  options.log_every = f.log_every;
  if (!f.inject_fault.empty()) {
    MOE_ASSIGN_OR_RETURN(const moe::FaultSpec spec, moe::ParseFaultSpec(f.inject_fault));
    options.after_backward = moe::MakeFaultHook(spec, process_per_rank);
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Trains a byte-level MoE language model with expert parallelism."};
  Flags f;
  app.add_option("--config", f.config, "training config (.textproto)")->required();
  app.add_option("--backend", f.backend,
                 "mpi (under mpirun), loopback (ranks as threads) or nccl (ranks as threads, "
                 "the layers' exchanges over NCCL with one GPU per rank; needs --device cuda); "
                 "default: mpi when started by mpirun, else loopback")
      ->check(CLI::IsMember({"mpi", "loopback", "nccl"}));
  app.add_option("--ranks", f.ranks, "ranks for the loopback backend")->check(CLI::Range(1, 1024));
  app.add_flag("--resume", f.resume,
               "continue from the newest complete checkpoint in train.checkpoint_dir");
  app.add_option("--local-groups", f.local_groups, "override moe.router.num_local_groups")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option(
         "--pipeline-degree", f.pipeline_degree,
         "override parallel.pipeline_degree (chunks per exchange, overlapped with the experts)")
      ->check(CLI::Range(1, 16));
  app.add_option("--exchange", f.exchange,
                 "override parallel.dropless_exchange: capacity (every (expert, group) block "
                 "travels and is computed as C rows, padding included) or real-rows (counts "
                 "first, then the kept rows only; the same routing and results)")
      ->check(CLI::IsMember({"capacity", "real-rows"}));
  app.add_option("--exchange-transport", f.transport,
                 "override parallel.exchange_transport: auto (direct writes where the group's "
                 "ranks share a node), alltoall or direct (the same results)")
      ->check(CLI::IsMember({"auto", "alltoall", "direct"}));
  app.add_option("--redundant-experts", f.redundant_experts,
                 "override parallel.num_redundant_experts (replicas of hot experts; 0: none)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--rebalance-every", f.rebalance_every,
                 "override parallel.rebalance_every (steps between placements; 0: never)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--ranks-per-node", f.ranks_per_node,
                 "override comm.ranks_per_node (> 0: the two-stage all-to-all; 0: flat)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--steps", f.steps, "override train.steps")->check(CLI::NonNegativeNumber);
  app.add_option("--metrics", f.metrics, "override train.metrics_path (JSON lines)");
  app.add_option("--router-record-dir", f.router_record_dir,
                 "override train.router_record_dir (write each step's router selections)");
  app.add_option("--router-replay-dir", f.router_replay_dir,
                 "override train.router_replay_dir (route by a recorded run's selections)");
  app.add_option("--checkpoint-dir", f.checkpoint_dir, "override train.checkpoint_dir");
  app.add_flag("--node-dedup", f.node_dedup,
               "set parallel.node_dedup: the two-stage exchange's dispatch sends a token to each "
               "other node once (needs --ranks-per-node)");
  app.add_option("--checkpoint-every", f.checkpoint_every,
                 "override train.checkpoint_every (> 0: also save every N steps; 0: the last only)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--data", f.data, "override train.data_path");
  app.add_option("--max-memory", f.max_memory,
                 "memory of this machine for the job's ranks on it (e.g. 16G; default: the "
                 "available memory); a rank whose estimate is above its share is refused");
  app.add_flag("--quiet", f.quiet, "no progress lines");
  app.add_option("--log-every", f.log_every, "a progress line every N steps")
      ->check(CLI::Range(1, 1 << 30));
  app.add_option("--deadline", f.deadline,
                 "override comm.deadline_seconds (every collective's deadline)")
      ->check(CLI::Range(0.001, 1e6));
  moe::flags::AddComputeFlags(app, &f.compute);
  app.add_option(
         "--inject-fault", f.inject_fault,
         "testing: KIND@RANK:STEP with KIND stall, exit or nan (see README, failure behaviour)")
      ->group("Testing");
  if (const int rc = moe::flags::ParseFlags(app, argc, argv); rc >= 0) return rc;
  moe::blas::SetThreads(1);
  if (f.backend.empty()) f.backend = moe::comm::DefaultBackend();
  // Under mpirun every process loads the config; only the job's rank 0 reports a bad one.
  auto cfg = LoadWithOverrides(f);
  if (!cfg.ok()) return moe::comm::LauncherRank() == 0 ? Fail(cfg.status().ToString(), 2) : 2;
  auto options = MakeOptions(f, /*process_per_rank=*/f.backend == "mpi");
  if (options.ok() && !f.max_memory.empty()) {
    moe::StatusOr<int64_t> bytes = moe::ParseByteSize("--max-memory", f.max_memory);
    if (bytes.ok()) {
      options->max_memory = *bytes;
    } else {
      options = bytes.status();
    }
  }
  if (!options.ok()) {
    return moe::comm::LauncherRank() == 0 ? Fail(options.status().ToString(), 2) : 2;
  }
  const bool nccl = f.backend == "nccl";
  if (nccl && cfg->compute().device() != moe::config::CUDA) {
    return Fail("--backend nccl: the layers' exchanges run over NCCL on GPUs; set --device cuda "
                "(compute.device=CUDA)", 2);
  }
  if (nccl && f.ranks > moe::CudaDeviceCount()) {
    return Fail("--backend nccl: --ranks " + std::to_string(f.ranks) + " needs " +
                std::to_string(f.ranks) + " GPUs (NCCL takes one per rank), " +
                std::to_string(moe::CudaDeviceCount()) + " visible; --backend loopback shares one",
                2);
  }
  moe::comm::WorldOptions w;
  // nccl: the trainer's own collectives (gradients, statistics) on host memory over loopback
  // threads; the layers' expert-parallel groups are NCCL communicators made over them, rank r
  // on GPU r (compute.gpu -1).
  w.backend = nccl ? "loopback" : f.backend;
  w.ranks = f.ranks;
  w.options.deadline_seconds = cfg->comm().deadline_seconds();
  // compute.device=CUDA on loopback threads: the device-resident layers exchange over the same
  // ranks in device memory, several on one GPU (NCCL would refuse that). Without a GPU the trainer
  // says so.
  w.device_twin = cfg->compute().device() == moe::config::CUDA && !nccl;
  w.tool = "moe_train";
  auto world = moe::comm::MakeWorld(w);
  if (!world.ok()) return Fail(world.status().ToString(), moe::comm::ExitCodeOf(world.status()));
  const moe::Status s = (*world)->Run([&](moe::comm::RankContext& rank) -> moe::Status {
    moe::TrainOptions rank_options = *options;
    // The ranks sharing this machine's memory: the threads of this process, or the processes
    // mpirun started on this node.
    rank_options.ranks_sharing_memory = rank.comm.local_size();
    rank_options.device_communicators = rank.device;
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<moe::Trainer> trainer,
                         moe::Trainer::Create(*cfg, &rank.comm, rank_options));
    return trainer->Run();
  });
  return s.ok() ? 0 : moe::comm::ExitCodeOf(s);
}
