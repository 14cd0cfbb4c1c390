// The expert-parallel exchange engine on host buffers (runtime/exchange/expert_exchange.h).
#include "runtime/exchange/expert_exchange.h"

#include <cstring>
#include <string>
#include <utility>

#include "comm/algorithms/hierarchical_alltoall.h"
#include "base/bf16.h"
#include "base/check.h"
#include "base/clock.h"
#include "runtime/device/expert_compute.h"

namespace moe {
namespace {

// Reshapes a wire buffer, keeping its allocation (and stale contents) when the shape is unchanged.
void Resize(Matrix<uint16_t>* m, int64_t rows, int64_t cols) {
  if (m->rows() != rows || m->cols() != cols) m->Reset(rows, cols);
}

}  // namespace

Status ValidateExchangeOptions(const ExchangeOptions& options) {
  if (options.pipeline_degree < 1 || options.pipeline_degree > ExpertCompute::kMaxParts) {
    return InvalidArgument("pipeline_degree=" + std::to_string(options.pipeline_degree) +
                           " must be in [1, " + std::to_string(ExpertCompute::kMaxParts) + "]");
  }
  if (options.ranks_per_node < 0) {
    return InvalidArgument("ranks_per_node=" + std::to_string(options.ranks_per_node) +
                           " must be >= 0");
  }
  return Status::Ok();
}

StatusOr<int> EpRanksPerNode(int ranks_per_node, int world, int ep_size) {
  const int p = ranks_per_node;
  if (p == 0) return 0;
  if (p < 0 || world % p != 0 || (ep_size % p != 0 && p % ep_size != 0)) {
    return InvalidArgument("comm.ranks_per_node=" + std::to_string(p) +
                           " must be >= 0, divide the " + std::to_string(world) +
                           " ranks, and divide or be a multiple of the expert-parallel group's " +
                           std::to_string(ep_size) + " ranks");
  }
  return p % ep_size == 0 ? 0 : p;
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

Status RunChunked(int chunks, const ChunkSteps& steps) {
  MOE_RETURN_IF_ERROR(steps.start_dispatch(0));
  for (int j = 0; j < chunks; ++j) {
    if (j + 1 < chunks) MOE_RETURN_IF_ERROR(steps.start_dispatch(j + 1));
    MOE_RETURN_IF_ERROR(steps.wait_dispatch(j));
    MOE_RETURN_IF_ERROR(steps.experts(j));
    MOE_RETURN_IF_ERROR(steps.start_combine(j));
  }
  for (int j = 0; j < chunks; ++j) MOE_RETURN_IF_ERROR(steps.wait_combine(j));
  return Status::Ok();
}

// Per pass, chunk and direction: the request in flight (null once complete or when the call was
// blocking) and its record in the stats.
struct ExchangeHandle::Requests {
  struct Slot {
    std::unique_ptr<comm::Request> request;
    size_t record = 0;
  };
  Slot slots[2][ExpertCompute::kMaxParts][2];
  Slot& at(Pass pass, int chunk, bool dispatch) {
    return slots[pass == Pass::kBackward ? 1 : 0][chunk][dispatch ? 0 : 1];
  }
};

ExchangeHandle::ExchangeHandle() : requests_(std::make_unique<Requests>()) {}
ExchangeHandle::~ExchangeHandle() = default;
ExchangeHandle::ExchangeHandle(ExchangeHandle&&) noexcept = default;
ExchangeHandle& ExchangeHandle::operator=(ExchangeHandle&&) noexcept = default;

MatrixView<const float> ExchangeHandle::received(Pass pass) const {
  return {rows(pass).recv_rows, layout_.recv_rows, rows(pass).send.cols()};
}

const float* ExchangeHandle::returned_row(Pass pass, int64_t plan_row) const {
  const Rows& r = rows(pass);
  const int64_t m = r.send.cols();
  if (!layout_.plan_to_recv.empty() && !bf16_wire_) {
    const int64_t at = layout_.plan_to_recv[static_cast<size_t>(plan_row)];
    if (at >= 0) return r.combine_rows + at * m;  // a self row: where the caller's experts left it
  }
  return r.back_rows + layout_.plan_to_send[static_cast<size_t>(plan_row)] * m;
}

ExpertExchange::ExpertExchange(comm::Communicator* ep, int num_experts, int64_t row_dim,
                               ExchangeOptions options)
    : ep_(ep),
      num_experts_(num_experts),
      w_(ep != nullptr ? ep->size() : 1),
      local_(num_experts / (ep != nullptr ? ep->size() : 1)),
      m_(row_dim),
      options_(options) {
  MOE_CHECK_OK(ValidateExchangeOptions(options));
  MOE_CHECK(num_experts % w_ == 0);
}

ExpertExchange::~ExpertExchange() = default;
ExpertExchange::ExpertExchange(ExpertExchange&&) noexcept = default;

Status ExpertExchange::EnableHierarchical() {
  if (options_.ranks_per_node == 0 || ep_ == nullptr || hierarchical_ != nullptr) {
    return Status::Ok();
  }
  MOE_ASSIGN_OR_RETURN(comm::HierarchicalAllToAll h,
                       comm::HierarchicalAllToAll::Create(*ep_, options_.ranks_per_node));
  hierarchical_ = std::make_unique<comm::HierarchicalAllToAll>(std::move(h));
  return Status::Ok();
}

Status ExpertExchange::Layout(const DispatchPlan& plan, ExchangeHandle* handle) {
  if (plan.num_experts != num_experts_) {
    return InvalidArgument("ExpertExchange: the plan has " + std::to_string(plan.num_experts) +
                           " experts, the exchange " + std::to_string(num_experts_));
  }
  if (options_.ranks_per_node > 0 && ep_ != nullptr && hierarchical_ == nullptr) {
    return FailedPrecondition(
        "ExpertExchange: ranks_per_node > 0 needs EnableHierarchical() before the first Dispatch");
  }
  const int64_t g = plan.num_groups, l = local_, w = w_, blocks = w * l * g;
  ExchangeShape shape{.ranks = w_,
                      .local_experts = local_,
                      .groups = static_cast<int>(g),
                      .chunks = options_.pipeline_degree,
                      .capacity = 0};
  const bool capacity_mode = ep_ != nullptr && !options_.dropless && plan.capacity > 0;
  const bool accounted = capacity_mode && options_.account_padding;
  const bool padded = capacity_mode && !accounted;
  if (padded) {
    shape.capacity = plan.capacity;
    shape.expert_capacity = plan.expert_capacity;
  }
  // This rank's rows for its own experts never enter the communicator.
  if (ep_ != nullptr && w_ > 1) shape.self = ep_->rank();
  // Plan blocks are (expert, group) = (destination, local expert, group).
  std::vector<int64_t> send(static_cast<size_t>(blocks)), recv(static_cast<size_t>(blocks));
  for (int64_t e = 0; e < num_experts_; ++e) {
    for (int64_t gr = 0; gr < g; ++gr) send[e * g + gr] = plan.group_expert_count[gr * num_experts_ + e];
  }
  // What a capacity exchange receives: C rows per block, or C_e per group for this rank's expert e
  // (redundant experts' replicas).
  const auto padded_recv = [&] {
    std::vector<int64_t> out(static_cast<size_t>(blocks), plan.capacity);
    if (!plan.expert_capacity.empty()) {
      const int64_t me = ep_->rank();
      for (int64_t b = 0; b < blocks; ++b) out[b] = plan.expert_capacity[me * l + (b / g) % l];
    }
    return out;
  };
  if (padded) {
    recv = padded_recv();
  } else if (ep_ == nullptr) {
    recv = send;
  } else if (accounted) {
    // A capacity exchange has no counts call: this one is not recorded.
    MOE_RETURN_IF_ERROR(ep_->AllToAll(send.data(), recv.data(), l * g, comm::DataType::kInt64));
  } else {
    const std::vector<int64_t> count_bytes(static_cast<size_t>(w),
                                           l * g * static_cast<int64_t>(sizeof(int64_t)));
    const size_t record = stats_.Record(ExchangeCall::Kind::kCounts, false, 0,
                                        options_.pipeline_degree, count_bytes, count_bytes);
    MOE_RETURN_IF_ERROR(stats_.Timed(record, [&] {
      return ep_->AllToAll(send.data(), recv.data(), l * g, comm::DataType::kInt64);
    }));
  }
  MOE_ASSIGN_OR_RETURN(handle->layout_, MakeExchangeLayout(shape, send, recv));
  handle->recorded_layout_ = ExchangeLayout();
  if (accounted) {
    ExchangeShape padded_shape = shape;
    padded_shape.capacity = plan.capacity;
    padded_shape.expert_capacity = plan.expert_capacity;
    MOE_ASSIGN_OR_RETURN(handle->recorded_layout_,
                         MakeExchangeLayout(padded_shape, send, padded_recv()));
  }
  handle->plan_ = &plan;
  handle->bf16_wire_ = options_.bf16_wire;
  return Status::Ok();
}

Status ExpertExchange::BeginDispatch(const DispatchPlan& plan, MatrixView<const float> x, Pass pass,
                                     ExchangeHandle* handle) {
  if (x.rows() != plan.num_tokens || x.cols() != m_) {
    return InvalidArgument("ExpertExchange: x is " + std::to_string(x.rows()) + " x " +
                           std::to_string(x.cols()) + ", the plan needs " +
                           std::to_string(plan.num_tokens) + " x " + std::to_string(m_));
  }
  if (pass == Pass::kForward) {
    MOE_RETURN_IF_ERROR(Layout(plan, handle));
  } else if (handle->plan_ != &plan) {
    return FailedPrecondition("ExpertExchange: a backward dispatch needs the handle of the "
                              "forward of the same plan");
  }
  const ExchangeLayout& layout = handle->layout_;
  ExchangeHandle::Rows& rows = handle->rows(pass);
  const bool bf16 = options_.bf16_wire;
  // Where the gather writes: float rows for this rank itself (a one-rank engine's send rows, or
  // the self pieces' receive rows), the wire rows otherwise (float, or bf16 when asked).
  ResizeTensor(&rows.send, bf16 && ep_ != nullptr ? 0 : layout.send_rows, m_);
  if (bf16 && ep_ != nullptr) Resize(&rows.send16, layout.send_rows, m_);
  if (ep_ == nullptr) {
    rows.recv_rows = rows.send.data();
  } else {
    ResizeTensor(&rows.recv, layout.recv_rows, m_);
    if (bf16) Resize(&rows.recv16, layout.recv_rows, m_);
    rows.recv_rows = rows.recv.data();
  }
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(m_);
  const bool gated = pass == Pass::kBackward;
  for (const ExchangeChunk& c : layout.chunks) {
    for (const SendPiece& p : c.pieces) {
      const bool local = ep_ == nullptr || p.recv_row >= 0;
      if (bf16 && !local) {
        uint16_t* const to = rows.send16.row(p.send_row);
        for (int64_t i = 0; i < p.real; ++i) {
          const int64_t r = p.plan_row + i;
          const float* src = x.row(plan.row_token[r]);
          if (gated) {
            FloatsToBf16(src, plan.row_gate[r], m_, to + i * m_);
          } else {
            FloatsToBf16(src, m_, to + i * m_);
          }
        }
        std::fill(to + p.real * m_, to + p.rows * m_, uint16_t{0});
        continue;
      }
      // A self piece goes straight to its receive rows.
      float* const to = p.recv_row >= 0 ? rows.recv.row(p.recv_row) : rows.send.row(p.send_row);
      for (int64_t i = 0; i < p.real; ++i) {
        const int64_t r = p.plan_row + i;
        const float* src = x.row(plan.row_token[r]);
        float* dst = to + i * m_;
        if (gated) {
          const float g = plan.row_gate[r];
          for (int64_t k = 0; k < m_; ++k) dst[k] = g * src[k];
        } else {
          std::memcpy(dst, src, row_bytes);
        }
        // The wire dtype applies to every row, including those that do not travel.
        if (bf16) RoundFloatsToBf16(dst, m_, dst);
      }
      if (p.rows > p.real) {
        std::memset(to + p.real * m_, 0, row_bytes * static_cast<size_t>(p.rows - p.real));
      }
    }
  }
  return Status::Ok();
}

Status ExpertExchange::Start(ExchangeHandle* handle, Pass pass, int chunk, bool dispatch,
                             const void* send, void* recv) {
  const ExchangeChunk& c = handle->layout_.chunks[static_cast<size_t>(chunk)];
  const auto scaled = [](const std::vector<int64_t>& v, int64_t by) {
    std::vector<int64_t> out(v);
    for (int64_t& x : out) x *= by;
    return out;
  };
  // The dispatch sends the send layout's counts; the combine the receive layout's.
  const std::vector<int64_t>& out_rows = dispatch ? c.send_counts : c.recv_counts;
  const ExchangeChunk& rc_chunk = handle->recorded_layout_.chunks.empty()
                                      ? c
                                      : handle->recorded_layout_.chunks[static_cast<size_t>(chunk)];
  const std::vector<int64_t>& recorded_out = dispatch ? rc_chunk.send_counts : rc_chunk.recv_counts;
  const std::vector<int64_t>& recorded_in = dispatch ? rc_chunk.recv_counts : rc_chunk.send_counts;
  const std::vector<int64_t>& out_displs = dispatch ? c.send_displs : c.recv_displs;
  const std::vector<int64_t>& in_rows = dispatch ? c.recv_counts : c.send_counts;
  const std::vector<int64_t>& in_displs = dispatch ? c.recv_displs : c.send_displs;
  // On the wire a row is M floats, or M bf16 values moved as 2·M bytes.
  const bool bf16 = options_.bf16_wire;
  const int64_t row_bytes = m_ * (bf16 ? 2 : static_cast<int64_t>(sizeof(float)));
  const int64_t row_elems = bf16 ? row_bytes : m_;
  const comm::DataType dtype = bf16 ? comm::DataType::kUint8 : comm::DataType::kFloat32;
  ExchangeHandle::Requests::Slot& slot = handle->requests_->at(pass, chunk, dispatch);
  slot.record = stats_.Record(dispatch ? ExchangeCall::Kind::kDispatch : ExchangeCall::Kind::kCombine,
                              pass == Pass::kBackward, chunk, options_.pipeline_degree,
                              scaled(recorded_out, row_bytes), scaled(recorded_in, row_bytes));
  std::vector<int64_t> sc = scaled(out_rows, row_elems), sd = scaled(out_displs, row_elems),
                       rc = scaled(in_rows, row_elems), rd = scaled(in_displs, row_elems);
  // The self block was moved by the gather (dispatch) and is read in place (combine).
  const int self = handle->layout_.shape.self;
  if (self >= 0) sc[self] = rc[self] = 0;
  // Every peer the same L·G·C rows (capacity mode, nothing bypassed): a plain all-to-all.
  const bool equal =
      handle->layout_.shape.capacity > 0 && handle->layout_.shape.expert_capacity.empty() && self < 0;
  return stats_.Timed(slot.record, [&]() -> Status {
    if (hierarchical_ != nullptr) {
      if (equal && handle->layout_.chunks.size() == 1) {
        return hierarchical_->AllToAll(send, recv, sc[0], dtype);
      }
      return hierarchical_->AllToAllV(send, sc, sd, recv, rc, rd, dtype);
    }
    if (handle->layout_.chunks.size() == 1) {
      if (equal) return ep_->AllToAll(send, recv, sc[0], dtype);
      return ep_->AllToAllV(send, sc, sd, recv, rc, rd, dtype);
    }
    MOE_ASSIGN_OR_RETURN(slot.request, ep_->StartAllToAllV(send, sc, sd, recv, rc, rd, dtype));
    return Status::Ok();
  });
}

Status ExpertExchange::Wait(ExchangeHandle* handle, Pass pass, int chunk, bool dispatch) {
  ExchangeHandle::Requests::Slot& slot = handle->requests_->at(pass, chunk, dispatch);
  if (slot.request == nullptr) return Status::Ok();
  std::unique_ptr<comm::Request> request = std::move(slot.request);
  return stats_.Timed(slot.record, [&] { return request->Wait(); });
}

Status ExpertExchange::StartDispatch(ExchangeHandle* handle, Pass pass, int chunk) {
  if (ep_ == nullptr) return Status::Ok();
  ExchangeHandle::Rows& rows = handle->rows(pass);
  if (options_.bf16_wire) {
    return Start(handle, pass, chunk, /*dispatch=*/true, rows.send16.data(), rows.recv16.data());
  }
  return Start(handle, pass, chunk, /*dispatch=*/true, rows.send.data(), rows.recv.data());
}

// Widens the bf16 rows of chunk j that came from (or, for the combine, went to) the other ranks.
void ExpertExchange::Widen(const ExchangeHandle& handle, int chunk, bool dispatch,
                           const Matrix<uint16_t>& from, Tensor* to) const {
  const ExchangeChunk& c = handle.layout_.chunks[static_cast<size_t>(chunk)];
  const std::vector<int64_t>& counts = dispatch ? c.recv_counts : c.send_counts;
  const std::vector<int64_t>& displs = dispatch ? c.recv_displs : c.send_displs;
  for (int p = 0; p < w_; ++p) {
    if (p == handle.layout_.shape.self) continue;
    Bf16sToFloats(from.row(displs[p]), counts[p] * m_, to->row(displs[p]));
  }
}

Status ExpertExchange::WaitDispatch(ExchangeHandle* handle, Pass pass, int chunk) {
  if (ep_ == nullptr) return Status::Ok();
  MOE_RETURN_IF_ERROR(Wait(handle, pass, chunk, /*dispatch=*/true));
  ExchangeHandle::Rows& rows = handle->rows(pass);
  if (options_.bf16_wire) Widen(*handle, chunk, /*dispatch=*/true, rows.recv16, &rows.recv);
  return Status::Ok();
}

Status ExpertExchange::StartCombine(ExchangeHandle* handle, Pass pass, int chunk,
                                    MatrixView<const float> rows) {
  const ExchangeLayout& layout = handle->layout_;
  if (rows.rows() != layout.recv_rows || (rows.rows() > 0 && rows.cols() != m_)) {
    return InvalidArgument("ExpertExchange::Combine: " + std::to_string(rows.rows()) + " x " +
                           std::to_string(rows.cols()) + " rows, the dispatch received " +
                           std::to_string(layout.recv_rows) + " x " + std::to_string(m_));
  }
  ExchangeHandle::Rows& r = handle->rows(pass);
  r.combine_rows = rows.data();
  const ExchangeChunk& c = layout.chunks[static_cast<size_t>(chunk)];
  if (!options_.bf16_wire) {
    if (ep_ == nullptr) {
      r.back_rows = rows.data();
      return Status::Ok();
    }
    // The rows come back to where chunk `chunk`'s dispatch rows were sent from: those are dead
    // once its dispatch completed (a completed send buffer may be reused), so the combine's
    // arrivals share `send` instead of a buffer of their own.
    if (handle->requests_->at(pass, chunk, /*dispatch=*/true).request != nullptr) {
      return FailedPrecondition("ExpertExchange: StartCombine(" + std::to_string(chunk) +
                                ") before WaitDispatch(" + std::to_string(chunk) + ")");
    }
    r.back_rows = r.send.data();
    return Start(handle, pass, chunk, /*dispatch=*/false, rows.data(), r.send.data());
  }
  // bf16: every returned row is rounded, so every one is read from `back` — the rows that stay
  // on this rank are rounded into it here, the others arrive as bf16 and are widened into it.
  if (chunk == 0) ResizeTensor(&r.back, layout.send_rows, m_);
  r.back_rows = r.back.data();
  if (ep_ == nullptr) {
    RoundFloatsToBf16(rows.row(c.recv_begin), c.recv_rows * m_, r.back.row(c.recv_begin));
    return Status::Ok();
  }
  if (chunk == 0) Resize(&r.comb16, layout.recv_rows, m_);
  for (int p = 0; p < w_; ++p) {
    if (p == layout.shape.self) continue;
    FloatsToBf16(rows.row(c.recv_displs[p]), c.recv_counts[p] * m_, r.comb16.row(c.recv_displs[p]));
  }
  for (const SendPiece& piece : c.pieces) {
    if (piece.recv_row < 0) continue;
    RoundFloatsToBf16(rows.row(piece.recv_row), piece.rows * m_, r.back.row(piece.send_row));
  }
  if (chunk == 0) Resize(&r.back16, layout.send_rows, m_);
  return Start(handle, pass, chunk, /*dispatch=*/false, r.comb16.data(), r.back16.data());
}

Status ExpertExchange::WaitCombine(ExchangeHandle* handle, Pass pass, int chunk) {
  if (ep_ == nullptr) return Status::Ok();
  MOE_RETURN_IF_ERROR(Wait(handle, pass, chunk, /*dispatch=*/false));
  ExchangeHandle::Rows& rows = handle->rows(pass);
  if (options_.bf16_wire) Widen(*handle, chunk, /*dispatch=*/false, rows.back16, &rows.back);
  return Status::Ok();
}

Status ExpertExchange::FinishCombine(const ExchangeHandle& handle, Pass pass, bool gated,
                                     MatrixView<float> y) const {
  const DispatchPlan& plan = *handle.plan_;
  if (y.rows() != plan.num_tokens || y.cols() != m_) {
    return InvalidArgument("ExpertExchange::Combine: y is " + std::to_string(y.rows()) + " x " +
                           std::to_string(y.cols()) + ", the plan needs " +
                           std::to_string(plan.num_tokens) + " x " + std::to_string(m_));
  }
  for (int64_t t = 0; t < plan.num_tokens; ++t) {
    float* out = y.row(t);
    for (int64_t i = plan.token_row_offset[t]; i < plan.token_row_offset[t + 1]; ++i) {
      const int32_t r = plan.token_rows[i];
      const float* src = handle.returned_row(pass, r);
      if (gated) {
        const float g = plan.row_gate[r];
        for (int64_t c = 0; c < m_; ++c) out[c] += g * src[c];
      } else {
        for (int64_t c = 0; c < m_; ++c) out[c] += src[c];
      }
    }
  }
  return Status::Ok();
}

Status ExpertExchange::Dispatch(const DispatchPlan& plan, MatrixView<const float> x, Pass pass,
                                ExchangeHandle* handle) {
  MOE_RETURN_IF_ERROR(BeginDispatch(plan, x, pass, handle));
  for (int j = 0; j < handle->chunks(); ++j) MOE_RETURN_IF_ERROR(StartDispatch(handle, pass, j));
  for (int j = 0; j < handle->chunks(); ++j) MOE_RETURN_IF_ERROR(WaitDispatch(handle, pass, j));
  return Status::Ok();
}

Status ExpertExchange::Combine(ExchangeHandle* handle, Pass pass, MatrixView<const float> rows,
                               bool gated, MatrixView<float> y) {
  for (int j = 0; j < handle->chunks(); ++j) {
    MOE_RETURN_IF_ERROR(StartCombine(handle, pass, j, rows));
  }
  for (int j = 0; j < handle->chunks(); ++j) MOE_RETURN_IF_ERROR(WaitCombine(handle, pass, j));
  return FinishCombine(*handle, pass, gated, y);
}

}  // namespace moe
