// Deadlines on the loopback backend: a rank that never calls makes the others fail with a
// kDeadlineExceeded that names the operation and the missing rank, within the deadline; the
// communicators are then aborted, and the late rank fails at once instead of waiting.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <latch>
#include <string>
#include <vector>

#include "comm/loopback/loopback_world.h"

namespace moe::comm {
namespace {

constexpr double kDeadline = 0.5;
constexpr double kSlack = 2.0;  // scheduling noise on a loaded 2-core machine

using Op = std::function<Status(Communicator&)>;

Status RunAllToAllV(Communicator& comm) {
  const std::vector<int64_t> counts(static_cast<size_t>(comm.size()), 1);
  std::vector<int64_t> displs(static_cast<size_t>(comm.size()));
  for (int p = 0; p < comm.size(); ++p) displs[static_cast<size_t>(p)] = p;
  std::vector<float> send(static_cast<size_t>(comm.size())), recv(send.size());
  return comm.AllToAllV(send.data(), counts, displs, recv.data(), counts, displs,
                        DataType::kFloat32);
}

Status RunAllReduce(Communicator& comm) {
  double x = 1;
  return comm.AllReduce(&x, &x, 1, DataType::kFloat64, ReduceOp::kSum);
}

Status RunBarrier(Communicator& comm) { return comm.Barrier(); }

void CheckMissingRank(int size, const std::string& op_name, const Op& op) {
  LoopbackOptions options;
  options.options.deadline_seconds = kDeadline;
  auto world = LoopbackWorld::Create(size, options);
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  const int missing = size - 1;
  std::latch others_done(size - 1);
  world->RunPerRank([&](Communicator& comm) {
    // One successful operation first, so the failing one is #2.
    EXPECT_TRUE(comm.Barrier().ok());
    if (comm.rank() == missing) {
      others_done.wait();
      const auto start = std::chrono::steady_clock::now();
      const Status late = op(comm);
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_EQ(late.code(), StatusCode::kAborted) << late.ToString();
      EXPECT_LT(elapsed, kDeadline) << "the late rank must fail at once";
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    const Status status = op(comm);
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const std::string expected = op_name + " #2 deadline 0.5 s exceeded on rank " +
                                 std::to_string(comm.rank()) + ": ranks [" +
                                 std::to_string(missing) + "] did not arrive";
    EXPECT_EQ(status.code(), StatusCode::kDeadlineExceeded) << status.ToString();
    EXPECT_EQ(status.message(), expected);
    EXPECT_GE(elapsed, kDeadline * 0.9);
    EXPECT_LT(elapsed, kDeadline + kSlack);
    EXPECT_TRUE(comm.aborted());
    const Status after = comm.Barrier();
    EXPECT_EQ(after.code(), StatusCode::kAborted) << after.ToString();
    EXPECT_NE(after.message().find(expected), std::string::npos) << after.message();
    others_done.count_down();
  });
}

TEST(LoopbackDeadline, AllToAllVMissingRank) {
  for (const int size : {2, 3, 4, 7}) CheckMissingRank(size, "alltoallv", RunAllToAllV);
}

TEST(LoopbackDeadline, AllReduceMissingRank) { CheckMissingRank(3, "allreduce", RunAllReduce); }

TEST(LoopbackDeadline, BarrierMissingRank) { CheckMissingRank(4, "barrier", RunBarrier); }

TEST(LoopbackDeadline, AsyncWaitNamesMissingRank) {
  LoopbackOptions options;
  options.options.deadline_seconds = kDeadline;
  auto world = LoopbackWorld::Create(3, options);
  ASSERT_TRUE(world.ok());
  world->RunPerRank([](Communicator& comm) {
    if (comm.rank() == 1) return;  // never calls
    const std::vector<int64_t> zeros(3, 0);
    auto request =
        comm.StartAllToAllV(nullptr, zeros, zeros, nullptr, zeros, zeros, DataType::kUint8);
    ASSERT_TRUE(request.ok()) << request.status().ToString();  // starting never blocks
    const Status status = (*request)->Wait();
    EXPECT_EQ(status.code(), StatusCode::kDeadlineExceeded);
    EXPECT_NE(status.message().find("alltoallv #1 deadline 0.5 s exceeded on rank " +
                                    std::to_string(comm.rank()) + ": ranks [1] did not arrive"),
              std::string::npos)
        << status.message();
  });
}

// A peer that stops before signalling a symmetric buffer's fence: the others fail at the deadline
// naming it, and the buffer then fails at once.
TEST(LoopbackDeadline, SymmetricFenceNamesThePeerThatDidNotSignal) {
  for (const int size : {2, 3, 4}) {
    LoopbackOptions options;
    options.options.deadline_seconds = kDeadline;
    auto world = LoopbackWorld::Create(size, options);
    ASSERT_TRUE(world.ok());
    const int missing = size - 1;
    std::latch others_done(size - 1);
    world->RunPerRank([&](Communicator& comm) {
      auto buffer = comm.AllocateSymmetric(256);
      ASSERT_TRUE(buffer.ok()) << buffer.status().ToString();
      SymmetricBuffer& buf = **buffer;
      ASSERT_TRUE(buf.Fence().ok());  // fence #1 everywhere
      if (comm.rank() == missing) {
        others_done.wait();  // never signals #2
        return;
      }
      static_cast<char*>(buf.peer(missing))[comm.rank()] = 1;
      const auto start = std::chrono::steady_clock::now();
      const Status status = buf.Fence();
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_EQ(status.code(), StatusCode::kDeadlineExceeded) << status.ToString();
      EXPECT_EQ(status.message(), "symmetric fence #2 deadline 0.5 s exceeded on rank " +
                                      std::to_string(comm.rank()) + ": ranks [" +
                                      std::to_string(missing) + "] did not signal");
      EXPECT_GE(elapsed, kDeadline * 0.9);
      EXPECT_LT(elapsed, kDeadline + kSlack);
      const Status after = buf.Fence();
      EXPECT_EQ(after.code(), StatusCode::kAborted) << after.ToString();
      EXPECT_NE(after.message().find("did not signal"), std::string::npos) << after.message();
      others_done.count_down();
    });
  }
}

}  // namespace
}  // namespace moe::comm
