// Argument checks shared by the backends (comm/validate.h).
#include "comm/validate.h"

#include <string>

namespace moe::comm {

Status ValidateCount(std::string_view op, std::string_view name, int64_t count) {
  if (count < 0) {
    return InvalidArgument(std::string(op) + ": " + std::string(name) + "=" +
                           std::to_string(count) + " must be >= 0");
  }
  return Status::Ok();
}

Status ValidateBuffer(std::string_view op, std::string_view name, const void* buffer,
                      int64_t count) {
  if (buffer == nullptr && count > 0) {
    return InvalidArgument(std::string(op) + ": " + std::string(name) +
                           " buffer is null but holds " + std::to_string(count) + " elements");
  }
  return Status::Ok();
}

Status ValidateVector(std::string_view op, std::string_view side, const void* buffer,
                      std::span<const int64_t> counts, std::span<const int64_t> displs, int size) {
  const std::string prefix = std::string(op) + ": " + std::string(side);
  if (counts.size() != static_cast<size_t>(size)) {
    return InvalidArgument(prefix + "_counts has " + std::to_string(counts.size()) +
                           " entries; must have one per rank (" + std::to_string(size) + ")");
  }
  if (displs.size() != static_cast<size_t>(size)) {
    return InvalidArgument(prefix + "_displs has " + std::to_string(displs.size()) +
                           " entries; must have one per rank (" + std::to_string(size) + ")");
  }
  int64_t total = 0;
  for (int p = 0; p < size; ++p) {
    if (counts[p] < 0) {
      return InvalidArgument(prefix + "_counts[" + std::to_string(p) +
                             "]=" + std::to_string(counts[p]) + " must be >= 0");
    }
    if (displs[p] < 0) {
      return InvalidArgument(prefix + "_displs[" + std::to_string(p) +
                             "]=" + std::to_string(displs[p]) + " must be >= 0");
    }
    total += counts[p];
  }
  if (buffer == nullptr && total > 0) {
    return InvalidArgument(prefix + " buffer is null but " + std::string(side) + "_counts sum to " +
                           std::to_string(total) + " elements");
  }
  return Status::Ok();
}

}  // namespace moe::comm
