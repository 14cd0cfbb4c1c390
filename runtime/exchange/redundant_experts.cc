// Redundant experts on the exchange (runtime/exchange/redundant_experts.h).
#include "runtime/exchange/redundant_experts.h"

#include <string>
#include <utility>

namespace moe {

std::vector<int64_t> ReplicaCapacities(int64_t capacity, const ExpertPlacement& placement) {
  if (capacity <= 0) return {};
  std::vector<int64_t> out(static_cast<size_t>(placement.num_physical()), 0);
  for (const std::vector<int>& replicas : placement.replicas) {
    const int64_t n = static_cast<int64_t>(replicas.size());
    for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(replicas[i])] = (capacity - i + n - 1) / n;
  }
  return out;
}

Status MakePhysicalPlan(const DispatchPlan& logical, const ExpertPlacement& placement,
                        PhysicalPlan* out) {
  if (logical.expert_choice) {
    return InvalidArgument("redundant experts: expert-choice plans are not supported");
  }
  if (logical.num_experts != placement.num_logical) {
    return InvalidArgument("redundant experts: the plan has " + std::to_string(logical.num_experts) +
                           " experts, the placement " + std::to_string(placement.num_logical));
  }
  const int64_t e_count = logical.num_experts, g_count = logical.num_groups;
  const int64_t q_count = placement.num_physical();
  DispatchPlan& p = out->plan;
  p = DispatchPlan();
  p.num_tokens = logical.num_tokens;
  p.num_experts = q_count;
  p.top_k = logical.top_k;
  p.num_groups = g_count;
  p.capacity = logical.capacity;
  p.expert_capacity = ReplicaCapacities(logical.capacity, placement);
  p.normalization = logical.normalization;
  p.group_begin = logical.group_begin;
  p.token_row_offset = logical.token_row_offset;
  // Rows per (group, physical expert): replica i of n takes positions i, i + n, ...
  p.group_expert_count.assign(static_cast<size_t>(g_count * q_count), 0);
  for (int64_t e = 0; e < e_count; ++e) {
    const std::vector<int>& replicas = placement.replicas[static_cast<size_t>(e)];
    const int64_t n = static_cast<int64_t>(replicas.size());
    for (int64_t g = 0; g < g_count; ++g) {
      const int64_t count = logical.group_expert_count[static_cast<size_t>(g * e_count + e)];
      for (int64_t i = 0; i < n; ++i) {
        p.group_expert_count[static_cast<size_t>(g * q_count + replicas[i])] =
            static_cast<int32_t>(count > i ? (count - i + n - 1) / n : 0);
      }
    }
  }
  // Physical rows in (expert, group, position) order; first row of each (expert, group).
  std::vector<int64_t> begin(static_cast<size_t>(q_count * g_count), 0);
  p.expert_offset.assign(static_cast<size_t>(q_count + 1), 0);
  int64_t at = 0;
  for (int64_t q = 0; q < q_count; ++q) {
    p.expert_offset[q] = at;
    for (int64_t g = 0; g < g_count; ++g) {
      begin[static_cast<size_t>(q * g_count + g)] = at;
      at += p.group_expert_count[static_cast<size_t>(g * q_count + q)];
    }
  }
  p.expert_offset[q_count] = at;
  const int64_t rows = logical.num_rows();
  if (at != rows) return Internal("redundant experts: the physical plan lost rows");
  p.row_token.assign(static_cast<size_t>(rows), 0);
  p.row_expert.assign(static_cast<size_t>(rows), 0);
  p.row_gate.assign(static_cast<size_t>(rows), 0.0f);
  out->physical_row.assign(static_cast<size_t>(rows), 0);
  int64_t r = 0;  // logical rows in (expert, group, position) order
  for (int64_t e = 0; e < e_count; ++e) {
    const std::vector<int>& replicas = placement.replicas[static_cast<size_t>(e)];
    const int64_t n = static_cast<int64_t>(replicas.size());
    for (int64_t g = 0; g < g_count; ++g) {
      const int64_t count = logical.group_expert_count[static_cast<size_t>(g * e_count + e)];
      for (int64_t pos = 0; pos < count; ++pos, ++r) {
        const int q = replicas[static_cast<size_t>(pos % n)];
        const int64_t to = begin[static_cast<size_t>(q * g_count + g)] + pos / n;
        out->physical_row[static_cast<size_t>(r)] = static_cast<int32_t>(to);
        p.row_token[static_cast<size_t>(to)] = logical.row_token[static_cast<size_t>(r)];
        p.row_expert[static_cast<size_t>(to)] = q;
        p.row_gate[static_cast<size_t>(to)] = logical.row_gate[static_cast<size_t>(r)];
      }
    }
  }
  p.token_rows.resize(logical.token_rows.size());
  for (size_t i = 0; i < logical.token_rows.size(); ++i) {
    p.token_rows[i] = out->physical_row[static_cast<size_t>(logical.token_rows[i])];
  }
  return Status::Ok();
}

RedundantExpertExecutor::RedundantExpertExecutor(std::unique_ptr<ExpertParallelExecutor> inner,
                                                 ExpertPlacement placement)
    : inner_(std::move(inner)),
      placement_(std::move(placement)),
      rows_ws_(inner_->device().memory()),
      map_ws_(inner_->device().memory()),
      dgate_ws_(inner_->device().memory()) {}

Status RedundantExpertExecutor::Forward(const DispatchPlan& plan, const PlanRows&,
                                        MatrixView<const float> x, MatrixView<float> y) {
  MOE_RETURN_IF_ERROR(MakePhysicalPlan(plan, placement_, &physical_));
  forward_plan_ = &plan;
  Device& device = inner_->device();
  MOE_ASSIGN_OR_RETURN(physical_rows_, PlanRowsOn(device, physical_.plan, &rows_ws_));
  map_staging_.Clear();
  map_staging_.Add(physical_.physical_row, &physical_row_);
  MOE_RETURN_IF_ERROR(map_staging_.Commit(device, &map_ws_));
  return inner_->Forward(physical_.plan, physical_rows_, x, y);
}

Status RedundantExpertExecutor::GateGradients(MatrixView<const float> dy, float* dgate) {
  // The physical rows' gradients, then each logical row's from its physical row.
  const int64_t rows = physical_.plan.num_rows();
  MOE_ASSIGN_OR_RETURN(void* buf, dgate_ws_.Get(rows * static_cast<int64_t>(sizeof(float))));
  float* const physical = static_cast<float*>(buf);
  MOE_RETURN_IF_ERROR(inner_->GateGradients(dy, physical));
  return inner_->device().GatherRows({.rows = rows,
                                      .cols = 1,
                                      .src_row = physical_row_,
                                      .src = physical,
                                      .dst = dgate,
                                      .src_rows = rows,
                                      .dst_rows = rows});
}

Status RedundantExpertExecutor::Backward(const DispatchPlan& plan, MatrixView<const float> dy,
                                         std::span<experts::FfnParams> grads,
                                         MatrixView<float> dx) {
  if (forward_plan_ != &plan) {
    return FailedPrecondition("RedundantExpertExecutor: Backward needs the plan of the last Forward");
  }
  return inner_->Backward(physical_.plan, dy, grads, dx);
}

}  // namespace moe
