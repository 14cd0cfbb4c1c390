// MPI deadline check, run by check_mpi_deadline.cmake under mpiexec: the last rank never calls the
// all-to-all(v) (mode "alltoallv") or never signals a symmetric buffer's fence (mode "symmetric");
// every other rank must get kDeadlineExceeded naming the operation and the missing rank within the
// deadline (plus slack), and the aborted communicator (buffer) must then fail at once.
// Verdicts are combined over MPI_COMM_WORLD (still healthy: only the library's duplicate has an
// unfinished operation). The process then ends the way an application should after a deadline:
// MPI_Abort, since MPI_Finalize may wait for the operation that can never finish. Exit code 3
// (via MPI_Abort) means "deadline detected as expected"; anything else is a failure.
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "comm/mpi/mpi_communicator.h"

namespace {

constexpr double kDeadline = 1.0;
constexpr double kSlack = 3.0;
constexpr int kExpectedExit = 3;

// Times `call` (operation #2 of `op`, which rank `missing` never joins) on the other ranks: it
// must fail with kDeadlineExceeded naming `missing` within the deadline plus slack, and `then`
// must fail at once with kAborted.
bool ExpectMissed(const moe::comm::Communicator& comm, const std::string& op, const char* what,
                  int missing, const std::function<moe::Status()>& call,
                  const std::function<moe::Status()>& then) {
  using moe::StatusCode;
  const auto start = std::chrono::steady_clock::now();
  const moe::Status status = call();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string expected = op + " #2 deadline 1.0 s exceeded on rank " +
                               std::to_string(comm.rank()) + ": ranks [" + std::to_string(missing) +
                               "] did not " + what;
  std::printf("rank %d: %s after %.2f s\n", comm.rank(), status.ToString().c_str(), elapsed);
  bool ok = status.code() == StatusCode::kDeadlineExceeded && status.message() == expected &&
            elapsed < kDeadline + kSlack;
  const moe::Status after = then();
  ok = ok && after.code() == StatusCode::kAborted;
  if (!ok) {
    std::printf("rank %d: MISMATCH: expected '%s' within %.1f s, then ABORTED; got then %s\n",
                comm.rank(), expected.c_str(), kDeadline + kSlack, after.ToString().c_str());
  }
  std::fflush(stdout);
  return ok;
}

bool CheckDeadline(moe::comm::Communicator& comm, int missing) {
  const int n = comm.size();
  const std::vector<int64_t> counts(static_cast<size_t>(n), 4);
  std::vector<int64_t> displs(static_cast<size_t>(n));
  for (int p = 0; p < n; ++p) displs[static_cast<size_t>(p)] = 4 * p;
  std::vector<float> send(static_cast<size_t>(4 * n), 1.0f), recv(send.size());
  if (!comm.Barrier().ok()) return false;   // operation #1 succeeds everywhere
  if (comm.rank() == missing) return true;  // never calls #2
  return ExpectMissed(
      comm, "alltoallv", "arrive", missing,
      [&] {
        return comm.AllToAllV(send.data(), counts, displs, recv.data(), counts, displs,
                              moe::comm::DataType::kFloat32);
      },
      [&] { return comm.Barrier(); });
}

// A shared-memory window's fence: the last rank writes, then stops before signalling fence #2.
bool CheckSymmetricDeadline(moe::comm::Communicator& comm, int missing) {
  auto buffer = comm.AllocateSymmetric(1024);
  if (!buffer.ok()) {
    std::printf("rank %d: %s\n", comm.rank(), buffer.status().ToString().c_str());
    return false;
  }
  moe::comm::SymmetricBuffer& buf = **buffer;
  if (!buf.Fence().ok()) return false;  // fence #1 everywhere
  static_cast<char*>(buf.peer(0))[comm.rank()] = 1;
  if (comm.rank() == missing) return true;  // never signals #2
  return ExpectMissed(comm, "symmetric fence", "signal", missing, [&] { return buf.Fence(); },
                      [&] { return buf.Fence(); });
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  moe::comm::Options options;
  options.deadline_seconds = kDeadline;
  auto comm = moe::comm::MpiCommunicator::Create(MPI_COMM_WORLD, options);
  const bool symmetric = argc > 1 && std::string(argv[1]) == "symmetric";
  int ok = comm.ok() && size >= 2 &&
                   (symmetric ? CheckSymmetricDeadline(**comm, size - 1)
                              : CheckDeadline(**comm, size - 1))
               ? 1
               : 0;
  int all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("%s\n", all_ok ? "MPI DEADLINE TEST PASSED" : "MPI DEADLINE TEST FAILED");
    std::fflush(stdout);
    MPI_Abort(MPI_COMM_WORLD, all_ok ? kExpectedExit : 1);
  }
  MPI_Barrier(MPI_COMM_WORLD);  // the abort ends the other ranks here
  MPI_Finalize();
  return 1;
}
