// The CUDA device's row operations (runtime/device/device.h: GatherRows, CombineRows,
// GateGradients, Cast) and the sum of two row buffers, one kernel each; their per-row index
// arithmetic is runtime/device/row_steps.h, the host loops' own. Every pointer is a device pointer;
// `stream` is a cudaStream_t. Each call only enqueues work; it returns launch errors. Without a
// CUDA build every call fails with kUnimplemented.
//
// Sums run in the host's order (a token's rows in plan order, added onto the existing output), so
// results differ from the host's only by fused multiply-adds (the combine) and by the gate
// gradient's float (not double) dot product.
#pragma once

#include <cstdint>

#include "base/status.h"
#include "runtime/device/device.h"

namespace moe::gpu {

Status GatherRows(const RowGather& g, void* stream);
Status CombineRows(const RowCombine& c, void* stream);
Status GateGradients(const GateGradient& g, void* stream);
Status Cast(CastKind kind, const void* src, void* dst, int64_t count, void* stream);
// out[i] += in[i] for n floats (a shared expert's sum onto the others').
Status AddInto(float* out, const float* in, int64_t n, void* stream);

}  // namespace moe::gpu
