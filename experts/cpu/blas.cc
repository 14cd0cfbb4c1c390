// Row-major GEMMs on OpenBLAS (experts/cpu/blas.h).
#include "experts/cpu/blas.h"

#include <cblas.h>

namespace moe::blas {

void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          const float* b, float beta, float* c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // BLAS leaves C * beta; make that explicit so the empty-k case is well defined.
    for (int64_t i = 0; i < m * n; ++i) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
    return;
  }
  const int lda = static_cast<int>(trans_a ? m : k);
  const int ldb = static_cast<int>(trans_b ? k : n);
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a, lda, b, ldb,
              beta, c, static_cast<int>(n));
}

int SetThreads(int n) {
  const int prev = openblas_get_num_threads();
  openblas_set_num_threads(n);
  return prev;
}

int GetThreads() { return openblas_get_num_threads(); }

const char* CoreName() { return openblas_get_corename(); }

}  // namespace moe::blas
