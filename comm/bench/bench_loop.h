// The one timing loop and table row of every benchmark in this project, in the manner of
// nccl-tests: warm-up calls, (a barrier,) timed calls each timed alone; the mean (nccl-tests'
// "time"; over ranks, the slowest rank's) and the median, minimum and maximum call (over ranks,
// each call's slowest rank); one row per measurement (time, algbw, busbw, #wrong, baseline), written
// as report.proto's BenchResult JSON lines by bench/bench_json.h; a closing average bus bandwidth.
// The communicator benchmarks (moe_comm_bench) time with TimeLoop, the single-process ones
// (moe_layer_bench, moe_gpu_bench) with TimeCalls. Built on the Communicator interface only.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "comm/communicator.h"
#include "base/status.h"

namespace moe::comm::bench {

// A scalar reduced over ranks, staged through the communicator's memory space.
StatusOr<double> ReduceScalar(Communicator& comm, double value, ReduceOp op);

// What a timed loop measured, in microseconds per call.
struct Timing {
  int iters = 0;
  double mean_us = 0;    // over ranks: the largest of the ranks' means
  double median_us = 0;  // over the calls; with ranks, of each call's slowest rank
  double min_us = 0;
  double max_us = 0;
};

// In this process: `warmup` untimed calls, then `iters` (>= 1) calls, each timed alone.
StatusOr<Timing> TimeCalls(int warmup, int iters, const std::function<Status()>& call);
// On every rank of `comm` (collective): `warmup` untimed calls, a barrier, then `iters` timed calls;
// the ranks' times are reduced as Timing says.
StatusOr<Timing> TimeLoop(Communicator& comm, int warmup, int iters,
                          const std::function<Status()>& call);
// The same, where each call returns the microseconds of it that count (parts timed alone, e.g.
// without the setup between them).
StatusOr<Timing> TimeLoopCounted(Communicator& comm, int warmup, int iters,
                                 const std::function<StatusOr<double>()>& call);

// The sizes of a sweep: min, min·factor, min·factor², ... while <= max; just {0} when min is 0.
std::vector<int64_t> SizeSweep(int64_t min_bytes, int64_t max_bytes, int factor);

// busbw / algbw of an all-to-all or all-gather over n ranks: (n-1)/n (nccl-tests).
double AllToAllBusFactor(int n);

// One row of a benchmark table, as report.proto's BenchResult records it.
struct BenchRow {
  std::string op;
  std::string backend;
  int ranks = 0;
  int64_t bytes = 0;
  int64_t count = 0;  // elements
  std::string dtype;
  double time_us = 0;         // mean per call
  double time_median_us = 0;  // median, min and max per call (0: one measurement)
  double time_min_us = 0;
  double time_max_us = 0;
  int iters = 0;
  double algbw_gbps = 0;
  double busbw_gbps = 0;
  int64_t wrong = -1;  // -1: not checked
  double baseline_time_us = 0;
  std::string baseline;
};

// Sets a row's time columns from a timed loop.
void SetTiming(BenchRow* row, const Timing& t);

// Takes each row on rank 0 as soon as it is measured (moe_comm_bench -J: one JSON line per row).
using RowSink = std::function<Status(const BenchRow&)>;

// The end of a sweep: the average bus bandwidth over its rows and whether any row had wrong
// elements.
class SweepSummary {
 public:
  // `wrong`: the row's wrong elements over all ranks (0 when unchecked).
  void Add(double busbw_gbps, double wrong);
  // Prints "# Avg bus bandwidth" to `out` (when not null); then kDataLoss naming `op` and the
  // number of rows with wrong elements, if any.
  Status Finish(std::FILE* out, std::string_view op) const;

 private:
  double busbw_sum_ = 0;
  int rows_ = 0;
  int bad_rows_ = 0;
};

}  // namespace moe::comm::bench
