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
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x0040u;  // quiet NaN
  // A select, not a branch, so that the row loops below vectorize.
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// f rounded to the nearest bfloat16, as a float.
inline float RoundToBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

// Row loops: dst[i] = bf16(scale · src[i]) (the product rounded to float first), and the widening.
inline void FloatsToBf16(const float* src, float scale, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FloatToBf16(scale * src[i]);
}
inline void FloatsToBf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
}
inline void Bf16sToFloats(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}
inline void RoundFloatsToBf16(const float* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = RoundToBf16(src[i]);
}

}  // namespace moe
