// ExpertExecutor: how the CPU layer's packed rows reach their experts. The layer hands an executor
// the packed rows of its DispatchPlan (expert-major over all E experts, then local group, then
// position) and gets the expert outputs back in the same order. The local executor (here) runs
// every expert in this process with an ExpertCompute (runtime/moe/expert_compute.h); the
// expert-parallel executor (runtime/moe/expert_parallel_executor.h) dispatches the rows to the
// ranks that host their experts with an all-to-all and combines the results with a second one.
#pragma once

#include <memory>
#include <vector>

#include "experts/expert_ffn.h"
#include "runtime/base/status.h"
#include "runtime/base/tensor.h"
#include "runtime/moe/dispatch_plan.h"
#include "runtime/moe/cpu_expert_compute.h"

namespace moe {

struct ExchangeStats;  // runtime/moe/expert_parallel_executor.h

class ExpertExecutor {
 public:
  virtual ~ExpertExecutor() = default;
  // packed_y[r] = expert_{row_expert[r]}(packed_x[r]). `experts` are this process's experts.
  virtual Status Forward(const DispatchPlan& plan, MatrixView<const float> packed_x,
                         const std::vector<experts::FfnParams>& experts, Tensor* packed_y) = 0;
  // packed_dx from packed_dy; gradients of this process's experts accumulated into grads.
  virtual Status Backward(const DispatchPlan& plan, MatrixView<const float> packed_dy,
                          const std::vector<experts::FfnParams>& experts,
                          std::vector<experts::FfnParams>* grads, Tensor* packed_dx) = 0;
  // The exchanges this executor made since they were last reset; null when it makes none.
  virtual ExchangeStats* exchange_stats() { return nullptr; }
};

// All E experts in this process, run by `compute` (default: the CPU).
class LocalExpertExecutor : public ExpertExecutor {
 public:
  explicit LocalExpertExecutor(const experts::FfnShape& shape)
      : compute_(std::make_unique<CpuExpertCompute>(shape)) {}
  explicit LocalExpertExecutor(std::unique_ptr<ExpertCompute> compute) : compute_(std::move(compute)) {}
  Status Forward(const DispatchPlan& plan, MatrixView<const float> packed_x,
                 const std::vector<experts::FfnParams>& experts, Tensor* packed_y) override {
    return compute_->Forward(plan.expert_offset, packed_x, experts, packed_y);
  }
  Status Backward(const DispatchPlan& plan, MatrixView<const float> packed_dy,
                  const std::vector<experts::FfnParams>& experts,
                  std::vector<experts::FfnParams>* grads, Tensor* packed_dx) override {
    return compute_->Backward(plan.expert_offset, packed_dy, experts, grads, packed_dx);
  }

 private:
  std::unique_ptr<ExpertCompute> compute_;
};

}  // namespace moe
