// Helpers shared by the unit tests: configs from text, weight setup, whole-layer calls.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "runtime/config/config.h"
#include "runtime/layer/moe_layer.h"

namespace moe::testing {

// Parses "moe { <layer_text> }" (with defaults and validation) and returns the layer config.
inline config::LayerConfig LayerFromText(const std::string& layer_text) {
  StatusOr<MoeConfig> cfg = ParseConfig("moe { " + layer_text + " }", "test");
  EXPECT_TRUE(cfg.ok()) << cfg.status().ToString() << "\n" << layer_text;
  if (!cfg.ok()) return config::LayerConfig();
  return cfg->moe();
}

inline Tensor MakeTensor(int64_t rows, int64_t cols, const std::vector<float>& v) {
  Tensor t(rows, cols);
  EXPECT_EQ(static_cast<int64_t>(v.size()), rows * cols);
  for (int64_t i = 0; i < t.size() && i < static_cast<int64_t>(v.size()); ++i) t[i] = v[i];
  return t;
}

// Deterministic pseudo-random values in [-scale, scale).
inline void FillRandom(Tensor* t, uint64_t seed, float scale) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 12345;
  for (int64_t i = 0; i < t->size(); ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const double u = static_cast<double>(s >> 11) * (1.0 / 9007199254740992.0);
    (*t)[i] = static_cast<float>((2.0 * u - 1.0) * scale);
  }
}

inline MoeLayerParams ZeroGrads(const MoeLayer& layer) {
  MoeLayerParams g = MakeLayerParams(layer.config());
  g.Zero();
  return g;
}

}  // namespace moe::testing
