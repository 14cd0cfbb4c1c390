#include "runtime/ep_executor.h"

#include <chrono>
#include <cstring>
#include <functional>
#include <utility>

#include "runtime/base/clock.h"

namespace moe {
namespace {

void CopyRows(const float* src, float* dst, int64_t rows, int64_t m) {
  if (rows > 0) std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(rows * m));
}

}  // namespace

ExpertParallelExecutor::ExpertParallelExecutor(comm::Communicator* ep,
                                               const experts::FfnShape& shape, int num_experts,
                                               bool dropless_exchange,
                                               std::unique_ptr<ExpertCompute> compute)
    : ep_(ep),
      shape_(shape),
      num_experts_(num_experts),
      w_(ep->size()),
      local_(num_experts / ep->size()),
      dropless_(dropless_exchange),
      compute_(compute != nullptr ? std::move(compute) : std::make_unique<ExpertBlocks>(shape)) {}

Status ExpertParallelExecutor::Layout(const DispatchPlan& plan) {
  const int64_t g = plan.num_groups, l = local_, w = w_;
  groups_ = g;
  capacity_ = plan.capacity;
  padded_ = !dropless_ && plan.capacity > 0;
  const auto count = [&](int64_t r, int64_t le, int64_t gr) {
    return static_cast<int64_t>(plan.group_expert_count[gr * num_experts_ + r * l + le]);
  };
  send_rows_.assign(static_cast<size_t>(w), 0);
  recv_counts_.assign(static_cast<size_t>(w * l * g), 0);
  if (padded_) {
    for (int64_t r = 0; r < w; ++r) send_rows_[r] = l * g * capacity_;
    std::fill(recv_counts_.begin(), recv_counts_.end(), capacity_);
  } else {
    std::vector<int64_t> send_counts(static_cast<size_t>(w * l * g));
    for (int64_t r = 0; r < w; ++r) {
      for (int64_t le = 0; le < l; ++le) {
        for (int64_t gr = 0; gr < g; ++gr) {
          send_counts[(r * l + le) * g + gr] = count(r, le, gr);
          send_rows_[r] += count(r, le, gr);
        }
      }
    }
    const std::vector<int64_t> count_bytes(static_cast<size_t>(w),
                                           l * g * static_cast<int64_t>(sizeof(int64_t)));
    MOE_RETURN_IF_ERROR(Record(ExchangeCall::Kind::kCounts, count_bytes, count_bytes, [&] {
      return ep_->AllToAll(send_counts.data(), recv_counts_.data(), l * g, comm::DataType::kInt64);
    }));
  }
  recv_rows_.assign(static_cast<size_t>(w), 0);
  for (int64_t s = 0; s < w; ++s) {
    for (int64_t i = 0; i < l * g; ++i) recv_rows_[s] += recv_counts_[s * l * g + i];
  }
  send_row_displ_.assign(static_cast<size_t>(w), 0);
  recv_row_displ_.assign(static_cast<size_t>(w), 0);
  for (int64_t r = 1; r < w; ++r) {
    send_row_displ_[r] = send_row_displ_[r - 1] + send_rows_[r - 1];
    recv_row_displ_[r] = recv_row_displ_[r - 1] + recv_rows_[r - 1];
  }
  expert_offsets_.assign(static_cast<size_t>(l + 1), 0);
  for (int64_t le = 0; le < l; ++le) {
    int64_t rows = 0;
    for (int64_t s = 0; s < w; ++s) {
      for (int64_t gr = 0; gr < g; ++gr) rows += recv_counts_[(s * l + le) * g + gr];
    }
    expert_offsets_[le + 1] = expert_offsets_[le] + rows;
  }
  return Status::Ok();
}

Status ExpertParallelExecutor::Exchange(ExchangeCall::Kind kind, const float* send,
                                        const std::vector<int64_t>& send_rows,
                                        const std::vector<int64_t>& send_displ, float* recv,
                                        const std::vector<int64_t>& recv_rows,
                                        const std::vector<int64_t>& recv_displ) {
  const int64_t m = shape_.model_dim;
  const auto scaled = [](const std::vector<int64_t>& rows, int64_t per_row) {
    std::vector<int64_t> out(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) out[i] = rows[i] * per_row;
    return out;
  };
  const int64_t row_bytes = m * static_cast<int64_t>(sizeof(float));
  return Record(kind, scaled(send_rows, row_bytes), scaled(recv_rows, row_bytes), [&] {
    if (padded_) {
      // Every peer gets the same L * G * C rows: a plain all-to-all.
      return ep_->AllToAll(send, recv, send_rows[0] * m, comm::DataType::kFloat32);
    }
    return ep_->AllToAllV(send, scaled(send_rows, m), scaled(send_displ, m), recv,
                          scaled(recv_rows, m), scaled(recv_displ, m), comm::DataType::kFloat32);
  });
}

Status ExpertParallelExecutor::Record(ExchangeCall::Kind kind, std::vector<int64_t> bytes_to_rank,
                                      std::vector<int64_t> bytes_from_rank,
                                      const std::function<Status()>& exchange) {
  ExchangeCall call;
  call.kind = kind;
  call.backward = in_backward_;
  call.bytes_to_rank = std::move(bytes_to_rank);
  call.bytes_from_rank = std::move(bytes_from_rank);
  call.start_seconds = WallSeconds();
  MOE_RETURN_IF_ERROR(exchange());
  call.seconds = WallSeconds() - call.start_seconds;
  stats_.calls.push_back(std::move(call));
  return Status::Ok();
}

void ExpertParallelExecutor::Regroup(const Tensor& from, Tensor* to, bool to_expert_major) const {
  const int64_t m = shape_.model_dim, l = local_, g = groups_;
  std::vector<int64_t> expert_pos(expert_offsets_.begin(), expert_offsets_.end() - 1);
  for (int64_t s = 0; s < w_; ++s) {
    int64_t source_pos = recv_row_displ_[s];
    for (int64_t le = 0; le < l; ++le) {
      int64_t n = 0;
      for (int64_t gr = 0; gr < g; ++gr) n += recv_counts_[(s * l + le) * g + gr];
      if (to_expert_major) {
        CopyRows(from.row(source_pos), to->row(expert_pos[le]), n, m);
      } else {
        CopyRows(from.row(expert_pos[le]), to->row(source_pos), n, m);
      }
      expert_pos[le] += n;
      source_pos += n;
    }
  }
}

Status ExpertParallelExecutor::Dispatch(const DispatchPlan& plan, MatrixView<const float> packed,
                                        Tensor* expert_rows) {
  const int64_t m = shape_.model_dim, g = groups_, w = w_;
  const int64_t total_send = send_row_displ_[w - 1] + send_rows_[w - 1];
  const int64_t total_recv = recv_row_displ_[w - 1] + recv_rows_[w - 1];
  const float* send = packed.data();
  if (padded_) {
    // [dest][local expert][group][C] with zero padding.
    ResizeTensor(&send_buf_, total_send, m);
    int64_t row = 0;
    for (int64_t e = 0; e < num_experts_; ++e) {
      int64_t src = plan.expert_offset[e];
      for (int64_t gr = 0; gr < g; ++gr) {
        const int64_t n = plan.group_expert_count[gr * num_experts_ + e];
        CopyRows(packed.row(src), send_buf_.row(row), n, m);
        if (capacity_ > n) {
          std::memset(send_buf_.row(row + n), 0,
                      sizeof(float) * static_cast<size_t>((capacity_ - n) * m));
        }
        src += n;
        row += capacity_;
      }
    }
    send = send_buf_.data();
  }
  ResizeTensor(&recv_buf_, total_recv, m);
  MOE_RETURN_IF_ERROR(Exchange(ExchangeCall::Kind::kDispatch, send, send_rows_, send_row_displ_,
                               recv_buf_.data(), recv_rows_, recv_row_displ_));
  ResizeTensor(expert_rows, total_recv, m);
  Regroup(recv_buf_, expert_rows, /*to_expert_major=*/true);
  return Status::Ok();
}

Status ExpertParallelExecutor::Combine(const DispatchPlan& plan, const Tensor& expert_rows,
                                       Tensor* packed) {
  const int64_t m = shape_.model_dim, g = groups_, w = w_;
  const int64_t total_send = send_row_displ_[w - 1] + send_rows_[w - 1];
  const int64_t total_recv = recv_row_displ_[w - 1] + recv_rows_[w - 1];
  ResizeTensor(&back_buf_, total_recv, m);
  Regroup(expert_rows, &back_buf_, /*to_expert_major=*/false);
  ResizeTensor(packed, plan.num_rows(), m);
  float* out =
      padded_ ? (ResizeTensor(&send_buf_, total_send, m), send_buf_.data()) : packed->data();
  MOE_RETURN_IF_ERROR(Exchange(ExchangeCall::Kind::kCombine, back_buf_.data(), recv_rows_,
                               recv_row_displ_, out, send_rows_, send_row_displ_));
  if (padded_) {
    int64_t row = 0;
    for (int64_t e = 0; e < num_experts_; ++e) {
      int64_t dst = plan.expert_offset[e];
      for (int64_t gr = 0; gr < g; ++gr) {
        const int64_t n = plan.group_expert_count[gr * num_experts_ + e];
        CopyRows(send_buf_.row(row), packed->row(dst), n, m);
        dst += n;
        row += capacity_;
      }
    }
  }
  return Status::Ok();
}

Status ExpertParallelExecutor::Forward(const DispatchPlan& plan, MatrixView<const float> packed_x,
                                       const std::vector<experts::FfnParams>& experts,
                                       Tensor* packed_y) {
  if (plan.num_experts != num_experts_) {
    return InvalidArgument("plan has " + std::to_string(plan.num_experts) + " experts, executor " +
                           std::to_string(num_experts_));
  }
  in_backward_ = false;
  MOE_RETURN_IF_ERROR(Layout(plan));
  MOE_RETURN_IF_ERROR(Dispatch(plan, packed_x, &expert_in_));
  const double t0 = WallSeconds();
  MOE_RETURN_IF_ERROR(compute_->Forward(expert_offsets_, expert_in_.view(), experts, &expert_out_));
  stats_.expert_seconds += WallSeconds() - t0;
  return Combine(plan, expert_out_, packed_y);
}

Status ExpertParallelExecutor::Backward(const DispatchPlan& plan, MatrixView<const float> packed_dy,
                                        const std::vector<experts::FfnParams>& experts,
                                        std::vector<experts::FfnParams>* grads, Tensor* packed_dx) {
  Tensor expert_dy, expert_dx;
  in_backward_ = true;
  MOE_RETURN_IF_ERROR(Dispatch(plan, packed_dy, &expert_dy));
  const double t0 = WallSeconds();
  MOE_RETURN_IF_ERROR(
      compute_->Backward(expert_offsets_, expert_dy.view(), experts, grads, &expert_dx));
  stats_.expert_seconds += WallSeconds() - t0;
  return Combine(plan, expert_dx, packed_dx);
}

}  // namespace moe
