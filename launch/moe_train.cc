// moe_train: trains the byte-level MoE language model with expert parallelism.
//
//   mpirun -n N moe_train --config configs/tiny_lm.textproto          (MPI, one process per rank)
//   moe_train --config configs/tiny_lm.textproto --backend loopback --ranks N   (threads)
//
// A thin main: flags, config, communicator, then runtime::Trainer.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "comm/loopback/loopback_world.h"
#include "experts/cpu/blas.h"
#include "runtime/config.h"
#include "runtime/trainer.h"
#if MOE_COMM_HAVE_MPI
#include <mpi.h>

#include "comm/mpi/mpi_communicator.h"
#endif

namespace {

struct Flags {
  std::string config;
  std::string backend;
  int ranks = 1;
  bool resume = false;
  int local_groups = 0;
  int steps = -1;
  std::string metrics, checkpoint_dir, data;
  bool quiet = false;
  int log_every = 1;
};

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "moe_train: %s\n", message.c_str());
  return code;
}

moe::StatusOr<moe::MoeConfig> LoadWithOverrides(const Flags& f) {
  MOE_ASSIGN_OR_RETURN(moe::MoeConfig cfg, moe::LoadConfig(f.config));
  if (f.local_groups > 0) cfg.mutable_moe()->mutable_router()->set_num_local_groups(f.local_groups);
  if (f.steps >= 0) cfg.mutable_train()->set_steps(f.steps);
  if (!f.metrics.empty()) cfg.mutable_train()->set_metrics_path(f.metrics);
  if (!f.checkpoint_dir.empty()) cfg.mutable_train()->set_checkpoint_dir(f.checkpoint_dir);
  if (!f.data.empty()) cfg.mutable_train()->set_data_path(f.data);
  MOE_RETURN_IF_ERROR(moe::ValidateConfig(cfg).WithContext("config " + f.config));
  return cfg;
}

int RunLoopback(const Flags& f, const moe::MoeConfig& cfg) {
  moe::comm::LoopbackOptions opts;
  opts.options.deadline_seconds = cfg.comm().deadline_seconds();
  auto world = moe::comm::LoopbackWorld::Create(f.ranks, opts);
  if (!world.ok()) return Fail(world.status().ToString(), 2);
  std::mutex mu;
  std::vector<moe::Status> status(static_cast<size_t>(f.ranks));
  world->RunPerRank([&](moe::comm::Communicator& comm) {
    moe::TrainOptions options;
    options.resume = f.resume;
    options.quiet = f.quiet;
    options.log_every = f.log_every;
    auto trainer = moe::Trainer::Create(cfg, &comm, options);
    moe::Status s = trainer.ok() ? (*trainer)->Run() : trainer.status();
    std::lock_guard<std::mutex> lock(mu);
    status[static_cast<size_t>(comm.rank())] = s;
  });
  for (int r = 0; r < f.ranks; ++r) {
    if (!status[static_cast<size_t>(r)].ok()) {
      const auto& s = status[static_cast<size_t>(r)];
      return Fail("rank " + std::to_string(r) + ": " + s.ToString(),
                  s.code() == moe::StatusCode::kInvalidArgument ? 2 : 1);
    }
  }
  return 0;
}

#if MOE_COMM_HAVE_MPI
int RunMpi(const Flags& f, const moe::MoeConfig& cfg) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  moe::comm::Options opts;
  opts.deadline_seconds = cfg.comm().deadline_seconds();
  auto world = moe::comm::MpiCommunicator::Create(MPI_COMM_WORLD, opts);
  if (!world.ok()) {
    Fail("rank " + std::to_string(rank) + ": " + world.status().ToString(), 1);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  moe::TrainOptions options;
  options.resume = f.resume;
  options.quiet = f.quiet;
  options.log_every = f.log_every;
  auto trainer = moe::Trainer::Create(cfg, world->get(), options);
  moe::Status s = trainer.ok() ? (*trainer)->Run() : trainer.status();
  if (!s.ok()) {
    // A failed rank cannot promise its peers another collective: stop the whole job now, so no
    // rank waits for one that has gone (MPI_Abort ends every process of the job).
    Fail("rank " + std::to_string(rank) + ": " + s.ToString(), 1);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, s.code() == moe::StatusCode::kInvalidArgument ? 2 : 1);
  }
  trainer->reset();
  world->reset();
  MPI_Finalize();
  return 0;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Trains a byte-level MoE language model with expert parallelism."};
  Flags f;
  app.add_option("--config", f.config, "training config (.textproto)")->required();
  app.add_option("--backend", f.backend, "mpi (under mpirun) or loopback (ranks as threads); default: mpi when "
                                         "started by mpirun, else loopback")
      ->check(CLI::IsMember({"mpi", "loopback"}));
  app.add_option("--ranks", f.ranks, "ranks for the loopback backend")->check(CLI::Range(1, 1024));
  app.add_flag("--resume", f.resume, "continue from the newest complete checkpoint in train.checkpoint_dir");
  app.add_option("--local-groups", f.local_groups, "override moe.router.num_local_groups")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--steps", f.steps, "override train.steps")->check(CLI::NonNegativeNumber);
  app.add_option("--metrics", f.metrics, "override train.metrics_path (JSON lines)");
  app.add_option("--checkpoint-dir", f.checkpoint_dir, "override train.checkpoint_dir");
  app.add_option("--data", f.data, "override train.data_path");
  app.add_flag("--quiet", f.quiet, "no progress lines");
  app.add_option("--log-every", f.log_every, "a progress line every N steps")->check(CLI::Range(1, 1 << 30));
  CLI11_PARSE(app, argc, argv);
  moe::blas::SetThreads(1);
  const bool under_mpirun = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr;
  if (f.backend.empty()) f.backend = under_mpirun ? "mpi" : "loopback";
  if (f.backend == "mpi") {
#if MOE_COMM_HAVE_MPI
    MPI_Init(&argc, &argv);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    auto cfg = LoadWithOverrides(f);
    if (!cfg.ok()) {
      if (rank == 0) Fail(cfg.status().ToString(), 2);
      MPI_Finalize();
      return 2;
    }
    return RunMpi(f, *cfg);
#else
    return Fail("--backend mpi: this build has no MPI (configure with MPI found or use --backend loopback)", 2);
#endif
  }
  auto cfg = LoadWithOverrides(f);
  if (!cfg.ok()) return Fail(cfg.status().ToString(), 2);
  return RunLoopback(f, *cfg);
}
