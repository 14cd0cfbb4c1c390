// Buffer, Workspace and the copies of base/memory.h (cudaMalloc/cudaMemcpy in a CUDA build).
#include "base/memory.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#if MOE_BASE_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace moe {
namespace {

#if MOE_BASE_HAVE_CUDA
Status CudaCopy(void* dst, const void* src, int64_t bytes, cudaMemcpyKind kind) {
  cudaError_t err = cudaMemcpy(dst, src, static_cast<size_t>(bytes), kind);
  // A device-to-device cudaMemcpy, and one from pageable host memory (once the source is staged),
  // may return before the copy is done: wait for it (on the default stream, where it runs), so the
  // copy is complete for work on any stream once this returns. Device-to-host copies are complete
  // on return.
  if (err == cudaSuccess && kind != cudaMemcpyDeviceToHost) err = cudaStreamSynchronize(nullptr);
  if (err != cudaSuccess) {
    return Internal(std::string("cudaMemcpy of ") + std::to_string(bytes) +
                    " bytes failed: " + cudaGetErrorString(err));
  }
  return Status::Ok();
}
#else
Status NoCuda(const char* what) {
  return Unimplemented(std::string(what) + ": device memory needs a CUDA build (MOE_HAVE_CUDA)");
}
#endif

}  // namespace

const char* MemorySpaceName(MemorySpace space) {
  return space == MemorySpace::kHost ? "host" : "device";
}

int CudaDeviceCount() {
#if MOE_BASE_HAVE_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

void Buffer::Free::operator()(void* p) const {
  if (p == nullptr) return;
  if (space == MemorySpace::kHost) {
    std::free(p);
    return;
  }
#if MOE_BASE_HAVE_CUDA
  (void)cudaFree(p);
#endif
}

StatusOr<Buffer> Buffer::Allocate(MemorySpace space, int64_t bytes) {
  if (bytes < 0) return InvalidArgument("Buffer: bytes=" + std::to_string(bytes) + " must be >= 0");
  if (bytes == 0) return Buffer(space, nullptr, 0);
  if (space == MemorySpace::kHost) {
    constexpr int64_t kAlign = 64;
    const int64_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, static_cast<size_t>(rounded));
    if (p == nullptr) return Internal("Buffer: out of host memory for " + std::to_string(bytes));
    return Buffer(space, p, bytes);
  }
#if MOE_BASE_HAVE_CUDA
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, static_cast<size_t>(bytes));
  if (err != cudaSuccess) {
    return Internal("Buffer: cudaMalloc of " + std::to_string(bytes) +
                    " bytes failed: " + cudaGetErrorString(err));
  }
  return Buffer(space, p, bytes);
#else
  return NoCuda("Buffer::Allocate");
#endif
}

StatusOr<Buffer> Buffer::FromHost(MemorySpace space, const void* host_src, int64_t bytes) {
  MOE_ASSIGN_OR_RETURN(Buffer b, Allocate(space, bytes));
  MOE_RETURN_IF_ERROR(CopyFromHost(space, b.data(), host_src, bytes));
  return b;
}

namespace {

// Buffer's allocator as a resource.
class SpaceResource final : public MemoryResource {
 public:
  explicit SpaceResource(MemorySpace space) : space_(space) {}
  MemorySpace space() const override { return space_; }
  StatusOr<void*> Allocate(int64_t bytes) override {
    MOE_ASSIGN_OR_RETURN(Buffer b, Buffer::Allocate(space_, bytes));
    return b.Release();
  }
  void Free(void* p, int64_t) override { Buffer::Free{space_}(p); }

 private:
  MemorySpace space_;
};

}  // namespace

MemoryResource* DefaultResource(MemorySpace space) {
  static SpaceResource host(MemorySpace::kHost), device(MemorySpace::kDevice);
  return space == MemorySpace::kHost ? &host : &device;
}

Workspace::Workspace(Workspace&& other) noexcept
    : resource_(other.resource_), data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)) {}

Workspace& Workspace::operator=(Workspace&& other) noexcept {
  if (this != &other) {
    Release();
    resource_ = other.resource_;
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void Workspace::Release() {
  if (data_ != nullptr) resource_->Free(data_, bytes_);
  data_ = nullptr;
  bytes_ = 0;
}

StatusOr<void*> Workspace::Get(int64_t bytes) {
  if (bytes > bytes_) {
    Release();  // first: peak memory is the new size, not old + new
    MOE_ASSIGN_OR_RETURN(data_, resource_->Allocate(bytes));
    bytes_ = bytes;
  }
  return data_;
}

Status CopyBytes(MemorySpace space, void* dst, const void* src, int64_t bytes) {
  if (bytes <= 0) return Status::Ok();
  if (space == MemorySpace::kHost) {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
#if MOE_BASE_HAVE_CUDA
  return CudaCopy(dst, src, bytes, cudaMemcpyDeviceToDevice);
#else
  return NoCuda("CopyBytes");
#endif
}

Status CopyToHost(MemorySpace space, void* host_dst, const void* src, int64_t bytes) {
  if (bytes <= 0) return Status::Ok();
  if (space == MemorySpace::kHost) {
    std::memcpy(host_dst, src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
#if MOE_BASE_HAVE_CUDA
  return CudaCopy(host_dst, src, bytes, cudaMemcpyDeviceToHost);
#else
  return NoCuda("CopyToHost");
#endif
}

Status CopyFromHost(MemorySpace space, void* dst, const void* host_src, int64_t bytes) {
  if (bytes <= 0) return Status::Ok();
  if (space == MemorySpace::kHost) {
    std::memcpy(dst, host_src, static_cast<size_t>(bytes));
    return Status::Ok();
  }
#if MOE_BASE_HAVE_CUDA
  return CudaCopy(dst, host_src, bytes, cudaMemcpyHostToDevice);
#else
  return NoCuda("CopyFromHost");
#endif
}

StatusOr<Stream> Stream::Create() {
#if MOE_BASE_HAVE_CUDA
  cudaStream_t stream = nullptr;
  const cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (err != cudaSuccess) {
    return Internal(std::string("cudaStreamCreateWithFlags failed: ") + cudaGetErrorString(err));
  }
  Stream out;
  out.stream_.reset(stream);
  return out;
#else
  return NoCuda("Stream::Create");
#endif
}

void Stream::Destroy::operator()(void* s) const {
#if MOE_BASE_HAVE_CUDA
  if (s != nullptr) (void)cudaStreamDestroy(static_cast<cudaStream_t>(s));
#else
  (void)s;
#endif
}

Status Stream::Synchronize() const { return SynchronizeStream(handle()); }

Status SynchronizeStream(StreamHandle stream) {
#if MOE_BASE_HAVE_CUDA
  const cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    return Internal(std::string("cudaStreamSynchronize failed: ") + cudaGetErrorString(err));
  }
  return Status::Ok();
#else
  if (stream == nullptr) return Status::Ok();
  return NoCuda("SynchronizeStream");
#endif
}

Status CopyBytesAsync(void* dst, const void* src, int64_t bytes, StreamHandle stream) {
  if (bytes <= 0) return Status::Ok();
#if MOE_BASE_HAVE_CUDA
  const cudaError_t err = cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes),
                                          cudaMemcpyDeviceToDevice,
                                          static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    return Internal(std::string("cudaMemcpyAsync of ") + std::to_string(bytes) +
                    " bytes failed: " + cudaGetErrorString(err));
  }
  return Status::Ok();
#else
  (void)dst;
  (void)src;
  (void)stream;
  return NoCuda("CopyBytesAsync");
#endif
}

}  // namespace moe
