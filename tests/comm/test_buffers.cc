// Test buffers in a communicator's memory space (tests/comm/test_buffers.h).
#include "tests/comm/test_buffers.h"

#include <cstring>

#include "base/check.h"

namespace moe::comm::testing {

void SetElement(DataType dtype, void* data, int64_t i, double v) {
  switch (dtype) {
    case DataType::kFloat32:
      static_cast<float*>(data)[i] = static_cast<float>(v);
      return;
    case DataType::kFloat64:
      static_cast<double*>(data)[i] = v;
      return;
    case DataType::kInt32:
      static_cast<int32_t*>(data)[i] = static_cast<int32_t>(v);
      return;
    case DataType::kInt64:
      static_cast<int64_t*>(data)[i] = static_cast<int64_t>(v);
      return;
    case DataType::kUint8:
      static_cast<uint8_t*>(data)[i] = static_cast<uint8_t>(v);
      return;
  }
}

double GetElement(DataType dtype, const void* data, int64_t i) {
  switch (dtype) {
    case DataType::kFloat32:
      return static_cast<const float*>(data)[i];
    case DataType::kFloat64:
      return static_cast<const double*>(data)[i];
    case DataType::kInt32:
      return static_cast<const int32_t*>(data)[i];
    case DataType::kInt64:
      return static_cast<double>(static_cast<const int64_t*>(data)[i]);
    case DataType::kUint8:
      return static_cast<const uint8_t*>(data)[i];
  }
  return 0;
}

namespace {
template <typename T>
void FillTyped(T* out, int64_t count, int src, int dst, int64_t first) {
  int64_t v = (src * 37 + dst * 11 + first * 7) % 101;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<T>(v);
    v += 7;
    if (v >= 101) v -= 101;
  }
}
}  // namespace

void FillPattern(DataType dtype, void* out, int64_t count, int src, int dst, int64_t first) {
  switch (dtype) {
    case DataType::kFloat32:
      return FillTyped(static_cast<float*>(out), count, src, dst, first);
    case DataType::kFloat64:
      return FillTyped(static_cast<double*>(out), count, src, dst, first);
    case DataType::kInt32:
      return FillTyped(static_cast<int32_t*>(out), count, src, dst, first);
    case DataType::kInt64:
      return FillTyped(static_cast<int64_t*>(out), count, src, dst, first);
    case DataType::kUint8:
      return FillTyped(static_cast<uint8_t*>(out), count, src, dst, first);
  }
}

Bytes Pattern(DataType dtype, int64_t count, int src, int dst, int64_t first) {
  Bytes out(static_cast<size_t>(count * DataTypeSize(dtype)));
  FillPattern(dtype, out.data(), count, src, dst, first);
  return out;
}

Buffer Upload(MemorySpace space, const Bytes& host) {
  StatusOr<Buffer> buffer = Buffer::FromHost(space, host.data(), static_cast<int64_t>(host.size()));
  MOE_CHECK_OK(buffer.status());
  return std::move(buffer).value();
}

Buffer Poisoned(MemorySpace space, int64_t bytes) {
  return Upload(space, Bytes(static_cast<size_t>(bytes), 0xEE));
}

Bytes Download(const Buffer& buffer) {
  Bytes out(static_cast<size_t>(buffer.bytes()));
  MOE_CHECK_OK(CopyToHost(buffer.space(), out.data(), buffer.data(), buffer.bytes()));
  return out;
}

std::string CompareBytes(const Bytes& expected, const Bytes& actual) {
  if (expected.size() != actual.size()) {
    return "size " + std::to_string(actual.size()) + " != expected " +
           std::to_string(expected.size());
  }
  if (expected.empty() || std::memcmp(expected.data(), actual.data(), expected.size()) == 0) {
    return "";
  }
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] != actual[i]) {
      return "first difference at byte " + std::to_string(i) + ": " + std::to_string(actual[i]) +
             " != expected " + std::to_string(expected[i]);
    }
  }
  return "";
}

}  // namespace moe::comm::testing
