// Failure behaviour in process (issue: reliability), with ranks as loopback threads:
// - a rank that stops calling collectives (dies) or stalls is named by every peer, which fails
//   within the deadline; a stalled rank that wakes up fails at once instead of hanging;
// - NaN gradients: SKIP_STEP skips exactly that step (parameters as if it never happened),
//   STOP ends the run with a clear message and the last checkpoint intact and resumable;
// - damaged checkpoints are refused with a message naming the problem, --resume falls back to the
//   newest complete one, a fresh run never writes over existing checkpoints, a damaged step
//   directory is moved aside (not deleted) when that step is saved again.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "comm/loopback/loopback_world.h"
#include "base/clock.h"
#include "base/file.h"
#include "runtime/train/checkpoint.h"
#include "runtime/config/config.h"
#include "runtime/train/fault_injection.h"
#include "runtime/train/trainer.h"
#include "tests/unit/train_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using testing::TinyTrainConfig;

struct RankResult {
  Status status;
  double end_seconds = 0.0;  // WallSeconds() when Run returned
  int64_t steps = 0;
  int64_t skipped = 0;
  std::vector<bool> skipped_flags;
  std::map<std::string, Tensor> params;  // this rank's parameters after the run
};

// Runs `cfg` on `world` loopback ranks with an after-backward hook; one result per rank.
std::vector<RankResult> RunJob(const MoeConfig& cfg, int world, std::function<Status(Trainer&)> hook = {},
                               bool resume = false) {
  std::vector<RankResult> out(static_cast<size_t>(world));
  comm::LoopbackOptions opts;
  opts.options.deadline_seconds = cfg.comm().deadline_seconds();
  auto w = comm::LoopbackWorld::Create(world, opts);
  EXPECT_TRUE(w.ok());
  w->RunPerRank([&](comm::Communicator& comm) {
    RankResult& r = out[static_cast<size_t>(comm.rank())];
    TrainOptions options;
    options.quiet = true;
    options.resume = resume;
    options.after_backward = hook;
    auto trainer = Trainer::Create(cfg, &comm, options);
    if (!trainer.ok()) {
      r.status = trainer.status();
      return;
    }
    r.status = (*trainer)->Run();
    r.end_seconds = WallSeconds();
    r.steps = (*trainer)->step();
    r.skipped = (*trainer)->skipped_steps();
    for (const auto& m : (*trainer)->history()) r.skipped_flags.push_back(m.skipped());
    for (const ParamRef& p : (*trainer)->model().Params()) r.params[p.name] = *p.value;
  });
  return out;
}

class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag)
      : path_(fs::temp_directory_path() / ("moe_fault_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

MoeConfig WithDeadline(MoeConfig cfg, double seconds) {
  cfg.mutable_comm()->set_deadline_seconds(seconds);
  return cfg;
}

// ---- A rank that stops ------------------------------------------------------------------------

TEST(FaultTest, RankThatStopsCallingIsNamedByEveryPeerWithinTheDeadline) {
  const double deadline = 2.0;
  const MoeConfig cfg = WithDeadline(TinyTrainConfig(8, 1), deadline);
  std::atomic<double> fault_time{0.0};
  auto hook = [&](Trainer& t) -> Status {
    if (t.world_rank() == 2 && t.step() == 3) {
      fault_time = WallSeconds();
      return Aborted("test: rank 2 stops calling collectives");  // the thread leaves the job
    }
    return Status::Ok();
  };
  const std::vector<RankResult> r = RunJob(cfg, 4, hook);
  ASSERT_GT(fault_time.load(), 0.0);
  EXPECT_EQ(r[2].status.code(), StatusCode::kAborted);
  for (int rank : {0, 1, 3}) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const Status& s = r[static_cast<size_t>(rank)].status;
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_NE(s.message().find("allreduce #"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("ranks [2] did not arrive"), std::string::npos) << s.ToString();
    const double waited = r[static_cast<size_t>(rank)].end_seconds - fault_time.load();
    EXPECT_GE(waited, deadline - 0.1);
    EXPECT_LE(waited, deadline + 3.0);
    EXPECT_EQ(r[static_cast<size_t>(rank)].steps, 3);
  }
}

TEST(FaultTest, StalledRankThatWakesUpFailsAtOnceInsteadOfHanging) {
  const double deadline = 1.0;
  const MoeConfig cfg = WithDeadline(TinyTrainConfig(8, 1), deadline);
  std::atomic<double> woke{0.0};
  auto hook = [&](Trainer& t) -> Status {
    if (t.world_rank() == 1 && t.step() == 2) {
      std::this_thread::sleep_for(std::chrono::duration<double>(deadline + 1.5));
      woke = WallSeconds();
    }
    return Status::Ok();
  };
  const std::vector<RankResult> r = RunJob(cfg, 4, hook);
  for (int rank : {0, 2, 3}) {
    const Status& s = r[static_cast<size_t>(rank)].status;
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_NE(s.message().find("ranks [1] did not arrive"), std::string::npos) << s.ToString();
  }
  const Status& late = r[1].status;
  EXPECT_EQ(late.code(), StatusCode::kAborted) << late.ToString();
  EXPECT_LE(r[1].end_seconds - woke.load(), 0.5) << "the late rank must fail at once, not wait for a deadline";
}

// ---- NaN / Inf --------------------------------------------------------------------------------

std::function<Status(Trainer&)> NanAt(int rank, int64_t step) {
  return MakeFaultHook(FaultSpec{FaultKind::kNan, rank, step}, /*process_per_rank=*/false);
}

void ExpectBitwiseEqual(const std::map<std::string, Tensor>& a, const std::map<std::string, Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    const Tensor& u = b.at(name);
    ASSERT_EQ(t.size(), u.size()) << name;
    int64_t differ = 0;
    for (int64_t i = 0; i < t.size(); ++i) differ += t[i] != u[i] ? 1 : 0;
    EXPECT_EQ(differ, 0) << name;
  }
}

TEST(FaultTest, NanGradientWithSkipStepSkipsExactlyThatStep) {
  MoeConfig cfg = TinyTrainConfig(3, 1);
  cfg.mutable_train()->set_nan_policy(config::SKIP_STEP);
  const std::vector<RankResult> poisoned = RunJob(cfg, 2, NanAt(1, 2));
  MoeConfig clean_cfg = cfg;
  clean_cfg.mutable_train()->set_steps(2);
  const std::vector<RankResult> clean = RunJob(clean_cfg, 2);
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const RankResult& p = poisoned[static_cast<size_t>(rank)];
    ASSERT_TRUE(p.status.ok()) << p.status.ToString();
    EXPECT_EQ(p.steps, 3);
    EXPECT_EQ(p.skipped, 1);
    EXPECT_EQ(p.skipped_flags, (std::vector<bool>{false, false, true}));
    // The skipped step changed nothing: the parameters are those of the clean 2-step run.
    ExpectBitwiseEqual(p.params, clean[static_cast<size_t>(rank)].params);
  }
  // Training goes on after a skipped step.
  cfg.mutable_train()->set_steps(6);
  const std::vector<RankResult> longer = RunJob(cfg, 2, NanAt(0, 2));
  EXPECT_TRUE(longer[0].status.ok());
  EXPECT_EQ(longer[0].steps, 6);
  EXPECT_EQ(longer[0].skipped, 1);
}

TEST(FaultTest, NanGradientWithStopEndsTheRunAndKeepsTheLastCheckpoint) {
  ScratchDir dir("nan_stop");
  MoeConfig cfg = TinyTrainConfig(6, 1);
  cfg.mutable_train()->set_nan_policy(config::STOP);
  cfg.mutable_train()->set_checkpoint_every(1);
  cfg.mutable_train()->set_checkpoint_dir(dir.path().string());
  const std::vector<RankResult> r = RunJob(cfg, 2, NanAt(1, 3));
  for (const RankResult& rank : r) {
    EXPECT_EQ(rank.status.code(), StatusCode::kFailedPrecondition) << rank.status.ToString();
    EXPECT_NE(rank.status.message().find("step 3: non-finite"), std::string::npos) << rank.status.ToString();
    EXPECT_NE(rank.status.message().find("train.nan_policy=STOP"), std::string::npos);
  }
  // Checkpoints after steps 1..3 exist; nothing of step 4 was written.
  StatusOr<std::string> latest = FindLatestCheckpoint(dir.path().string());
  ASSERT_TRUE(latest.ok()) << latest.status().ToString();
  EXPECT_EQ(fs::path(*latest).filename(), "step_00000003");
  EXPECT_TRUE(VerifyCheckpoint(*latest).ok());
  EXPECT_FALSE(fs::exists(dir.path() / "step_00000004"));
  EXPECT_FALSE(fs::exists(dir.path() / "step_00000003.tmp"));
  // It resumes without the fault and finishes; the parameters at step 3 are the clean run's.
  const std::vector<RankResult> resumed = RunJob(cfg, 2, {}, /*resume=*/true);
  ASSERT_TRUE(resumed[0].status.ok()) << resumed[0].status.ToString();
  EXPECT_EQ(resumed[0].steps, 6);
  ScratchDir clean_dir("nan_stop_clean");
  MoeConfig clean_cfg = cfg;
  clean_cfg.mutable_train()->set_checkpoint_dir(clean_dir.path().string());
  const std::vector<RankResult> clean = RunJob(clean_cfg, 2);
  for (int rank = 0; rank < 2; ++rank) {
    ExpectBitwiseEqual(resumed[static_cast<size_t>(rank)].params, clean[static_cast<size_t>(rank)].params);
  }
}

TEST(FaultTest, InjectedFaultSpecsParseAndBadOnesAreNamed) {
  StatusOr<FaultSpec> ok = ParseFaultSpec("stall@2:15");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->kind, FaultKind::kStall);
  EXPECT_EQ(ok->rank, 2);
  EXPECT_EQ(ok->step, 15);
  for (const auto& [text, expect] : std::vector<std::pair<std::string, std::string>>{
           {"stall", "must be KIND@RANK:STEP"},
           {"crash@1:2", "kind 'crash' must be stall, exit or nan"},
           {"nan@x:2", "rank 'x' must be a non-negative integer"},
           {"exit@1:-3", "step '-3' must be a non-negative integer"},
           {"exit@1:", "step '' must be"}}) {
    StatusOr<FaultSpec> bad = ParseFaultSpec(text);
    ASSERT_FALSE(bad.ok()) << text;
    EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(bad.status().message().find(expect), std::string::npos) << bad.status().message();
  }
}

// ---- Damaged checkpoints ----------------------------------------------------------------------

class DamagedCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = TinyTrainConfig(4, 1);
    cfg_.mutable_train()->set_checkpoint_every(2);
    cfg_.mutable_train()->set_checkpoint_dir(dir_.path().string());
    const std::vector<RankResult> r = RunJob(cfg_, 1);
    ASSERT_TRUE(r[0].status.ok()) << r[0].status.ToString();
    newest_ = dir_.path() / "step_00000004";
    ASSERT_TRUE(VerifyCheckpoint(newest_.string()).ok());
    fs::copy(newest_, backup_.path(), fs::copy_options::recursive);
  }
  void Restore() {
    fs::remove_all(newest_);
    fs::copy(backup_.path(), newest_, fs::copy_options::recursive);
  }
  fs::path AnyTensorFile() const {
    for (const auto& e : fs::directory_iterator(newest_)) {
      if (e.path().extension() == ".npy") return e.path();
    }
    return {};
  }
  static std::string Read(const fs::path& p) {
    StatusOr<std::string> content = ReadFileToString(p.string());
    EXPECT_TRUE(content.ok()) << content.status().ToString();
    return content.ok() ? *content : std::string();
  }
  static void Write(const fs::path& p, const std::string& content) {
    const Status s = WriteFile(p.string(), content);
    EXPECT_TRUE(s.ok()) << s.ToString();
  }

  ScratchDir dir_{"damaged"};
  ScratchDir backup_{"damaged_backup"};
  MoeConfig cfg_;
  fs::path newest_;
};

TEST_F(DamagedCheckpointTest, EveryDamageIsRefusedAndResumeFallsBackToTheNewestCompleteOne) {
  struct Damage {
    std::string what, expect;
    std::function<void()> apply;
  };
  const fs::path tensor = AnyTensorFile();
  const fs::path manifest = newest_ / "manifest.textproto";
  const std::vector<Damage> damages = {
      {"truncated tensor", "bytes, the manifest says",
       [&] { const std::string c = Read(tensor); Write(tensor, c.substr(0, c.size() / 2)); }},
      {"flipped byte", "checksum does not match",
       [&] { std::string c = Read(tensor); c[c.size() - 3] ^= 0x40; Write(tensor, c); }},
      {"missing tensor file", "does not exist", [&] { fs::remove(tensor); }},
      {"missing manifest", "is incomplete", [&] { fs::remove(manifest); }},
      {"garbage manifest", "not a valid moe.checkpoint.Manifest", [&] { Write(manifest, "step: {{{ nonsense"); }},
      {"manifest of another format", "is not moe-checkpoint-v1",
       [&] { Write(manifest, "format: \"v0\"\n" + Read(manifest)); }},
      {"manifest pointing outside the directory", "must be",
       [&] {
         std::string m = Read(manifest);
         const std::string name = tensor.filename().string();
         m.replace(m.find("file: \"" + name), 7 + name.size(), "file: \"../" + name);
         Write(manifest, m);
       }},
  };
  for (const Damage& d : damages) {
    SCOPED_TRACE(d.what);
    Restore();
    d.apply();
    StatusOr<checkpoint::Manifest> v = VerifyCheckpoint(newest_.string());
    ASSERT_FALSE(v.ok());
    EXPECT_EQ(v.status().code(), StatusCode::kDataLoss) << v.status().ToString();
    EXPECT_NE(v.status().message().find(d.expect), std::string::npos) << v.status().message();
    EXPECT_NE(v.status().message().find("step_00000004"), std::string::npos) << v.status().message();
    StatusOr<std::string> latest = FindLatestCheckpoint(dir_.path().string());
    ASSERT_TRUE(latest.ok());
    EXPECT_EQ(fs::path(*latest).filename(), "step_00000002");
  }
  // Resuming with the damaged step 4 present starts from step 2 and, when it saves step 4 again,
  // moves the damaged directory aside instead of deleting it.
  Restore();
  Write(AnyTensorFile(), "not a tensor");
  const std::vector<RankResult> resumed = RunJob(cfg_, 1, {}, /*resume=*/true);
  ASSERT_TRUE(resumed[0].status.ok()) << resumed[0].status.ToString();
  EXPECT_EQ(resumed[0].steps, 4);
  EXPECT_TRUE(VerifyCheckpoint(newest_.string()).ok());
  EXPECT_TRUE(fs::exists(dir_.path() / "step_00000004.damaged" / "manifest.textproto"));
  StatusOr<std::string> latest = FindLatestCheckpoint(dir_.path().string());
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(fs::path(*latest).filename(), "step_00000004");
}

TEST_F(DamagedCheckpointTest, FreshRunRefusesADirectoryThatHoldsCheckpoints) {
  const std::string before = Read(newest_ / "manifest.textproto");
  const std::vector<RankResult> r = RunJob(cfg_, 2);
  for (const RankResult& rank : r) {
    EXPECT_EQ(rank.status.code(), StatusCode::kFailedPrecondition) << rank.status.ToString();
    EXPECT_NE(rank.status.message().find("already holds checkpoints"), std::string::npos);
    EXPECT_NE(rank.status.message().find("--resume"), std::string::npos);
  }
  EXPECT_EQ(Read(newest_ / "manifest.textproto"), before);
  EXPECT_TRUE(VerifyCheckpoint(newest_.string()).ok());
}

TEST(FaultTest, ResumeWithoutAnyCheckpointIsAClearError) {
  ScratchDir dir("empty");
  MoeConfig cfg = TinyTrainConfig(2, 1);
  cfg.mutable_train()->set_checkpoint_dir(dir.path().string());
  const std::vector<RankResult> r = RunJob(cfg, 1, {}, /*resume=*/true);
  EXPECT_EQ(r[0].status.code(), StatusCode::kNotFound) << r[0].status.ToString();
  EXPECT_NE(r[0].status.message().find("--resume"), std::string::npos) << r[0].status.ToString();
}

}  // namespace
}  // namespace moe
