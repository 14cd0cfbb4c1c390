// The communicator conformance suite, written once: each case is a function run by every rank of
// a communicator (one thread or process per rank), asserting with gtest EXPECT macros. The
// loopback, NCCL and MPI test binaries run every case for their backend and world sizes.
#pragma once

#include <string>
#include <vector>

#include "comm/communicator.h"

namespace moe::comm::testing {

struct ConformanceCase {
  std::string name;
  void (*run)(Communicator& comm);
};

// Every case, in a fixed order.
const std::vector<ConformanceCase>& ConformanceCases();
std::vector<std::string> ConformanceCaseNames();
const ConformanceCase& FindConformanceCase(const std::string& name);

// Generous deadline for conformance runs: a desynchronised test fails instead of hanging.
inline constexpr double kConformanceDeadlineSeconds = 60.0;

}  // namespace moe::comm::testing
