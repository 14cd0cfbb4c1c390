// ExpertParallelExecutor (runtime/moe/expert_parallel_executor.h).
#include "runtime/moe/expert_parallel_executor.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <utility>

#include "runtime/base/check.h"
#include "runtime/base/clock.h"

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
      shape_(shape),
      num_experts_(num_experts),
      w_(ep->size()),
      local_(num_experts / ep->size()),
      dropless_(options.dropless),
      d_(options.pipeline_degree),
      compute_(compute != nullptr ? std::move(compute) : std::make_unique<CpuExpertCompute>(shape)) {
  MOE_CHECK_OK(ValidateExchangeOptions(options));
}

Status ValidateExchangeOptions(const ExchangeOptions& options) {
  if (options.pipeline_degree < 1 || options.pipeline_degree > ExpertCompute::kMaxParts) {
    return InvalidArgument("pipeline_degree=" + std::to_string(options.pipeline_degree) +
                           " must be in [1, " + std::to_string(ExpertCompute::kMaxParts) + "]");
  }
  return Status::Ok();
}

Status ExpertParallelExecutor::Layout(const DispatchPlan& plan) {
  const int64_t g = plan.num_groups, l = local_, w = w_, blocks = w * l * g;
  const int64_t capacity = plan.capacity;
  padded_ = !dropless_ && capacity > 0;
  direct_ = !padded_ && d_ == 1;
  // Send blocks, in the plan's order (expert = destination-major, then group).
  block_rows_.assign(static_cast<size_t>(blocks), 0);
  block_real_.assign(static_cast<size_t>(blocks), 0);
  block_src_.assign(static_cast<size_t>(blocks), 0);
  for (int64_t e = 0; e < num_experts_; ++e) {
    int64_t src = plan.expert_offset[e];
    for (int64_t gr = 0; gr < g; ++gr) {
      const int64_t b = e * g + gr, n = plan.group_expert_count[gr * num_experts_ + e];
      block_real_[b] = n;
      block_rows_[b] = padded_ ? capacity : n;
      block_src_[b] = src;
      src += n;
    }
  }
  recv_counts_.assign(static_cast<size_t>(blocks), 0);
  if (padded_) {
    std::fill(recv_counts_.begin(), recv_counts_.end(), capacity);
  } else {
    const std::vector<int64_t> count_bytes(static_cast<size_t>(w),
                                           l * g * static_cast<int64_t>(sizeof(int64_t)));
    const size_t record =
        stats_.Record(ExchangeCall::Kind::kCounts, in_backward_, 0, d_, count_bytes, count_bytes);
    MOE_RETURN_IF_ERROR(stats_.Timed(record, [&] {
      return ep_->AllToAll(block_rows_.data(), recv_counts_.data(), l * g, comm::DataType::kInt64);
    }));
  }
  // Per chunk: rows to and from each peer, chunk-major displacements, the expert-major parts.
  send_rows_.assign(static_cast<size_t>(d_ * w), 0);
  recv_rows_.assign(static_cast<size_t>(d_ * w), 0);
  send_displ_.assign(static_cast<size_t>(d_ * w), 0);
  recv_displ_.assign(static_cast<size_t>(d_ * w), 0);
  part_begin_.assign(static_cast<size_t>(d_), 0);
  part_offsets_.assign(static_cast<size_t>(d_),
                       std::vector<int64_t>(static_cast<size_t>(l + 1), 0));
  source_expert_rows_.assign(static_cast<size_t>(d_ * w * l), 0);
  int64_t send_pos = 0, recv_pos = 0;
  for (int j = 0; j < d_; ++j) {
    part_begin_[j] = recv_pos;
    std::vector<int64_t>& offsets = part_offsets_[j];
    for (int64_t p = 0; p < w; ++p) {
      const size_t at = static_cast<size_t>(j * w + p);
      send_displ_[at] = send_pos;
      recv_displ_[at] = recv_pos;
      for (int64_t i = 0; i < l * g; ++i) send_rows_[at] += Chunk(block_rows_[p * l * g + i], j);
      for (int64_t le = 0; le < l; ++le) {
        int64_t& n = source_expert_rows_[at * l + le];
        for (int64_t gr = 0; gr < g; ++gr) n += Chunk(recv_counts_[(p * l + le) * g + gr], j);
        recv_rows_[at] += n;
        offsets[le + 1] += n;
      }
      send_pos += send_rows_[at];
      recv_pos += recv_rows_[at];
    }
    for (int64_t le = 0; le < l; ++le) offsets[le + 1] += offsets[le];
  }
  total_send_ = send_pos;
  total_recv_ = recv_pos;
  return Status::Ok();
}

size_t ExchangeStats::Record(ExchangeCall::Kind kind, bool backward, int chunk, int chunks,
                             std::vector<int64_t> bytes_to_rank,
                             std::vector<int64_t> bytes_from_rank) {
  ExchangeCall call;
  call.kind = kind;
  call.backward = backward;
  call.chunk = chunk;
  call.chunks = chunks;
  call.bytes_to_rank = std::move(bytes_to_rank);
  call.bytes_from_rank = std::move(bytes_from_rank);
  call.start_seconds = WallSeconds();
  calls.push_back(std::move(call));
  return calls.size() - 1;
}

Status ExchangeStats::Timed(size_t record, const std::function<Status()>& exchange) {
  const double t0 = WallSeconds();
  Status status = exchange();
  calls[record].seconds += WallSeconds() - t0;
  return status;
}

StatusOr<ExpertParallelExecutor::Pending> ExpertParallelExecutor::Exchange(ExchangeCall::Kind kind,
                                                                           int j, const float* send,
                                                                           float* recv) {
  const int64_t m = shape_.model_dim, row_bytes = m * static_cast<int64_t>(sizeof(float));
  const bool dispatch = kind == ExchangeCall::Kind::kDispatch;
  const auto chunk = [&](const std::vector<int64_t>& v, int64_t per_row) {
    std::vector<int64_t> out(static_cast<size_t>(w_));
    for (int p = 0; p < w_; ++p) out[p] = v[static_cast<size_t>(j * w_ + p)] * per_row;
    return out;
  };
  const std::vector<int64_t>& out_rows = dispatch ? send_rows_ : recv_rows_;
  const std::vector<int64_t>& out_displ = dispatch ? send_displ_ : recv_displ_;
  const std::vector<int64_t>& in_rows = dispatch ? recv_rows_ : send_rows_;
  const std::vector<int64_t>& in_displ = dispatch ? recv_displ_ : send_displ_;
  const std::vector<int64_t> send_counts = chunk(out_rows, m), send_displs = chunk(out_displ, m),
                             recv_counts = chunk(in_rows, m), recv_displs = chunk(in_displ, m);
  Pending pending;
  pending.record = stats_.Record(kind, in_backward_, j, d_, chunk(out_rows, row_bytes),
                                 chunk(in_rows, row_bytes));
  if (d_ == 1) {
    MOE_RETURN_IF_ERROR(stats_.Timed(pending.record, [&] {
      if (padded_) {
        // Every peer gets the same L * G * C rows: a plain all-to-all.
        return ep_->AllToAll(send, recv, send_counts[0], comm::DataType::kFloat32);
      }
      return ep_->AllToAllV(send, send_counts, send_displs, recv, recv_counts, recv_displs,
                            comm::DataType::kFloat32);
    }));
    return pending;
  }
  MOE_RETURN_IF_ERROR(stats_.Timed(pending.record, [&]() -> Status {
    MOE_ASSIGN_OR_RETURN(pending.request,
                         ep_->StartAllToAllV(send, send_counts, send_displs, recv, recv_counts,
                                             recv_displs, comm::DataType::kFloat32));
    return Status::Ok();
  }));
  return pending;
}

Status ExpertParallelExecutor::Wait(Pending* pending) {
  if (pending->request == nullptr) return Status::Ok();
  std::unique_ptr<comm::Request> request = std::move(pending->request);
  return stats_.Timed(pending->record, [&] { return request->Wait(); });
}

void ExpertParallelExecutor::ForEachSendPiece(const SendPieceFn& fn) const {
  const int64_t per_peer = static_cast<int64_t>(block_rows_.size()) / w_;
  for (int j = 0; j < d_; ++j) {
    for (int64_t p = 0; p < w_; ++p) {
      int64_t row = send_displ_[static_cast<size_t>(j * w_ + p)];
      for (int64_t b = p * per_peer; b < (p + 1) * per_peer; ++b) {
        const int64_t lo = ChunkBegin(block_rows_[b], j), n = Chunk(block_rows_[b], j);
        fn(row, block_src_[b] + lo, std::clamp<int64_t>(block_real_[b] - lo, 0, n), n);
        row += n;
      }
    }
  }
}

void ExpertParallelExecutor::Pack(MatrixView<const float> packed) {
  const int64_t m = shape_.model_dim;
  ResizeTensor(&send_buf_, total_send_, m);
  ForEachSendPiece([&](int64_t send_row, int64_t packed_row, int64_t real, int64_t rows) {
    CopyRows(packed.row(packed_row), send_buf_.row(send_row), real, m);
    if (rows > real) {
      std::memset(send_buf_.row(send_row + real), 0,
                  sizeof(float) * static_cast<size_t>((rows - real) * m));
    }
  });
}

void ExpertParallelExecutor::Unpack(const DispatchPlan& plan, Tensor* packed) const {
  const int64_t m = shape_.model_dim;
  ResizeTensor(packed, plan.num_rows(), m);
  ForEachSendPiece([&](int64_t send_row, int64_t packed_row, int64_t real, int64_t) {
    CopyRows(send_buf_.row(send_row), packed->row(packed_row), real, m);
  });
}

void ExpertParallelExecutor::Regroup(int j, const float* from, float* to,
                                     bool to_expert_major) const {
  const int64_t m = shape_.model_dim, l = local_;
  const int64_t base = part_begin_[static_cast<size_t>(j)];
  std::vector<int64_t> expert_pos(part_offsets_[j].begin(), part_offsets_[j].end() - 1);
  for (int64_t s = 0; s < w_; ++s) {
    const size_t at = static_cast<size_t>(j * w_ + s);
    int64_t source_pos = recv_displ_[at] - base;
    for (int64_t le = 0; le < l; ++le) {
      const int64_t n = source_expert_rows_[at * l + le];
      if (to_expert_major) {
        CopyRows(from + source_pos * m, to + expert_pos[le] * m, n, m);
      } else {
        CopyRows(from + expert_pos[le] * m, to + source_pos * m, n, m);
      }
      expert_pos[le] += n;
      source_pos += n;
    }
  }
}

Status ExpertParallelExecutor::Pipeline(const DispatchPlan& plan, MatrixView<const float> packed_in,
                                        Tensor* expert_rows, std::vector<Tensor>* expert_results,
                                        const PartCompute& compute, Tensor* packed_out) {
  const int64_t m = shape_.model_dim;
  const float* send = packed_in.data();
  if (!direct_) {
    Pack(packed_in);
    send = send_buf_.data();
  }
  ResizeTensor(&recv_buf_, total_recv_, m);
  ResizeTensor(&back_buf_, total_recv_, m);
  ResizeTensor(expert_rows, total_recv_, m);
  expert_results->resize(static_cast<size_t>(d_));
  // The combine lands in the send layout: in place of chunk j's dispatched rows (sent by then).
  float* combined = send_buf_.data();
  if (direct_) {
    ResizeTensor(packed_out, plan.num_rows(), m);
    combined = packed_out->data();
  }
  std::vector<Pending> dispatch(static_cast<size_t>(d_)), combine(static_cast<size_t>(d_));
  MOE_ASSIGN_OR_RETURN(dispatch[0],
                       Exchange(ExchangeCall::Kind::kDispatch, 0, send, recv_buf_.data()));
  for (int j = 0; j < d_; ++j) {
    if (j + 1 < d_) {
      MOE_ASSIGN_OR_RETURN(dispatch[j + 1],
                           Exchange(ExchangeCall::Kind::kDispatch, j + 1, send, recv_buf_.data()));
    }
    MOE_RETURN_IF_ERROR(Wait(&dispatch[j]));
    const int64_t begin = part_begin_[j], rows = part_offsets_[j].back();
    float* part = expert_rows->row(begin);
    Regroup(j, recv_buf_.data() + begin * m, part, /*to_expert_major=*/true);
    Tensor& result = (*expert_results)[j];
    if (rows > 0) {
      const double t0 = WallSeconds();
      MOE_RETURN_IF_ERROR(compute(j, part_offsets_[j], {part, rows, m}, &result));
      stats_.expert_seconds += WallSeconds() - t0;
      Regroup(j, result.data(), back_buf_.row(begin), /*to_expert_major=*/false);
    }
    MOE_ASSIGN_OR_RETURN(combine[j],
                         Exchange(ExchangeCall::Kind::kCombine, j, back_buf_.data(), combined));
  }
  for (int j = 0; j < d_; ++j) MOE_RETURN_IF_ERROR(Wait(&combine[j]));
  if (!direct_) Unpack(plan, packed_out);
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
  return Pipeline(
      plan, packed_x, &expert_in_, &expert_out_,
      [&](int part, const std::vector<int64_t>& offsets, MatrixView<const float> in, Tensor* out) {
        return compute_->Forward(part, offsets, in, experts, out);
      },
      packed_y);
}

Status ExpertParallelExecutor::Backward(const DispatchPlan& plan, MatrixView<const float> packed_dy,
                                        const std::vector<experts::FfnParams>& experts,
                                        std::vector<experts::FfnParams>* grads, Tensor* packed_dx) {
  in_backward_ = true;
  return Pipeline(
      plan, packed_dy, &expert_dy_, &expert_dx_,
      [&](int part, const std::vector<int64_t>& offsets, MatrixView<const float> in, Tensor* out) {
        return compute_->Backward(part, offsets, in, experts, grads, out);
      },
      packed_dx);
}

}  // namespace moe
