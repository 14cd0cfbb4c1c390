// cuBLAS, loaded on first use (dlopen) instead of linked: libcublas and libcublasLt are ~600 MB,
// and linking them made every process of every tool — CPU-only runs, each MPI rank, each test —
// pay ~0.45 s and ~210 MB to load them at start-up. Only GPU runs load them now.
#pragma once

#include <cublas_v2.h>

#include "base/status.h"

namespace moe::experts::cuda {

// The cuBLAS entry points the project calls (the _v2 names are what cublas_v2.h maps to).
// cublasGemmEx is overloaded in C++ (a cudaDataType compute-type variant): the C one is named.
using CublasGemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                          int, int, const void*, const void*, cudaDataType, int,
                                          const void*, cudaDataType, int, const void*, void*,
                                          cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  CublasGemmExFn gemm_ex = nullptr;
  decltype(&cublasGemmGroupedBatchedEx) gemm_grouped_batched_ex = nullptr;
  decltype(&cublasGetStatusName) status_name = nullptr;
  decltype(&cublasGetStatusString) status_string = nullptr;
};

// Loads libcublas.so.<major of the headers> once (thread-safe); the error names the library and
// dlerror()'s reason.
StatusOr<const CublasApi*> Cublas();

// kInternal naming `what` and the library's reason, or Ok.
Status CudaCheck(cudaError_t err, const char* what);
Status CublasCheck(const CublasApi& api, cublasStatus_t st, const char* what);

}  // namespace moe::experts::cuda
