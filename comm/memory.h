// Memory in a MemorySpace: an owning buffer and byte copies, so code written on the Communicator
// interface (algorithms, tests, benchmarks) can stage data wherever the communicator wants it.
// Device memory needs CUDA (MOE_COMM_HAVE_CUDA); without it, device requests are kUnimplemented.
#pragma once

#include <cstdint>
#include <memory>

#include "comm/communicator.h"
#include "runtime/base/status.h"

namespace moe::comm {

// Number of CUDA devices visible to this process; 0 without CUDA or without a GPU.
int CudaDeviceCount();

// Owns `bytes` bytes in `space` (host: 64-byte aligned, uninitialized; device: cudaMalloc).
class Buffer {
 public:
  static StatusOr<Buffer> Allocate(MemorySpace space, int64_t bytes);
  // A buffer of `bytes` in `space` holding a copy of host memory `host_src`.
  static StatusOr<Buffer> FromHost(MemorySpace space, const void* host_src, int64_t bytes);

  Buffer() = default;
  void* data() const { return data_.get(); }
  int64_t bytes() const { return bytes_; }
  MemorySpace space() const { return space_; }

  template <typename T>
  T* as() const {
    return static_cast<T*>(data());
  }

 private:
  struct Free {
    MemorySpace space;
    void operator()(void* p) const;
  };
  Buffer(MemorySpace space, void* data, int64_t bytes)
      : space_(space), bytes_(bytes), data_(data, Free{space}) {}

  MemorySpace space_ = MemorySpace::kHost;
  int64_t bytes_ = 0;
  std::unique_ptr<void, Free> data_{nullptr, Free{MemorySpace::kHost}};
};

// Reusable scratch memory in one space: grows to the largest request and keeps it, so repeated
// calls of the same size allocate (and fault in pages) once.
class Workspace {
 public:
  explicit Workspace(MemorySpace space = MemorySpace::kHost) : space_(space) {}
  // At least `bytes` bytes; valid until the next Get. Contents are unspecified.
  StatusOr<void*> Get(int64_t bytes);

 private:
  MemorySpace space_;
  Buffer buffer_;
};

// dst and src both in `space`. Every copy is complete when the call returns (device to device
// included), so work on any stream may use dst.
Status CopyBytes(MemorySpace space, void* dst, const void* src, int64_t bytes);
// src in `space`, dst in host memory.
Status CopyToHost(MemorySpace space, void* host_dst, const void* src, int64_t bytes);
// src in host memory, dst in `space`.
Status CopyFromHost(MemorySpace space, void* dst, const void* host_src, int64_t bytes);

}  // namespace moe::comm
