// The conformance suite on the MPI backend: every case, on MPI_COMM_WORLD of whatever size
// mpiexec started (ctest runs sizes 1, 2, 3, 4, 7). Main: mpi_gtest_main.cc.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <string>

#include "comm/mpi/mpi_communicator.h"
#include "tests/comm/conformance_cases.h"

namespace moe::comm::testing {
namespace {

class MpiConformance : public ::testing::TestWithParam<std::string> {};

TEST_P(MpiConformance, Case) {
  Options options;
  options.deadline_seconds = kConformanceDeadlineSeconds;
  auto comm = MpiCommunicator::Create(MPI_COMM_WORLD, options);
  ASSERT_TRUE(comm.ok()) << comm.status().ToString();
  EXPECT_EQ((*comm)->memory_space(), MemorySpace::kHost);
  FindConformanceCase(GetParam()).run(**comm);
}

// The node-local ranks (what picks a rank's GPU): ctest starts every rank on this machine, so
// they are the ranks themselves — as Open MPI's launcher says — and a split's are its own.
TEST(MpiLocalRanks, OneNodeAndASplit) {
  Options options;
  options.deadline_seconds = kConformanceDeadlineSeconds;
  auto comm = MpiCommunicator::Create(MPI_COMM_WORLD, options);
  ASSERT_TRUE(comm.ok()) << comm.status().ToString();
  EXPECT_EQ((*comm)->local_rank(), (*comm)->rank());
  EXPECT_EQ((*comm)->local_size(), (*comm)->size());
  if (const char* launcher = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) {
    EXPECT_EQ((*comm)->local_rank(), std::atoi(launcher));
  }
  auto half = (*comm)->Split((*comm)->rank() % 2, (*comm)->rank());
  ASSERT_TRUE(half.ok()) << half.status().ToString();
  ASSERT_NE(*half, nullptr);
  EXPECT_EQ((*half)->local_rank(), (*half)->rank());
  EXPECT_EQ((*half)->local_size(), (*half)->size());
}

INSTANTIATE_TEST_SUITE_P(Cases, MpiConformance, ::testing::ValuesIn(ConformanceCaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& param) {
                           return param.param;
                         });

}  // namespace
}  // namespace moe::comm::testing
