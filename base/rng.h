// Counter-based random numbers: every draw is a pure function of (seed, step, index, stream),
// never of a generator's position, so the draws for a token do not depend on how tokens are
// split over ranks or groups (docs/SEMANTICS.md "Randomness"). Every function is host and device code
// (MOE_HD): the GPU router draws the same numbers.
//
// The function is SplitMix64's finalizer applied to a combined key. The same function is written
// in tests/reference/moe_reference.py; both must stay bit-identical.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#include "base/host_device.h"

namespace moe {

// Streams keep independent uses of one (seed, step, index) apart.
enum class RngStream : uint64_t {
  kRoutingUniform = 1,  // GShard random routing of the 2nd expert, one draw per token
  kRouterNoise = 2,     // noisy top-k, one normal draw per (token, expert)
  kInit = 3,            // weight initialization
  kData = 4,            // training-batch positions, one draw per (step, global token)
  kEval = 5,            // held-out batch positions
};

MOE_HD inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A 64-bit hash of (seed, step, index, stream, sub).
MOE_HD inline uint64_t CounterHash(uint64_t seed, uint64_t step, uint64_t index, RngStream stream,
                            uint64_t sub = 0) {
  uint64_t h = SplitMix64(seed);
  h = SplitMix64(h ^ step);
  h = SplitMix64(h ^ index);
  h = SplitMix64(h ^ static_cast<uint64_t>(stream));
  h = SplitMix64(h ^ sub);
  return h;
}

// Uniform double in [0, 1) with 53 random bits.
MOE_HD inline double UniformFromHash(uint64_t h) {
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

// Standard normal by Box-Muller from two hashes (computed in double, returned as float).
MOE_HD inline float NormalFromHashes(uint64_t h1, uint64_t h2) {
  const double u1 = 1.0 - UniformFromHash(h1);  // (0, 1]
  const double u2 = UniformFromHash(h2);
  const double r = sqrt(-2.0 * log(u1));
  return static_cast<float>(r * cos(6.283185307179586 * u2));
}

MOE_HD inline double CounterUniform(uint64_t seed, uint64_t step, uint64_t index, RngStream stream,
                             uint64_t sub = 0) {
  return UniformFromHash(CounterHash(seed, step, index, stream, sub));
}

MOE_HD inline float CounterNormal(uint64_t seed, uint64_t step, uint64_t index, RngStream stream,
                           uint64_t sub = 0) {
  return NormalFromHashes(CounterHash(seed, step, index, stream, 2 * sub),
                          CounterHash(seed, step, index, stream, 2 * sub + 1));
}

}  // namespace moe
