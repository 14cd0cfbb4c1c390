// The conformance suite on the MPI backend: every case, on MPI_COMM_WORLD of whatever size
// mpiexec started (ctest runs sizes 1, 2, 3, 4, 7). Main: mpi_gtest_main.cc.
#include <gtest/gtest.h>
#include <mpi.h>

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

INSTANTIATE_TEST_SUITE_P(Cases, MpiConformance, ::testing::ValuesIn(ConformanceCaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& param) {
                           return param.param;
                         });

}  // namespace
}  // namespace moe::comm::testing
