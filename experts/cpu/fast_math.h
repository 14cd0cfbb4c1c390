// Vectorizable exp / tanh / sigmoid for the expert activations. Accuracy: exp within 2 ulp over
// [-87, 88]; tanh and sigmoid within ~2e-7 absolute. Plain arithmetic so that loops over them
// auto-vectorize.
#pragma once

#include <bit>
#include <cstdint>

namespace moe::experts {

inline float FastExp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // x = n ln2 + r, |r| <= ln2 / 2.
  // Round to nearest by the 1.5 * 2^23 trick (|x log2 e| < 2^22), which vectorizes unlike roundf.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // exp(r) by a degree-6 polynomial (Cephes expf coefficients).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

inline float FastSigmoid(float x) { return 1.0f / (1.0f + FastExp(-x)); }

inline float FastTanh(float x) {
  x = x < -9.0f ? -9.0f : (x > 9.0f ? 9.0f : x);
  return 1.0f - 2.0f / (FastExp(2.0f * x) + 1.0f);
}

}  // namespace moe::experts
