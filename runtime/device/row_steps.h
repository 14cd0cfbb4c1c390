// The per-row index arithmetic of the Device's row operations (runtime/device/device.h), written
// once for the host loops (host_device.cc) and the CUDA kernels (runtime/device/cuda/permute.cu):
// which row a gather reads and writes, where a plan row's combined result is, which rows a token
// sums. tests/unit/row_steps_test.cc checks them on the CPU, so the kernels' index logic runs on
// every build, GPU or not (as runtime/routing/route_steps.h does for the device router).
#pragma once

#include <cstdint>

#include "base/host_device.h"
#include "runtime/device/device.h"

namespace moe::row_steps {

// Gather row i of `g`: the destination row, and the source row it copies (-1: a zero row).
MOE_HD inline int64_t GatherDestination(const RowGather& g, int64_t i) {
  return g.dst_row == nullptr ? i : g.dst_row[i];
}
MOE_HD inline int64_t GatherSource(const RowGather& g, int64_t i) {
  const int32_t p = g.src_row[i];
  if (p < 0) return -1;
  return g.row_token == nullptr ? p : g.row_token[p];
}
// The scale of gather row i (a source row's): its plan row's gate, or 1.
MOE_HD inline float GatherScale(const RowGather& g, int64_t i) {
  return g.row_gate == nullptr ? 1.0f : g.row_gate[g.src_row[i]];
}

// Plan row r's combined row (`cols` floats wide).
MOE_HD inline const float* ReturnedRow(const ReturnedRows& ret, int64_t r, int64_t cols) {
  if (ret.return_row == nullptr) return ret.rows + r * cols;
  const int64_t at = ret.return_row[r];
  return at >= 0 ? ret.rows + at * cols : ret.self_rows + (-1 - at) * cols;
}

// Token t's plan rows are token_rows[TokenRowsBegin(t) .. TokenRowsEnd(t)), summed in that order.
MOE_HD inline int64_t TokenRowsBegin(const PlanRows& p, int64_t t) { return p.token_row_offset[t]; }
MOE_HD inline int64_t TokenRowsEnd(const PlanRows& p, int64_t t) {
  return p.token_row_offset[t + 1];
}

}  // namespace moe::row_steps
