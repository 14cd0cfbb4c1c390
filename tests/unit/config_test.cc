// Config parsing and validation: every error names the field path, the value and the rule.
#include "runtime/config/config.h"

#include <google/protobuf/descriptor.h>
#include <gtest/gtest.h>

#include <string>

namespace moe {
namespace {

const char* kValidLayer = R"(
moe {
  model_dim: 16
  num_experts: 4
  expert { hidden_dim: 32 activation: SILU }
  router { gate: TOPK top_k: 2 normalization: TOPK_SOFTMAX capacity_factor_train: 1.5
           min_capacity: 2 num_local_groups: 2 aux_loss: IMPORTANCE_CV z_loss_weight: 0.001 }
  num_shared_experts: 1
}
seed: 77
)";

// Parses `text`; expects InvalidArgument whose message contains every one of `parts`.
void ExpectInvalid(const std::string& text, std::initializer_list<std::string> parts) {
  StatusOr<MoeConfig> cfg = ParseConfig(text, "cfg.textproto");
  ASSERT_FALSE(cfg.ok()) << text;
  EXPECT_EQ(cfg.status().code(), StatusCode::kInvalidArgument) << cfg.status().ToString();
  EXPECT_NE(cfg.status().message().find("cfg.textproto"), std::string::npos) << cfg.status().message();
  for (const std::string& p : parts) {
    EXPECT_NE(cfg.status().message().find(p), std::string::npos)
        << "missing '" << p << "' in: " << cfg.status().message();
  }
}

std::string Layer(const std::string& router, const std::string& extra = "") {
  return "moe { model_dim: 8 num_experts: 4 expert { hidden_dim: 16 } router { " + router + " } " +
         extra + " }";
}

TEST(ConfigTest, ParsesValidTextAndFillsDefaults) {
  StatusOr<MoeConfig> cfg = ParseConfig(kValidLayer, "valid");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  const auto& l = cfg->moe();
  EXPECT_EQ(l.model_dim(), 16);
  EXPECT_EQ(l.num_experts(), 4);
  EXPECT_EQ(l.expert().hidden_dim(), 32);
  EXPECT_EQ(l.expert().activation(), config::SILU);
  EXPECT_EQ(l.expert().kind(), config::FFN);
  EXPECT_TRUE(l.expert().bias());
  EXPECT_EQ(l.router().top_k(), 2);
  EXPECT_EQ(l.router().normalization(), config::TOPK_SOFTMAX);
  EXPECT_EQ(l.router().capacity_factor_train(), 1.5);
  EXPECT_EQ(l.router().capacity_factor_eval(), 2.0);
  EXPECT_EQ(l.router().min_capacity(), 2);
  EXPECT_EQ(l.router().num_local_groups(), 2);
  EXPECT_EQ(l.router().aux_loss(), config::IMPORTANCE_CV);
  EXPECT_EQ(l.router().z_loss_weight(), 0.001);
  EXPECT_EQ(l.num_shared_experts(), 1);
  EXPECT_EQ(SharedHidden(l), 32);
  EXPECT_EQ(cfg->seed(), 77u);
  // Defaults are explicit after resolution.
  EXPECT_TRUE(l.router().has_drop_policy());
  EXPECT_TRUE(cfg->train().has_lr());
}

TEST(ConfigTest, KindDependentDefaults) {
  StatusOr<MoeConfig> top1 = ParseConfig(Layer("gate: TOP1"), "t");
  ASSERT_TRUE(top1.ok()) << top1.status().ToString();
  EXPECT_EQ(top1->moe().router().top_k(), 1);
  StatusOr<MoeConfig> noisy = ParseConfig(Layer("gate: NOISY_TOPK"), "t");
  ASSERT_TRUE(noisy.ok()) << noisy.status().ToString();
  EXPECT_EQ(noisy->moe().router().normalization(), config::TOPK_SOFTMAX);
  StatusOr<MoeConfig> ec = ParseConfig(Layer("gate: EXPERT_CHOICE"), "t");
  ASSERT_TRUE(ec.ok()) << ec.status().ToString();
  EXPECT_EQ(ec->moe().router().aux_loss(), config::NO_AUX_LOSS);
  StatusOr<MoeConfig> rr = ParseConfig(Layer("top_k: 2 random_routing: true"), "t");
  EXPECT_TRUE(rr.ok()) << rr.status().ToString();
  StatusOr<MoeConfig> dropless = ParseConfig(Layer("capacity_factor_train: 0 capacity_factor_eval: -1"), "t");
  EXPECT_TRUE(dropless.ok()) << dropless.status().ToString();
}

TEST(ConfigTest, NodeDedupNeedsTheTwoStageExchange) {
  ExpectInvalid(Layer("top_k: 2") + " parallel { node_dedup: true }",
                {"parallel.node_dedup=true", "comm.ranks_per_node > 0"});
  EXPECT_TRUE(ParseConfig(Layer("top_k: 2") + " parallel { node_dedup: true } comm { ranks_per_node: 2 }",
                          "cfg.textproto")
                  .ok());
}

TEST(ConfigTest, TopKAboveNumExperts) {
  ExpectInvalid(Layer("top_k: 5"), {"moe.router.top_k=5", "<= moe.num_experts=4"});
  ExpectInvalid(Layer("gate: NOISY_TOPK top_k: 5"), {"moe.router.top_k=5", "<= moe.num_experts=4"});
  ExpectInvalid(Layer("top_k: 0"), {"moe.router.top_k=0", ">= 1"});
  EXPECT_TRUE(ParseConfig(Layer("top_k: 4"), "t").ok());
}

TEST(ConfigTest, Top1WithTopK2) {
  ExpectInvalid(Layer("gate: TOP1 top_k: 2"), {"moe.router.top_k=2", "be 1 with gate TOP1"});
}

TEST(ConfigTest, RandomRoutingNeedsK2) {
  ExpectInvalid(Layer("top_k: 3 random_routing: true"),
                {"moe.router.top_k=3", "be 2 when moe.router.random_routing is true"});
  ExpectInvalid(Layer("gate: TOP1 random_routing: true"),
                {"moe.router.top_k=1", "be 2 when moe.router.random_routing is true"});
}

TEST(ConfigTest, NoisyTopKNeedsTopKSoftmax) {
  ExpectInvalid(Layer("gate: NOISY_TOPK normalization: NONE"),
                {"moe.router.normalization=NONE", "TOPK_SOFTMAX with gate NOISY_TOPK"});
  ExpectInvalid(Layer("gate: NOISY_TOPK normalization: RENORM_AFTER_CAPACITY"),
                {"moe.router.normalization=RENORM_AFTER_CAPACITY", "TOPK_SOFTMAX with gate NOISY_TOPK"});
}

TEST(ConfigTest, ExpertChoiceRestrictions) {
  ExpectInvalid(Layer("gate: EXPERT_CHOICE aux_loss: SWITCH"),
                {"moe.router.aux_loss=SWITCH", "be NO_AUX_LOSS with gate EXPERT_CHOICE"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE reroute_overflow: true"),
                {"moe.router.reroute_overflow", "with gate EXPERT_CHOICE"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE bias_update_rate: 0.1"),
                {"moe.router.bias_update_rate=0.1", "be 0 with gate EXPERT_CHOICE"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE random_routing: true"),
                {"moe.router.random_routing", "with gate EXPERT_CHOICE"});
}

TEST(ConfigTest, RoutingOfTheSecondWave) {
  // Score function and scaling.
  ExpectInvalid(Layer("gate: NOISY_TOPK score_function: SIGMOID"),
                {"moe.router.gate=NOISY_TOPK", "TOP1 or TOPK with moe.router.score_function SIGMOID"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE score_function: SIGMOID"),
                {"moe.router.gate=EXPERT_CHOICE", "score_function SIGMOID"});
  ExpectInvalid(Layer("scaling_factor: 0"), {"moe.router.scaling_factor=0", "be > 0"});
  ExpectInvalid(Layer("scaling_factor: -2.5"), {"moe.router.scaling_factor=-2.5", "be > 0"});
  ExpectInvalid(Layer("scaling_factor: inf"), {"moe.router.scaling_factor", "finite"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE scaling_factor: 2"),
                {"moe.router.scaling_factor=2", "be 1 with gate EXPERT_CHOICE"});
  // Group-limited top-k (E = 4).
  ExpectInvalid(Layer("num_expert_groups: 3"),
                {"moe.router.num_expert_groups=3", "divide moe.num_experts=4"});
  ExpectInvalid(Layer("num_expert_groups: 0"), {"moe.router.num_expert_groups=0", "be >= 1"});
  ExpectInvalid(Layer("num_expert_groups: 2 groups_per_token: 3"),
                {"moe.router.groups_per_token=3", "be <= moe.router.num_expert_groups=2"});
  ExpectInvalid(Layer("num_expert_groups: 2 groups_per_token: 0"),
                {"moe.router.groups_per_token=0", "be >= 1"});
  ExpectInvalid(Layer("top_k: 3 num_expert_groups: 2 groups_per_token: 2"),
                {"moe.router.top_k=3", "divisible by moe.router.groups_per_token=2"});
  ExpectInvalid(Layer("top_k: 4 num_expert_groups: 2 groups_per_token: 1"),
                {"moe.router.top_k=4", "groups_per_token * experts per group (1 * 2)"});
  ExpectInvalid(Layer("num_expert_groups: 2 reroute_overflow: true"),
                {"moe.router.reroute_overflow", "num_expert_groups > 1"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE num_expert_groups: 2"),
                {"moe.router.num_expert_groups=2", "be 1 with gate EXPERT_CHOICE"});
  // Per-expert drop policies.
  ExpectInvalid(Layer("drop_policy: EXPERT_SCORE reroute_overflow: true"),
                {"moe.router.reroute_overflow", "drop_policy EXPERT_SCORE", "slot-major"});
  ExpectInvalid(Layer("drop_policy: TOKEN_ORDER reroute_overflow: true"),
                {"moe.router.reroute_overflow", "drop_policy TOKEN_ORDER"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE drop_policy: EXPERT_SCORE"),
                {"moe.router.drop_policy=EXPERT_SCORE", "be POSITION with gate EXPERT_CHOICE"});
  // And the valid combinations parse.
  EXPECT_TRUE(ParseConfig(Layer("score_function: SIGMOID scaling_factor: 2.5 top_k: 2 "
                                "num_expert_groups: 2 groups_per_token: 1 drop_policy: "
                                "EXPERT_SCORE aux_loss: SWITCH_TOPK normalization: TOPK_SOFTMAX"),
                          "t")
                  .ok());
}

TEST(ConfigTest, SoftMoeRefusesTopKOptions) {
  for (const auto& [router, want] : std::vector<std::pair<std::string, std::string>>{
           {"gate: SOFT aux_loss: SWITCH", "moe.router.aux_loss=SWITCH"},
           {"gate: SOFT z_loss_weight: 0.1", "moe.router.z_loss_weight=0.1"},
           {"gate: SOFT random_routing: true", "moe.router.random_routing"},
           {"gate: SOFT reroute_overflow: true", "moe.router.reroute_overflow"},
           {"gate: SOFT bias_update_rate: 0.1", "moe.router.bias_update_rate=0.1"},
           {"gate: SOFT normalization: TOPK_SOFTMAX", "moe.router.normalization=TOPK_SOFTMAX"},
           {"gate: SOFT drop_policy: PROBABILITY", "moe.router.drop_policy=PROBABILITY"},
           {"gate: SOFT score_function: SIGMOID", "moe.router.score_function=SIGMOID"},
           {"gate: SOFT scaling_factor: 2", "moe.router.scaling_factor=2"},
           {"gate: SOFT num_expert_groups: 2", "moe.router.num_expert_groups=2"}}) {
    ExpectInvalid(Layer(router), {want, "with gate SOFT"});
  }
  ExpectInvalid(Layer("gate: SOFT slots_per_expert: 0"),
                {"moe.router.slots_per_expert=0", "be >= 1"});
  ExpectInvalid(Layer("gate: SOFT") + " train { router_record_dir: \"r\" }",
                {"train.router_record_dir", "gate SOFT"});
  StatusOr<MoeConfig> ok = ParseConfig(Layer("gate: SOFT slots_per_expert: 3"), "soft");
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->moe().router().aux_loss(), config::NO_AUX_LOSS);  // resolved like EXPERT_CHOICE
  EXPECT_EQ(RouterColumns(ok->moe()), 12);
}

TEST(ConfigTest, RouterReplayRules) {
  ExpectInvalid(Layer("reroute_overflow: true") + " train { router_replay_dir: \"r\" }",
                {"moe.router.reroute_overflow", "train.router_replay_dir"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE") + " train { router_record_dir: \"r\" }",
                {"train.router_record_dir", "EXPERT_CHOICE"});
  ExpectInvalid(Layer("") + " train { router_replay_dir: \"r\" } compute { device: CUDA }",
                {"train.router_replay_dir=r", "compute.device=CUDA"});
}

TEST(ConfigTest, MissingOrBadDims) {
  // Required fields that are missing are reported as missing, with their path.
  ExpectInvalid("moe { num_experts: 4 expert { hidden_dim: 16 } }", {"moe.model_dim must be set"});
  ExpectInvalid("moe { model_dim: 8 expert { hidden_dim: 16 } }", {"moe.num_experts must be set"});
  ExpectInvalid("moe { model_dim: 8 num_experts: 4 }", {"moe.expert.hidden_dim must be set"});
  ExpectInvalid("moe { model_dim: 8 num_experts: 4 expert { hidden_dim: 0 } }",
                {"moe.expert.hidden_dim=0", "be > 0"});
  ExpectInvalid("moe { model_dim: -3 num_experts: 4 expert { hidden_dim: 2 } }",
                {"moe.model_dim=-3", "be > 0"});
  ExpectInvalid("seed: 3", {"moe must be set"});
  ExpectInvalid(Layer("", "num_shared_experts: -1"), {"moe.num_shared_experts=-1", "be >= 0"});
}

TEST(ConfigTest, PipelineDegreeRange) {
  ExpectInvalid(Layer("") + " parallel { pipeline_degree: 0 }",
                {"parallel.pipeline_degree=0", "be in [1, 16]"});
  ExpectInvalid(Layer("") + " parallel { pipeline_degree: 17 }",
                {"parallel.pipeline_degree=17", "be in [1, 16]"});
}

// bf16 experts: model_dim and the experts' hidden dims multiples of 8 (aligned bf16 rows).
TEST(ConfigTest, Bf16ExpertDims) {
  const std::string cuda_bf16 = " compute { device: CUDA expert_precision: BF16 }";
  ExpectInvalid("moe { model_dim: 12 num_experts: 4 expert { hidden_dim: 16 } }" + cuda_bf16,
                {"moe.model_dim=12", "be a multiple of 8 with compute.expert_precision=BF16"});
  ExpectInvalid("moe { model_dim: 16 num_experts: 4 expert { hidden_dim: 20 } }" + cuda_bf16,
                {"moe.expert.hidden_dim=20", "be a multiple of 8"});
  ExpectInvalid("moe { model_dim: 16 num_experts: 4 expert { hidden_dim: 16 } "
                "num_shared_experts: 1 shared_hidden_dim: 36 }" + cuda_bf16,
                {"moe.shared_hidden_dim=36", "be a multiple of 8"});
  EXPECT_TRUE(ParseConfig("moe { model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } "
                          "num_shared_experts: 1 shared_hidden_dim: 40 }" + cuda_bf16,
                          "cfg.textproto")
                  .ok());
  // fp32 experts take any dimensions.
  EXPECT_TRUE(ParseConfig("moe { model_dim: 12 num_experts: 4 expert { hidden_dim: 20 } } "
                          "compute { device: CUDA }",
                          "cfg.textproto")
                  .ok());
  // And the layer-level check (MakeMoeLayer, the Python module) says the same.
  config::ComputeConfig compute;
  compute.set_device(config::CUDA);
  compute.set_expert_precision(config::BF16);
  config::LayerConfig layer;
  layer.set_model_dim(12);
  layer.mutable_expert()->set_hidden_dim(16);
  const Status s = ValidateCompute(compute, layer);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("moe.model_dim=12 must be a multiple of 8"), std::string::npos)
      << s.ToString();
}

TEST(ConfigTest, RedundantExperts) {
  ExpectInvalid(Layer("") + " parallel { num_redundant_experts: -1 }",
                {"parallel.num_redundant_experts=-1", "be >= 0"});
  ExpectInvalid(Layer("") + " parallel { rebalance_every: 5 }",
                {"parallel.rebalance_every=5", "be 0 without redundant experts"});
  ExpectInvalid(Layer("") + " parallel { num_redundant_experts: 2 rebalance_every: -1 }",
                {"parallel.rebalance_every=-1", "be >= 0"});
  ExpectInvalid(Layer("gate: EXPERT_CHOICE") + " parallel { num_redundant_experts: 2 }",
                {"parallel.num_redundant_experts=2", "EXPERT_CHOICE"});
  ExpectInvalid(Layer("") + " parallel { num_redundant_experts: 2 } compute { device: CUDA }",
                {"parallel.num_redundant_experts=2", "compute.device=CUDA"});
  StatusOr<MoeConfig> cfg = ParseConfig(
      "moe { model_dim: 8 num_experts: 8 expert { hidden_dim: 4 } } train { global_batch_tokens: 64 } "
      "parallel { num_redundant_experts: 3 }",
      "r");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  Status s = ValidateForWorld(*cfg, 4);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message(),
            "parallel.num_redundant_experts: 8 experts + 3 redundant = 11 physical experts must be "
            "divisible by the expert-parallel size 4");
  cfg->mutable_parallel()->set_num_redundant_experts(4);
  EXPECT_TRUE(ValidateForWorld(*cfg, 4).ok());
  // At most one replica per rank: R <= E (W - 1); one rank has no room for any.
  cfg->mutable_parallel()->set_num_redundant_experts(8);
  s = ValidateForWorld(*cfg, 1);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("must be <= moe.num_experts x (expert-parallel size - 1) = 0"),
            std::string::npos)
      << s.message();
  EXPECT_TRUE(ValidateForWorld(*cfg, 2).ok());
}

TEST(ConfigTest, RouterNumbers) {
  ExpectInvalid(Layer("min_capacity: -1"), {"moe.router.min_capacity=-1", "be >= 0"});
  ExpectInvalid(Layer("num_local_groups: 0"), {"moe.router.num_local_groups=0", "be >= 1"});
  ExpectInvalid(Layer("capacity_factor_train: nan"),
                {"moe.router.capacity_factor_train=nan", "be a finite number"});
  ExpectInvalid(Layer("capacity_factor_eval: inf"),
                {"moe.router.capacity_factor_eval=inf", "be a finite number"});
  ExpectInvalid(Layer("aux_loss_weight: -0.5"), {"moe.router.aux_loss_weight=-0.5", "be >= 0"});
  ExpectInvalid(Layer("z_loss_weight: nan"), {"moe.router.z_loss_weight=nan", "finite"});
  ExpectInvalid(Layer("bias_update_rate: -1"), {"moe.router.bias_update_rate=-1", "be >= 0"});
}

TEST(ConfigTest, TrainNumbers) {
  ExpectInvalid(Layer("") + " train { lr: 0 }", {"train.lr=0", "> 0"});
  ExpectInvalid(Layer("") + " train { beta1: 1 }", {"train.beta1=1", "[0, 1)"});
  ExpectInvalid(Layer("") + " comm { deadline_seconds: -1 }", {"comm.deadline_seconds=-1"});
  ExpectInvalid(Layer("") + " topology { nodes: 0 gpus_per_node: 1 }", {"topology.nodes=0"});
}

TEST(ConfigTest, SyntaxErrorsHaveLineAndColumn) {
  StatusOr<MoeConfig> cfg = ParseConfig("moe {\n  model_dim: 8\n  no_such_field: 3\n}\n", "x.textproto");
  ASSERT_FALSE(cfg.ok());
  EXPECT_EQ(cfg.status().code(), StatusCode::kInvalidArgument);
  const std::string& m = cfg.status().message();
  EXPECT_NE(m.find("x.textproto"), std::string::npos) << m;
  EXPECT_NE(m.find("line 3"), std::string::npos) << m;
  EXPECT_NE(m.find("column "), std::string::npos) << m;
  EXPECT_NE(m.find("no_such_field"), std::string::npos) << m;

  StatusOr<MoeConfig> syn = ParseConfig("moe { model_dim: 8\n num_experts: : 4 }", "y.textproto");
  ASSERT_FALSE(syn.ok());
  EXPECT_NE(syn.status().message().find("y.textproto"), std::string::npos);
  EXPECT_NE(syn.status().message().find("line 2"), std::string::npos) << syn.status().message();
  EXPECT_NE(syn.status().message().find("column"), std::string::npos);

  StatusOr<MoeConfig> badenum = ParseConfig("moe { router { gate: TOP3 } }", "z");
  ASSERT_FALSE(badenum.ok());
  EXPECT_NE(badenum.status().message().find("TOP3"), std::string::npos) << badenum.status().message();
  EXPECT_NE(badenum.status().message().find("line 1"), std::string::npos);
}

TEST(ConfigTest, ValidateForWorld) {
  StatusOr<MoeConfig> cfg = ParseConfig(
      "moe { model_dim: 8 num_experts: 6 expert { hidden_dim: 4 } } train { global_batch_tokens: 1536 }",
      "w");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  Status s = ValidateForWorld(*cfg, 4);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "moe.num_experts=6 must be divisible by ep_size=4");
  EXPECT_EQ(s.ToString(), "INVALID_ARGUMENT: moe.num_experts=6 must be divisible by ep_size=4");
  EXPECT_TRUE(ValidateForWorld(*cfg, 3).ok());
  EXPECT_TRUE(ValidateForWorld(*cfg, 6).ok());
  MoeConfig c2 = *cfg;
  c2.mutable_parallel()->set_ep_size(3);
  EXPECT_TRUE(ValidateForWorld(c2, 6).ok());
  Status bad = ValidateForWorld(c2, 4);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("parallel.ep_size=3"), std::string::npos) << bad.message();
  // Every rank's batch splits into its local groups, each reading its own data shard.
  MoeConfig c3 = *cfg;
  c3.mutable_train()->set_global_batch_tokens(1000);
  Status batch = ValidateForWorld(c3, 3);
  ASSERT_FALSE(batch.ok());
  EXPECT_EQ(batch.message(),
            "train.global_batch_tokens=1000 must be divisible by world size x moe.router.num_local_groups = 3");
}

// Every field name of `d` (recursively through set sub-messages) appears as "name": in json.
void ExpectAllFields(const google::protobuf::Descriptor* d, const std::string& json, bool with_topology) {
  for (int i = 0; i < d->field_count(); ++i) {
    const auto* f = d->field(i);
    if (f->message_type() != nullptr) {
      if (f->name() == "topology" && !with_topology) {
        EXPECT_EQ(json.find("\"topology\""), std::string::npos);
        continue;
      }
      EXPECT_NE(json.find("\"" + f->name() + "\""), std::string::npos) << f->full_name();
      ExpectAllFields(f->message_type(), json, with_topology);
      continue;
    }
    EXPECT_NE(json.find("\"" + f->name() + "\":"), std::string::npos) << f->full_name() << "\n" << json;
  }
}

TEST(ConfigTest, ConfigToJsonHasEveryField) {
  StatusOr<MoeConfig> cfg = ParseConfig(kValidLayer, "valid");
  ASSERT_TRUE(cfg.ok());
  const std::string json = ConfigToJson(*cfg);
  EXPECT_NE(json.find("\"min_capacity\": 2"), std::string::npos) << json;
  EXPECT_NE(json.find("\"num_local_groups\": 2"), std::string::npos) << json;
  EXPECT_NE(json.find("\"capacity_factor_eval\": 2"), std::string::npos) << json;
  EXPECT_NE(json.find("\"IMPORTANCE_CV\""), std::string::npos) << json;
  ExpectAllFields(MoeConfig::descriptor(), json, false);

  // From an unresolved message, defaults (and kind defaults) are written too.
  MoeConfig raw;
  raw.mutable_moe()->set_model_dim(4);
  raw.mutable_moe()->mutable_router()->set_gate(config::TOP1);
  const std::string j2 = ConfigToJson(raw);
  EXPECT_NE(j2.find("\"top_k\": 1"), std::string::npos) << j2;
  EXPECT_NE(j2.find("\"min_capacity\": 4"), std::string::npos) << j2;
  ExpectAllFields(MoeConfig::descriptor(), j2, false);

  MoeConfig topo = *cfg;
  topo.mutable_topology()->set_name("t");
  ExpectAllFields(MoeConfig::descriptor(), ConfigToJson(topo), true);
}

}  // namespace
}  // namespace moe
