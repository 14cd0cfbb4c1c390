// cuBLAS loaded with dlopen on first use (experts/cuda/cublas_loader.h).
#include "experts/cuda/cublas_loader.h"

#include <dlfcn.h>

#include <mutex>
#include <string>

namespace moe::experts::cuda {
namespace {

template <typename F>
bool Bind(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  return *fn != nullptr;
}

StatusOr<CublasApi> Load() {
  const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  // The loader's search path first (LD_LIBRARY_PATH, the executable's RUNPATH, which names the
  // CUDA runtime's folder), then the toolkit this was built with.
  void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
#ifdef MOE_CUDA_LIBRARY_DIR
  if (lib == nullptr)
    lib = dlopen((std::string(MOE_CUDA_LIBRARY_DIR) + "/" + soname).c_str(), RTLD_NOW | RTLD_LOCAL);
#endif
  if (lib == nullptr) {
    const char* why = dlerror();
    return FailedPrecondition(
        "cannot load " + soname + " (cuBLAS " + std::to_string(CUBLAS_VER_MAJOR) +
        ", needed for experts on a GPU): " + (why != nullptr ? why : "unknown reason"));
  }
  CublasApi api;
  const bool ok =
      Bind(lib, "cublasCreate_v2", &api.create) && Bind(lib, "cublasDestroy_v2", &api.destroy) &&
      Bind(lib, "cublasSetStream_v2", &api.set_stream) && Bind(lib, "cublasGemmEx", &api.gemm_ex) &&
      Bind(lib, "cublasGemmGroupedBatchedEx", &api.gemm_grouped_batched_ex) &&
      Bind(lib, "cublasGetStatusName", &api.status_name) &&
      Bind(lib, "cublasGetStatusString", &api.status_string);
  if (!ok) {
    return FailedPrecondition(
        soname +
        " lacks a function the project needs (cublasGemmGroupedBatchedEx needs "
        "cuBLAS 12.5 or later)");
  }
  return api;  // the library stays loaded for the life of the process
}

}  // namespace

StatusOr<const CublasApi*> Cublas() {
  static std::once_flag once;
  static StatusOr<CublasApi>* loaded = nullptr;
  std::call_once(once, [] { loaded = new StatusOr<CublasApi>(Load()); });
  if (!loaded->ok()) return loaded->status();
  return &loaded->value();
}

Status CudaCheck(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Internal(std::string("CUDA ") + what + ": " + cudaGetErrorString(err));
}

Status CublasCheck(const CublasApi& api, cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  return Internal(std::string("cuBLAS ") + what + ": " + api.status_name(st) + " (" +
                  api.status_string(st) + ")");
}

}  // namespace moe::experts::cuda
