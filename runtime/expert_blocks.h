// Runs a set of experts on contiguous row blocks: rows [offsets[i], offsets[i+1]) go through
// expert i. Keeps the activations the backward needs. Used by the local executor (all experts in
// this process) and by the expert-parallel one (the local experts, on the rows received).
#pragma once

#include <cstdint>
#include <vector>

#include "experts/expert_ffn.h"
#include "runtime/base/tensor.h"

namespace moe {

class ExpertBlocks {
 public:
  explicit ExpertBlocks(const experts::FfnShape& shape) : shape_(shape) {}

  // y (rows x M) = expert_i(x) for each block. x must stay alive until Backward.
  void Forward(const std::vector<int64_t>& offsets, MatrixView<const float> x,
               const std::vector<experts::FfnParams>& params, Tensor* y);
  // dx = d/dx of the blocks given dy; weight gradients accumulated into grads (same order).
  void Backward(const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                const std::vector<experts::FfnParams>& params,
                std::vector<experts::FfnParams>* grads, Tensor* dx);

 private:
  experts::FfnSaved Saved(int64_t begin, int64_t end);  // views of rows [begin, end)

  experts::FfnShape shape_;
  MatrixView<const float> x_;
  Tensor h_, a_, u_, scratch1_, scratch2_;
};

// Resizes t to rows x cols, keeping the allocation when the shape is unchanged (contents undefined
// then; zero after a shape change).
inline void ResizeTensor(Tensor* t, int64_t rows, int64_t cols) {
  if (t->rows() != rows || t->cols() != cols) t->Reset(rows, cols);
}

inline MatrixView<float> RowBlock(Tensor& t, int64_t begin, int64_t end) {
  return {t.data() + begin * t.cols(), end - begin, t.cols()};
}
inline MatrixView<const float> RowBlock(MatrixView<const float> t, int64_t begin, int64_t end) {
  return {t.data() + begin * t.cols(), end - begin, t.cols()};
}

}  // namespace moe
