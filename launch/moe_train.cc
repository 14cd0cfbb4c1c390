// moe_train: trains the byte-level MoE language model with expert parallelism.
//
//   mpirun -n N moe_train --config configs/tiny_lm.textproto          (MPI, one process per rank)
//   moe_train --config configs/tiny_lm.textproto --backend loopback --ranks N   (threads)
//
// A thin main: flags, config, communicator, then runtime::Trainer.
#include <CLI/CLI.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/loopback/loopback_world.h"
#include "comm/memory.h"
#include "experts/cpu/blas.h"
#include "launch/cli.h"
#include "runtime/base/malloc_tuning.h"
#include "runtime/moe/config.h"
#include "runtime/train/fault_injection.h"
#include "runtime/train/trainer.h"
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
  int pipeline_degree = 0;
  int steps = -1;
  std::string metrics, checkpoint_dir, data;
  bool quiet = false;
  int log_every = 1;
  double deadline = -1;
  std::string inject_fault;
  moe::launch::ComputeFlags compute;
};

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "moe_train: %s\n", message.c_str());
  return code;
}

moe::StatusOr<moe::MoeConfig> LoadWithOverrides(const Flags& f) {
  MOE_ASSIGN_OR_RETURN(moe::MoeConfig cfg, moe::LoadConfig(f.config));
  if (f.local_groups > 0) cfg.mutable_moe()->mutable_router()->set_num_local_groups(f.local_groups);
  if (f.pipeline_degree > 0) cfg.mutable_parallel()->set_pipeline_degree(f.pipeline_degree);
  if (f.steps >= 0) cfg.mutable_train()->set_steps(f.steps);
  if (!f.metrics.empty()) cfg.mutable_train()->set_metrics_path(f.metrics);
  if (!f.checkpoint_dir.empty()) cfg.mutable_train()->set_checkpoint_dir(f.checkpoint_dir);
  if (!f.data.empty()) cfg.mutable_train()->set_data_path(f.data);
  if (f.deadline >= 0) cfg.mutable_comm()->set_deadline_seconds(f.deadline);
  moe::launch::ApplyComputeFlags(f.compute, cfg.mutable_compute());
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

int ExitCode(const moe::Status& s) { return s.code() == moe::StatusCode::kInvalidArgument ? 2 : 1; }

// Ranks as threads. The process never waits for a rank that stopped making progress. Once one
// rank has failed, the others get time to finish: kGraceSeconds when that failure was a missed
// deadline (the peers' collectives are aborted, so a live rank fails at once at its next one),
// else the deadline plus kGraceSeconds (they may be waiting in a collective for the failed rank
// and will report it by name). Ranks still running after that are left behind and the process
// exits.
constexpr double kGraceSeconds = 2.0;

int RunLoopback(const Flags& f, const moe::MoeConfig& cfg) {
  auto options = MakeOptions(f, /*process_per_rank=*/false);
  if (!options.ok()) return Fail(options.status().ToString(), 2);
  moe::comm::LoopbackOptions opts;
  opts.options.deadline_seconds = cfg.comm().deadline_seconds();
  auto world = moe::comm::LoopbackWorld::Create(f.ranks, opts);
  if (!world.ok()) return Fail(world.status().ToString(), 2);
  // compute.device=CUDA: the device-resident layers exchange over the same ranks in device memory,
  // several ranks on one GPU (NCCL would refuse that). Without a GPU the trainer says so.
  std::shared_ptr<moe::comm::LoopbackWorld> device_world;
  if (cfg.compute().device() == moe::config::CUDA && moe::comm::CudaDeviceCount() > 0) {
    moe::comm::LoopbackOptions device_opts = opts;
    device_opts.memory = moe::comm::MemorySpace::kDevice;
    auto made = moe::comm::LoopbackWorld::Create(f.ranks, device_opts);
    if (!made.ok()) return Fail(made.status().ToString(), 2);
    device_world = std::make_shared<moe::comm::LoopbackWorld>(std::move(*made));
  }
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<moe::Status> status;
    std::vector<bool> done;
    int finished = 0;
    moe::StatusCode first_failure = moe::StatusCode::kOk;  // kOk until a rank fails
  };
  auto shared = std::make_shared<Shared>();  // outlives main's frame if a rank is left behind
  shared->status.resize(static_cast<size_t>(f.ranks));
  shared->done.resize(static_cast<size_t>(f.ranks), false);
  auto world_ptr = std::make_shared<moe::comm::LoopbackWorld>(std::move(*world));
  std::thread runner([world_ptr, device_world, shared, cfg, opts = *options] {
    world_ptr->RunPerRank([&](moe::comm::Communicator& comm) {
      moe::TrainOptions rank_opts = opts;
      if (device_world) rank_opts.device_world = &device_world->rank(comm.rank());
      auto trainer = moe::Trainer::Create(cfg, &comm, rank_opts);
      moe::Status s = trainer.ok() ? (*trainer)->Run() : trainer.status();
      std::lock_guard<std::mutex> lock(shared->mu);
      shared->status[static_cast<size_t>(comm.rank())] = s;
      shared->done[static_cast<size_t>(comm.rank())] = true;
      ++shared->finished;
      if (!s.ok() && shared->first_failure == moe::StatusCode::kOk)
        shared->first_failure = s.code();
      shared->cv.notify_all();
    });
  });
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] {
    return shared->finished == f.ranks || shared->first_failure != moe::StatusCode::kOk;
  });
  const double grace = kGraceSeconds + (shared->first_failure == moe::StatusCode::kDeadlineExceeded
                                            ? 0.0
                                            : cfg.comm().deadline_seconds());
  const bool all = shared->cv.wait_for(lock, std::chrono::duration<double>(grace),
                                       [&] { return shared->finished == f.ranks; });
  int code = 0;
  for (int r = 0; r < f.ranks; ++r) {
    const moe::Status& s = shared->status[static_cast<size_t>(r)];
    if (shared->done[static_cast<size_t>(r)] && !s.ok()) {
      Fail("rank " + std::to_string(r) + ": " + s.ToString(), 0);
      if (code == 0) code = ExitCode(s);
    }
  }
  if (!all) {
    std::string stuck;
    for (int r = 0; r < f.ranks; ++r) {
      if (!shared->done[static_cast<size_t>(r)])
        stuck += (stuck.empty() ? "" : ", ") + std::to_string(r);
    }
    Fail("rank(s) [" + stuck + "] still not finished " + std::to_string(static_cast<int>(grace)) +
             " s after the first failure; exiting without them",
         0);
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(code != 0 ? code : 1);  // the stuck threads cannot be joined
  }
  lock.unlock();
  runner.join();
  return code;
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
  auto options = MakeOptions(f, /*process_per_rank=*/true);
  if (!options.ok()) {
    if (rank == 0) Fail(options.status().ToString(), 2);
    MPI_Finalize();
    return 2;
  }
  auto trainer = moe::Trainer::Create(cfg, world->get(), *options);
  moe::Status s = trainer.ok() ? (*trainer)->Run() : trainer.status();
  if (!s.ok()) {
    // A failed rank cannot promise its peers another collective: stop the whole job now, so no
    // rank waits for one that has gone (MPI_Abort ends every process of the job).
    Fail("rank " + std::to_string(rank) + ": " + s.ToString(), 1);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, ExitCode(s));
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
  app.add_option("--backend", f.backend,
                 "mpi (under mpirun) or loopback (ranks as threads); default: mpi when "
                 "started by mpirun, else loopback")
      ->check(CLI::IsMember({"mpi", "loopback"}));
  app.add_option("--ranks", f.ranks, "ranks for the loopback backend")->check(CLI::Range(1, 1024));
  app.add_flag("--resume", f.resume,
               "continue from the newest complete checkpoint in train.checkpoint_dir");
  app.add_option("--local-groups", f.local_groups, "override moe.router.num_local_groups")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option(
         "--pipeline-degree", f.pipeline_degree,
         "override parallel.pipeline_degree (chunks per exchange, overlapped with the experts)")
      ->check(CLI::Range(1, 16));
  app.add_option("--steps", f.steps, "override train.steps")->check(CLI::NonNegativeNumber);
  app.add_option("--metrics", f.metrics, "override train.metrics_path (JSON lines)");
  app.add_option("--checkpoint-dir", f.checkpoint_dir, "override train.checkpoint_dir");
  app.add_option("--data", f.data, "override train.data_path");
  app.add_flag("--quiet", f.quiet, "no progress lines");
  app.add_option("--log-every", f.log_every, "a progress line every N steps")
      ->check(CLI::Range(1, 1 << 30));
  app.add_option("--deadline", f.deadline,
                 "override comm.deadline_seconds (every collective's deadline)")
      ->check(CLI::Range(0.001, 1e6));
  moe::launch::AddComputeFlags(app, &f.compute);
  app.add_option(
         "--inject-fault", f.inject_fault,
         "testing: KIND@RANK:STEP with KIND stall, exit or nan (see README, failure behaviour)")
      ->group("Testing");
  if (const int rc = moe::launch::ParseFlags(app, argc, argv); rc >= 0) return rc;
  moe::blas::SetThreads(1);
  const bool under_mpirun =
      std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr;
  if (f.backend.empty()) f.backend = under_mpirun ? "mpi" : "loopback";
  if (f.backend == "mpi") {
#if MOE_COMM_HAVE_MPI
    moe::KeepStepBuffersOnHeap();  // one rank per process (see malloc_tuning.h)
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
    return Fail(
        "--backend mpi: this build has no MPI (configure with MPI found or use --backend loopback)",
        2);
#endif
  }
  auto cfg = LoadWithOverrides(f);
  if (!cfg.ok()) return Fail(cfg.status().ToString(), 2);
  return RunLoopback(f, *cfg);
}
