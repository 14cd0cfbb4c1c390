// Element-wise reduction of host arrays: acc[i] = op(acc[i], in[i]).
#pragma once

#include <cstdint>

#include "comm/communicator.h"

namespace moe::comm {

void HostReduceInto(void* acc, const void* in, int64_t count, DataType dtype, ReduceOp op);

}  // namespace moe::comm
