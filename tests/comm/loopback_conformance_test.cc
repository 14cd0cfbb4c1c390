// The conformance suite on the loopback backend: every case × world size {1, 2, 3, 4, 7}, one
// thread per rank, with host memory and (when a GPU is present) device memory.
#include <gtest/gtest.h>

#include <string>
#include <tuple>

#include "comm/loopback/loopback_world.h"
#include "base/memory.h"
#include "tests/comm/conformance_cases.h"

namespace moe::comm::testing {
namespace {

class LoopbackConformance : public ::testing::TestWithParam<std::tuple<std::string, int>> {
 protected:
  void RunCase(MemorySpace memory) {
    const auto& [name, size] = GetParam();
    LoopbackOptions options;
    options.memory = memory;
    options.options.deadline_seconds = kConformanceDeadlineSeconds;
    auto world = LoopbackWorld::Create(size, options);
    ASSERT_TRUE(world.ok()) << world.status().ToString();
    const ConformanceCase& c = FindConformanceCase(name);
    world->RunPerRank([&c](Communicator& comm) { c.run(comm); });
  }
};

TEST_P(LoopbackConformance, Host) { RunCase(MemorySpace::kHost); }

TEST_P(LoopbackConformance, Device) {
  if (CudaDeviceCount() == 0) {
    GTEST_SKIP() << "loopback device memory needs a GPU; cudaGetDeviceCount reports none"
                 << (MOE_BASE_HAVE_CUDA ? "" : " (CPU-only build)");
  }
  RunCase(MemorySpace::kDevice);
}

INSTANTIATE_TEST_SUITE_P(Cases, LoopbackConformance,
                         ::testing::Combine(::testing::ValuesIn(ConformanceCaseNames()),
                                            ::testing::Values(1, 2, 3, 4, 7)),
                         [](const ::testing::TestParamInfo<std::tuple<std::string, int>>& param) {
                           return std::get<0>(param.param) + "_" +
                                  std::to_string(std::get<1>(param.param)) + "ranks";
                         });

TEST(LoopbackWorld, RejectsBadSizeAndMissingGpu) {
  EXPECT_EQ(LoopbackWorld::Create(0, {}).status().code(), StatusCode::kInvalidArgument);
  LoopbackOptions zero_deadline;
  zero_deadline.options.deadline_seconds = 0;
  const Status bad = LoopbackWorld::Create(2, zero_deadline).status();
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("deadline_seconds=0"), std::string::npos) << bad.message();
  if (CudaDeviceCount() == 0) {
    LoopbackOptions device;
    device.memory = MemorySpace::kDevice;
    EXPECT_EQ(LoopbackWorld::Create(2, device).status().code(), StatusCode::kFailedPrecondition);
  }
}

}  // namespace
}  // namespace moe::comm::testing
