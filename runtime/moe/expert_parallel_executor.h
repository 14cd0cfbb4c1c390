// The expert-parallel executor: experts are spread over the W ranks of an expert-parallel
// communicator in contiguous blocks (rank r hosts experts r*L .. r*L + L - 1, L = E / W).
//
// Forward: the layer's packed rows (expert, group, position order = destination rank, local
// expert, group, position) are dispatched with an all-to-all, regrouped so each local expert owns
// one contiguous block ordered (source rank, group, position) — exactly the order a 1-rank layer
// with G = W * groups would use —, run through the local experts, ungrouped and sent back
// (combine). Backward sends dY the same way and returns dX, reusing the forward's layout (one
// plan).
//
// Two exchange modes:
//   capacity: every rank sends exactly C rows per (remote expert, group), zero-padded, with one
//             equal-count all-to-all (GShard's fixed shape; padded rows are computed and dropped);
//   dropless: the per-(expert, group) row counts are exchanged first (an all-to-all of integers),
//             then an all-to-all-v moves only the real rows.
// Dropless routing (capacity 0) always uses the dropless exchange.
//
// Pipelining (ExchangeOptions::pipeline_degree = d > 1, Tutel's overlap degree): every
// (destination, local expert, group) block of n rows (C in capacity mode) is split along its
// positions into d chunks, chunk j holding positions [n·j/d, n·(j+1)/d). Chunk j is exchanged with
// an asynchronous all-to-all-v of its own; the dispatch of chunk j+1 is issued before the experts
// run chunk j, and chunk j's combine is issued as soon as its experts are done, so one chunk's
// exchange is in flight while another chunk's experts run (on NCCL and MPI; the loopback backend
// moves the data inside Wait). Issue order, the same on every rank: D0 D1 C0 D2 C1 ... C(d-1).
// Each chunk is one part of the ExpertCompute (its own saved state for the backward). Results
// equal d = 1 up to the order of the weight-gradient sums (a sum over chunks of per-chunk sums).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "runtime/moe/expert_executor.h"

namespace moe {

// One all-to-all of the executor, as this rank saw it.
struct ExchangeCall {
  enum class Kind {
    kCounts,    // dropless layout: the per-(expert, group) row counts (int64), once per Forward
    kDispatch,  // rows to the experts' ranks (forward: x, backward: dY)
    kCombine,   // rows back to their source ranks (forward: y, backward: dX)
  };
  Kind kind = Kind::kDispatch;
  bool backward = false;  // issued by Backward()
  int chunk = 0;          // pipeline chunk of this row exchange (0 for kCounts)
  int chunks = 1;         // the executor's pipeline degree
  std::vector<int64_t>
      bytes_to_rank;  // per destination rank of the EP group, the self block included
  std::vector<int64_t> bytes_from_rank;  // per source rank
  double start_seconds = 0.0;            // WallSeconds() when the call began
  // Inside the communicator: the blocking call, or the start plus the Wait of an asynchronous one.
  double seconds = 0.0;
};

struct ExchangeOptions {
  bool dropless = false;    // parallel.dropless_exchange
  int pipeline_degree = 1;  // parallel.pipeline_degree: chunks per exchange, 1..16
};

// kInvalidArgument unless 1 <= pipeline_degree <= ExpertCompute::kMaxParts ("pipeline_degree=17
// must be in [1, 16]"). MakeMoeLayer checks it for both layers; the executor's constructor takes
// only valid options (a programmer error otherwise).
Status ValidateExchangeOptions(const ExchangeOptions& options);

// What the executor did since the last Reset() (the Trainer resets it at the start of each step).
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

class ExpertParallelExecutor : public ExpertExecutor {
 public:
  // `ep` must outlive the executor; num_experts must be divisible by ep->size(). `compute` runs the
  // local experts (nullptr: on the CPU).
  ExpertParallelExecutor(comm::Communicator* ep, const experts::FfnShape& shape, int num_experts,
                         ExchangeOptions options, std::unique_ptr<ExpertCompute> compute = nullptr);

  Status Forward(const DispatchPlan& plan, MatrixView<const float> packed_x,
                 const std::vector<experts::FfnParams>& experts, Tensor* packed_y) override;
  Status Backward(const DispatchPlan& plan, MatrixView<const float> packed_dy,
                  const std::vector<experts::FfnParams>& experts,
                  std::vector<experts::FfnParams>* grads, Tensor* packed_dx) override;

  ExchangeStats* exchange_stats() override { return &stats_; }
  ExchangeStats& stats() { return stats_; }
  const ExchangeStats& stats() const { return stats_; }

 private:
  // Runs the experts on part j: rows `in` (expert-major, offsets relative to the part) into `out`.
  using PartCompute = std::function<Status(int part, const std::vector<int64_t>& offsets,
                                           MatrixView<const float> in, Tensor* out)>;
  // An issued row exchange: `request` is null once complete (always for one chunk: blocking).
  struct Pending {
    std::unique_ptr<comm::Request> request;
    size_t record = 0;  // index in stats_.calls
  };

  Status Layout(const DispatchPlan& plan);
  // dispatch -> experts -> combine of every chunk: packed_in (plan layout) to packed_out.
  Status Pipeline(const DispatchPlan& plan, MatrixView<const float> packed_in, Tensor* expert_rows,
                  std::vector<Tensor>* expert_results, const PartCompute& compute,
                  Tensor* packed_out);
  // Copies the rows of `packed` into send_buf_ in the chunk-major send layout (zero padding in
  // capacity mode), or the reverse (the real rows only).
  void Pack(MatrixView<const float> packed);
  void Unpack(const DispatchPlan& plan, Tensor* packed) const;
  // Calls fn(send row, packed row, real rows, rows) for chunk j of every send block, in send-buffer
  // order (j, destination, local expert, group): `rows` rows at `send row` of which the first
  // `real` come from the plan layout at `packed row` (the rest is capacity padding).
  using SendPieceFn = std::function<void(int64_t, int64_t, int64_t, int64_t)>;
  void ForEachSendPiece(const SendPieceFn& fn) const;
  // Copies chunk j between the receive layout [source][local expert][group] and the expert-major
  // part [local expert][source][group]; `from` and `to` point at the chunk's first row in each
  // (to_expert_major picks the direction).
  void Regroup(int j, const float* from, float* to, bool to_expert_major) const;
  // Issues the row exchange of chunk j: kDispatch moves send rows -> recv_buf_, kCombine moves
  // back_buf_ -> `recv` (the send layout). Blocking when the pipeline has one chunk.
  StatusOr<Pending> Exchange(ExchangeCall::Kind kind, int j, const float* send, float* recv);
  Status Wait(Pending* pending);


  int64_t Chunk(int64_t n, int j) const { return n * (j + 1) / d_ - n * j / d_; }
  int64_t ChunkBegin(int64_t n, int j) const { return n * j / d_; }

  comm::Communicator* ep_;
  experts::FfnShape shape_;
  int num_experts_, w_, local_;
  bool dropless_;
  int d_;  // pipeline degree
  std::unique_ptr<ExpertCompute> compute_;

  // Layout of the current plan. Send side: block b = (destination, local expert, group) has
  // block_rows_[b] rows in the exchange (C when padded) of which block_real_[b] are real, taken
  // from packed row block_src_[b]. Receive side: recv_counts_[(source, local expert, group)].
  // Per chunk j and peer p: rows and displacements (absolute, chunk-major) at [j * W + p]; the
  // expert-major part j starts at row part_begin_[j] with relative offsets part_offsets_[j].
  bool padded_ = false;
  bool direct_ = false;  // one chunk, dropless: the plan layout is the send layout (no copies)
  std::vector<int64_t> block_rows_, block_real_, block_src_;
  std::vector<int64_t> recv_counts_;
  std::vector<int64_t> send_rows_, recv_rows_, send_displ_, recv_displ_;
  std::vector<int64_t> part_begin_;
  // [j][source][local expert]: rows of chunk j from a source for a local expert (its groups').
  std::vector<int64_t> source_expert_rows_;
  std::vector<std::vector<int64_t>> part_offsets_;
  int64_t total_send_ = 0, total_recv_ = 0;
  Tensor send_buf_, recv_buf_, back_buf_, expert_in_, expert_dy_;
  std::vector<Tensor> expert_out_, expert_dx_;
  ExchangeStats stats_;
  bool in_backward_ = false;  // the direction recorded in stats_.calls
};

}  // namespace moe
