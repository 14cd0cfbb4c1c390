// ExpertExecutor: how the layer's routed rows reach their experts and come back. The layer hands
// an executor its token rows and its DispatchPlan; the executor gathers the kept rows, runs them
// through their experts and adds each token's gated outputs into y. Every executor is the exchange
// engine (runtime/exchange/expert_exchange.h) plus a device's ExpertCompute
// (runtime/device/expert_compute.h): the local one has no communicator and runs every expert in
// this process; the expert-parallel one (runtime/exchange/expert_parallel_executor.h) dispatches
// the rows to the ranks that host their experts and combines the results; the redundant one
// (runtime/exchange/redundant_experts.h) re-addresses them to replicas first. Rows (x, y, dy, dx,
// dgate) live in the device's memory.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/tensor.h"
#include "experts/expert_ffn.h"
#include "runtime/device/device.h"
#include "runtime/routing/dispatch_plan.h"

namespace moe {

struct ExchangeStats;  // runtime/exchange/expert_exchange.h

class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  // This process's experts' weights (ExpertCompute::SetWeights).
  virtual Status SetWeights(std::span<const experts::FfnParams> experts) = 0;
  // y[t] += Σ over t's kept rows r (the plan's token_rows order) of gate_r · expert_r(x[t]).
  // `rows`: the plan's row arrays in the device's memory. x (S x M) must stay alive until
  // Backward.
  virtual Status Forward(const DispatchPlan& plan, const PlanRows& rows, MatrixView<const float> x,
                         MatrixView<float> y) = 0;
  // dgate[r] = dy[token_r] · expert_r(x[token_r]) (before its gate) for every plan row r of the
  // last Forward.
  virtual Status GateGradients(MatrixView<const float> dy, float* dgate) = 0;
  // dx[t] += Σ over t's kept rows r of (d expert_r / dx)ᵀ (gate_r · dy[t]); the gradients of this
  // process's experts: into grads (host) on the host, kept on a GPU until AddGradients.
  virtual Status Backward(const DispatchPlan& plan, MatrixView<const float> dy,
                          std::span<experts::FfnParams> grads, MatrixView<float> dx) = 0;
  virtual Status AddGradients(std::span<experts::FfnParams> grads) = 0;
  // The exchanges this executor made since they were last reset (the experts' time included);
  // null when it makes none.
  virtual ExchangeStats* exchange_stats() { return nullptr; }
  // How the rows move between ranks, in words ("" when they do not: one rank).
  virtual std::string exchange_description() const { return ""; }
};

}  // namespace moe
