// Helpers shared by the GPU tests: device arrays from and to host vectors, and the skip without a
// GPU.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "base/memory.h"
#include "base/tensor.h"

namespace moe::testing {

// Skips the test, with the reason, when no CUDA device is visible (or the build has no CUDA).
#define MOE_REQUIRE_GPU()                                                                          \
  do {                                                                                             \
    if (::moe::CudaDeviceCount() == 0) {                                                     \
      GTEST_SKIP() << "no CUDA device visible to this process (or a build without CUDA): the GPU " \
                      "path is tested on a machine with a GPU";                                    \
    }                                                                                              \
  } while (0)

// max |a - b| / max(1, max |b|): the GPU-versus-CPU tolerance measure.
inline double RelativeError(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0, scale = 1;
  for (int64_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    worst = std::max(worst, static_cast<double>(std::abs(a[i] - b[i])));
    scale = std::max(scale, static_cast<double>(std::abs(b[i])));
  }
  return worst / scale;
}

template <typename T>
Buffer DeviceArray(int64_t n) {
  auto b = Buffer::Allocate(MemorySpace::kDevice, n * static_cast<int64_t>(sizeof(T)));
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return b.ok() ? std::move(b).value() : Buffer();
}

template <typename T>
Buffer ToDevice(const std::vector<T>& v) {
  auto b = Buffer::FromHost(MemorySpace::kDevice, v.data(),
                                  static_cast<int64_t>(v.size() * sizeof(T)));
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return b.ok() ? std::move(b).value() : Buffer();
}

template <typename T>
std::vector<T> FromDevice(const Buffer& b, int64_t n) {
  std::vector<T> v(static_cast<size_t>(n));
  EXPECT_TRUE(CopyToHost(MemorySpace::kDevice, v.data(), b.data(),
                               n * static_cast<int64_t>(sizeof(T)))
                  .ok());
  return v;
}

}  // namespace moe::testing
