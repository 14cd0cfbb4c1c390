// Fault injection for the failure tests and for trying the failure behaviour by hand
// (moe_train --inject-fault). A fault fires on one rank at one step, after that rank's backward
// pass (mid-step: the forward all-to-alls are done, the gradient all-reduce is not):
//   stall  the rank stops making progress forever (a hung kernel, a stuck NIC); its peers must fail
//          at their next collective's deadline, naming it;
//   exit   the rank dies: with one process per rank the process ends at once (_exit(3), no
//          cleanup, like a crash); with ranks as threads the thread stops calling collectives;
//   nan    the rank's first gradient element becomes NaN (train.nan_policy decides what happens).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "base/status.h"

namespace moe {

class Trainer;

enum class FaultKind { kStall, kExit, kNan };

struct FaultSpec {
  FaultKind kind = FaultKind::kStall;
  int rank = 0;
  int64_t step = 0;  // 0-based step index
};

// Parses "KIND@RANK:STEP", e.g. "stall@2:5"; kInvalidArgument naming the part that is wrong.
StatusOr<FaultSpec> ParseFaultSpec(const std::string& text);

// A TrainOptions::after_backward hook that fires `spec` on world rank spec.rank.
// process_per_rank: kExit ends the process (MPI) rather than the calling thread (loopback).
std::function<Status(Trainer&)> MakeFaultHook(const FaultSpec& spec, bool process_per_rank);

}  // namespace moe
