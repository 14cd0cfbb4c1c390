// Thin row-major wrappers over OpenBLAS cblas_sgemm, plus thread control.
#pragma once

#include <cstdint>

namespace moe::blas {

// C (m x n) = alpha * op(A) * op(B) + beta * C, all row-major; op transposes when trans_* is true.
// A is m x k (k x m when trans_a), B is k x n (n x k when trans_b).
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          const float* b, float beta, float* c);

// Sets the number of OpenBLAS threads; returns the previous setting.
int SetThreads(int n);
int GetThreads();
// "OPENBLAS_CORETYPE=<core>, threads=<n>" for reports.
const char* CoreName();

}  // namespace moe::blas
