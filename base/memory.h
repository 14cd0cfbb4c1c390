// Memory in a memory space (host, or the current CUDA device): the one way this project owns
// memory that code may have to place on a GPU — an owning Buffer, a Workspace that keeps the
// largest allocation asked of it and carves it into typed slices (sizes computed first, one
// allocation, TensorRT-LLM's habit), and byte copies between the spaces.
// Device memory needs a CUDA build (MOE_BASE_HAVE_CUDA); without it device requests are
// kUnimplemented. Depends on nothing else in the project.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "base/status.h"

namespace moe {

enum class MemorySpace { kHost, kDevice };

// "host", "device".
const char* MemorySpaceName(MemorySpace space);

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
  // Gives up ownership: the caller frees the memory (Free{space()}).
  void* Release() {
    bytes_ = 0;
    return data_.release();
  }

  // Frees memory of `space` that Allocate made.
  struct Free {
    MemorySpace space;
    void operator()(void* p) const;
  };

 private:
  Buffer(MemorySpace space, void* data, int64_t bytes)
      : space_(space), bytes_(bytes), data_(data, Free{space}) {}

  MemorySpace space_ = MemorySpace::kHost;
  int64_t bytes_ = 0;
  std::unique_ptr<void, Free> data_{nullptr, Free{MemorySpace::kHost}};
};

// Lays typed arrays out in one allocation, each kAlign-aligned (at least one element, so every
// array has its own address). A layout function is run twice with it: first on a sizing carver
// (base null: every Take returns null and only used() counts), then on the allocation.
class Carver {
 public:
  static constexpr int64_t kAlign = 256;
  explicit Carver(char* base) : base_(base) {}

  template <typename T>
  T* Take(int64_t count) {
    T* p = base_ == nullptr ? nullptr : reinterpret_cast<T*>(base_ + used_);
    used_ += (std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(T)) + kAlign - 1) /
             kAlign * kAlign;
    return p;
  }
  int64_t used() const { return used_; }

 private:
  char* base_;
  int64_t used_ = 0;
};

// Where a Workspace's memory comes from: a memory space's own allocator (DefaultResource), or a
// device's (the CUDA device selects its GPU first; the checked host device poisons and tracks its
// allocations, runtime/device/checked_device.h).
class MemoryResource {
 public:
  virtual ~MemoryResource() = default;
  virtual MemorySpace space() const = 0;
  // bytes > 0; the memory is uninitialized.
  virtual StatusOr<void*> Allocate(int64_t bytes) = 0;
  // p from Allocate with the same bytes.
  virtual void Free(void* p, int64_t bytes) = 0;
};
// The allocator of `space` that Buffer uses (host: 64-byte aligned; device: cudaMalloc on the
// current device). Lives for the whole process.
MemoryResource* DefaultResource(MemorySpace space);

// Reusable memory from one resource: grows to the largest request and keeps it, so calls of the
// same size allocate (and fault in pages) once. Growing releases the old allocation first (peak
// memory is the new size, not old + new), so every pointer taken from an earlier Get or Carve is
// invalid after a call that grows it; contents are unspecified after any call.
class Workspace {
 public:
  explicit Workspace(MemorySpace space = MemorySpace::kHost) : resource_(DefaultResource(space)) {}
  explicit Workspace(MemoryResource* resource) : resource_(resource) {}
  Workspace(Workspace&& other) noexcept;
  Workspace& operator=(Workspace&& other) noexcept;
  ~Workspace() { Release(); }
  // At least `bytes` bytes.
  StatusOr<void*> Get(int64_t bytes);
  // Runs layout(Carver&) to size the arrays, grows to that size, runs it again on the allocation
  // and returns its result (a struct of the typed pointers):
  //   struct Arrays { float* x; int32_t* idx; };
  //   auto arrays = ws.Carve([&](Carver& c) { return Arrays{c.Take<float>(n), c.Take<int32_t>(k)}; });
  template <typename Layout>
  StatusOr<std::invoke_result_t<Layout&, Carver&>> Carve(Layout&& layout) {
    Carver sizing(nullptr);
    layout(sizing);
    MOE_ASSIGN_OR_RETURN(void* base, Get(sizing.used()));
    Carver real(static_cast<char*>(base));
    return layout(real);
  }
  int64_t bytes() const { return bytes_; }
  // The current allocation (null before the first Get), as the last Get returned it.
  void* data() const { return data_; }
  MemorySpace space() const { return resource_->space(); }
  MemoryResource* resource() const { return resource_; }

 private:
  void Release();

  MemoryResource* resource_;
  void* data_ = nullptr;
  int64_t bytes_ = 0;
};

// dst and src both in `space`. Every copy is complete when the call returns (device to device
// included), so work on any stream may use dst.
Status CopyBytes(MemorySpace space, void* dst, const void* src, int64_t bytes);
// src in `space`, dst in host memory.
Status CopyToHost(MemorySpace space, void* host_dst, const void* src, int64_t bytes);
// src in host memory, dst in `space`.
Status CopyFromHost(MemorySpace space, void* dst, const void* host_src, int64_t bytes);

// A CUDA stream (cudaStream_t) as an opaque handle, so interfaces that take one (the stream-ordered
// communicator calls, comm/communicator.h) name no CUDA type.
using StreamHandle = void*;

// An owned non-blocking CUDA stream on the current device.
class Stream {
 public:
  static StatusOr<Stream> Create();
  StreamHandle handle() const { return stream_.get(); }
  // Host waits for the work queued so far.
  Status Synchronize() const;

 private:
  struct Destroy {
    void operator()(void* s) const;
  };
  std::unique_ptr<void, Destroy> stream_;
};

// The host waits for the work queued so far on `stream` (a no-op for nullptr in a host-only build).
Status SynchronizeStream(StreamHandle stream);
// dst and src both in device memory: a copy queued on `stream` (not complete on return).
Status CopyBytesAsync(void* dst, const void* src, int64_t bytes, StreamHandle stream);

}  // namespace moe
