// What every Device shares (runtime/device/device.h): staging host arrays onto it.
#include "runtime/device/device.h"

#include <cstring>

namespace moe {

Status DeviceArrays::Commit(Device& device, Workspace* workspace) {
  if (device.memory_space() == MemorySpace::kHost) {
    for (const Part& p : parts_) *p.out = p.data;
    return Status::Ok();
  }
  // One staging buffer, one upload; every array 256-byte aligned in it (Carver's alignment).
  int64_t total = 0;
  for (const Part& p : parts_) total += (std::max<int64_t>(p.bytes, 1) + Carver::kAlign - 1) /
                                        Carver::kAlign * Carver::kAlign;
  staging_.resize(static_cast<size_t>(total));
  MOE_ASSIGN_OR_RETURN(void* base, workspace->Get(total));
  int64_t at = 0;
  for (const Part& p : parts_) {
    if (p.bytes > 0) std::memcpy(staging_.data() + at, p.data, static_cast<size_t>(p.bytes));
    *p.out = static_cast<char*>(base) + at;
    at += (std::max<int64_t>(p.bytes, 1) + Carver::kAlign - 1) / Carver::kAlign * Carver::kAlign;
  }
  return total > 0 ? device.Upload(base, staging_.data(), total) : Status::Ok();
}

StatusOr<PlanRows> PlanRowsOn(Device& device, const DispatchPlan& plan, Workspace* workspace) {
  PlanRows rows{.rows = plan.num_rows(), .tokens = plan.num_tokens};
  DeviceArrays arrays;
  arrays.Add(plan.row_token, &rows.row_token);
  arrays.Add(plan.row_gate, &rows.row_gate);
  arrays.Add(plan.token_row_offset, &rows.token_row_offset);
  arrays.Add(plan.token_rows, &rows.token_rows);
  MOE_RETURN_IF_ERROR(arrays.Commit(device, workspace));
  return rows;
}

}  // namespace moe
