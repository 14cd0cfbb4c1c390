// Redundant experts on the exchange (docs/SEMANTICS.md "Redundant experts"; placement:
// runtime/exchange/expert_placement.h).
//
// Routing, capacity and drops are decided on the E logical experts exactly as without redundancy;
// then the kept rows of logical expert e, whose n replicas are the physical experts
// placement.replicas[e] (ascending), are split over them by position: the row at position p of
// (group, e) goes to replica p mod n, at position p / n there. The result is a plan over the E + R
// physical experts — placed on the ranks in contiguous blocks, so the exchange engine carries it
// unchanged — with each token's rows in the logical plan's order (the combine sums them in the
// same order, so y is the logical layer's bit for bit when the experts' rows are).
//
// Capacity. Replica i of n receives positions i, i + n, ... < C: its capacity is
// ceil((C − i) / n) (DispatchPlan::expert_capacity), so a capacity exchange pads every replica to
// its share and the padded rows of a logical expert stay C per group, whatever n.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "base/memory.h"
#include "base/status.h"
#include "runtime/device/device.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/exchange/expert_placement.h"

namespace moe {

// The physical plan of `logical` under `placement`, and where each logical plan row went. Only the
// fields the exchange engine and the executors read are set: num_tokens, num_experts (E + R),
// top_k, num_groups, capacity and expert_capacity, group_begin, expert_offset,
// group_expert_count, row_token, row_expert (physical), row_gate, token_row_offset, token_rows.
// Token-choice plans only (kInvalidArgument for expert choice).
struct PhysicalPlan {
  DispatchPlan plan;
  std::vector<int32_t> physical_row;  // per logical plan row
};
Status MakePhysicalPlan(const DispatchPlan& logical, const ExpertPlacement& placement,
                        PhysicalPlan* out);

// Capacity of each physical expert for a logical capacity C (0: dropless, empty result).
std::vector<int64_t> ReplicaCapacities(int64_t capacity, const ExpertPlacement& placement);

// An ExpertExecutor over logical plans whose experts are the placement's physical experts: the
// rows are re-addressed (MakePhysicalPlan, on the host: the logical plan's row arrays must be
// there) and run by an expert-parallel executor over the E + R physical experts; the weights
// given are this rank's physical experts (placement.per_rank of them, slot order). The placement
// may change between calls (rebalancing).
class RedundantExpertExecutor : public ExpertExecutor {
 public:
  // `inner` must have been made for placement.num_physical() experts on placement.num_ranks
  // ranks.
  RedundantExpertExecutor(std::unique_ptr<ExpertParallelExecutor> inner,
                          ExpertPlacement placement);

  const ExpertPlacement& placement() const { return placement_; }
  // Takes effect at the next Forward (not between a Forward and its Backward).
  void set_placement(ExpertPlacement placement) { placement_ = std::move(placement); }
  ExpertParallelExecutor& inner() { return *inner_; }

  Status SetWeights(std::span<const experts::FfnParams> experts) override {
    return inner_->SetWeights(experts);
  }
  Status Forward(const DispatchPlan& plan, const PlanRows& rows, MatrixView<const float> x,
                 MatrixView<float> y) override;
  Status GateGradients(MatrixView<const float> dy, float* dgate) override;
  Status Backward(const DispatchPlan& plan, MatrixView<const float> dy,
                  std::span<experts::FfnParams> grads, MatrixView<float> dx) override;
  Status AddGradients(std::span<experts::FfnParams> grads) override {
    return inner_->AddGradients(grads);
  }
  ExchangeStats* exchange_stats() override { return inner_->exchange_stats(); }
  std::string exchange_description() const override { return inner_->exchange_description(); }

 private:
  std::unique_ptr<ExpertParallelExecutor> inner_;
  ExpertPlacement placement_;
  PhysicalPlan physical_;
  const DispatchPlan* forward_plan_ = nullptr;
  // The physical plan's rows and the logical rows' physical addresses on the device, and the
  // physical rows' gate gradients.
  PlanRows physical_rows_;
  const int32_t* physical_row_ = nullptr;
  Workspace rows_ws_, map_ws_, dgate_ws_;
  DeviceArrays map_staging_;
};

}  // namespace moe
