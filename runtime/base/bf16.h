// bfloat16 on the host: the upper 16 bits of an IEEE float32. Rounding is to nearest, ties to even
// (what CUDA's __float2bfloat16 and PyTorch's .to(torch.bfloat16) do); NaN stays a (quiet) NaN.
// Widening is exact. The exchange's wire dtype (parallel.wire_dtype) uses these.
#pragma once

#include <cstdint>
#include <cstring>

namespace moe {

inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// f rounded to the nearest bfloat16, as a float.
inline float RoundToBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

}  // namespace moe
