// ExpertExecutor: how the CPU layer's routed rows reach their experts and come back. The layer
// hands an executor its token rows and its DispatchPlan; the executor gathers the kept rows,
// runs them through their experts and adds each token's gated outputs into y. Both executors are
// the exchange engine (runtime/exchange/expert_exchange.h) plus an ExpertCompute
// (runtime/device/expert_compute.h): the local one has no communicator and runs every expert in
// this process; the expert-parallel one (runtime/exchange/expert_parallel_executor.h) dispatches the
// rows to the ranks that host their experts and combines the results.
#pragma once

#include <memory>
#include <vector>

#include "experts/expert_ffn.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/routing/dispatch_plan.h"

namespace moe {

struct ExchangeStats;  // runtime/exchange/expert_exchange.h

class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  // y[t] += Σ over t's kept rows r (the plan's token_rows order) of gate_r · expert_r(x[t]).
  // `experts` are this process's experts; x (S x M) must stay alive until Backward.
  virtual Status Forward(const DispatchPlan& plan, MatrixView<const float> x,
                         const std::vector<experts::FfnParams>& experts, MatrixView<float> y) = 0;
  // expert_r(x[t]) of plan row r of the last Forward, before its gate (M floats).
  virtual const float* OutputRow(int64_t plan_row) const = 0;
  // dx[t] += Σ over t's kept rows r of (d expert_r / dx)ᵀ (gate_r · dy[t]); gradients of this
  // process's experts accumulated into grads.
  virtual Status Backward(const DispatchPlan& plan, MatrixView<const float> dy,
                          const std::vector<experts::FfnParams>& experts,
                          std::vector<experts::FfnParams>* grads, MatrixView<float> dx) = 0;
  // The exchanges this executor made since they were last reset; null when it makes none.
  virtual ExchangeStats* exchange_stats() { return nullptr; }
};

}  // namespace moe
