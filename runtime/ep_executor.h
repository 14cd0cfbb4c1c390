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
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "runtime/expert_executor.h"

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
  std::vector<int64_t>
      bytes_to_rank;  // per destination rank of the EP group, the self block included
  std::vector<int64_t> bytes_from_rank;  // per source rank
  double start_seconds = 0.0;            // WallSeconds() when the call began
  double seconds = 0.0;                  // inside the communicator call
};

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
};

class ExpertParallelExecutor : public ExpertExecutor {
 public:
  // `ep` must outlive the executor; num_experts must be divisible by ep->size(). `compute` runs the
  // local experts (nullptr: on the CPU).
  ExpertParallelExecutor(comm::Communicator* ep, const experts::FfnShape& shape, int num_experts,
                         bool dropless_exchange, std::unique_ptr<ExpertCompute> compute = nullptr);

  Status Forward(const DispatchPlan& plan, MatrixView<const float> packed_x,
                 const std::vector<experts::FfnParams>& experts, Tensor* packed_y) override;
  Status Backward(const DispatchPlan& plan, MatrixView<const float> packed_dy,
                  const std::vector<experts::FfnParams>& experts,
                  std::vector<experts::FfnParams>* grads, Tensor* packed_dx) override;

  ExchangeStats& stats() { return stats_; }
  const ExchangeStats& stats() const { return stats_; }

 private:
  // Sends rows of `packed` (layout of `plan`) to the experts' ranks; fills `expert_rows` in the
  // regrouped order (local expert, source rank, group, position).
  Status Dispatch(const DispatchPlan& plan, MatrixView<const float> packed, Tensor* expert_rows);
  // The reverse: rows of `expert_rows` back to their source ranks, into `packed` (plan layout).
  Status Combine(const DispatchPlan& plan, const Tensor& expert_rows, Tensor* packed);
  Status Layout(const DispatchPlan& plan);
  // Copies row blocks between the receive layout [source][local expert][group] and the expert-major
  // layout [local expert][source][group] (to_expert_major picks the direction).
  void Regroup(const Tensor& from, Tensor* to, bool to_expert_major) const;
  // One all-to-all(v) of float rows; counts and displacements in rows.
  // `call` is filled with the kind, direction, per-peer bytes and time and appended to stats_.
  Status Exchange(ExchangeCall::Kind kind, const float* send, const std::vector<int64_t>& send_rows,
                  const std::vector<int64_t>& send_displ, float* recv,
                  const std::vector<int64_t>& recv_rows, const std::vector<int64_t>& recv_displ);

  // Runs `exchange` and appends its record (kind, direction, bytes per peer, start, seconds) to
  // stats_.calls.
  Status Record(ExchangeCall::Kind kind, std::vector<int64_t> bytes_to_rank,
                std::vector<int64_t> bytes_from_rank, const std::function<Status()>& exchange);

  comm::Communicator* ep_;
  experts::FfnShape shape_;
  int num_experts_, w_, local_;
  bool dropless_;
  std::unique_ptr<ExpertCompute> compute_;

  // Layout of the current plan.
  bool padded_ = false;
  int64_t groups_ = 0, capacity_ = 0;
  std::vector<int64_t> send_rows_, recv_rows_;  // per peer (rows)
  std::vector<int64_t> send_row_displ_, recv_row_displ_;
  std::vector<int64_t> recv_counts_;     // [src][l][g] rows received (dropless) or C (padded)
  std::vector<int64_t> expert_offsets_;  // L + 1 offsets in the regrouped buffer
  Tensor send_buf_, recv_buf_, expert_in_, expert_out_, back_buf_;
  ExchangeStats stats_;
  bool in_backward_ = false;  // the direction recorded in stats_.calls
};

}  // namespace moe
