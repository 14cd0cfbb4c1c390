// Fault specs and hooks (runtime/train/fault_injection.h).
#include "runtime/train/fault_injection.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <limits>
#include <thread>

#include "runtime/train/trainer.h"

namespace moe {
namespace {

StatusOr<int64_t> ParseNonNegative(const std::string& s, const std::string& what, const std::string& text) {
  if (s.empty() || s.size() > 12 || s.find_first_not_of("0123456789") != std::string::npos) {
    return InvalidArgument("--inject-fault=" + text + ": " + what + " '" + s + "' must be a non-negative integer");
  }
  return std::stoll(s);
}

}  // namespace

StatusOr<FaultSpec> ParseFaultSpec(const std::string& text) {
  const size_t at = text.find('@'), colon = text.find(':', at == std::string::npos ? 0 : at);
  if (at == std::string::npos || colon == std::string::npos) {
    return InvalidArgument("--inject-fault=" + text + " must be KIND@RANK:STEP, e.g. stall@2:5");
  }
  FaultSpec spec;
  const std::string kind = text.substr(0, at);
  if (kind == "stall") {
    spec.kind = FaultKind::kStall;
  } else if (kind == "exit") {
    spec.kind = FaultKind::kExit;
  } else if (kind == "nan") {
    spec.kind = FaultKind::kNan;
  } else {
    return InvalidArgument("--inject-fault=" + text + ": kind '" + kind + "' must be stall, exit or nan");
  }
  MOE_ASSIGN_OR_RETURN(const int64_t rank, ParseNonNegative(text.substr(at + 1, colon - at - 1), "rank", text));
  MOE_ASSIGN_OR_RETURN(spec.step, ParseNonNegative(text.substr(colon + 1), "step", text));
  if (rank > std::numeric_limits<int>::max()) return InvalidArgument("--inject-fault=" + text + ": rank too large");
  spec.rank = static_cast<int>(rank);
  return spec;
}

std::function<Status(Trainer&)> MakeFaultHook(const FaultSpec& spec, bool process_per_rank) {
  return [spec, process_per_rank](Trainer& trainer) -> Status {
    if (trainer.world_rank() != spec.rank || trainer.step() != spec.step) return Status::Ok();
    std::fprintf(stderr, "fault injected on rank %d at step %lld: %s\n", spec.rank,
                 static_cast<long long>(spec.step),
                 spec.kind == FaultKind::kStall ? "stall" : spec.kind == FaultKind::kExit ? "exit" : "nan");
    std::fflush(stderr);
    switch (spec.kind) {
      case FaultKind::kStall:
        for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
      case FaultKind::kExit:
        if (process_per_rank) ::_exit(3);
        return Aborted("fault injected: rank " + std::to_string(spec.rank) + " stopped at step " +
                       std::to_string(spec.step));
      case FaultKind::kNan: {
        std::vector<ParamRef> params = trainer.model().Params();
        if (!params.empty() && params[0].grad->size() > 0) {
          (*params[0].grad)[0] = std::numeric_limits<float>::quiet_NaN();
        }
        return Status::Ok();
      }
    }
    return Status::Ok();
  };
}

}  // namespace moe
