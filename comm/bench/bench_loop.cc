// The timing loop, sweep sizes and sweep summary of comm/bench/bench_loop.h.
#include "comm/bench/bench_loop.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "base/memory.h"

namespace moe::comm::bench {

StatusOr<double> ReduceScalar(Communicator& comm, double value, ReduceOp op) {
  MOE_ASSIGN_OR_RETURN(Buffer buf, Buffer::Allocate(comm.memory_space(), sizeof(double)));
  MOE_RETURN_IF_ERROR(CopyFromHost(comm.memory_space(), buf.data(), &value, sizeof(double)));
  MOE_RETURN_IF_ERROR(comm.AllReduce(buf.data(), buf.data(), 1, DataType::kFloat64, op));
  MOE_RETURN_IF_ERROR(CopyToHost(comm.memory_space(), &value, buf.data(), sizeof(double)));
  return value;
}

namespace {

// Per-call microseconds of `iters` calls, as each call reports them.
StatusOr<std::vector<double>> CountedCalls(int iters,
                                           const std::function<StatusOr<double>()>& call) {
  if (iters < 1) return InvalidArgument("iters=" + std::to_string(iters) + " must be >= 1");
  std::vector<double> us(static_cast<size_t>(iters));
  for (double& t : us) {
    MOE_ASSIGN_OR_RETURN(t, call());
  }
  return us;
}

// The call, reporting its whole duration in microseconds.
std::function<StatusOr<double>()> Whole(const std::function<Status()>& call) {
  return [&call]() -> StatusOr<double> {
    const auto start = std::chrono::steady_clock::now();
    MOE_RETURN_IF_ERROR(call());
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
        .count();
  };
}

// Per-call microseconds of `iters` calls.
StatusOr<std::vector<double>> TimedCalls(int iters, const std::function<Status()>& call) {
  return CountedCalls(iters, Whole(call));
}

double Mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return sum / static_cast<double>(v.size());
}

Timing Summarize(std::vector<double> us, double mean_us) {
  Timing t;
  t.iters = static_cast<int>(us.size());
  t.mean_us = mean_us;
  std::sort(us.begin(), us.end());
  t.median_us = us.size() % 2 == 1 ? us[us.size() / 2]
                                   : (us[us.size() / 2 - 1] + us[us.size() / 2]) / 2;
  t.min_us = us.front();
  t.max_us = us.back();
  return t;
}

}  // namespace

StatusOr<Timing> TimeCalls(int warmup, int iters, const std::function<Status()>& call) {
  for (int i = 0; i < warmup; ++i) MOE_RETURN_IF_ERROR(call());
  MOE_ASSIGN_OR_RETURN(std::vector<double> us, TimedCalls(iters, call));
  const double mean = Mean(us);
  return Summarize(std::move(us), mean);
}

StatusOr<Timing> TimeLoop(Communicator& comm, int warmup, int iters,
                          const std::function<Status()>& call) {
  return TimeLoopCounted(comm, warmup, iters, Whole(call));
}

StatusOr<Timing> TimeLoopCounted(Communicator& comm, int warmup, int iters,
                                 const std::function<StatusOr<double>()>& call) {
  for (int i = 0; i < warmup; ++i) MOE_RETURN_IF_ERROR(call().status());
  MOE_RETURN_IF_ERROR(comm.Barrier());
  MOE_ASSIGN_OR_RETURN(std::vector<double> us, CountedCalls(iters, call));
  // One max-reduction: [this rank's mean, its calls...] -> [slowest mean, each call's slowest].
  std::vector<double> all(us.size() + 1);
  all[0] = Mean(us);
  std::copy(us.begin(), us.end(), all.begin() + 1);
  MOE_ASSIGN_OR_RETURN(Buffer buf, Buffer::Allocate(comm.memory_space(),
                                                    static_cast<int64_t>(all.size() * sizeof(double))));
  const int64_t bytes = static_cast<int64_t>(all.size() * sizeof(double));
  MOE_RETURN_IF_ERROR(CopyFromHost(comm.memory_space(), buf.data(), all.data(), bytes));
  MOE_RETURN_IF_ERROR(comm.AllReduce(buf.data(), buf.data(), static_cast<int64_t>(all.size()),
                                     DataType::kFloat64, ReduceOp::kMax));
  MOE_RETURN_IF_ERROR(CopyToHost(comm.memory_space(), all.data(), buf.data(), bytes));
  return Summarize(std::vector<double>(all.begin() + 1, all.end()), all[0]);
}

void SetTiming(BenchRow* row, const Timing& t) {
  row->time_us = t.mean_us;
  row->time_median_us = t.median_us;
  row->time_min_us = t.min_us;
  row->time_max_us = t.max_us;
  row->iters = t.iters;
}

std::vector<int64_t> SizeSweep(int64_t min_bytes, int64_t max_bytes, int factor) {
  std::vector<int64_t> sizes;
  for (int64_t b = min_bytes; b <= max_bytes; b *= factor) {
    sizes.push_back(b);
    if (b == 0) break;
  }
  return sizes;
}

double AllToAllBusFactor(int n) { return static_cast<double>(n - 1) / n; }

void SweepSummary::Add(double busbw_gbps, double wrong) {
  busbw_sum_ += busbw_gbps;
  ++rows_;
  if (wrong > 0) ++bad_rows_;
}

Status SweepSummary::Finish(std::FILE* out, std::string_view op) const {
  if (out != nullptr) {
    std::fprintf(out, "# Avg bus bandwidth    : %g\n", rows_ > 0 ? busbw_sum_ / rows_ : 0.0);
  }
  if (bad_rows_ > 0) {
    return DataLoss(std::string(op) + ": " + std::to_string(bad_rows_) +
                    " size(s) with wrong elements");
  }
  return Status::Ok();
}

}  // namespace moe::comm::bench
