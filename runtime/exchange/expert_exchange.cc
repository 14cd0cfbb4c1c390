// The expert-parallel exchange engine over a Device (runtime/exchange/expert_exchange.h).
#include "runtime/exchange/expert_exchange.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "base/bf16.h"
#include "base/check.h"
#include "base/clock.h"
#include "comm/algorithms/hierarchical_alltoall.h"
#include "runtime/config/limits.h"
#include "runtime/device/row_steps.h"

namespace moe {
namespace {

// Row i of a buffer of `cols`-wide rows of T, by byte arithmetic (the workspaces are untyped).
template <typename T>
T* RowAt(void* base, int64_t row, int64_t cols) {
  return static_cast<T*>(base) + row * cols;
}

// Every count times `by` (rows to elements or bytes).
std::vector<int64_t> Scaled(const std::vector<int64_t>& v, int64_t by) {
  std::vector<int64_t> out(v);
  for (int64_t& x : out) x *= by;
  return out;
}

// Per send row of `maps`, `of(p)` for the plan row p it carries, `padding` for a row that carries
// none.
template <typename T, typename Of>
std::vector<T> PerSendRow(const ExchangeMaps& maps, int64_t send_rows, T padding, Of of) {
  std::vector<T> out(static_cast<size_t>(send_rows), padding);
  for (size_t i = 0; i < maps.send_dst.size(); ++i) {
    const int32_t p = maps.send_src[i];
    if (p >= 0) out[static_cast<size_t>(maps.send_dst[i])] = of(p);
  }
  return out;
}

}  // namespace

Status ValidateExchangeOptions(const ExchangeOptions& options) {
  if (options.pipeline_degree < 1 || options.pipeline_degree > limits::kMaxPipelineDegree) {
    return InvalidArgument("pipeline_degree=" + std::to_string(options.pipeline_degree) +
                           " must be in [1, " + std::to_string(limits::kMaxPipelineDegree) + "]");
  }
  if (options.ranks_per_node < 0) {
    return InvalidArgument("ranks_per_node=" + std::to_string(options.ranks_per_node) +
                           " must be >= 0");
  }
  if (options.node_dedup && options.ranks_per_node == 0) {
    return InvalidArgument("node_dedup needs the two-stage exchange (ranks_per_node > 0)");
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
// blocking), whether the device's stream already waits for it (Then), and its record in the stats.
struct ExchangeHandle::Requests {
  struct Slot {
    std::unique_ptr<comm::Request> request;
    bool ordered = false;
    size_t record = 0;
  };
  Slot slots[2][limits::kMaxPipelineDegree][2];
  Slot& at(Pass pass, int chunk, bool dispatch) {
    return slots[pass == Pass::kBackward ? 1 : 0][chunk][dispatch ? 0 : 1];
  }
};

ExchangeHandle::ExchangeHandle() : requests_(std::make_unique<Requests>()) {}
ExchangeHandle::~ExchangeHandle() = default;
ExchangeHandle::ExchangeHandle(ExchangeHandle&&) noexcept = default;
ExchangeHandle& ExchangeHandle::operator=(ExchangeHandle&&) noexcept = default;

MatrixView<const float> ExchangeHandle::received(Pass pass) const {
  return {rows(pass).recv_rows, layout_.recv_rows, row_dim_};
}

ReturnedRows ExchangeHandle::returned(Pass pass) const {
  const Rows& r = rows(pass);
  if (r.direct_done) return r.direct_returned;
  return {.return_row = dev_.return_row,
          .rows = r.back_rows,
          .self_rows = r.combine_rows,
          .num_rows = layout_.send_rows,
          .num_self_rows = layout_.recv_rows};
}

const float* ExchangeHandle::returned_row(Pass pass, int64_t plan_row) const {
  MOE_CHECK(host_);
  return row_steps::ReturnedRow(returned(pass), plan_row, row_dim_);
}

float ExchangeHandle::returned_value(Pass pass, int64_t plan_row, int64_t col) const {
  const float v = returned_row(pass, plan_row)[col];
  return returned(pass).round_bf16 ? RoundToBf16(v) : v;
}

ExpertExchange::ExpertExchange(Device* device, comm::Communicator* ep, int num_experts,
                               int64_t row_dim, ExchangeOptions options)
    : device_(device),
      ep_(ep),
      num_experts_(num_experts),
      w_(ep != nullptr ? ep->size() : 1),
      local_(num_experts / (ep != nullptr ? ep->size() : 1)),
      m_(row_dim),
      options_(options),
      counts_(device->memory()) {
  MOE_CHECK_OK(ValidateExchangeOptions(options));
  MOE_CHECK(num_experts % w_ == 0);
  MOE_CHECK(ep == nullptr || ep->memory_space() == device->memory_space());
  // Where the direct transport can run; a forced one that cannot is refused by Layout, saying why.
  if (ep == nullptr || w_ == 1) {
    direct_refusal_ = "one rank exchanges nothing";
  } else if (ep->local_size() < ep->size()) {
    direct_refusal_ = "the " + std::to_string(ep->size()) + " ranks of the expert-parallel group "
                      "span nodes (" + std::to_string(ep->local_size()) + " on this one)";
  } else if ((device->memory_space() != MemorySpace::kHost || device->stream() != nullptr) &&
             options.transport != ExchangeTransport::kDirect) {
    // Compiled and wired, but never yet run on GPUs by this project: opt-in until measured.
    direct_refusal_ = "AUTO keeps the all-to-all on the " + std::string(device->name()) +
                      " device (direct writes into device memory are chosen by "
                      "parallel.exchange_transport: DIRECT)";
  } else if (options.ranks_per_node > 0) {
    direct_refusal_ = "comm.ranks_per_node > 0 asks for the two-stage all-to-all";
  } else if (options.account_padding) {
    direct_refusal_ = "accounted padding (the simulator's) moves rows as the all-to-all would";
  }
  direct_ = direct_refusal_.empty() && options.transport != ExchangeTransport::kAllToAll;
  if (options.transport != ExchangeTransport::kDirect) direct_refusal_.clear();
}

ExpertExchange::~ExpertExchange() = default;
ExpertExchange::ExpertExchange(ExpertExchange&&) noexcept = default;

Status ExpertExchange::EnableHierarchical() {
  if (options_.ranks_per_node == 0 || ep_ == nullptr || hierarchical_ != nullptr) {
    return Status::Ok();
  }
  MOE_ASSIGN_OR_RETURN(comm::HierarchicalAllToAll h,
                       comm::HierarchicalAllToAll::Create(
                           *ep_, options_.ranks_per_node,
                           /*direct_intra=*/options_.transport != ExchangeTransport::kAllToAll));
  hierarchical_ = std::make_unique<comm::HierarchicalAllToAll>(std::move(h));
  return Status::Ok();
}

std::string ExpertExchange::Description() const {
  if (direct_) {
    return "direct writes (the group's " + std::to_string(w_) + " ranks on one node)";
  }
  if (options_.ranks_per_node > 0) {
    return "two-stage all-to-all (" + std::to_string(options_.ranks_per_node) +
           " ranks per node; the node stage " +
           (intra_node_direct() ? "by direct writes" : "by the communicator") +
           (options_.node_dedup ? "; node-deduplicated dispatch)" : ")");
  }
  std::string why;
  if (ep_ != nullptr && ep_->local_size() < ep_->size()) {
    why = " (the group's " + std::to_string(w_) + " ranks span nodes, " +
          std::to_string(ep_->local_size()) + " on this one)";
  } else if (options_.transport == ExchangeTransport::kAllToAll) {
    why = " (parallel.exchange_transport: ALLTOALL)";
  } else if (device_->memory_space() != MemorySpace::kHost && w_ > 1) {
    why = " (AUTO on device memory; DIRECT forces direct writes)";
  }
  return "all-to-all" + why;
}

int64_t ExpertExchange::inter_node_bytes() const {
  return hierarchical_ != nullptr ? hierarchical_->inter_node_bytes() : 0;
}

bool ExpertExchange::intra_node_direct() const {
  return hierarchical_ != nullptr && hierarchical_->direct_intra();
}

Status ExpertExchange::ExchangeCounts(const std::vector<int64_t>& send,
                                      std::vector<int64_t>* recv) {
  const int64_t n = static_cast<int64_t>(send.size()), per = n / w_;
  if (ep_->memory_space() == MemorySpace::kHost) {
    return ep_->AllToAll(send.data(), recv->data(), per, comm::DataType::kInt64);
  }
  // The counts cross in device memory: up, the blocking all-to-all (after the upload), down.
  const int64_t bytes = n * static_cast<int64_t>(sizeof(int64_t));
  MOE_ASSIGN_OR_RETURN(void* buf, counts_.Get(2 * bytes));
  auto* dev = static_cast<int64_t*>(buf);
  MOE_RETURN_IF_ERROR(device_->Upload(dev, send.data(), bytes));
  MOE_RETURN_IF_ERROR(device_->Synchronize());
  MOE_RETURN_IF_ERROR(ep_->AllToAll(dev, dev + n, per, comm::DataType::kInt64));
  return device_->Download(recv->data(), dev + n, bytes);
}

Status ExpertExchange::Layout(const DispatchPlan& plan, ExchangeHandle* handle) {
  if (plan.num_experts != num_experts_) {
    return InvalidArgument("ExpertExchange: the plan has " + std::to_string(plan.num_experts) +
                           " experts, the exchange " + std::to_string(num_experts_));
  }
  if (!direct_refusal_.empty()) {
    return FailedPrecondition("parallel.exchange_transport=DIRECT cannot run here: " +
                              direct_refusal_);
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
    MOE_RETURN_IF_ERROR(ExchangeCounts(send, &recv));
  } else {
    const std::vector<int64_t> count_bytes(static_cast<size_t>(w),
                                           l * g * static_cast<int64_t>(sizeof(int64_t)));
    const size_t record = stats_.Record(ExchangeCall::Kind::kCounts, false, 0,
                                        options_.pipeline_degree, count_bytes, count_bytes);
    MOE_RETURN_IF_ERROR(stats_.Timed(record, [&] { return ExchangeCounts(send, &recv); }));
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
  // The index maps of the layout, where the device's row operations read them.
  // The direct transport reads every row rounded where it lies (the self rows too): its maps
  // point at the self rows as the fp32 wire's do.
  handle->maps_ = MakeExchangeMaps(handle->layout_, options_.bf16_wire && !direct_);
  const ExchangeMaps& maps = handle->maps_;
  ExchangeHandle::DeviceMaps& dev = handle->dev_;
  DeviceArrays& arrays = handle->maps_staging_;
  arrays.Clear();
  arrays.Add(maps.send_dst, &dev.send_dst);
  arrays.Add(maps.send_src, &dev.send_src);
  arrays.Add(maps.self_dst, &dev.self_dst);
  arrays.Add(maps.self_src, &dev.self_src);
  arrays.Add(maps.self_back_dst, &dev.self_back_dst);
  arrays.Add(maps.self_back_src, &dev.self_back_src);
  arrays.Add(maps.return_row, &dev.return_row);
  if (!handle->layout_.recv_is_expert_major) {
    arrays.Add(maps.to_expert_major, &dev.to_expert_major);
    arrays.Add(maps.to_source_major, &dev.to_source_major);
  } else {
    dev.to_expert_major = dev.to_source_major = nullptr;
  }
  MOE_RETURN_IF_ERROR(arrays.Commit(*device_, &handle->maps_ws_));
  handle->plan_ = &plan;
  handle->send_keys_.clear();
  handle->send_scales_.clear();
  if (options_.node_dedup && hierarchical_ != nullptr) {
    if (device_->memory_space() != MemorySpace::kHost || stream_ordered()) {
      return FailedPrecondition("parallel.node_dedup runs on the host device, not the " +
                                std::string(device_->name()) + " device");
    }
    handle->send_keys_ = PerSendRow<int64_t>(maps, handle->layout_.send_rows, -1, [&](int32_t p) {
      return plan.row_token[static_cast<size_t>(p)];
    });
  }
  if (direct_) MOE_RETURN_IF_ERROR(DirectLayout(handle));
  return Status::Ok();
}

Status ExpertExchange::BeginDispatch(const DispatchPlan& plan, MatrixView<const float> x, Pass pass,
                                     ExchangeHandle* handle, const PlanRows* plan_rows) {
  if (x.rows() != plan.num_tokens || x.cols() != m_) {
    return InvalidArgument("ExpertExchange: x is " + std::to_string(x.rows()) + " x " +
                           std::to_string(x.cols()) + ", the plan needs " +
                           std::to_string(plan.num_tokens) + " x " + std::to_string(m_));
  }
  MemoryResource* const memory = device_->memory();
  if (handle->maps_ws_.resource() != memory) {
    // A handle's buffers live where this engine's device computes.
    *handle = ExchangeHandle();
    for (ExchangeHandle::Rows* r : {&handle->forward_, &handle->backward_}) {
      for (Workspace* ws : {&r->send, &r->recv, &r->back, &r->send16, &r->recv16, &r->comb16,
                            &r->back16, &r->direct_ws}) {
        *ws = Workspace(memory);
      }
    }
    handle->maps_ws_ = Workspace(memory);
    handle->plan_rows_ws_ = Workspace(memory);
    handle->direct_.ws = Workspace(memory);
  }
  handle->row_dim_ = m_;
  handle->host_ = device_->memory_space() == MemorySpace::kHost && device_->stream() == nullptr;
  if (pass == Pass::kForward) {
    MOE_RETURN_IF_ERROR(Layout(plan, handle));
    if (plan_rows != nullptr) {
      handle->plan_rows_ = *plan_rows;
    } else {
      MOE_ASSIGN_OR_RETURN(handle->plan_rows_, PlanRowsOn(*device_, plan, &handle->plan_rows_ws_));
    }
  } else if (handle->plan_ != &plan) {
    return FailedPrecondition("ExpertExchange: a backward dispatch needs the handle of the "
                              "forward of the same plan");
  }
  const ExchangeLayout& layout = handle->layout_;
  const ExchangeHandle::DeviceMaps& dev = handle->dev_;
  ExchangeHandle::Rows& rows = handle->rows(pass);
  const bool bf16 = options_.bf16_wire;
  const int64_t float_row = m_ * static_cast<int64_t>(sizeof(float));
  const PlanRows& pr = handle->plan_rows_;
  const float* gates = pass == Pass::kBackward ? pr.row_gate : nullptr;
  // The wire dtype applies to every row, including those that do not travel.
  const RowFormat local = bf16 ? RowFormat::kRoundedBf16 : RowFormat::kFloat32;
  // A self piece goes straight to its receive rows (on both transports).
  const auto gather_self = [&]() -> Status {
    if (handle->maps_.self_dst.empty()) return Status::Ok();
    return device_->GatherRows({.rows = static_cast<int64_t>(handle->maps_.self_dst.size()),
                                .cols = m_,
                                .src_row = dev.self_src,
                                .dst_row = dev.self_dst,
                                .row_token = pr.row_token,
                                .row_gate = gates,
                                .src = x.data(),
                                .dst = const_cast<float*>(rows.recv_rows),
                                .format = local,
                                .src_rows = x.rows(),
                                .dst_rows = layout.recv_rows});
  };
  if (direct_) {
    // Each chunk's rows go from x straight into their destinations (DirectDispatch); only the
    // self pieces are gathered now, into this rank's receive rows.
    rows.x = x.data();
    rows.x_rows = x.rows();
    if (pass == Pass::kForward) {
      handle->direct_call_ = ++direct_calls_;
    } else {
      MOE_RETURN_IF_ERROR(DirectCurrent(*handle));
    }
    rows.recv_rows = DirectRows(ep_->rank(), pass, Region::kReceive);
    rows.direct_done = false;
    return gather_self();
  }
  // Where the gather writes: float rows for this rank itself (a one-rank engine's send rows, or
  // the self pieces' receive rows), the wire rows otherwise (float, or bf16 when asked).
  const bool wire16 = bf16 && ep_ != nullptr;
  MOE_ASSIGN_OR_RETURN(void* send, (wire16 ? rows.send16 : rows.send)
                                       .Get(layout.send_rows * (wire16 ? 2 * m_ : float_row)));
  if (ep_ == nullptr) {
    rows.recv_rows = static_cast<const float*>(send);
  } else {
    MOE_ASSIGN_OR_RETURN(void* recv, rows.recv.Get(layout.recv_rows * float_row));
    rows.recv_rows = static_cast<const float*>(recv);
  }
  // Every buffer of the pass is sized now, before any exchange starts: nothing is allocated (or
  // freed) while an all-to-all is in flight.
  if (bf16) {
    MOE_RETURN_IF_ERROR(rows.back.Get(layout.send_rows * float_row).status());
    if (ep_ != nullptr) {
      MOE_RETURN_IF_ERROR(rows.recv16.Get(layout.recv_rows * 2 * m_).status());
      MOE_RETURN_IF_ERROR(rows.comb16.Get(layout.recv_rows * 2 * m_).status());
      MOE_RETURN_IF_ERROR(rows.back16.Get(layout.send_rows * 2 * m_).status());
    }
  }
  // The backward's node-deduplicated dispatch on the fp32 wire: a token's dY rows cross to a node
  // once, unscaled, each with its gate, and are scaled where they arrive (the same product).
  const bool scale_on_arrival = pass == Pass::kBackward && !handle->send_keys_.empty() && !bf16;
  handle->send_scales_.clear();
  if (scale_on_arrival) {
    handle->send_scales_ = PerSendRow<float>(handle->maps_, layout.send_rows, 1.0f,
                                             [&](int32_t p) { return pr.row_gate[p]; });
  }
  MOE_RETURN_IF_ERROR(device_->GatherRows({.rows = static_cast<int64_t>(handle->maps_.send_dst.size()),
                                           .cols = m_,
                                           .src_row = dev.send_src,
                                           .dst_row = dev.send_dst,
                                           .row_token = pr.row_token,
                                           .row_gate = scale_on_arrival ? nullptr : gates,
                                           .src = x.data(),
                                           .dst = send,
                                           .format = wire16 ? RowFormat::kBf16 : local,
                                           .src_rows = x.rows(),
                                           .dst_rows = layout.send_rows}));
  return gather_self();
}

Status ExpertExchange::Start(ExchangeHandle* handle, Pass pass, int chunk, bool dispatch,
                             const void* send, void* recv) {
  const ExchangeChunk& c = handle->layout_.chunks[static_cast<size_t>(chunk)];
  // The dispatch sends the send layout's counts; the combine the receive layout's.
  const std::vector<int64_t>& out_rows = dispatch ? c.send_counts : c.recv_counts;
  const std::vector<int64_t>& out_displs = dispatch ? c.send_displs : c.recv_displs;
  const std::vector<int64_t>& in_rows = dispatch ? c.recv_counts : c.send_counts;
  const std::vector<int64_t>& in_displs = dispatch ? c.recv_displs : c.send_displs;
  // On the wire a row is M floats, or M bf16 values moved as 2·M bytes.
  const bool bf16 = options_.bf16_wire;
  const int64_t row_bytes = m_ * (bf16 ? 2 : static_cast<int64_t>(sizeof(float)));
  const int64_t row_elems = bf16 ? row_bytes : m_;
  const comm::DataType dtype = bf16 ? comm::DataType::kUint8 : comm::DataType::kFloat32;
  ExchangeHandle::Requests::Slot& slot = handle->requests_->at(pass, chunk, dispatch);
  slot.record = RecordCall(*handle, pass, chunk, dispatch);
  slot.ordered = false;
  // Rows per peer; the self block was moved by the gather (dispatch) and is read in place
  // (combine), so it is left out.
  const int self = handle->layout_.shape.self;
  std::vector<int64_t> out(out_rows), in(in_rows);
  if (self >= 0) out[static_cast<size_t>(self)] = in[static_cast<size_t>(self)] = 0;
  const std::vector<int64_t> sc = Scaled(out, row_elems), sd = Scaled(out_displs, row_elems),
                             rc = Scaled(in, row_elems), rd = Scaled(in_displs, row_elems);
  // Every peer the same L·G·C rows (capacity mode, nothing bypassed): a plain all-to-all.
  const bool equal =
      handle->layout_.shape.capacity > 0 && handle->layout_.shape.expert_capacity.empty() && self < 0;
  if (hierarchical_ == nullptr && ep_->local_size() < w_) {
    // The flat exchange across nodes: what it sends to ranks of other nodes.
    ExchangeCall& call = stats_.calls[slot.record];
    const int node = ep_->rank() / ep_->local_size();
    for (int p = 0; p < w_; ++p) {
      if (p / ep_->local_size() != node) {
        call.inter_node_bytes += call.bytes_to_rank[static_cast<size_t>(p)];
      }
    }
  }
  // The two-stage exchange's calls block: what its inter-node stage sent is counted after them.
  const int64_t inter_before = inter_node_bytes();
  const Status sent = stats_.Timed(slot.record, [&]() -> Status {
    if (hierarchical_ != nullptr && dispatch && !handle->send_keys_.empty() &&
        (pass == Pass::kForward || !handle->send_scales_.empty())) {
      return hierarchical_->DedupAllToAllV(
          send, out, out_displs, handle->send_keys_, recv, in, in_displs, row_bytes,
          pass == Pass::kBackward ? std::span<const float>(handle->send_scales_)
                                  : std::span<const float>());
    }
    if (hierarchical_ != nullptr) {
      // Blocking calls: on device memory they start once the rows queued on the stream are there.
      if (stream_ordered()) MOE_RETURN_IF_ERROR(device_->Synchronize());
      if (equal && handle->layout_.chunks.size() == 1) {
        return hierarchical_->AllToAll(send, recv, sc[0], dtype);
      }
      return hierarchical_->AllToAllV(send, sc, sd, recv, rc, rd, dtype);
    }
    if (stream_ordered()) {
      // Stream-ordered: starts after the gather (or the chunk's experts) queued on the stream.
      MOE_ASSIGN_OR_RETURN(slot.request, ep_->StartAllToAllV(send, sc, sd, recv, rc, rd, dtype,
                                                             device_->stream()));
      return Status::Ok();
    }
    if (handle->layout_.chunks.size() == 1) {
      if (equal) return ep_->AllToAll(send, recv, sc[0], dtype);
      return ep_->AllToAllV(send, sc, sd, recv, rc, rd, dtype);
    }
    MOE_ASSIGN_OR_RETURN(slot.request, ep_->StartAllToAllV(send, sc, sd, recv, rc, rd, dtype));
    return Status::Ok();
  });
  if (hierarchical_ != nullptr) {
    stats_.calls[slot.record].inter_node_bytes += inter_node_bytes() - inter_before;
  }
  return sent;
}

size_t ExpertExchange::RecordCall(const ExchangeHandle& handle, Pass pass, int chunk,
                                  bool dispatch) {
  const ExchangeChunk& c = handle.recorded_layout_.chunks.empty()
                               ? handle.layout_.chunks[static_cast<size_t>(chunk)]
                               : handle.recorded_layout_.chunks[static_cast<size_t>(chunk)];
  // On the wire a row is M floats, or M bf16 values (the direct transport writes the rounded
  // values as floats; what it records is what the exchange means, as the all-to-all's).
  const int64_t row_bytes = m_ * (options_.bf16_wire ? 2 : static_cast<int64_t>(sizeof(float)));
  return stats_.Record(dispatch ? ExchangeCall::Kind::kDispatch : ExchangeCall::Kind::kCombine,
                       pass == Pass::kBackward, chunk, options_.pipeline_degree,
                       Scaled(dispatch ? c.send_counts : c.recv_counts, row_bytes),
                       Scaled(dispatch ? c.recv_counts : c.send_counts, row_bytes));
}

Status ExpertExchange::Wait(ExchangeHandle* handle, Pass pass, int chunk, bool dispatch) {
  ExchangeHandle::Requests::Slot& slot = handle->requests_->at(pass, chunk, dispatch);
  if (slot.request == nullptr) return Status::Ok();
  if (stream_ordered()) {
    // The stream (not the host) waits; FinishCombine collects the status.
    if (!slot.ordered) {
      slot.ordered = true;
      return stats_.Timed(slot.record, [&] { return slot.request->Then(device_->stream()); });
    }
    return Status::Ok();
  }
  std::unique_ptr<comm::Request> request = std::move(slot.request);
  return stats_.Timed(slot.record, [&] { return request->Wait(); });
}

Status ExpertExchange::StartDispatch(ExchangeHandle* handle, Pass pass, int chunk) {
  if (ep_ == nullptr) return Status::Ok();
  if (direct_) return DirectDispatch(handle, pass, chunk);
  ExchangeHandle::Rows& rows = handle->rows(pass);
  if (options_.bf16_wire) {
    return Start(handle, pass, chunk, /*dispatch=*/true, rows.send16.data(), rows.recv16.data());
  }
  return Start(handle, pass, chunk, /*dispatch=*/true, rows.send.data(), rows.recv.data());
}

Status ExpertExchange::Widen(const ExchangeHandle& handle, int chunk, bool dispatch,
                             const void* from, float* to) const {
  const ExchangeChunk& c = handle.layout_.chunks[static_cast<size_t>(chunk)];
  const std::vector<int64_t>& counts = dispatch ? c.recv_counts : c.send_counts;
  const std::vector<int64_t>& displs = dispatch ? c.recv_displs : c.send_displs;
  for (int p = 0; p < w_; ++p) {
    if (p == handle.layout_.shape.self || counts[p] == 0) continue;
    MOE_RETURN_IF_ERROR(device_->Cast(CastKind::kFromBf16,
                                      RowAt<const uint16_t>(const_cast<void*>(from), displs[p], m_),
                                      to + displs[p] * m_, counts[p] * m_));
  }
  return Status::Ok();
}

Status ExpertExchange::WaitDispatch(ExchangeHandle* handle, Pass pass, int chunk) {
  if (ep_ == nullptr) return Status::Ok();
  if (direct_) return DirectFence(handle, pass, chunk, /*dispatch=*/true);
  MOE_RETURN_IF_ERROR(Wait(handle, pass, chunk, /*dispatch=*/true));
  ExchangeHandle::Rows& rows = handle->rows(pass);
  if (options_.bf16_wire) {
    return Widen(*handle, chunk, /*dispatch=*/true, rows.recv16.data(),
                 static_cast<float*>(rows.recv.data()));
  }
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
  if (direct_) return DirectCombine(handle, pass, chunk, rows);
  if (!options_.bf16_wire) {
    if (ep_ == nullptr) {
      r.back_rows = rows.data();
      return Status::Ok();
    }
    // The rows come back to where chunk `chunk`'s dispatch rows were sent from: those are dead
    // once its dispatch completed (a completed send buffer may be reused), so the combine's
    // arrivals share `send` instead of a buffer of their own.
    const ExchangeHandle::Requests::Slot& sent = handle->requests_->at(pass, chunk, true);
    if (sent.request != nullptr && !sent.ordered) {
      return FailedPrecondition("ExpertExchange: StartCombine(" + std::to_string(chunk) +
                                ") before WaitDispatch(" + std::to_string(chunk) + ")");
    }
    r.back_rows = static_cast<const float*>(r.send.data());
    return Start(handle, pass, chunk, /*dispatch=*/false, rows.data(), r.send.data());
  }
  // bf16: every returned row is rounded, so every one is read from `back` — the rows that stay
  // on this rank are rounded into it here, the others arrive as bf16 and are widened into it.
  float* const back = static_cast<float*>(r.back.data());  // sized by BeginDispatch
  r.back_rows = back;
  if (ep_ == nullptr) {
    return device_->Cast(CastKind::kRoundBf16, rows.row(c.recv_begin), back + c.recv_begin * m_,
                         c.recv_rows * m_);
  }
  void* const comb16 = r.comb16.data();
  for (int p = 0; p < w_; ++p) {
    if (p == layout.shape.self || c.recv_counts[p] == 0) continue;
    MOE_RETURN_IF_ERROR(device_->Cast(CastKind::kToBf16, rows.row(c.recv_displs[p]),
                                      RowAt<uint16_t>(comb16, c.recv_displs[p], m_),
                                      c.recv_counts[p] * m_));
  }
  MOE_RETURN_IF_ERROR(RoundSelfRows(*handle, chunk, rows, back));
  return Start(handle, pass, chunk, /*dispatch=*/false, comb16, r.back16.data());
}

Status ExpertExchange::RoundSelfRows(const ExchangeHandle& handle, int chunk,
                                     MatrixView<const float> rows, float* back) const {
  const ExchangeMaps& maps = handle.maps_;
  const int64_t first = maps.self_back_begin[static_cast<size_t>(chunk)],
                n = maps.self_back_begin[static_cast<size_t>(chunk) + 1] - first;
  if (n == 0) return Status::Ok();
  return device_->GatherRows({.rows = n,
                              .cols = m_,
                              .src_row = handle.dev_.self_back_src + first,
                              .dst_row = handle.dev_.self_back_dst + first,
                              .src = rows.data(),
                              .dst = back,
                              .format = RowFormat::kRoundedBf16,
                              .src_rows = handle.layout_.recv_rows,
                              .dst_rows = handle.layout_.send_rows});
}

Status ExpertExchange::WaitCombine(ExchangeHandle* handle, Pass pass, int chunk) {
  if (ep_ == nullptr) return Status::Ok();
  if (direct_) return DirectFence(handle, pass, chunk, /*dispatch=*/false);
  MOE_RETURN_IF_ERROR(Wait(handle, pass, chunk, /*dispatch=*/false));
  ExchangeHandle::Rows& rows = handle->rows(pass);
  if (options_.bf16_wire) {
    return Widen(*handle, chunk, /*dispatch=*/false, rows.back16.data(),
                 static_cast<float*>(rows.back.data()));
  }
  return Status::Ok();
}

Status ExpertExchange::FinishCombine(ExchangeHandle* handle, Pass pass, bool gated,
                                     MatrixView<float> y) {
  const DispatchPlan& plan = *handle->plan_;
  if (y.rows() != plan.num_tokens || y.cols() != m_) {
    return InvalidArgument("ExpertExchange::Combine: y is " + std::to_string(y.rows()) + " x " +
                           std::to_string(y.cols()) + ", the plan needs " +
                           std::to_string(plan.num_tokens) + " x " + std::to_string(m_));
  }
  if (direct_) {
    MOE_RETURN_IF_ERROR(DirectCurrent(*handle));
    MOE_RETURN_IF_ERROR(DirectReturned(handle, pass));
  }
  // Stream-ordered requests: the stream waited for each; their statuses (deadlines) now.
  for (int j = 0; j < handle->chunks(); ++j) {
    for (const bool dispatch : {true, false}) {
      ExchangeHandle::Requests::Slot& slot = handle->requests_->at(pass, j, dispatch);
      if (slot.request == nullptr) continue;
      std::unique_ptr<comm::Request> request = std::move(slot.request);
      MOE_RETURN_IF_ERROR(stats_.Timed(slot.record, [&] { return request->Wait(); }));
    }
  }
  return device_->CombineRows({.cols = m_,
                               .plan = handle->plan_rows_,
                               .returned = handle->returned(pass),
                               .gated = gated,
                               .y = y.data()});
}

Status ExpertExchange::GateGradients(const ExchangeHandle& handle, MatrixView<const float> dy,
                                     float* dgate) const {
  if (direct_) MOE_RETURN_IF_ERROR(DirectCurrent(handle));
  return device_->GateGradients({.cols = m_,
                                 .plan = handle.plan_rows_,
                                 .returned = handle.returned(Pass::kForward),
                                 .dy = dy.data(),
                                 .dgate = dgate});
}

// ---- The direct transport ----------------------------------------------------------------------

namespace {

// The board words a rank publishes with its symmetric buffer: the padding before its rows, per
// pass its read-in-place flag, the receive and send rows its layout needs, then per chunk its
// receive displacements (W) and its send displacements (W).
constexpr int kPadWord = 0, kInPlaceWord = 1, kNeedWord = 3, kDisplsWord = 5;
int64_t DirectBoardWords(int ranks) { return kDisplsWord + 2 * limits::kMaxPipelineDegree * ranks; }
int InPlaceWord(Pass pass) { return kInPlaceWord + (pass == Pass::kBackward ? 1 : 0); }

}  // namespace

int64_t ExpertExchange::DirectRowIndex(int rank, Pass pass, Region region) const {
  // Per pass: receive rows, returned rows (send layout), output rows.
  int64_t row = direct_first_row_[static_cast<size_t>(rank)];
  if (pass == Pass::kBackward) row += 2 * sym_recv_rows_ + sym_send_rows_;
  if (region != Region::kReceive) row += sym_recv_rows_;
  if (region == Region::kOutput) row += sym_send_rows_;
  return row;
}

int64_t ExpertExchange::DirectRowsExtent() const {
  int64_t end = 0;
  for (int p = 0; p < w_; ++p) {
    end = std::max(end, DirectRowIndex(p, Pass::kBackward, Region::kOutput) + sym_recv_rows_);
  }
  return end;
}

float* ExpertExchange::DirectRows(int rank, Pass pass, Region region) const {
  const int64_t at = DirectRowIndex(rank, pass, region) - direct_first_row_[static_cast<size_t>(rank)];
  return reinterpret_cast<float*>(static_cast<char*>(sym_->peer(rank)) +
                                  direct_pad_[static_cast<size_t>(rank)]) +
         at * m_;
}

int64_t ExpertExchange::DirectReadInPlace(int rank, Pass pass) const {
  return sym_->board(rank)[InPlaceWord(pass)];
}

float* ExpertExchange::OutputRows(Pass pass) const {
  if (!direct_ || !in_place_ || sym_ == nullptr) return nullptr;
  return DirectRows(ep_->rank(), pass, Region::kOutput);
}

Status ExpertExchange::DirectPublish(const ExchangeLayout& layout) {
  int64_t* const mine = sym_->board();
  mine[kNeedWord] = layout.recv_rows;
  mine[kNeedWord + 1] = layout.send_rows;
  for (size_t j = 0; j < layout.chunks.size(); ++j) {
    const ExchangeChunk& c = layout.chunks[j];
    int64_t* const displs = mine + kDisplsWord + 2 * static_cast<int64_t>(j) * w_;
    std::copy(c.recv_displs.begin(), c.recv_displs.end(), displs);
    std::copy(c.send_displs.begin(), c.send_displs.end(), displs + w_);
  }
  return DirectSync();
}

Status ExpertExchange::DirectSync() {
  // On a device, a fence publishes this rank's work on the buffers once the stream has done it
  // (comm/symmetric.h): nothing queued still reads or writes them when peers go on.
  if (stream_ordered()) MOE_RETURN_IF_ERROR(device_->Synchronize());
  return sym_->Fence();
}

Status ExpertExchange::GrowDirectBuffer(int64_t recv_rows, int64_t send_rows) {
  const int64_t row_bytes = m_ * static_cast<int64_t>(sizeof(float));
  // Collective: every rank sees the same maxima. On a device the stream's work on the old buffer
  // is done first (its memory goes back when the next buffer is allocated).
  if (stream_ordered()) MOE_RETURN_IF_ERROR(device_->Synchronize());
  sym_.reset();
  sym_recv_rows_ = std::max(sym_recv_rows_, recv_rows + recv_rows / 4);
  sym_send_rows_ = std::max(sym_send_rows_, send_rows + send_rows / 4);
  // Up to a row of padding, then per pass the three regions (DirectRowIndex).
  const int64_t bytes = row_bytes + 2 * (2 * sym_recv_rows_ + sym_send_rows_) * row_bytes;
  MOE_ASSIGN_OR_RETURN(sym_, ep_->AllocateSymmetric(bytes, DirectBoardWords(w_)));
  // This rank's rows start a whole number of rows after the lowest buffer of the group; every
  // rank's padding as it published it is what its writers use. Whether this rank sees every
  // rank's rows whole rows from the lowest buffer, as that rank does (one mapping of the group's
  // memory), and whether every rank does: then output rows can be read where they lie.
  const char* lowest = static_cast<const char*>(sym_->peer(0));
  for (int p = 1; p < w_; ++p) lowest = std::min(lowest, static_cast<const char*>(sym_->peer(p)));
  direct_base_ = lowest;
  const auto offset = [&](int p) {
    return static_cast<const char*>(sym_->peer(p)) - lowest;
  };
  sym_->board()[kPadWord] =
      (row_bytes - offset(ep_->rank()) % row_bytes) % row_bytes;
  MOE_RETURN_IF_ERROR(DirectSync());
  direct_pad_.assign(static_cast<size_t>(w_), 0);
  direct_first_row_.assign(static_cast<size_t>(w_), 0);
  int64_t aligned = 1;
  for (int p = 0; p < w_; ++p) {
    const int64_t pad = sym_->board(p)[kPadWord];
    direct_pad_[static_cast<size_t>(p)] = pad;
    if ((offset(p) + pad) % row_bytes != 0) aligned = 0;
    direct_first_row_[static_cast<size_t>(p)] = (offset(p) + pad) / row_bytes;
  }
  if (DirectRowsExtent() > std::numeric_limits<int32_t>::max()) aligned = 0;
  MOE_RETURN_IF_ERROR(ep_->AllReduceWords(&aligned, 1, comm::ReduceOp::kMin));
  in_place_ = aligned == 1;
  return Status::Ok();
}

Status ExpertExchange::DirectLayout(ExchangeHandle* handle) {
  const ExchangeLayout& layout = handle->layout_;
  const int chunks = static_cast<int>(layout.chunks.size());
  const int me = ep_->rank();
  // One size on every rank, from the largest receive and send layouts of this call: the first
  // call all-reduces them, later calls read them on the boards the ranks publish with their
  // displacements (the fence they need anyway). A buffer too small for them is replaced, with
  // room to grow (dropless layouts change every call): every rank sees the same maxima, so every
  // rank replaces it, and publishes again into the new one.
  int64_t need[2] = {layout.recv_rows, layout.send_rows};
  if (sym_ == nullptr) {
    MOE_RETURN_IF_ERROR(ep_->AllReduceWords(need, 2, comm::ReduceOp::kMax));
  } else {
    MOE_RETURN_IF_ERROR(DirectPublish(layout));
    for (int p = 0; p < w_; ++p) {
      need[0] = std::max(need[0], sym_->board(p)[kNeedWord]);
      need[1] = std::max(need[1], sym_->board(p)[kNeedWord + 1]);
    }
  }
  if (sym_ == nullptr || need[0] > sym_recv_rows_ || need[1] > sym_send_rows_) {
    MOE_RETURN_IF_ERROR(GrowDirectBuffer(need[0], need[1]));
    MOE_RETURN_IF_ERROR(DirectPublish(layout));
  }
  ExchangeHandle::Direct& d = handle->direct_;
  d.peer_recv_at.assign(static_cast<size_t>(chunks * w_), 0);
  d.peer_send_at.assign(static_cast<size_t>(chunks * w_), 0);
  for (int p = 0; p < w_; ++p) {
    const int64_t* theirs = sym_->board(p) + kDisplsWord;
    for (int j = 0; j < chunks; ++j) {
      d.peer_recv_at[static_cast<size_t>(j * w_ + p)] = theirs[(2 * j) * w_ + me];
      d.peer_send_at[static_cast<size_t>(j * w_ + p)] = theirs[(2 * j + 1) * w_ + me];
    }
  }
  // Each send row's destination rank and receive row; the gathers' destinations, and the runs of
  // rows with one (chunk, destination).
  d.send_peer.assign(static_cast<size_t>(layout.send_rows), -1);
  d.send_peer_row.assign(static_cast<size_t>(layout.send_rows), -1);
  std::vector<int32_t> owner(static_cast<size_t>(layout.send_rows), -1);
  for (int j = 0; j < chunks; ++j) {
    const ExchangeChunk& c = layout.chunks[static_cast<size_t>(j)];
    for (int p = 0; p < w_; ++p) {
      const int64_t first = c.send_displs[static_cast<size_t>(p)],
                    at = d.peer_recv_at[static_cast<size_t>(j * w_ + p)];
      for (int64_t r = 0; r < c.send_counts[static_cast<size_t>(p)]; ++r) {
        owner[static_cast<size_t>(first + r)] = j * w_ + p;
        d.send_peer[static_cast<size_t>(first + r)] = p;
        d.send_peer_row[static_cast<size_t>(first + r)] = static_cast<int32_t>(at + r);
      }
    }
  }
  const std::vector<int32_t>& send_dst = handle->maps_.send_dst;
  d.dst.resize(send_dst.size());
  d.runs.clear();
  for (size_t i = 0; i < send_dst.size(); ++i) {
    const int32_t o = owner[static_cast<size_t>(send_dst[i])];
    d.dst[i] = d.send_peer_row[static_cast<size_t>(send_dst[i])];
    const int j = o / w_, p = o % w_;
    const int64_t at = static_cast<int64_t>(i);
    if (d.runs.empty() || d.runs.back().chunk != j || d.runs.back().peer != p) {
      d.runs.push_back({.chunk = j, .peer = p, .begin = at, .end = at + 1});
    } else {
      d.runs.back().end = at + 1;
    }
  }
  d.arrays.Clear();
  d.arrays.Add(d.dst, &d.dst_on_device);
  return d.arrays.Commit(*device_, &d.ws);
}

Status ExpertExchange::DirectCurrent(const ExchangeHandle& handle) const {
  if (handle.direct_call_ == direct_calls_) return Status::Ok();
  return FailedPrecondition(
      "ExpertExchange: this handle's rows were taken over by a later forward Dispatch (call " +
      std::to_string(direct_calls_) + ", the handle's " + std::to_string(handle.direct_call_) +
      "): on the direct transport the rows live in the engine's symmetric buffer, one call in "
      "flight per engine");
}

Status ExpertExchange::DirectDispatch(ExchangeHandle* handle, Pass pass, int chunk) {
  MOE_RETURN_IF_ERROR(DirectCurrent(*handle));
  ExchangeHandle::Requests::Slot& slot = handle->requests_->at(pass, chunk, /*dispatch=*/true);
  slot.record = RecordCall(*handle, pass, chunk, /*dispatch=*/true);
  const ExchangeHandle::Rows& rows = handle->rows(pass);
  const PlanRows& pr = handle->plan_rows_;
  const RowFormat format = options_.bf16_wire ? RowFormat::kRoundedBf16 : RowFormat::kFloat32;
  return stats_.Timed(slot.record, [&]() -> Status {
    for (const ExchangeHandle::Direct::Run& run : handle->direct_.runs) {
      if (run.chunk != chunk) continue;
      MOE_RETURN_IF_ERROR(device_->GatherRows(
          {.rows = run.end - run.begin,
           .cols = m_,
           .src_row = handle->dev_.send_src + run.begin,
           .dst_row = handle->direct_.dst_on_device + run.begin,
           .row_token = pr.row_token,
           .row_gate = pass == Pass::kBackward ? pr.row_gate : nullptr,
           .src = rows.x,
           .dst = DirectRows(run.peer, pass, Region::kReceive),
           .format = format,
           .src_rows = rows.x_rows,
           .dst_rows = sym_recv_rows_}));
    }
    return Status::Ok();
  });
}

Status ExpertExchange::DirectCombine(ExchangeHandle* handle, Pass pass, int chunk,
                                     MatrixView<const float> rows) {
  const ExchangeLayout& layout = handle->layout_;
  const ExchangeChunk& c = layout.chunks[static_cast<size_t>(chunk)];
  MOE_RETURN_IF_ERROR(DirectCurrent(*handle));
  ExchangeHandle::Requests::Slot& slot = handle->requests_->at(pass, chunk, /*dispatch=*/false);
  slot.record = RecordCall(*handle, pass, chunk, /*dispatch=*/false);
  // Rows in this rank's output rows stay there for the origins to read (the flag is published by
  // the chunk's fence); any others are written into the origins' returned rows.
  const bool in_place = rows.data() == OutputRows(pass);
  sym_->board()[InPlaceWord(pass)] = in_place ? 1 : 0;
  if (in_place) return Status::Ok();
  return stats_.Timed(slot.record, [&]() -> Status {
    // Source s's rows of this chunk are one run in both layouts: straight into its returned rows
    // (rounded on the bf16 wire, as the origin would read them).
    for (int s = 0; s < w_; ++s) {
      const int64_t n = c.recv_counts[static_cast<size_t>(s)];
      if (s == layout.shape.self || n == 0) continue;
      float* to = DirectRows(s, pass, Region::kReturned) +
                  handle->direct_.peer_send_at[static_cast<size_t>(chunk * w_ + s)] * m_;
      const float* from = rows.row(c.recv_displs[static_cast<size_t>(s)]);
      if (options_.bf16_wire) {
        MOE_RETURN_IF_ERROR(device_->Cast(CastKind::kRoundBf16, from, to, n * m_));
      } else {
        MOE_RETURN_IF_ERROR(device_->Copy(to, from, n * m_ * static_cast<int64_t>(sizeof(float))));
      }
    }
    return Status::Ok();
  });
}

Status ExpertExchange::DirectReturned(ExchangeHandle* handle, Pass pass) const {
  ExchangeHandle::Rows& r = handle->rows(pass);
  const ExchangeHandle::Direct& d = handle->direct_;
  const std::vector<int32_t>& at = handle->maps_.return_row;
  const int me = ep_->rank();
  // Per rank: where its rows of this pass are for this rank to read, counted from direct_base_.
  std::vector<int64_t> first(static_cast<size_t>(w_));
  for (int p = 0; p < w_; ++p) {
    first[static_cast<size_t>(p)] = DirectReadInPlace(p, pass) != 0
                                        ? DirectRowIndex(p, pass, Region::kOutput)
                                        : -1;
  }
  const int64_t returned = DirectRowIndex(me, pass, Region::kReturned);
  r.direct_return_row.resize(at.size());
  for (size_t i = 0; i < at.size(); ++i) {
    const int32_t s = at[i];
    if (s < 0) {  // a self row: where this rank's experts wrote it
      r.direct_return_row[i] = s;
      continue;
    }
    const int64_t peer_first = first[static_cast<size_t>(d.send_peer[static_cast<size_t>(s)])];
    r.direct_return_row[i] = static_cast<int32_t>(
        peer_first >= 0 ? peer_first + d.send_peer_row[static_cast<size_t>(s)] : returned + s);
  }
  const int32_t* return_row = nullptr;
  r.direct_arrays.Clear();
  r.direct_arrays.Add(r.direct_return_row, &return_row);
  MOE_RETURN_IF_ERROR(r.direct_arrays.Commit(*device_, &r.direct_ws));
  r.direct_returned = {.return_row = return_row,
                       .rows = reinterpret_cast<const float*>(direct_base_),
                       .self_rows = r.combine_rows,
                       .num_rows = DirectRowsExtent(),
                       .num_self_rows = handle->layout_.recv_rows,
                       .round_bf16 = options_.bf16_wire};
  r.direct_done = true;
  return Status::Ok();
}

Status ExpertExchange::DirectFence(ExchangeHandle* handle, Pass pass, int chunk, bool dispatch) {
  // Every rank's writes of this chunk (and of any chunk started before) are now in place; on a
  // device, once this rank's stream has done its writes.
  const ExchangeHandle::Requests::Slot& slot = handle->requests_->at(pass, chunk, dispatch);
  return stats_.Timed(slot.record, [&] { return DirectSync(); });
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
  return FinishCombine(handle, pass, gated, y);
}

}  // namespace moe
