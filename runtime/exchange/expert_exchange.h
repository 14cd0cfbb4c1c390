// The expert-parallel exchange engine: Dispatch sends each kept (token, expert) row of a plan to
// the rank that hosts the expert, Combine brings the experts' outputs back and sums them into the
// tokens' rows — two public calls sharing a handle (DeepEP's API shape), so a caller can run its
// own experts, or anything else, between them. The backward runs the same calls on gradients with
// the same handle (Pass::kBackward: its own buffers, the forward's stay valid).
//
//   ExpertExchange exchange(&device, ep, num_experts, model_dim, {.dropless = false});
//   ExchangeHandle h;
//   exchange.Dispatch(plan, x, Pass::kForward, &h);          // h.received(): rows per segment
//   ... out[i] = expert_{segment's expert}(h.received()[i]) for every received row ...
//   exchange.Combine(&h, Pass::kForward, out, /*gated=*/true, y);   // y[t] += Σ gate·out
//
// One engine for every device (runtime/device/device.h): the rows live in the device's memory and
// move by its operations (GatherRows, CombineRows, Cast: memcpy loops on the host, kernels on a
// GPU); the communicator works in the same memory. On device memory every all-to-all is ordered on
// the device's stream (it starts after the gather queued before it, and the kernels after its
// Wait* read what it delivered) with no host synchronization in between; the requests' statuses
// (deadlines) are collected by FinishCombine.
//
// Rows. Dispatch gathers the token rows x[row_token[r]] of the plan's rows r straight into the send
// layout (runtime/exchange/exchange_layout.h; scaled by the row gates when asked — the backward's
// gate·dY), with zero padding in capacity mode — the rows for this rank's own experts straight
// into their receive rows instead, so they never pass through the communicator (nor back: Combine
// reads them where the caller's experts wrote them); the received rows are left in the receive layout
// ([chunk][source][local expert][group]) and presented as segments, one per (local expert, source,
// group), listed in the order a 1-rank layer with G = W·groups would use. Combine sends rows in
// that same receive layout back; they land in the send layout, from where each token's rows are
// added into y in the plan's token order (token_rows), scaled by their gates when asked, so the
// sum order is the 1-rank layer's.
//
// Asynchronous form, by pipeline chunk (ExchangeOptions::pipeline_degree = d): BeginDispatch
// (layout and gather), StartDispatch(j) / WaitDispatch(j) per chunk, StartCombine(j) /
// WaitCombine(j) per chunk, FinishCombine (the sum into y). RunChunked (below) is the one
// schedule that overlaps them, D0 D1 C0 D2 C1 ... C(d-1).
//
// Modes: capacity (every (expert, group) block travels as C rows: one equal-count all-to-all, no
// count exchange) and dropless (the per-block row counts are exchanged first, an all-to-all of
// integers, then all-to-all-v of the real rows). A null communicator is one rank: nothing is
// exchanged and the received rows are the sent rows (no copy).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/memory.h"
#include "base/status.h"
#include "base/tensor.h"
#include "comm/communicator.h"
#include "runtime/device/device.h"
#include "runtime/exchange/exchange_layout.h"
#include "runtime/routing/dispatch_plan.h"

namespace moe::comm {
class HierarchicalAllToAll;
class SymmetricBuffer;
}

namespace moe {

// One all-to-all of the exchange, as this rank saw it.
struct ExchangeCall {
  enum class Kind {
    kCounts,    // dropless layout: the per-(expert, group) row counts (int64), once per Forward
    kDispatch,  // rows to the experts' ranks (forward: x, backward: dY)
    kCombine,   // rows back to their source ranks (forward: y, backward: dX)
  };
  Kind kind = Kind::kDispatch;
  bool backward = false;  // issued by a backward pass
  int chunk = 0;          // pipeline chunk of this row exchange (0 for kCounts)
  int chunks = 1;         // the pipeline degree
  std::vector<int64_t>
      bytes_to_rank;  // per destination rank of the EP group, the self block included
  std::vector<int64_t> bytes_from_rank;  // per source rank
  double start_seconds = 0.0;            // WallSeconds() when the call began
  // Inside the communicator: the blocking call, or the start plus the Wait of an asynchronous one.
  double seconds = 0.0;
  // Bytes this rank sent to ranks of other nodes in this call: the two-stage exchange's inter-node
  // stage as it ran (node-deduplicated rows and their index lists included); the flat exchange's
  // bytes_to_rank to ranks outside this rank's node (the launch's nodes, ranks node-major); 0
  // when the group is on one node.
  int64_t inter_node_bytes = 0;
};

// How rows move between the ranks (parallel.exchange_transport).
enum class ExchangeTransport {
  kAuto,      // kDirect where it can run (below), else kAllToAll
  kAllToAll,  // the communicator's all-to-all(v)
  // Each row written straight into its slot in the destination's receive rows (and each expert
  // output into its slot in the origin's returned rows), in a symmetric buffer of the group
  // (comm/symmetric.h), a fence per chunk. Needs: every rank of the group on this node
  // (local_size() == size()), the flat exchange (ranks_per_node 0) and materialized padding; on
  // device memory it must be asked for (kAuto keeps the all-to-all there). Same rows in the same
  // places as kAllToAll.
  kDirect,
};

struct ExchangeOptions {
  bool dropless = false;    // parallel.dropless_exchange
  int pipeline_degree = 1;  // parallel.pipeline_degree: chunks per exchange, 1..16
  // comm.ranks_per_node: > 0 sends the rows with the two-stage all-to-all
  // (comm/algorithms/hierarchical_alltoall.h; byte for byte the flat one's result). It must
  // divide the EP group's size. Its calls are blocking, so chunks do not overlap under it.
  int ranks_per_node = 0;
  // parallel.wire_dtype = BF16: every dispatched and combined row is rounded to bfloat16 (to
  // nearest even; base/bf16.h) — those that travel cross the wire as 2 bytes per value and
  // are widened on arrival, those that stay on their rank are rounded the same way, so results do
  // not depend on where the experts sit.
  bool bf16_wire = false;
  // Capacity mode accounted, not materialized (moe_simulate's many-rank worlds, where the padding
  // of E = W experts at min_capacity would be most of the memory and time): the rows travel as in
  // dropless mode (counts exchanged, real rows only, the experts run on them alone), while
  // ExchangeStats records what the capacity exchange moves — no counts call, every (expert,
  // group) block C rows, chunk by chunk. Outputs equal the padded run's up to the order of the
  // weight-gradient sums (the padding rows add exact zeros). Ignored when dropless or C = 0.
  bool account_padding = false;
  // With ranks_per_node > 0: the forward's dispatch sends each token's row to each other node
  // once (HierarchicalAllToAll::DedupAllToAllV); same rows in the same places. Host memory.
  bool node_dedup = false;
  ExchangeTransport transport = ExchangeTransport::kAuto;
};

// kInvalidArgument unless 1 <= pipeline_degree <= limits::kMaxPipelineDegree ("pipeline_degree=17
// must be in [1, 16]") and ranks_per_node >= 0. Every engine and layer checks it; the constructors
// take only valid options (a programmer error otherwise).
Status ValidateExchangeOptions(const ExchangeOptions& options);

// The ranks per node of an EP group for comm.ranks_per_node = P, in a world of `world` ranks whose
// EP groups are runs of ep_size consecutive ranks: 0 (flat) for P = 0 or when the group fits in one
// node (P a multiple of ep_size), P when it divides ep_size. kInvalidArgument naming
// comm.ranks_per_node when P does not divide the world or cuts EP groups unevenly.
StatusOr<int> EpRanksPerNode(int ranks_per_node, int world, int ep_size);

// What the exchange did since the last Reset() (the Trainer resets it at the start of each step).
struct ExchangeStats {
  double expert_seconds = 0.0;
  std::vector<ExchangeCall> calls;  // every exchange, in issue order
  // Seconds inside all exchanges, the count exchange included.
  double AllToAllSeconds() const {
    double t = 0.0;
    for (const ExchangeCall& c : calls) t += c.seconds;
    return t;
  }
  void Reset() { *this = ExchangeStats(); }
  // Appends the record of an exchange about to be issued (start_seconds: now); returns its index.
  size_t Record(ExchangeCall::Kind kind, bool backward, int chunk, int chunks,
                std::vector<int64_t> bytes_to_rank, std::vector<int64_t> bytes_from_rank);
  // Runs `exchange` (a blocking call, or the start or Wait of an asynchronous one) and adds its
  // wall time to the seconds of record `record`.
  Status Timed(size_t record, const std::function<Status()>& exchange);
};

// The schedule of a chunked exchange, written once: D0 D1 C0 D2 C1 ... C(d-1) — chunk j+1's
// dispatch is issued before chunk j's experts run, and chunk j's combine as soon as they are done.
// Every rank issues the same order.
struct ChunkSteps {
  std::function<Status(int)> start_dispatch, wait_dispatch, experts, start_combine, wait_combine;
};
Status RunChunked(int chunks, const ChunkSteps& steps);

enum class Pass { kForward, kBackward };

// One layer call's exchange: the plan it follows, its layout and index maps, and per pass the
// buffers (device memory) and the requests in flight. Made by ExpertExchange::BeginDispatch of the
// forward; the backward reuses the layout. A handle must not outlive the plan or the engine that
// filled it. On the direct transport its rows live in the engine's symmetric buffer: one call in
// flight per engine, the handle's rows valid until the engine's next forward BeginDispatch.
class ExchangeHandle {
 public:
  ExchangeHandle();
  ~ExchangeHandle();
  ExchangeHandle(ExchangeHandle&&) noexcept;
  ExchangeHandle& operator=(ExchangeHandle&&) noexcept;

  const ExchangeLayout& layout() const { return layout_; }
  int chunks() const { return static_cast<int>(layout_.chunks.size()); }
  // Chunk j's received rows, one segment per (local expert, source, group), rows absolute in
  // received(pass).
  const std::vector<Segment>& segments(int j) const { return layout_.chunks[j].segments; }
  // The layout's regroup maps (ExchangeMaps::to_expert_major / to_source_major) in device memory.
  const int32_t* to_expert_major() const { return dev_.to_expert_major; }
  const int32_t* to_source_major() const { return dev_.to_source_major; }
  // The plan's row arrays in device memory.
  const PlanRows& plan_rows() const { return plan_rows_; }
  // Every received row of `pass`, in the receive layout, device memory (valid after WaitDispatch
  // of its chunk).
  MatrixView<const float> received(Pass pass) const;
  // Where each plan row's combined result is (expert output of the forward, dX row of the
  // backward, before its gate), device memory: valid after the pass's combine, until the next
  // Begin of that pass.
  ReturnedRows returned(Pass pass) const;
  // The same for one row, on the host device only: where it is stored, and its value `col` as
  // the combine reads it (rounded when returned(pass).round_bf16).
  const float* returned_row(Pass pass, int64_t plan_row) const;
  float returned_value(Pass pass, int64_t plan_row, int64_t col) const;

 private:
  friend class ExpertExchange;
  struct Requests;
  struct Rows {
    // The send and receive layouts; `back`: the combine's arrivals (send layout) on the bf16 wire
    // — in fp32 they land in `send`, whose chunk rows are dead once the chunk's dispatch completed.
    Workspace send, recv, back, send16, recv16, comb16, back16;
    const float* recv_rows = nullptr;  // recv, or send for a one-rank engine
    const float* back_rows = nullptr;  // back, or the caller's rows for a one-rank engine
    const float* combine_rows = nullptr;  // the caller's rows of the last combine (self rows)
    // The direct transport: the pass's x and gates, read by each chunk's StartDispatch; after
    // its FinishCombine, where each plan row's result is (ReturnedRows over the whole symmetric
    // buffer: a peer's output rows where the peer left them for this rank to read, or the rows
    // it wrote into this rank's returned rows), read rounded on the bf16 wire.
    const float* x = nullptr;
    int64_t x_rows = 0;
    std::vector<int32_t> direct_return_row;
    DeviceArrays direct_arrays;  // direct_return_row where the device reads it
    Workspace direct_ws;
    ReturnedRows direct_returned;
    bool direct_done = false;
  };
  // The direct transport's addressing: where this rank's rows go in each peer's buffers.
  struct Direct {
    // [chunk·W + p]: peer p's receive row of this rank's first row of chunk j (the dispatch), and
    // its send row of that chunk's rows for this rank (the combine's return).
    std::vector<int64_t> peer_recv_at, peer_send_at;
    // Per entry of ExchangeMaps::send_dst: the destination's receive row; where the device reads it.
    std::vector<int32_t> dst;
    const int32_t* dst_on_device = nullptr;
    DeviceArrays arrays;
    Workspace ws;
    // Per send row: its destination rank and that rank's receive row.
    std::vector<int32_t> send_peer, send_peer_row;
    struct Run {
      int chunk = 0, peer = 0;
      int64_t begin = 0, end = 0;  // entries [begin, end) of the send maps
    };
    std::vector<Run> runs;
  };
  Rows& rows(Pass pass) { return pass == Pass::kForward ? forward_ : backward_; }
  const Rows& rows(Pass pass) const { return pass == Pass::kForward ? forward_ : backward_; }

  const DispatchPlan* plan_ = nullptr;
  PlanRows plan_rows_;
  Workspace plan_rows_ws_;  // the plan's rows when the engine put them on the device
  int64_t row_dim_ = 0;
  bool host_ = true;  // the host device: returned_row may be read
  ExchangeLayout layout_;
  // ExchangeOptions::account_padding: the capacity exchange's layout, whose chunks' counts are
  // recorded in place of layout_'s (empty otherwise).
  ExchangeLayout recorded_layout_;
  ExchangeMaps maps_;
  // ExchangeOptions::node_dedup: per send row, the token it carries (-1: padding), the rows'
  // keys for HierarchicalAllToAll::DedupAllToAllV.
  std::vector<int64_t> send_keys_;
  // ... and in the backward on the fp32 wire, per send row its gate: the rows are gathered
  // unscaled (a token's rows equal) and scaled where they arrive (empty otherwise).
  std::vector<float> send_scales_;
  struct DeviceMaps {
    const int32_t *send_dst = nullptr, *send_src = nullptr, *self_dst = nullptr,
                  *self_src = nullptr, *self_back_dst = nullptr, *self_back_src = nullptr,
                  *return_row = nullptr, *to_expert_major = nullptr, *to_source_major = nullptr;
  } dev_;
  Workspace maps_ws_;
  DeviceArrays maps_staging_;
  Rows forward_, backward_;
  Direct direct_;
  uint64_t direct_call_ = 0;  // the engine's forward call that filled it (direct transport)
  std::unique_ptr<Requests> requests_;
};

class ExpertExchange {
 public:
  // `device` and `ep` (null: one rank; in the device's memory space) must outlive the engine;
  // num_experts must be divisible by ep's size; options must be valid (ValidateExchangeOptions).
  // With options.ranks_per_node > 0 the constructor cannot split the communicator (a collective
  // that can fail): call EnableHierarchical on every rank before the first Dispatch.
  ExpertExchange(Device* device, comm::Communicator* ep, int num_experts, int64_t row_dim,
                 ExchangeOptions options);
  ~ExpertExchange();
  ExpertExchange(ExpertExchange&&) noexcept;

  // Collective: builds the two-stage all-to-all for options.ranks_per_node (no-op when 0).
  Status EnableHierarchical();

  Device& device() const { return *device_; }
  int ranks() const { return w_; }
  int local_experts() const { return local_; }
  const ExchangeOptions& options() const { return options_; }
  // The transport this engine uses (kAuto resolved): kDirect or kAllToAll.
  ExchangeTransport transport() const {
    return direct_ ? ExchangeTransport::kDirect : ExchangeTransport::kAllToAll;
  }

  // Where the caller may write the rows it will combine for `pass` (the receive layout,
  // handle.received(pass).rows() x row_dim), after that pass's BeginDispatch: on the direct
  // transport, this rank's output rows in the symmetric buffer — the origins read them where they
  // lie, nothing is copied (rows combined from any other buffer are written into the origins'
  // returned rows). Null when the transport offers none (then any buffer works).
  float* OutputRows(Pass pass) const;

  // The two-stage exchange (after EnableHierarchical) moves rows inside a node by direct writes
  // (comm/algorithms/hierarchical_alltoall.h).
  bool intra_node_direct() const;
  // Bytes this rank's two-stage exchanges sent to other nodes so far (0 when flat).
  int64_t inter_node_bytes() const;
  // The transport in words, e.g. "direct writes (the group's 4 ranks on one node)" or "two-stage
  // all-to-all (2 ranks per node; the node stage by direct writes)".
  std::string Description() const;

  // Blocking: BeginDispatch, then every chunk started and waited for. x and the rows below live
  // in the device's memory.
  Status Dispatch(const DispatchPlan& plan, MatrixView<const float> x, Pass pass,
                  ExchangeHandle* handle);
  // Blocking: every chunk of `rows` (the receive layout, received(pass).rows() rows) started and
  // waited for, then FinishCombine.
  Status Combine(ExchangeHandle* handle, Pass pass, MatrixView<const float> rows, bool gated,
                 MatrixView<float> y);

  // The forward makes the layout (dropless: exchanges the counts — collective) and the backward
  // reuses it; then x's rows (S x row_dim, S = plan.num_tokens) are gathered into the send layout,
  // times their gates for the backward (gate·dY). `rows`: the plan's row arrays in the device's
  // memory (null: the engine puts them there; on the host device, the plan's vectors).
  Status BeginDispatch(const DispatchPlan& plan, MatrixView<const float> x, Pass pass,
                       ExchangeHandle* handle, const PlanRows* rows = nullptr);
  Status StartDispatch(ExchangeHandle* handle, Pass pass, int chunk);
  Status WaitDispatch(ExchangeHandle* handle, Pass pass, int chunk);
  // `rows`: the whole receive-layout buffer, chunk j's rows at its recv_begin; it must stay
  // untouched until WaitCombine(j) and until returned_row is last read (the rows of this rank's
  // own experts are read there: they never travel).
  Status StartCombine(ExchangeHandle* handle, Pass pass, int chunk, MatrixView<const float> rows);
  Status WaitCombine(ExchangeHandle* handle, Pass pass, int chunk);
  // y[t] += Σ over t's plan rows (token_rows order) of (gate ·) returned row; collects the
  // pass's requests on device memory (their deadlines and errors).
  Status FinishCombine(ExchangeHandle* handle, Pass pass, bool gated, MatrixView<float> y);
  // dgate[r] = dy[row_token[r]] · the forward's returned row r, for every plan row (device
  // memory, plan.num_rows() values): the gates' gradient, before the backward's dispatch.
  Status GateGradients(const ExchangeHandle& handle, MatrixView<const float> dy,
                       float* dgate) const;

  ExchangeStats& stats() { return stats_; }
  const ExchangeStats& stats() const { return stats_; }

 private:
  Status Layout(const DispatchPlan& plan, ExchangeHandle* handle);
  // The counts all-to-all of a dropless layout, through device memory when ep_ is there.
  Status ExchangeCounts(const std::vector<int64_t>& send, std::vector<int64_t>* recv);
  Status Start(ExchangeHandle* handle, Pass pass, int chunk, bool dispatch, const void* send,
               void* recv);
  // Widens the bf16 rows of chunk j that came from (or, for the combine, went to) other ranks.
  Status Widen(const ExchangeHandle& handle, int chunk, bool dispatch, const void* from,
               float* to) const;
  Status Wait(ExchangeHandle* handle, Pass pass, int chunk, bool dispatch);
  // The device orders work on a stream (a GPU, the checked host device): the all-to-alls are
  // stream-ordered requests. The host device runs everything when it is called.
  bool stream_ordered() const { return device_->stream() != nullptr; }
  // The bf16 wire's combine: chunk j's self rows of `rows`, rounded, into `back` (send layout).
  Status RoundSelfRows(const ExchangeHandle& handle, int chunk, MatrixView<const float> rows,
                       float* back) const;
  // Records an exchange of chunk `chunk` (bytes per peer as the layout says) in the stats.
  size_t RecordCall(const ExchangeHandle& handle, Pass pass, int chunk, bool dispatch);
  // The direct transport: sizes the symmetric buffer for this layout (collective), publishes this
  // rank's displacements and reads the peers' (one fence), and makes the handle's Direct.
  Status DirectLayout(ExchangeHandle* handle);
  // Writes this layout's needs and displacements on this rank's board, then fences.
  Status DirectPublish(const ExchangeLayout& layout);
  // Replaces the symmetric buffer by one for these rows (collective), and works out where every
  // rank's rows are (direct_pad_, direct_first_row_, in_place_).
  Status GrowDirectBuffer(int64_t recv_rows, int64_t send_rows);
  // Rank r's rows of `pass` in the symmetric buffer: its receive rows (written by the peers'
  // dispatch), its returned rows (send layout; written by the peers' combine when they copy) and
  // its output rows (OutputRows; read in place by the peers' FinishCombine).
  enum class Region { kReceive, kReturned, kOutput };
  float* DirectRows(int rank, Pass pass, Region region) const;
  // The row of DirectRows(rank, pass, region) counted from direct_base_.
  int64_t DirectRowIndex(int rank, Pass pass, Region region) const;
  // Rows from direct_base_ to the end of the group's last rows.
  int64_t DirectRowsExtent() const;
  // Rank r's flag of `pass` on its published board: 1 when its last combine of the pass left its
  // rows in its output rows for the origins to read.
  int64_t DirectReadInPlace(int rank, Pass pass) const;
  // After the pass's last fence: where each plan row's result is (ExchangeHandle::Rows).
  Status DirectReturned(ExchangeHandle* handle, Pass pass) const;
  Status DirectDispatch(ExchangeHandle* handle, Pass pass, int chunk);
  Status DirectCombine(ExchangeHandle* handle, Pass pass, int chunk, MatrixView<const float> rows);
  Status DirectFence(ExchangeHandle* handle, Pass pass, int chunk, bool dispatch);
  // A fence of the symmetric buffer, after the device's stream finished its work (on a device).
  Status DirectSync();
  // kFailedPrecondition when a later forward of this engine took over the handle's rows.
  Status DirectCurrent(const ExchangeHandle& handle) const;

  Device* device_;
  comm::Communicator* ep_;
  int num_experts_, w_, local_;
  int64_t m_;
  ExchangeOptions options_;
  std::unique_ptr<comm::HierarchicalAllToAll> hierarchical_;
  ExchangeStats stats_;
  Workspace counts_;  // the counts all-to-all's buffers in device memory
  // The direct transport (ExchangeTransport::kDirect): chosen at construction; `direct_refusal_`
  // says why a forced kDirect cannot run (Layout returns it). The symmetric buffer holds, per
  // rank, the displacements it publishes, then per pass its receive rows (sym_recv_rows_) and its
  // returned rows (sym_send_rows_).
  bool direct_ = false;
  std::string direct_refusal_;
  std::unique_ptr<comm::SymmetricBuffer> sym_;
  int64_t sym_recv_rows_ = 0, sym_send_rows_ = 0;
  // Every rank's rows start a whole number of rows after direct_base_ (the lowest buffer of the
  // group): rank r's first row is direct_first_row_[r], its padding before it direct_pad_[r]
  // bytes. in_place_: every rank sees that layout alike (the rows of one rank addressable by row
  // index from another), so output rows can be read where they lie.
  const char* direct_base_ = nullptr;
  std::vector<int64_t> direct_pad_, direct_first_row_;
  bool in_place_ = false;
  uint64_t direct_calls_ = 0;  // forward calls so far
};

}  // namespace moe
