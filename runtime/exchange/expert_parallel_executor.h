// The executors of the layer on the exchange engine (runtime/exchange/expert_exchange.h), over a
// Device (runtime/device/device.h): the same code on the host and on a GPU.
//
// ExpertParallelExecutor: experts are spread over the W ranks of an expert-parallel communicator
// in contiguous blocks (rank r hosts experts r*L .. r*L + L - 1, L = E / W). Forward: Dispatch
// (the token rows gathered straight into the send layout, all-to-all), the local experts, Combine
// (all-to-all back, gated sum into y). The experts read the received rows in place when the
// receive layout is already local-expert-major (L = 1, or one rank); otherwise each chunk's rows
// are gathered into one contiguous block per local expert — ordered (source rank, group,
// position), exactly the order a 1-rank layer with G = W * groups would use — and back (the
// grouped GEMMs want one block per expert; per-segment GEMMs would change the weight gradients'
// sum order against the 1-rank layer). Backward sends gate·dY the same way with the same handle.
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

#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "base/memory.h"
#include "comm/communicator.h"
#include "runtime/device/device.h"
#include "runtime/device/expert_compute.h"
#include "runtime/exchange/expert_exchange.h"
#include "runtime/exchange/expert_executor.h"

namespace moe {

class ExpertParallelExecutor : public ExpertExecutor {
 public:
  // `device` and `ep` (null: one rank, nothing exchanged; in the device's memory) must outlive the
  // executor; num_experts must be divisible by ep's size; options must be valid
  // (ValidateExchangeOptions), and with options.ranks_per_node > 0 EnableHierarchical() must be
  // called (collectively) before Forward. `compute` runs this rank's E / W experts (null: the
  // device's, Device::MakeExperts, which must not fail).
  ExpertParallelExecutor(Device* device, comm::Communicator* ep, const experts::FfnShape& shape,
                         int num_experts, ExchangeOptions options,
                         std::unique_ptr<ExpertCompute> compute = nullptr);

  Status EnableHierarchical() { return exchange_.EnableHierarchical(); }

  Status SetWeights(std::span<const experts::FfnParams> experts) override {
    return compute_->SetWeights(experts);
  }
  Status Forward(const DispatchPlan& plan, const PlanRows& rows, MatrixView<const float> x,
                 MatrixView<float> y) override;
  Status GateGradients(MatrixView<const float> dy, float* dgate) override {
    return exchange_.GateGradients(handle_, dy, dgate);
  }
  Status Backward(const DispatchPlan& plan, MatrixView<const float> dy,
                  std::span<experts::FfnParams> grads, MatrixView<float> dx) override;
  Status AddGradients(std::span<experts::FfnParams> grads) override {
    return compute_->AddGradients(grads);
  }

  ExchangeStats* exchange_stats() override;
  std::string exchange_description() const override {
    return ep_ == nullptr ? "" : exchange_.Description();
  }
  ExchangeStats& stats() { return exchange_.stats(); }
  const ExchangeStats& stats() const { return exchange_.stats(); }
  ExpertExchange& exchange() { return exchange_; }
  Device& device() const { return *device_; }

 private:
  // Runs the experts on chunk j: rows `in` (local-expert-major, offsets relative to the chunk)
  // into `out`.
  using PartCompute = std::function<Status(int part, const std::vector<int64_t>& offsets,
                                           MatrixView<const float> in, MatrixView<float> out)>;
  // One pass: dispatch of `in` (x or dy), the experts chunk by chunk, combine into `out`.
  Status Run(const DispatchPlan& plan, const PlanRows* rows, Pass pass, MatrixView<const float> in,
             const PartCompute& compute, MatrixView<float> out);

  Device* device_;
  comm::Communicator* ep_;
  ExpertExchange exchange_;
  std::unique_ptr<ExpertCompute> compute_;
  ExchangeHandle handle_;
  // Per pass: the experts' input rows when they are regrouped, their outputs (chunk j at its
  // recv_begin), and the outputs in the receive layout when regrouped (what the combine sends).
  struct PassRows {
    Workspace expert_in, results, combine_rows;
  };
  PassRows rows_[2];
};

// Every expert in this process (no communicator), run by `compute` (null: the device's).
class LocalExpertExecutor : public ExpertParallelExecutor {
 public:
  // options: only bf16_wire matters (nothing travels, nothing is padded, one chunk).
  LocalExpertExecutor(Device* device, const experts::FfnShape& shape, int num_experts,
                      ExchangeOptions options = {}, std::unique_ptr<ExpertCompute> compute = nullptr)
      : ExpertParallelExecutor(device, nullptr, shape, num_experts,
                               {.dropless = true, .bf16_wire = options.bf16_wire},
                               std::move(compute)) {}
};

}  // namespace moe
