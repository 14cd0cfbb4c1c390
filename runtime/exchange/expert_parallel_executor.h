// The executors of the CPU layer on the exchange engine (runtime/exchange/expert_exchange.h).
//
// ExpertParallelExecutor: experts are spread over the W ranks of an expert-parallel communicator
// in contiguous blocks (rank r hosts experts r*L .. r*L + L - 1, L = E / W). Forward: Dispatch
// (the token rows gathered straight into the send layout, all-to-all), the local experts, Combine
// (all-to-all back, gated sum into y). The experts read the received rows in place when the
// receive layout is already local-expert-major (L = 1, or one rank); otherwise each chunk's
// segments are copied into one contiguous block per local expert — ordered (source rank, group,
// position), exactly the order a 1-rank layer with G = W * groups would use — and back (the CPU
// GEMMs want one block per expert; per-segment GEMMs would change the weight gradients' sum order
// against the 1-rank layer). Backward sends gate·dY the same way with the same handle.
//
// Pipelining (ExchangeOptions::pipeline_degree = d > 1, Tutel's overlap degree): the engine's
// chunks run on RunChunked's schedule, D0 D1 C0 D2 C1 ... C(d-1), so one chunk's exchange is in
// flight while another chunk's experts run (on NCCL and MPI; the loopback backend moves the data
// inside Wait). Each chunk is one part of the ExpertCompute (its own saved state for the
// backward). Results equal d = 1 up to the order of the weight-gradient sums.
//
// LocalExpertExecutor: the same with no communicator — every expert in this process, nothing
// exchanged, no padding; the gather is the layer's only copy of the rows.
#pragma once

#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "runtime/device/cpu_expert_compute.h"
#include "runtime/exchange/expert_exchange.h"
#include "runtime/exchange/expert_executor.h"

namespace moe {

class ExpertParallelExecutor : public ExpertExecutor {
 public:
  // `ep` (null: one rank, nothing exchanged) must outlive the executor; num_experts must be
  // divisible by its size; options must be valid (ValidateExchangeOptions), and with
  // options.ranks_per_node > 0 EnableHierarchical() must be called (collectively) before Forward.
  // `compute` runs the local experts (nullptr: on the CPU).
  ExpertParallelExecutor(comm::Communicator* ep, const experts::FfnShape& shape, int num_experts,
                         ExchangeOptions options, std::unique_ptr<ExpertCompute> compute = nullptr);

  Status EnableHierarchical() { return exchange_.EnableHierarchical(); }

  Status Forward(const DispatchPlan& plan, MatrixView<const float> x,
                 const std::vector<experts::FfnParams>& experts, MatrixView<float> y) override;
  const float* OutputRow(int64_t plan_row) const override {
    return handle_.returned_row(Pass::kForward, plan_row);
  }
  Status Backward(const DispatchPlan& plan, MatrixView<const float> dy,
                  const std::vector<experts::FfnParams>& experts,
                  std::vector<experts::FfnParams>* grads, MatrixView<float> dx) override;

  ExchangeStats* exchange_stats() override { return ep_ != nullptr ? &exchange_.stats() : nullptr; }
  ExchangeStats& stats() { return exchange_.stats(); }
  const ExchangeStats& stats() const { return exchange_.stats(); }
  ExpertExchange& exchange() { return exchange_; }

 private:
  // Runs the experts on chunk j: rows `in` (local-expert-major, offsets relative to the chunk)
  // into `out`.
  using PartCompute = std::function<Status(int part, const std::vector<int64_t>& offsets,
                                           MatrixView<const float> in, Tensor* out)>;
  // One pass: dispatch of `in` (x or dy), the experts chunk by chunk, combine into `out`.
  Status Run(const DispatchPlan& plan, Pass pass, MatrixView<const float> in,
             const PartCompute& compute, MatrixView<float> out);

  comm::Communicator* ep_;
  ExpertExchange exchange_;
  std::unique_ptr<ExpertCompute> compute_;
  ExchangeHandle handle_;
  // Per pass: the experts' input rows when they are regrouped, their outputs per chunk, and the
  // outputs in the receive layout (what the combine sends).
  struct PassRows {
    Tensor expert_in, combine_rows;
    std::vector<Tensor> results;
  };
  PassRows rows_[2];
};

// Every expert in this process (no communicator), run by `compute` (default: the CPU).
class LocalExpertExecutor : public ExpertParallelExecutor {
 public:
  // options: only bf16_wire matters (nothing travels, nothing is padded, one chunk).
  explicit LocalExpertExecutor(const experts::FfnShape& shape, int num_experts,
                               ExchangeOptions options = {})
      : ExpertParallelExecutor(nullptr, shape, num_experts,
                               {.dropless = true, .bf16_wire = options.bf16_wire}) {}
  LocalExpertExecutor(const experts::FfnShape& shape, int num_experts,
                      std::unique_ptr<ExpertCompute> compute)
      : ExpertParallelExecutor(nullptr, shape, num_experts, {.dropless = true},
                               std::move(compute)) {}
};

}  // namespace moe
