// The benchmark libraries behind moe_comm_bench, on loopback ranks: rows reach the sink on rank 0,
// results check out, and an injected raw baseline is what the baseline column times.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "comm/bench/collective_bench.h"
#include "comm/loopback/loopback_world.h"
#include "bench/bench_json.h"
#include "bench/dispatch_combine_bench.h"

namespace moe {
namespace {

using comm::bench::BenchRow;
using comm::bench::TimeCalls;
using comm::bench::TimeLoop;
using comm::bench::Timing;
using comm::bench::RawCollectives;

// Counts its calls and records the all-to-all-v send counts; moves no data (the timed run after
// the baseline overwrites the receive buffer anyway).
class CountingRaw final : public RawCollectives {
 public:
  const char* Name(Op op) const override {
    return op == Op::kAllToAllV   ? "fake_alltoallv"
           : op == Op::kAllReduce ? "fake_allreduce"
                                  : "fake_allgather";
  }
  Status AllToAllV(const void*, std::span<const int64_t> send_counts, std::span<const int64_t>,
                   void*, std::span<const int64_t>, std::span<const int64_t>,
                   comm::DataType) override {
    ++calls;
    last_send_counts.assign(send_counts.begin(), send_counts.end());
    return Status::Ok();
  }
  Status AllReduceSum(const void*, void*, int64_t, comm::DataType) override {
    ++calls;
    return Status::Ok();
  }
  Status AllGather(const void*, void*, int64_t, comm::DataType) override {
    ++calls;
    return Status::Ok();
  }

  int calls = 0;
  std::vector<int64_t> last_send_counts;
};

// Runs `bench` on `ranks` loopback ranks, each with its own CountingRaw (or none); returns the
// rows rank 0 handed to the sink and what it printed.
struct BenchRun {
  std::vector<Status> status;
  std::vector<CountingRaw> raw;
  std::vector<BenchRow> rows;
  std::string table;
};

template <typename Bench>
BenchRun RunOnLoopback(int ranks, bool with_raw, const Bench& bench) {
  BenchRun run;
  run.status.resize(static_cast<size_t>(ranks));
  run.raw.resize(static_cast<size_t>(ranks));
  auto world = comm::LoopbackWorld::Create(ranks, {});
  EXPECT_TRUE(world.ok());
  std::FILE* out = std::tmpfile();
  std::mutex mu;
  const comm::bench::RowSink sink = [&](const BenchRow& row) {
    std::lock_guard<std::mutex> lock(mu);
    run.rows.push_back(row);
    return Status::Ok();
  };
  world->RunPerRank([&](comm::Communicator& c) {
    const auto r = static_cast<size_t>(c.rank());
    run.status[r] = bench(c, with_raw ? &run.raw[r] : nullptr, out, sink);
  });
  std::rewind(out);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), out)) > 0) run.table.append(buf, n);
  std::fclose(out);
  return run;
}

TEST(CollectiveBench, RawBaselineIsTimedAndResultsCheck) {
  comm::bench::CollectiveBenchOptions o;
  o.op = "alltoallv";
  o.min_bytes = 1024;
  o.max_bytes = 4096;
  o.factor = 4;
  o.iters = 2;
  o.warmup = 1;
  const BenchRun run = RunOnLoopback(3, true, [&](auto& c, auto* raw, auto* out, const auto& sink) {
    return comm::bench::RunCollectiveBench(c, o, raw, out, sink);
  });
  for (const Status& s : run.status) EXPECT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(run.rows.size(), 2u);
  EXPECT_EQ(run.rows[0].bytes, 1020);  // 255 float32 = 85 per peer
  EXPECT_EQ(run.rows[1].count, 1023);
  for (const BenchRow& r : run.rows) {
    EXPECT_EQ(r.op, "alltoallv");
    EXPECT_EQ(r.wrong, 0);
    EXPECT_EQ(r.baseline, "fake_alltoallv");
  }
  for (const CountingRaw& raw : run.raw) EXPECT_EQ(raw.calls, 2 * (o.warmup + o.iters));
  EXPECT_NE(run.table.find("baseline = fake_alltoallv of the same bytes"), std::string::npos);
  EXPECT_NE(run.table.find("# Avg bus bandwidth"), std::string::npos);
}

TEST(CollectiveBench, MemcpyBaselineWithoutRaw) {
  comm::bench::CollectiveBenchOptions o;
  o.op = "allgather";
  o.min_bytes = o.max_bytes = 4096;
  o.iters = 1;
  o.warmup = 0;
  o.dtype = comm::DataType::kInt64;
  const BenchRun run =
      RunOnLoopback(2, false, [&](auto& c, auto* raw, auto* out, const auto& sink) {
        return comm::bench::RunCollectiveBench(c, o, raw, out, sink);
      });
  for (const Status& s : run.status) EXPECT_TRUE(s.ok()) << s.ToString();
  ASSERT_EQ(run.rows.size(), 1u);
  EXPECT_EQ(run.rows[0].baseline, "memcpy");
  EXPECT_EQ(run.rows[0].wrong, 0);
}

TEST(DispatchCombineBench, TokensPerSize) {
  // bytes / (k · M · 4) with k = 2, M = 32: 8K -> 32, 32K -> 128; 1 at least, repeats dropped.
  EXPECT_EQ(DispatchCombineTokens({8192, 32768}, 2, 32), (std::vector<int64_t>{32, 128}));
  EXPECT_EQ(DispatchCombineTokens({8, 16, 256, 512}, 2, 32), (std::vector<int64_t>{1, 2}));
}

TEST(DispatchCombineBench, ShapeIsChecked) {
  DispatchCombineBenchOptions o;
  o.experts = 3;
  EXPECT_EQ(CheckDispatchCombineShape(o, 2).message(),
            "--experts=3 must be divisible by the 2 ranks");
  o.experts = 0;
  o.top_k = 5;
  EXPECT_EQ(CheckDispatchCombineShape(o, 2).message(), "--topk=5 must be <= the 4 experts");
}

TEST(DispatchCombineBench, ReplaysTheExecutorsCountsThroughTheRawBaseline) {
  DispatchCombineBenchOptions o;
  o.tokens = {16, 64};
  o.hidden = 8;
  o.dropless_exchange = true;
  o.skew = {ProbsSkew::kZipf, 1.2};
  o.iters = 2;
  o.warmup = 1;
  const BenchRun run = RunOnLoopback(2, true, [&](auto& c, auto* raw, auto* out, const auto& sink) {
    return RunDispatchCombineBench(c, o, raw, out, sink);
  });
  for (const Status& s : run.status) EXPECT_TRUE(s.ok()) << s.ToString();
  // Per token count, float32 rows then bfloat16 rows of half the bytes, each over the all-to-all
  // and then the direct transport (loopback ranks share memory), the same bytes on both.
  ASSERT_EQ(run.rows.size(), 8u);
  for (size_t i = 0; i < run.rows.size(); ++i) {
    const BenchRow& r = run.rows[i];
    const bool direct = i % 2 == 1, fp32 = (i / 2) % 2 == 0;
    EXPECT_EQ(r.op, direct ? "dispatch_combine_direct" : "dispatch_combine");
    EXPECT_EQ(r.wrong, 0);
    EXPECT_EQ(r.dtype, fp32 ? "float32" : "bfloat16");
    EXPECT_EQ(r.count * (fp32 ? 4 : 2), r.bytes);
    if (direct) {
      EXPECT_EQ(r.bytes, run.rows[i - 1].bytes);
    }
    if (!fp32) {
      EXPECT_EQ(2 * r.bytes, run.rows[i - 2].bytes);
    }
  }
  // Per row: (warmup + iters) replays of both directions. The last replay is the combine
  // direction of the last row, which sends back what the dispatch received.
  int64_t combine_floats = 0;
  for (const CountingRaw& raw : run.raw) {
    EXPECT_EQ(raw.calls, 8 * 2 * (o.warmup + o.iters));
    for (int64_t c : raw.last_send_counts) combine_floats += c;
  }
  // Over all ranks, what the combines send equals what the dispatches sent: row.bytes per rank.
  EXPECT_EQ(combine_floats * 4, run.rows[7].bytes * 2);
  EXPECT_NE(run.table.find("direct"), std::string::npos);
  EXPECT_NE(run.table.find("baseline = fake_alltoallv of the same per-peer counts"),
            std::string::npos);
}

TEST(DispatchCombineBench, PipelineTableComparesEveryDegreeWithDegreeOne) {
  DispatchCombineBenchOptions o;
  o.tokens = {24};
  o.hidden = 8;
  o.expert_hidden = 12;
  o.pipeline_degrees = {3, 2, 3};  // degree 1 is added first, repeats dropped
  o.iters = 1;
  o.warmup = 1;
  for (const bool dropless : {false, true}) {
    o.dropless_exchange = dropless;
    const BenchRun run = RunOnLoopback(2, false, [&](auto& c, auto*, auto* out, const auto& sink) {
      return RunDispatchCombineBench(c, o, nullptr, out, sink);
    });
    for (const Status& s : run.status) EXPECT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(run.rows.size(), 3u);
    const char* ops[] = {"ep_pipeline_d1", "ep_pipeline_d3", "ep_pipeline_d2"};
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(run.rows[i].op, ops[i]);
      EXPECT_EQ(run.rows[i].wrong, 0);
      EXPECT_EQ(run.rows[i].baseline, "ep_pipeline_d1");
      EXPECT_GT(run.rows[i].bytes, 0);
      // Chunking moves the same rows: every degree sends the same bytes.
      EXPECT_EQ(run.rows[i].bytes, run.rows[0].bytes);
    }
    EXPECT_NE(run.table.find("speedup"), std::string::npos);
  }
  o.pipeline_degrees = {17};
  const BenchRun bad = RunOnLoopback(2, false, [&](auto& c, auto*, auto* out, const auto& sink) {
    return RunDispatchCombineBench(c, o, nullptr, out, sink);
  });
  EXPECT_EQ(bad.status[0].message(), "--pipeline-degree 17 must be in [1, 16]");
}

TEST(BenchJson, EveryFieldIsWritten) {
  BenchRow row;
  row.op = "alltoall";
  row.backend = "loopback";
  row.ranks = 2;
  row.bytes = 1024;
  row.count = 256;
  row.dtype = "float32";
  row.time_us = 2.5;
  row.wrong = 0;
  row.baseline = "memcpy";
  row.time_median_us = 2.25;
  row.time_min_us = 2;
  row.time_max_us = 4;
  row.iters = 8;
  std::ostringstream out;
  ASSERT_TRUE(WriteBenchJson(out, row).ok());
  EXPECT_EQ(out.str(),
            "{\"op\":\"alltoall\",\"backend\":\"loopback\",\"ranks\":2,\"bytes\":\"1024\","
            "\"count\":\"256\",\"dtype\":\"float32\",\"timeUs\":2.5,\"algbwGbps\":0,"
            "\"busbwGbps\":0,\"wrong\":\"0\",\"baselineTimeUs\":0,\"baseline\":\"memcpy\","
            "\"timeMedianUs\":2.25,\"timeMinUs\":2,\"timeMaxUs\":4,\"iters\":8}\n");
}

// The one timing loop: every call timed alone; median, min and max of the calls, over ranks each
// call's slowest rank, and the slowest rank's mean.
TEST(TimingLoop, SummarizesCallsAndRanks) {
  int calls = 0;
  auto local = TimeCalls(2, 5, [&] {
    ++calls;
    return Status::Ok();
  });
  ASSERT_TRUE(local.ok()) << local.status().ToString();
  EXPECT_EQ(calls, 7);  // 2 warm-up + 5 timed
  EXPECT_EQ(local->iters, 5);
  EXPECT_LE(local->min_us, local->median_us);
  EXPECT_LE(local->median_us, local->max_us);
  EXPECT_LE(local->min_us, local->mean_us);
  EXPECT_LE(local->mean_us, local->max_us);
  EXPECT_EQ(TimeCalls(0, 0, [] { return Status::Ok(); }).status().code(),
            StatusCode::kInvalidArgument);
  // Two ranks: rank 1 sleeps 3 ms in its second timed call only, so that call's slowest rank is
  // rank 1 (max >= 3 ms) while the median call stays fast on both.
  auto world = comm::LoopbackWorld::Create(2, {});
  ASSERT_TRUE(world.ok());
  std::vector<Timing> got(2);
  world->RunPerRank([&](comm::Communicator& c) {
    int call = 0;
    auto t = TimeLoop(c, 1, 5, [&] {
      if (c.rank() == 1 && call == 2) std::this_thread::sleep_for(std::chrono::milliseconds(3));
      ++call;
      return Status::Ok();
    });
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    got[static_cast<size_t>(c.rank())] = *t;
  });
  for (const Timing& t : got) {
    EXPECT_EQ(t.iters, 5);
    EXPECT_GE(t.max_us, 3000.0);
    EXPECT_LT(t.median_us, 3000.0);
    EXPECT_GE(t.mean_us, 3000.0 / 5);
  }
  EXPECT_EQ(got[0].max_us, got[1].max_us);  // every rank reports the same reduced numbers
  EXPECT_EQ(got[0].median_us, got[1].median_us);
}

}  // namespace
}  // namespace moe
