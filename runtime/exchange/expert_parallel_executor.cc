// ExpertParallelExecutor and LocalExpertExecutor (runtime/exchange/expert_parallel_executor.h).
#include "runtime/exchange/expert_parallel_executor.h"

#include <cstring>
#include <utility>

#include "base/clock.h"

namespace moe {
namespace {

void CopyRows(const float* src, float* dst, int64_t rows, int64_t m) {
  if (rows > 0) std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(rows * m));
}

}  // namespace

ExpertParallelExecutor::ExpertParallelExecutor(comm::Communicator* ep,
                                               const experts::FfnShape& shape, int num_experts,
                                               ExchangeOptions options,
                                               std::unique_ptr<ExpertCompute> compute)
    : ep_(ep),
      exchange_(ep, num_experts, shape.model_dim, options),
      compute_(compute != nullptr ? std::move(compute)
                                  : std::make_unique<CpuExpertCompute>(shape)) {}

Status ExpertParallelExecutor::Run(const DispatchPlan& plan, Pass pass, MatrixView<const float> in,
                                   const PartCompute& compute, MatrixView<float> out) {
  MOE_RETURN_IF_ERROR(exchange_.BeginDispatch(plan, in, pass, &handle_));
  const ExchangeLayout& layout = handle_.layout();
  const int64_t m = in.cols(), chunks = handle_.chunks();
  PassRows& rows = rows_[pass == Pass::kForward ? 0 : 1];
  const bool regroup = !layout.recv_is_expert_major;
  if (regroup) ResizeTensor(&rows.expert_in, layout.recv_rows, m);
  rows.results.resize(static_cast<size_t>(chunks));
  // The experts' outputs go back from one buffer in the receive layout: the single chunk's
  // results themselves when no regroup is needed, else a buffer they are copied into.
  const bool direct = !regroup && chunks == 1;
  if (!direct) ResizeTensor(&rows.combine_rows, layout.recv_rows, m);
  const auto combine_rows = [&]() -> MatrixView<const float> {
    if (!direct) return rows.combine_rows.view();
    const Tensor& r = rows.results[0];
    return {r.data(), layout.recv_rows, m};
  };
  const auto experts = [&](int j) -> Status {
    const ExchangeChunk& c = layout.chunks[static_cast<size_t>(j)];
    Tensor& result = rows.results[static_cast<size_t>(j)];
    if (c.recv_rows == 0) {
      ResizeTensor(&result, 0, m);
      return Status::Ok();
    }
    const float* received = handle_.received(pass).row(c.recv_begin);
    const float* expert_rows = received;
    if (regroup) {
      float* to = rows.expert_in.row(c.recv_begin);
      for (const Segment& s : c.segments) {
        CopyRows(handle_.received(pass).row(s.row), to, s.rows, m);
        to += s.rows * m;
      }
      expert_rows = rows.expert_in.row(c.recv_begin);
    }
    const double t0 = WallSeconds();
    MOE_RETURN_IF_ERROR(compute(j, c.expert_offsets, {expert_rows, c.recv_rows, m}, &result));
    exchange_.stats().expert_seconds += WallSeconds() - t0;
    if (regroup) {
      const float* from = result.data();
      for (const Segment& s : c.segments) {
        CopyRows(from, rows.combine_rows.row(s.row), s.rows, m);
        from += s.rows * m;
      }
    } else if (!direct) {
      CopyRows(result.data(), rows.combine_rows.row(c.recv_begin), c.recv_rows, m);
    }
    return Status::Ok();
  };
  if (direct && layout.recv_rows == 0) ResizeTensor(&rows.results[0], 0, m);
  MOE_RETURN_IF_ERROR(RunChunked(
      static_cast<int>(chunks),
      {.start_dispatch = [&](int j) { return exchange_.StartDispatch(&handle_, pass, j); },
       .wait_dispatch = [&](int j) { return exchange_.WaitDispatch(&handle_, pass, j); },
       .experts = experts,
       .start_combine =
           [&](int j) { return exchange_.StartCombine(&handle_, pass, j, combine_rows()); },
       .wait_combine = [&](int j) { return exchange_.WaitCombine(&handle_, pass, j); }}));
  return exchange_.FinishCombine(handle_, pass, /*gated=*/pass == Pass::kForward, out);
}

Status ExpertParallelExecutor::Forward(const DispatchPlan& plan, MatrixView<const float> x,
                                       const std::vector<experts::FfnParams>& experts,
                                       MatrixView<float> y) {
  return Run(
      plan, Pass::kForward, x,
      [&](int part, const std::vector<int64_t>& offsets, MatrixView<const float> in, Tensor* out) {
        return compute_->Forward(part, offsets, in, experts, out);
      },
      y);
}

Status ExpertParallelExecutor::Backward(const DispatchPlan& plan, MatrixView<const float> dy,
                                        const std::vector<experts::FfnParams>& experts,
                                        std::vector<experts::FfnParams>* grads,
                                        MatrixView<float> dx) {
  return Run(
      plan, Pass::kBackward, dy,
      [&](int part, const std::vector<int64_t>& offsets, MatrixView<const float> in, Tensor* out) {
        return compute_->Backward(part, offsets, in, experts, grads, out);
      },
      dx);
}

}  // namespace moe
