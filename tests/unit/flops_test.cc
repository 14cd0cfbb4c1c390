// Model FLOPs (runtime/train/flops.h) against a hand count for configs/tiny_lm.textproto.
#include "runtime/train/flops.h"

#include <gtest/gtest.h>

#include "runtime/config/config.h"

namespace moe {
namespace {

TEST(ModelFlops, TinyLmByHand) {
  StatusOr<MoeConfig> cfg = LoadConfig(MOE_TINY_LM_CONFIG);
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  // tiny_lm: M 32, E 8, H 64 (FFN: two projections), top-2, 2 layers, 256-byte head.
  // Forward per token: routers 2 x 2·32·8 = 1024, head 2·32·256 = 16384; per kept row
  // 2 x 2·32·64 = 8192. Backward twice the forward.
  const StepFlops one = ModelFlops(*cfg, /*tokens=*/1, /*expert_rows=*/4);
  EXPECT_DOUBLE_EQ(one.router, 3.0 * 1024);
  EXPECT_DOUBLE_EQ(one.head, 3.0 * 16384);
  EXPECT_DOUBLE_EQ(one.experts, 3.0 * 4 * 8192);
  EXPECT_DOUBLE_EQ(one.shared, 0.0);
  EXPECT_DOUBLE_EQ(one.total(), 150528.0);
  // At the nominal k = 2 rows per token and layer, the same.
  EXPECT_DOUBLE_EQ(NominalFlopsPerToken(*cfg, 512), 150528.0);
  // A step of 512 tokens whose layers kept 1900 rows (drops): linear in both.
  EXPECT_DOUBLE_EQ(ModelFlops(*cfg, 512, 1900).total(),
                   512 * 3.0 * (1024 + 16384) + 1900 * 3.0 * 8192);
}

TEST(ModelFlops, SharedSwigluNoisyAndSoft) {
  StatusOr<MoeConfig> cfg = ParseConfig(
      "moe { model_dim: 4 num_experts: 2 num_shared_experts: 1 shared_hidden_dim: 5 expert { "
      "hidden_dim: 3 kind: SWIGLU } router { gate: NOISY_TOPK top_k: 1 } } model { num_layers: 1 }",
      "n");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  const StepFlops f = ModelFlops(*cfg, 1, 1);
  EXPECT_DOUBLE_EQ(f.router, 3.0 * 2 * 4 * (2 + 2));  // logits and noise
  EXPECT_DOUBLE_EQ(f.experts, 3.0 * 3 * 2 * 4 * 3);   // three projections
  EXPECT_DOUBLE_EQ(f.shared, 3.0 * 3 * 2 * 4 * 5);
  StatusOr<MoeConfig> soft = ParseConfig(
      "moe { model_dim: 4 num_experts: 2 expert { hidden_dim: 3 } router { gate: SOFT "
      "slots_per_expert: 3 } } model { num_layers: 1 }",
      "s");
  ASSERT_TRUE(soft.ok()) << soft.status().ToString();
  const StepFlops g = ModelFlops(*soft, 1, 0);
  EXPECT_DOUBLE_EQ(g.router, 3.0 * 2 * 4 * 6);        // Φ is M x E·p
  EXPECT_DOUBLE_EQ(g.soft_mix, 3.0 * 2 * 2 * 4 * 6);  // Dᵀ·X and C·Ỹ
  // 6 slots shared by a group of 12 tokens: half a row per token.
  EXPECT_DOUBLE_EQ(NominalFlopsPerToken(*soft, 12),
                   g.total() + 0.5 * 3.0 * 2 * 2 * 4 * 3);
}

}  // namespace
}  // namespace moe
