// The memory model (runtime/config/memory_model.h) against hand-computed bytes on two small configs,
// its refusal message, and the byte-size flag parser.
#include "runtime/config/memory_model.h"

#include <gtest/gtest.h>

#include <map>
#include <string>

#include "runtime/config/config.h"

namespace moe {
namespace {

std::map<std::string, int64_t> Terms(const MemoryEstimate& e) {
  std::map<std::string, int64_t> out;
  for (const MemoryTerm& t : e.terms) out[t.what] = t.bytes;
  return out;
}

TEST(MemoryModel, LayerCallByHand) {
  // M 4, E 2, H 3, FFN with biases, top-1, S 8 in one group: C = max(4, ceil(8/2)) = 4, rows
  // min(8 slots, 2 x 4) = 8. Forward only.
  StatusOr<MoeConfig> cfg = ParseConfig(
      "moe { model_dim: 4 num_experts: 2 expert { hidden_dim: 3 } router { gate: TOP1 "
      "capacity_factor_train: 1 capacity_factor_eval: 1 } }",
      "a");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  const MemoryEstimate e = LayerCallMemory(cfg->moe(), 8, /*backward=*/false);
  const std::map<std::string, int64_t> want = {
      {"router weights", 4 * 4 * 2},                             // M x E floats
      {"routed experts' parameters", 2 * (4 * 31 + 64 * 4)},     // 2·4·3 + 3 + 4 floats, 4 tensors
      {"selection bias", 4 * 2},                                 // E floats
      {"token tensors", 4 * 8 * 4 * 3},                          // x read, x copied, y
      {"router activations", 4 * 8 * 2 * 2},                     // logits, probs
      {"expert rows", 4 * 8 * (2 * 4 + 2 * 3)},                  // in, out, h, a per row
      {"routing plan", 4 * (6 * 8 + 3 * 8) + 8 * 8},             // slots, rows, token offsets
      {"per-group routing state", 2 * 28 + 256},                 // one group
  };
  EXPECT_EQ(Terms(e), want);
  EXPECT_EQ(e.total(), 2424);
  // The backward doubles the parameters (gradients) and adds dy, dx and the rows' gradients.
  const MemoryEstimate b = LayerCallMemory(cfg->moe(), 8, /*backward=*/true);
  EXPECT_EQ(Terms(b).at("routed experts' parameters"), 2 * 760);
  EXPECT_EQ(Terms(b).at("token tensors"), 4 * 8 * 4 * 5);
  EXPECT_EQ(Terms(b).at("expert rows"), 4 * 8 * (2 * 4 + 2 * 3 + 2 * 4 + 2 * 3));
}

TEST(MemoryModel, TrainRankByHand) {
  // 1 layer, context 2, M 4, E 4 on 2 ranks (2 local), H 2 without biases, top-1, 8 tokens per
  // step: 4 per rank, C = max(1, ceil(4/4)) = 1, 4 rows sent and received.
  StatusOr<MoeConfig> cfg = ParseConfig(
      "moe { model_dim: 4 num_experts: 4 expert { hidden_dim: 2 bias: false } router { gate: TOP1 "
      "capacity_factor_train: 1 capacity_factor_eval: 1 min_capacity: 1 } } "
      "model { context: 2 num_layers: 1 } train { global_batch_tokens: 8 }",
      "b");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  const MemoryEstimate e = TrainRankMemory(*cfg, 2);
  // Parameters x 4 (weights, gradients, AdamW m and v).
  const std::map<std::string, int64_t> want = {
      {"embeddings and head (+grads, AdamW)", 16 * (2 * 256 * 4 + 4 * 256 + 256 + 8 + 8)},
      {"routers (+grads, AdamW)", 16 * 4 * 4},
      {"this rank's experts (+grads, AdamW)", 4 * 2 * (4 * 16 + 64 * 2)},
      // 7 M-vectors and 5 router rows per token and layer, the head's logits and gradient, the
      // batch bytes and targets.
      {"token activations", 4 * 4 * (7 * 4 + 4 * 5) + 4 * 4 * 2 * 256 + 4 * (2 + 4)},
      // 2 M-wide copies per sent row (each pass's send layout, the combine's rows return into
      // it); 8 per received row: 2 ranks, 2 local experts.
      {"expert rows at capacity", 4 * (4 * 2 * 4 + 4 * (8 * 4 + 4 + 2 * 2))},
      {"per-group routing state", (4 * 28 + 256) + 256},
  };
  EXPECT_EQ(Terms(e), want);
  EXPECT_EQ(e.total(), 65672);
}

TEST(MemoryModel, RefusalNamesTheEstimateTheLargestTermsAndTheFields) {
  StatusOr<MoeConfig> cfg = ParseConfig(
      "moe { model_dim: 8 num_experts: 100000000 expert { hidden_dim: 8 } router { top_k: 1 } }",
      "huge");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  const MemoryEstimate e = LayerCallMemory(cfg->moe(), 16, false);
  EXPECT_GT(e.total(), int64_t{50} << 30);
  const Status s = CheckMemory(e, int64_t{8} << 30, "this layer call", "--max-memory", "--max-memory");
  ASSERT_FALSE(s.ok());
  const std::string msg = s.ToString();
  for (const char* part : {"this layer call needs an estimated", "routed experts' parameters",
                           "[moe.num_experts, moe.expert.hidden_dim]", "above --max-memory 8.00 GiB",
                           "raise --max-memory"}) {
    EXPECT_NE(msg.find(part), std::string::npos) << part << " in " << msg;
  }
  EXPECT_TRUE(CheckMemory(e, e.total(), "x", "y", "z").ok());
  EXPECT_TRUE(CheckMemory(e, 0, "x", "y", "z").ok());  // no limit known
}

TEST(MemoryModel, ByteSizes) {
  EXPECT_EQ(*ParseByteSize("--max-memory", "1048576"), 1048576);
  EXPECT_EQ(*ParseByteSize("--max-memory", "512M"), int64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("--max-memory", "1.5G"), int64_t{3} << 29);
  EXPECT_EQ(*ParseByteSize("--max-memory", "2GB"), int64_t{2} << 30);
  for (const char* bad : {"", "0", "-1G", "abc", "1.5X", "G"}) {
    EXPECT_FALSE(ParseByteSize("--max-memory", bad).ok()) << bad;
  }
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1536), "1.50 KiB");
  EXPECT_GT(AvailableMemoryBytes(), 0);
}

}  // namespace
}  // namespace moe
