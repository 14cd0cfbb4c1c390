// Test helpers: known data patterns and staging of host bytes to a communicator's memory space.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "base/memory.h"

namespace moe::comm::testing {

inline constexpr DataType kAllDataTypes[] = {DataType::kFloat32, DataType::kFloat64,
                                             DataType::kInt32, DataType::kInt64, DataType::kUint8};

using Bytes = std::vector<unsigned char>;

// Element i of the message from rank `src` to rank `dst`: a small integer (0..100) that every dtype
// holds exactly. Writes `count` elements starting at element index `first`.
void FillPattern(DataType dtype, void* out, int64_t count, int src, int dst, int64_t first = 0);
Bytes Pattern(DataType dtype, int64_t count, int src, int dst, int64_t first = 0);

// Host bytes -> a new buffer in `space`, and back.
Buffer Upload(MemorySpace space, const Bytes& host);
// A buffer filled with the poison byte 0xEE.
Buffer Poisoned(MemorySpace space, int64_t bytes);
Bytes Download(const Buffer& buffer);

// "" when equal; else where the first difference is.
std::string CompareBytes(const Bytes& expected, const Bytes& actual);

// Writes v (a small integer) as element i of a host array of `dtype`; reads it back as double.
void SetElement(DataType dtype, void* data, int64_t i, double v);
double GetElement(DataType dtype, const void* data, int64_t i);

}  // namespace moe::comm::testing
