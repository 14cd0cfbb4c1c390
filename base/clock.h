// Monotonic wall time in seconds, for timing steps, exchanges and benchmarks.
#pragma once

#include <chrono>

namespace moe {

inline double WallSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace moe
