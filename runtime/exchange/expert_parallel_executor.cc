// ExpertParallelExecutor and LocalExpertExecutor (runtime/exchange/expert_parallel_executor.h).
#include "runtime/exchange/expert_parallel_executor.h"

#include <utility>

#include "base/check.h"

namespace moe {
namespace {

std::unique_ptr<ExpertCompute> DeviceExperts(Device* device, const experts::FfnShape& shape,
                                             int count, std::unique_ptr<ExpertCompute> given) {
  if (given != nullptr) return given;
  StatusOr<std::unique_ptr<ExpertCompute>> made = device->MakeExperts(shape, count);
  MOE_CHECK_OK(made.status());
  return std::move(made).value();
}

}  // namespace

ExpertParallelExecutor::ExpertParallelExecutor(Device* device, comm::Communicator* ep,
                                               const experts::FfnShape& shape, int num_experts,
                                               ExchangeOptions options,
                                               std::unique_ptr<ExpertCompute> compute)
    : device_(device),
      ep_(ep),
      exchange_(device, ep, num_experts, shape.model_dim, options),
      compute_(DeviceExperts(device, shape, num_experts / (ep == nullptr ? 1 : ep->size()),
                             std::move(compute))),
      rows_{{Workspace(device->memory()), Workspace(device->memory()),
             Workspace(device->memory())},
            {Workspace(device->memory()), Workspace(device->memory()),
             Workspace(device->memory())}} {}

ExchangeStats* ExpertParallelExecutor::exchange_stats() {
  if (ep_ == nullptr) return nullptr;
  // The experts' intervals since the last read (a GPU resolves its events here).
  StatusOr<double> timed = device_->TakeTimedSeconds();
  if (timed.ok()) exchange_.stats().expert_seconds += *timed;
  return &exchange_.stats();
}

Status ExpertParallelExecutor::Run(const DispatchPlan& plan, const PlanRows* plan_rows, Pass pass,
                                   MatrixView<const float> in, const PartCompute& compute,
                                   MatrixView<float> out) {
  MOE_RETURN_IF_ERROR(exchange_.BeginDispatch(plan, in, pass, &handle_, plan_rows));
  const ExchangeLayout& layout = handle_.layout();
  const int64_t m = in.cols(), chunks = handle_.chunks();
  const int64_t bytes = layout.recv_rows * m * static_cast<int64_t>(sizeof(float));
  PassRows& rows = rows_[pass == Pass::kForward ? 0 : 1];
  const bool regroup = !layout.recv_is_expert_major;
  // The experts' outputs go back from one buffer in the receive layout: the results themselves
  // when no regroup is needed, else a buffer they are gathered into — the exchange's output rows
  // where it offers them (the direct transport: the origins read them there, nothing is copied).
  float* const shared = exchange_.OutputRows(pass);
  float* results = nullptr;
  float* expert_in = nullptr;
  float* combine_rows = shared;
  if (regroup) {
    MOE_ASSIGN_OR_RETURN(void* e, rows.expert_in.Get(bytes));
    MOE_ASSIGN_OR_RETURN(void* r, rows.results.Get(bytes));
    expert_in = static_cast<float*>(e);
    results = static_cast<float*>(r);
    if (combine_rows == nullptr) {
      MOE_ASSIGN_OR_RETURN(void* c, rows.combine_rows.Get(bytes));
      combine_rows = static_cast<float*>(c);
    }
  } else {
    if (combine_rows == nullptr) {
      MOE_ASSIGN_OR_RETURN(void* r, rows.results.Get(bytes));
      combine_rows = static_cast<float*>(r);
    }
    results = combine_rows;
  }
  // Everything the chunks' experts take from the device's memory, taken now: nothing allocates
  // once the first exchange is in flight.
  for (int j = 0; j < chunks; ++j) {
    MOE_RETURN_IF_ERROR(compute_->Reserve(j, layout.chunks[static_cast<size_t>(j)].recv_rows));
  }
  const auto experts = [&](int j) -> Status {
    const ExchangeChunk& c = layout.chunks[static_cast<size_t>(j)];
    if (c.recv_rows == 0) return Status::Ok();
    const float* const received = handle_.received(pass).data();
    const float* expert_rows = received + c.recv_begin * m;
    if (regroup) {
      // The regroup maps of a chunk address its own rows.
      MOE_RETURN_IF_ERROR(device_->GatherRows({.rows = c.recv_rows,
                                               .cols = m,
                                               .src_row = handle_.to_expert_major() + c.recv_begin,
                                               .src = received + c.recv_begin * m,
                                               .dst = expert_in + c.recv_begin * m,
                                               .src_rows = c.recv_rows,
                                               .dst_rows = c.recv_rows}));
      expert_rows = expert_in + c.recv_begin * m;
    }
    MOE_RETURN_IF_ERROR(device_->BeginTiming());
    MOE_RETURN_IF_ERROR(compute(j, c.expert_offsets, {expert_rows, c.recv_rows, m},
                                {results + c.recv_begin * m, c.recv_rows, m}));
    MOE_RETURN_IF_ERROR(device_->EndTiming());
    if (!regroup) return Status::Ok();
    return device_->GatherRows({.rows = c.recv_rows,
                                .cols = m,
                                .src_row = handle_.to_source_major() + c.recv_begin,
                                .src = results + c.recv_begin * m,
                                .dst = combine_rows + c.recv_begin * m,
                                .src_rows = c.recv_rows,
                                .dst_rows = c.recv_rows});
  };
  const MatrixView<const float> back(combine_rows, layout.recv_rows, m);
  MOE_RETURN_IF_ERROR(RunChunked(
      static_cast<int>(chunks),
      {.start_dispatch = [&](int j) { return exchange_.StartDispatch(&handle_, pass, j); },
       .wait_dispatch = [&](int j) { return exchange_.WaitDispatch(&handle_, pass, j); },
       .experts = experts,
       .start_combine = [&](int j) { return exchange_.StartCombine(&handle_, pass, j, back); },
       .wait_combine = [&](int j) { return exchange_.WaitCombine(&handle_, pass, j); }}));
  return exchange_.FinishCombine(&handle_, pass, /*gated=*/pass == Pass::kForward, out);
}

Status ExpertParallelExecutor::Forward(const DispatchPlan& plan, const PlanRows& rows,
                                       MatrixView<const float> x, MatrixView<float> y) {
  return Run(
      plan, &rows, Pass::kForward, x,
      [&](int part, const std::vector<int64_t>& offsets, MatrixView<const float> in,
          MatrixView<float> out) { return compute_->Forward(part, offsets, in, out); },
      y);
}

Status ExpertParallelExecutor::Backward(const DispatchPlan& plan, MatrixView<const float> dy,
                                        std::span<experts::FfnParams> grads,
                                        MatrixView<float> dx) {
  return Run(
      plan, nullptr, Pass::kBackward, dy,
      [&](int part, const std::vector<int64_t>& offsets, MatrixView<const float> in,
          MatrixView<float> out) { return compute_->Backward(part, offsets, in, out, grads); },
      dx);
}

}  // namespace moe
