// Argument checks shared by every backend: one place, messages that name the argument and rule.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "base/status.h"

namespace moe::comm {

// "alltoall: count=-1 must be >= 0".
Status ValidateCount(std::string_view op, std::string_view name, int64_t count);
// A null buffer is allowed only when it holds no elements.
Status ValidateBuffer(std::string_view op, std::string_view name, const void* buffer,
                      int64_t count);
// Per-peer counts/displacements of one side ("send" or "recv") of an all-to-all(v): both vectors
// have `size` entries, counts and displacements are >= 0, the buffer is non-null when any count is.
Status ValidateVector(std::string_view op, std::string_view side, const void* buffer,
                      std::span<const int64_t> counts, std::span<const int64_t> displs, int size);

}  // namespace moe::comm
