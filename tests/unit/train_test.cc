// Training-job equivalence (issue: expert-parallel layer and moe_train): N steps on W ranks (threads
// over the loopback communicator) reach the same parameters as 1 rank with G = W local groups, and
// a checkpoint saved on 4 ranks resumes on 2 and on 1 with the same parameters afterwards.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <unistd.h>

#include <mutex>
#include <string>

#include "comm/loopback/loopback_world.h"
#include "runtime/config/config.h"
#include "runtime/train/trainer.h"
#include "tests/unit/train_util.h"

namespace moe {
namespace {

MoeConfig TinyConfig(int steps, int groups, int ep_size = 0) {
  return testing::TinyTrainConfig(steps, groups, ep_size);
}

// Runs a job on `world` loopback ranks; returns every parameter by name (experts from the rank
// that holds them) and the per-step losses.
struct RunResult {
  std::map<std::string, Tensor> params;
  std::vector<double> losses;
};

RunResult Train(const MoeConfig& cfg, int world, bool resume = false) {
  RunResult out;
  auto w = comm::LoopbackWorld::Create(world, {});
  EXPECT_TRUE(w.ok());
  std::mutex mu;
  w->RunPerRank([&](comm::Communicator& comm) {
    TrainOptions opts;
    opts.quiet = true;
    opts.resume = resume;
    auto trainer = Trainer::Create(cfg, &comm, opts);
    ASSERT_TRUE(trainer.ok()) << trainer.status().ToString();
    Status s = (*trainer)->Run();
    ASSERT_TRUE(s.ok()) << s.ToString();
    std::lock_guard<std::mutex> lock(mu);
    for (const ParamRef& p : (*trainer)->model().Params()) {
      if (p.expert_id < 0 && comm.rank() != 0) continue;
      if (out.params.count(p.name) == 0) out.params[p.name] = *p.value;
    }
    if (comm.rank() == 0) {
      for (const auto& m : (*trainer)->history()) out.losses.push_back(m.loss());
    }
  });
  return out;
}

void ExpectSameParams(const RunResult& a, const RunResult& b, float tol) {
  ASSERT_EQ(a.params.size(), b.params.size());
  for (const auto& [name, t] : a.params) {
    auto it = b.params.find(name);
    ASSERT_NE(it, b.params.end()) << name;
    ASSERT_EQ(t.size(), it->second.size()) << name;
    float worst = 0.0f;
    for (int64_t i = 0; i < t.size(); ++i) worst = std::max(worst, std::abs(t[i] - it->second[i]));
    EXPECT_LE(worst, tol) << name;
  }
}

TEST(TrainTest, WRanksReachTheParametersOfOneRankWithWGroups) {
  const int steps = 12;
  const RunResult one = Train(TinyConfig(steps, 4), 1);
  ASSERT_EQ(one.losses.size(), static_cast<size_t>(steps));
  EXPECT_LT(one.losses.back(), one.losses.front());
  for (int world : {2, 4}) {
    SCOPED_TRACE("world " + std::to_string(world));
    const RunResult many = Train(TinyConfig(steps, 4 / world), world);
    ExpectSameParams(many, one, 1e-5f);
    for (int s = 0; s < steps; ++s) EXPECT_NEAR(many.losses[s], one.losses[s], 1e-6) << "step " << s;
  }
}

TEST(TrainTest, ExpertDataParallelReplicasMatchToo) {
  // World 4 = 2-way expert parallel x 2 replicas: expert gradients are reduced over replicas.
  const int steps = 8;
  const RunResult one = Train(TinyConfig(steps, 4), 1);
  const RunResult replicated = Train(TinyConfig(steps, 1, 2), 4);
  ExpectSameParams(replicated, one, 1e-5f);
}

TEST(TrainTest, CheckpointFromFourRanksResumesOnTwoAndOne) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("moe_train_test_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  MoeConfig cfg = TinyConfig(12, 1);
  cfg.mutable_train()->set_checkpoint_every(6);
  cfg.mutable_train()->set_checkpoint_dir(dir.string());
  const RunResult full = Train(cfg, 4);
  ASSERT_TRUE(fs::exists(dir / "step_00000006" / "manifest.textproto"));
  ASSERT_TRUE(fs::exists(dir / "step_00000012" / "manifest.textproto"));
  for (int world : {2, 1}) {
    SCOPED_TRACE("resume on " + std::to_string(world));
    fs::remove_all(dir / "step_00000012");  // resume from step 6
    MoeConfig rcfg = cfg;
    rcfg.mutable_moe()->mutable_router()->set_num_local_groups(4 / world);
    const RunResult resumed = Train(rcfg, world, /*resume=*/true);
    ASSERT_EQ(resumed.losses.size(), 6u);
    for (int s = 0; s < 6; ++s) EXPECT_NEAR(resumed.losses[s], full.losses[6 + s], 1e-6);
    ExpectSameParams(resumed, full, 1e-5f);
  }
  fs::remove_all(dir);
}

TEST(TrainTest, FinetuneModesFreezeTheRightParameters) {
  const MoeConfig base = TinyConfig(0, 1);  // 0 steps: the initial parameters
  const RunResult init = Train(base, 2);
  for (auto mode : {config::FREEZE_NON_EXPERT, config::FREEZE_MOE}) {
    SCOPED_TRACE(config::FinetuneMode_Name(mode));
    MoeConfig cfg = TinyConfig(4, 1);
    cfg.mutable_train()->set_finetune(mode);
    const RunResult tuned = Train(cfg, 2);
    for (const auto& [name, t] : init.params) {
      const bool expert = name.find("_moe_expert_") != std::string::npos;
      const bool moe = name.find("_moe_") != std::string::npos;
      const bool should_change = mode == config::FREEZE_NON_EXPERT ? expert : !moe;
      bool changed = false;
      const Tensor& after = tuned.params.at(name);
      for (int64_t i = 0; i < t.size(); ++i) changed = changed || after[i] != t[i];
      EXPECT_EQ(changed, should_change) << name;
    }
  }
}

}  // namespace
}  // namespace moe
