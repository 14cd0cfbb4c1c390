#include "comm/bench/bench_loop.h"

#include <chrono>

#include "runtime/base/memory.h"

namespace moe::comm::bench {

StatusOr<double> ReduceScalar(Communicator& comm, double value, ReduceOp op) {
  MOE_ASSIGN_OR_RETURN(Buffer buf, Buffer::Allocate(comm.memory_space(), sizeof(double)));
  MOE_RETURN_IF_ERROR(CopyFromHost(comm.memory_space(), buf.data(), &value, sizeof(double)));
  MOE_RETURN_IF_ERROR(comm.AllReduce(buf.data(), buf.data(), 1, DataType::kFloat64, op));
  MOE_RETURN_IF_ERROR(CopyToHost(comm.memory_space(), &value, buf.data(), sizeof(double)));
  return value;
}

StatusOr<double> TimeLoop(Communicator& comm, int warmup, int iters,
                          const std::function<Status()>& call) {
  for (int i = 0; i < warmup; ++i) MOE_RETURN_IF_ERROR(call());
  MOE_RETURN_IF_ERROR(comm.Barrier());
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) MOE_RETURN_IF_ERROR(call());
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
      iters;
  return ReduceScalar(comm, us, ReduceOp::kMax);
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
