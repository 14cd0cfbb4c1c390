// Where the experts run. The layer hands an executor the packed rows of its DispatchPlan
// (expert-major over all E experts, then local group, then position) and gets the expert outputs
// back in the same order. The local executor runs every expert in this process; the
// expert-parallel executor (runtime/ep_executor.h) dispatches the rows to the ranks that host their
// experts with an all-to-all and combines the results with a second one.
#pragma once

#include <vector>

#include "experts/expert_ffn.h"
#include "runtime/base/status.h"
#include "runtime/base/tensor.h"
#include "runtime/dispatch_plan.h"
#include "runtime/expert_blocks.h"

namespace moe {

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
};

// All E experts in this process.
class LocalExpertExecutor : public ExpertExecutor {
 public:
  explicit LocalExpertExecutor(const experts::FfnShape& shape) : blocks_(shape) {}
  Status Forward(const DispatchPlan& plan, MatrixView<const float> packed_x,
                 const std::vector<experts::FfnParams>& experts, Tensor* packed_y) override {
    blocks_.Forward(plan.expert_offset, packed_x, experts, packed_y);
    return Status::Ok();
  }
  Status Backward(const DispatchPlan& plan, MatrixView<const float> packed_dy,
                  const std::vector<experts::FfnParams>& experts,
                  std::vector<experts::FfnParams>* grads, Tensor* packed_dx) override {
    blocks_.Backward(plan.expert_offset, packed_dy, experts, grads, packed_dx);
    return Status::Ok();
  }

 private:
  ExpertBlocks blocks_;
};

}  // namespace moe
