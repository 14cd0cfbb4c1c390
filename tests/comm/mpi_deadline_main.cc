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
#include <string>
#include <vector>

#include "comm/mpi/mpi_communicator.h"

namespace {

constexpr double kDeadline = 1.0;
constexpr double kSlack = 3.0;
constexpr int kExpectedExit = 3;

bool CheckDeadline(moe::comm::Communicator& comm, int missing) {
  using moe::StatusCode;
  const int n = comm.size();
  const std::vector<int64_t> counts(static_cast<size_t>(n), 4);
  std::vector<int64_t> displs(static_cast<size_t>(n));
  for (int p = 0; p < n; ++p) displs[static_cast<size_t>(p)] = 4 * p;
  std::vector<float> send(static_cast<size_t>(4 * n), 1.0f), recv(send.size());
  if (!comm.Barrier().ok()) return false;   // operation #1 succeeds everywhere
  if (comm.rank() == missing) return true;  // never calls #2
  const auto start = std::chrono::steady_clock::now();
  const moe::Status status = comm.AllToAllV(send.data(), counts, displs, recv.data(), counts,
                                            displs, moe::comm::DataType::kFloat32);
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string expected = "alltoallv #2 deadline 1.0 s exceeded on rank " +
                               std::to_string(comm.rank()) + ": ranks [" + std::to_string(missing) +
                               "] did not arrive";
  std::printf("rank %d: %s after %.2f s\n", comm.rank(), status.ToString().c_str(), elapsed);
  bool ok = status.code() == StatusCode::kDeadlineExceeded && status.message() == expected &&
            elapsed < kDeadline + kSlack;
  const moe::Status after = comm.Barrier();
  ok = ok && after.code() == StatusCode::kAborted;
  if (!ok) {
    std::printf("rank %d: MISMATCH: expected '%s' within %.1f s, then ABORTED; got then %s\n",
                comm.rank(), expected.c_str(), kDeadline + kSlack, after.ToString().c_str());
  }
  std::fflush(stdout);
  return ok;
}

// A shared-memory window's fence: the last rank writes, then stops before signalling fence #2.
bool CheckSymmetricDeadline(moe::comm::Communicator& comm, int missing) {
  using moe::StatusCode;
  auto buffer = comm.AllocateSymmetric(1024);
  if (!buffer.ok()) {
    std::printf("rank %d: %s\n", comm.rank(), buffer.status().ToString().c_str());
    return false;
  }
  moe::comm::SymmetricBuffer& buf = **buffer;
  if (!buf.Fence().ok()) return false;  // fence #1 everywhere
  static_cast<char*>(buf.peer(0))[comm.rank()] = 1;
  if (comm.rank() == missing) {
    (void)(*buffer).release();  // never signals; the others will not depart either
    return true;
  }
  const auto start = std::chrono::steady_clock::now();
  const moe::Status status = buf.Fence();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::string expected = "symmetric fence #2 deadline 1.0 s exceeded on rank " +
                               std::to_string(comm.rank()) + ": ranks [" + std::to_string(missing) +
                               "] did not signal";
  std::printf("rank %d: %s after %.2f s\n", comm.rank(), status.ToString().c_str(), elapsed);
  bool ok = status.code() == StatusCode::kDeadlineExceeded && status.message() == expected &&
            elapsed < kDeadline + kSlack;
  const moe::Status after = buf.Fence();
  ok = ok && after.code() == StatusCode::kAborted;
  if (!ok) {
    std::printf("rank %d: MISMATCH: expected '%s' within %.1f s, then ABORTED; got then %s\n",
                comm.rank(), expected.c_str(), kDeadline + kSlack, after.ToString().c_str());
  }
  std::fflush(stdout);
  (void)(*buffer).release();  // a failed buffer is left to the process's end (MPI_Abort below)
  return ok;
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
