// The conformance suite on the NCCL backend: one GPU per rank, ranks as threads, the NCCL id
// broadcast over a loopback (host) world. Skips with the reason when there are not enough GPUs.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <string>
#include <tuple>

#include "comm/loopback/loopback_world.h"
#include "base/memory.h"
#include "comm/nccl/nccl_communicator.h"
#include "tests/comm/conformance_cases.h"

namespace moe::comm::testing {
namespace {

class NcclConformance : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(NcclConformance, Case) {
  const auto& [name, size] = GetParam();
  const int gpus = CudaDeviceCount();
  if (gpus < size) {
    GTEST_SKIP() << "NCCL with " << size << " ranks needs " << size
                 << " GPUs (one per rank); cudaGetDeviceCount reports " << gpus;
  }
  LoopbackOptions bootstrap_options;
  bootstrap_options.options.deadline_seconds = kConformanceDeadlineSeconds;
  auto bootstrap = LoopbackWorld::Create(size, bootstrap_options);
  ASSERT_TRUE(bootstrap.ok()) << bootstrap.status().ToString();
  const ConformanceCase& c = FindConformanceCase(name);
  bootstrap->RunPerRank([&c](Communicator& host) {
    NcclOptions options;
    options.device = host.rank();
    options.options.deadline_seconds = kConformanceDeadlineSeconds;
    ASSERT_EQ(cudaSetDevice(host.rank()), cudaSuccess);
    auto comm = NcclCommunicator::Create(host, options);
    ASSERT_TRUE(comm.ok()) << comm.status().ToString();
    EXPECT_EQ((*comm)->memory_space(), MemorySpace::kDevice);
    c.run(**comm);
  });
}

INSTANTIATE_TEST_SUITE_P(Cases, NcclConformance,
                         ::testing::Combine(::testing::ValuesIn(ConformanceCaseNames()),
                                            ::testing::Values(1, 2, 3, 4, 7)),
                         [](const ::testing::TestParamInfo<std::tuple<std::string, int>>& param) {
                           return std::get<0>(param.param) + "_" +
                                  std::to_string(std::get<1>(param.param)) + "ranks";
                         });

TEST(NcclCommunicator, CreateWithoutGpuFailsCleanly) {
  if (CudaDeviceCount() > 0) GTEST_SKIP() << "a GPU is present; this checks the no-GPU error";
  auto world = LoopbackWorld::Create(1, {});
  ASSERT_TRUE(world.ok());
  const Status status = NcclCommunicator::Create(world->rank(0), {}).status();
  EXPECT_EQ(status.code(), StatusCode::kFailedPrecondition) << status.ToString();
}

}  // namespace
}  // namespace moe::comm::testing
