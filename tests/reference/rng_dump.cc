// Prints CounterHash / CounterUniform / CounterNormal for a fixed list of keys, one line per key,
// so that tests/reference/test_reference_selfcheck.py can check that the Python port in
// moe_reference.py is bit-identical to base/rng.h.
//
// Line format (all hex, no 0x): seed step index stream sub hash uniform_bits normal_bits
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "base/rng.h"

int main() {
  const uint64_t seeds[] = {0ull, 1ull, 7ull, 1234ull, 0x9E3779B97F4A7C15ull, 0xFFFFFFFFFFFFFFFFull};
  const uint64_t steps[] = {0ull, 2ull, 1ull << 40};
  int line = 0;
  for (uint64_t seed : seeds) {
    for (uint64_t step : steps) {
      for (uint64_t index = 0; index < 6; ++index) {
        for (uint64_t stream = 1; stream <= 3; ++stream) {
          const uint64_t sub = (static_cast<uint64_t>(line) * 2654435761ull) % 11ull;
          const auto s = static_cast<moe::RngStream>(stream);
          const uint64_t idx = index * 1000003ull + (index == 5 ? 0xFFFFFFFF00000000ull : 0ull);
          const uint64_t h = moe::CounterHash(seed, step, idx, s, sub);
          const double u = moe::CounterUniform(seed, step, idx, s, sub);
          const float n = moe::CounterNormal(seed, step, idx, s, sub);
          uint64_t ub;
          uint32_t nb;
          std::memcpy(&ub, &u, sizeof(ub));
          std::memcpy(&nb, &n, sizeof(nb));
          std::printf("%" PRIx64 " %" PRIx64 " %" PRIx64 " %" PRIx64 " %" PRIx64 " %" PRIx64 " %" PRIx64
                      " %" PRIx32 "\n",
                      seed, step, idx, stream, sub, h, ub, nb);
          ++line;
        }
      }
    }
  }
  return 0;
}
