// The permute stages of the MoE layer on device memory, one kernel each: the GPU counterparts of
// the pack / combine loops in runtime/layer/cpu_moe_layer.cc, driven by the DispatchPlan's index arrays
// (copied to the device). Rows are `cols` fp32 values; every pointer is a device pointer;
// `stream` is a cudaStream_t (nullptr: the legacy default stream). Each call only enqueues work;
// it returns launch errors. Without a CUDA build every call fails with kUnimplemented.
//
// Sum order matches the CPU loops (a token's rows in plan order, added onto the existing output),
// so results differ from the CPU only by fused multiply-adds.
#pragma once

#include <cstdint>

#include "base/status.h"

namespace moe::gpu {

// The plan's index arrays on the device.
struct DevicePlan {
  int64_t rows = 0;                           // packed rows
  int64_t tokens = 0;                         // S
  const int32_t* row_token = nullptr;         // rows: the token of each packed row
  const float* row_gate = nullptr;            // rows: its gate
  const int64_t* token_row_offset = nullptr;  // S + 1
  const int32_t* token_rows = nullptr;        // rows: the packed rows of each token, in slot order
};

// packed[r] = x[row_token[r]].
Status PermuteRows(const DevicePlan& plan, const float* x, int64_t cols, float* packed,
                   void* stream);

// out[t] = (accumulate ? out[t] : 0) + Σ over the token's rows r of gate[r] · packed_y[r]
// (with_gates false: gate 1, the backward's dX gather).
Status UnpermuteRows(const DevicePlan& plan, const float* packed_y, int64_t cols, bool with_gates,
                     bool accumulate, float* out, void* stream);

// Backward of the gated combine: packed_dy[r] = gate[r] · dy[row_token[r]] and
// dgate[r] = dy[row_token[r]] · packed_y[r].
Status PermuteGradRows(const DevicePlan& plan, const float* dy, const float* packed_y, int64_t cols,
                       float* packed_dy, float* dgate, void* stream);

// out[i] += in[i] for n floats (the shared experts' sum).
Status AddInto(float* out, const float* in, int64_t n, void* stream);

}  // namespace moe::gpu
