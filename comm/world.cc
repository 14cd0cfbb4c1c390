// MakeWorld and the three worlds of comm/world.h: MPI (one rank per process), loopback and NCCL
// (ranks as threads), with World::Run's supervision. Built into moe_comm_world, which links the
// MPI and NCCL backends when this build has them (MOE_WORLD_HAVE_MPI, MOE_WORLD_HAVE_NCCL).
#include "comm/world.h"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "comm/bench/raw_collectives.h"
#include "comm/loopback/loopback_world.h"
#include "base/malloc_tuning.h"
#include "base/memory.h"
#if MOE_WORLD_HAVE_MPI
#include <mpi.h>

#include "comm/mpi/mpi_communicator.h"
#include "comm/mpi/mpi_raw_collectives.h"
#endif
#if MOE_WORLD_HAVE_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif

namespace moe::comm {
namespace {

void PrintFailure(const std::string& tool, int rank, const Status& s) {
  std::fprintf(stderr, "%s: rank %d: %s\n", tool.empty() ? "moe" : tool.c_str(), rank,
               s.ToString().c_str());
}

// This rank's NCCL communicator over the ranks of `group` (host memory), on `gpu`.
StatusOr<std::unique_ptr<Communicator>> NcclOver(Communicator& group, int gpu) {
#if MOE_WORLD_HAVE_NCCL
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<NcclCommunicator> nccl,
                       NcclCommunicator::Create(group, {gpu, group.options()}));
  return std::unique_ptr<Communicator>(std::move(nccl));
#else
  (void)group;
  (void)gpu;
  return Unimplemented("device-memory communicators need NCCL: this build has no CUDA/NCCL");
#endif
}

StatusOr<std::unique_ptr<Communicator>> NcclFactory(Communicator& group, int, int, int gpu) {
  return NcclOver(group, gpu);
}

// Ranks as threads over a loopback world: "loopback" runs each rank on its loopback communicator,
// "nccl" first makes each rank's NCCL communicator (GPU r) over it.
class ThreadWorld final : public World {
 public:
  ThreadWorld(WorldOptions options, LoopbackWorld world, std::unique_ptr<LoopbackWorld> twin)
      : options_(std::move(options)), world_(std::move(world)), twin_(std::move(twin)) {}

  std::string_view backend() const override { return options_.backend; }
  int size() const override { return world_.size(); }
  bool hosts_rank0() const override { return true; }
  void Abort(int) override {}
  std::vector<Communicator*> LocalRanks() override {
    std::vector<Communicator*> out;
    if (options_.backend == "nccl") return out;
    for (int r = 0; r < size(); ++r) out.push_back(&world_.rank(r));
    return out;
  }

  Status Run(const RankFn& fn) override {
    const int n = size();
    struct Shared {
      std::mutex mu;
      std::condition_variable cv;
      std::vector<Status> status;
      std::vector<bool> done;
      int finished = 0;
      StatusCode first_failure = StatusCode::kOk;  // kOk until a rank fails
    };
    // Outlives this frame if a rank is left behind (the process then exits without joining).
    auto shared = std::make_shared<Shared>();
    shared->status.resize(static_cast<size_t>(n));
    shared->done.resize(static_cast<size_t>(n), false);
    std::thread runner([this, shared, fn] {
      world_.RunPerRank([&](Communicator& comm) {
        const Status s = RunRank(comm, fn);
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->status[static_cast<size_t>(comm.rank())] = s;
        shared->done[static_cast<size_t>(comm.rank())] = true;
        ++shared->finished;
        if (!s.ok() && shared->first_failure == StatusCode::kOk) shared->first_failure = s.code();
        shared->cv.notify_all();
      });
    });
    std::unique_lock<std::mutex> lock(shared->mu);
    shared->cv.wait(lock, [&] {
      return shared->finished == n || shared->first_failure != StatusCode::kOk;
    });
    const double grace =
        kGraceSeconds + (shared->first_failure == StatusCode::kDeadlineExceeded
                             ? 0.0
                             : options_.options.deadline_seconds);
    const bool all = shared->cv.wait_for(lock, std::chrono::duration<double>(grace),
                                         [&] { return shared->finished == n; });
    Status first;
    int first_rank = -1;
    for (int r = 0; r < n; ++r) {
      const Status& s = shared->status[static_cast<size_t>(r)];
      if (!shared->done[static_cast<size_t>(r)] || s.ok()) continue;
      if (!options_.tool.empty() || !all) PrintFailure(options_.tool, r, s);
      if (first_rank < 0) {
        first = s;
        first_rank = r;
      }
    }
    if (!all) {
      std::string stuck;
      for (int r = 0; r < n; ++r) {
        if (!shared->done[static_cast<size_t>(r)])
          stuck += (stuck.empty() ? "" : ", ") + std::to_string(r);
      }
      std::fprintf(stderr,
                   "%s: rank(s) [%s] still not finished %d s after the first failure; exiting "
                   "without them\n",
                   options_.tool.empty() ? "moe" : options_.tool.c_str(), stuck.c_str(),
                   static_cast<int>(grace));
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(first_rank >= 0 ? ExitCodeOf(first) : 1);  // the stuck threads cannot be joined
    }
    lock.unlock();
    runner.join();
    if (first_rank < 0) return Status::Ok();
    return options_.tool.empty() ? first.WithContext("rank " + std::to_string(first_rank)) : first;
  }

 private:
  Status RunRank(Communicator& host, const RankFn& fn) {
    if (options_.backend == "nccl") {
      // Rank r on GPU r (MakeWorld checked there are enough); the communicator selects it, and
      // the rank's layers select the same one (compute.gpu -1: local rank r mod the GPUs).
      MOE_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> nccl, NcclOver(host, host.rank()));
      RankContext ctx{*nccl, NcclFactory};
      return fn(ctx);
    }
    DeviceCommunicatorFactory device = NcclFactory;
    if (twin_ != nullptr) {
      Communicator& twin = twin_->rank(host.rank());
      device = [&twin](Communicator&, int color, int key, int) { return twin.Split(color, key); };
    }
    RankContext ctx{host, device};
    return fn(ctx);
  }

  const WorldOptions options_;
  LoopbackWorld world_;
  std::unique_ptr<LoopbackWorld> twin_;  // device-memory ranks for device layers, or null
};

#if MOE_WORLD_HAVE_MPI
// This process is one rank of the MPI job.
class MpiWorld final : public World {
 public:
  static StatusOr<std::unique_ptr<World>> Create(const WorldOptions& options) {
    KeepStepBuffersOnHeap();  // one rank per process (see malloc_tuning.h); before MPI_Init
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      // Serialized: the Python module's threads may call the library one at a time.
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
    }
    std::unique_ptr<MpiWorld> world(new MpiWorld(options, !initialized));
    auto comm = MpiCommunicator::Create(MPI_COMM_WORLD, options.options);
    if (!comm.ok()) {
      int rank = 0;
      MPI_Comm_rank(MPI_COMM_WORLD, &rank);
      PrintFailure(options.tool, rank, comm.status());
      world->Abort(1);
    }
    world->comm_ = std::move(comm).value();
    world->raw_ = std::make_unique<MpiRawCollectives>(world->comm_->mpi_comm());
    return std::unique_ptr<World>(std::move(world));
  }

  ~MpiWorld() override {
    raw_.reset();
    comm_.reset();
    if (owns_mpi_) MPI_Finalize();
  }

  std::string_view backend() const override { return "mpi"; }
  int size() const override { return comm_->size(); }
  bool hosts_rank0() const override { return comm_->rank() == 0; }
  bench::RawCollectives* raw_collectives() override { return raw_.get(); }
  std::vector<Communicator*> LocalRanks() override { return {comm_.get()}; }

  void Abort(int exit_code) override {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, exit_code);
  }

  Status Run(const RankFn& fn) override {
    RankContext ctx{*comm_, NcclFactory};
    const Status s = fn(ctx);
    if (s.ok()) return s;
    PrintFailure(options_.tool, comm_->rank(), s);
    Abort(ExitCodeOf(s));
    return s;  // not reached
  }

 private:
  MpiWorld(WorldOptions options, bool owns_mpi)
      : options_(std::move(options)), owns_mpi_(owns_mpi) {}

  const WorldOptions options_;
  const bool owns_mpi_;  // this World initialized MPI, so it finalizes it
  std::unique_ptr<MpiCommunicator> comm_;
  std::unique_ptr<MpiRawCollectives> raw_;
};
#endif

}  // namespace

StatusOr<std::unique_ptr<World>> MakeWorld(const WorldOptions& options) {
  MOE_RETURN_IF_ERROR(ValidateOptions(options.options));
  if (options.backend == "mpi") {
#if MOE_WORLD_HAVE_MPI
    return MpiWorld::Create(options);
#else
    return InvalidArgument(
        "backend mpi: this build has no MPI (configure with MPI found, or use the loopback "
        "backend)");
#endif
  }
  if (options.backend != "loopback" && options.backend != "nccl") {
    return InvalidArgument("backend '" + options.backend + "' must be mpi, loopback or nccl");
  }
  if (options.backend == "nccl") {
#if MOE_WORLD_HAVE_NCCL
    const int gpus = CudaDeviceCount();
    if (gpus < options.ranks) {
      return FailedPrecondition("backend nccl with " + std::to_string(options.ranks) +
                                " ranks needs " + std::to_string(options.ranks) +
                                " GPUs; found " + std::to_string(gpus));
    }
#else
    return InvalidArgument("backend nccl: this build has no CUDA/NCCL");
#endif
  }
  LoopbackOptions loopback;
  loopback.options = options.options;
  loopback.memory = options.backend == "nccl" ? MemorySpace::kHost : options.memory;
  MOE_ASSIGN_OR_RETURN(LoopbackWorld world, LoopbackWorld::Create(options.ranks, loopback));
  std::unique_ptr<LoopbackWorld> twin;
  if (options.backend == "loopback" && options.device_twin && CudaDeviceCount() > 0) {
    loopback.memory = MemorySpace::kDevice;
    MOE_ASSIGN_OR_RETURN(LoopbackWorld made, LoopbackWorld::Create(options.ranks, loopback));
    twin = std::make_unique<LoopbackWorld>(std::move(made));
  }
  return std::unique_ptr<World>(
      std::make_unique<ThreadWorld>(options, std::move(world), std::move(twin)));
}

std::string DefaultBackend() {
  const bool under_mpirun =
      std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr;
  return under_mpirun ? "mpi" : "loopback";
}

int LauncherRank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMI_RANK"}) {
    if (const char* v = std::getenv(name); v != nullptr) return std::atoi(v);
  }
  return 0;
}

int ExitCodeOf(const Status& s) { return s.code() == StatusCode::kInvalidArgument ? 2 : 1; }

}  // namespace moe::comm
