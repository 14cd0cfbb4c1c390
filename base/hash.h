// FNV-1a 64-bit hash of a byte string: names parameters for initialization (the same values on
// whichever rank holds a tensor) and checksums checkpoint files.
#pragma once

#include <cstdint>
#include <string_view>

namespace moe {

inline uint64_t Fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

}  // namespace moe
