// Worlds: the communicators of a job for a named backend, and running a function on every rank
// this process hosts. With launch/ and the tests, world.cc is the only code that names MPI, NCCL or
// loopback (docs/ARCHITECTURE.md "Layout").
//
//   backend    ranks in this process          buffers   made from
//   ---------  -----------------------------  --------  -------------------------------------------
//   mpi        1 (the job mpirun started)     host      MPI_COMM_WORLD (MPI initialized here — the
//                                                       one place, for the tools and the Python
//                                                       module alike — and finalized when the
//                                                       World is destroyed)
//   loopback   WorldOptions::ranks (threads)  host or   one in-process rendezvous
//                                             device
//   nccl       WorldOptions::ranks (threads)  device    a loopback bootstrap, rank r on GPU r
//
// The declarations here need only the moe_comm target; MakeWorld is defined in moe_comm_world,
// which links the MPI and NCCL backends. The runtime can be handed a World (or a WorldFactory) and
// a DeviceCommunicatorFactory but cannot make one: it does not link moe_comm_world.
//
// Supervision (World::Run), as moe_train has always done it:
// - ranks as threads: when every rank has returned, Run returns. Once one rank has failed, the
//   others get kGraceSeconds when that failure was a missed deadline (its peers' collectives are
//   aborted, so a live rank fails at once at its next one), else the deadline plus kGraceSeconds
//   (they may be waiting in a collective for the failed rank, and will name it). Ranks still
//   running after that are never joined: the failures are printed and the process exits.
// - MPI: a rank whose function fails prints its error and ends the whole job (MPI_Abort): a failed
//   rank cannot promise its peers another collective.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "comm/communicator.h"
#include "base/status.h"

namespace moe::comm {

namespace bench {
class RawCollectives;  // comm/bench/raw_collectives.h
}

struct WorldOptions {
  std::string backend = "loopback";  // "mpi", "loopback" or "nccl"
  int ranks = 1;                     // loopback, nccl: ranks as threads (mpi: from mpirun)
  MemorySpace memory = MemorySpace::kHost;  // loopback: where buffers live
  Options options;                   // every communicator's deadline
  // loopback: also a twin world of the same ranks in device memory (when a GPU is visible), from
  // which RankContext::device splits the device-memory communicators of device layers (several
  // ranks on one GPU: NCCL refuses that). Without it, and under MPI, they are NCCL communicators.
  bool device_twin = false;
  // Prefix of the failure lines Run prints to stderr ("moe_train: rank 2: ..."); empty: Run prints
  // nothing unless it has to exit the process, and returns the failure with its rank named.
  std::string tool;
};

// What a rank's function gets: its communicator of the world and a factory for device-memory
// communicators over groups of the world's ranks.
struct RankContext {
  Communicator& comm;
  DeviceCommunicatorFactory device;
};
using RankFn = std::function<Status(RankContext& rank)>;

class World {
 public:
  static constexpr double kGraceSeconds = 2.0;

  virtual ~World() = default;
  virtual std::string_view backend() const = 0;
  // Ranks of the whole world.
  virtual int size() const = 0;
  // Whether world rank 0 runs in this process (it prints the tables and writes the reports).
  virtual bool hosts_rank0() const = 0;
  // Runs fn on every rank of this process (one thread per rank; under MPI the calling thread) with
  // the supervision above. Returns Ok when every rank returned Ok; otherwise the status of the
  // lowest failed rank (with "rank r" as its context when WorldOptions::tool is empty; with a tool
  // every failure has been printed). Call once per World.
  virtual Status Run(const RankFn& fn) = 0;
  // Ends the job after a failure outside Run (MPI_Abort under MPI; returns elsewhere).
  virtual void Abort(int exit_code) = 0;
  // The communicators of the ranks this process hosts, by rank — every rank of a loopback world,
  // this process's one under MPI — for a caller that drives its ranks itself (the Python module's
  // threads) instead of through Run. Empty for nccl (its communicators are made inside Run).
  virtual std::vector<Communicator*> LocalRanks() = 0;
  // The transport's own collectives for benchmark baselines (MPI_Alltoallv, ...): non-null under
  // MPI only.
  virtual bench::RawCollectives* raw_collectives() { return nullptr; }
};

// kInvalidArgument for an unknown backend, ranks < 1 or bad options; kUnimplemented for a backend
// this build does not have; kFailedPrecondition for device memory without a GPU, or for "nccl"
// with fewer GPUs than ranks.
StatusOr<std::unique_ptr<World>> MakeWorld(const WorldOptions& options);

// Makes a world of the given number of ranks (a simulator's worlds of several sizes).
using WorldFactory = std::function<StatusOr<std::unique_ptr<World>>(int ranks)>;

// "mpi" when this process was started by mpirun (Open MPI's or a PMI environment), else
// "loopback".
std::string DefaultBackend();
// This process's rank in the job its launcher started, before any world exists (to print a config
// error once); 0 without a launcher.
int LauncherRank();
// The exit code of a tool whose work failed with `s`: 2 for bad input (kInvalidArgument), else 1.
int ExitCodeOf(const Status& s);

}  // namespace moe::comm
