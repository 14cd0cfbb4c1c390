// Runs a set of experts on contiguous row blocks: rows [offsets[i], offsets[i+1]) go through
// expert i, and keeps what the backward needs. Used by the local executor (all experts in this
// process) and by the expert-parallel one (the local experts, on the rows received).
// ExpertBlocks runs them on the CPU (OpenBLAS); MakeExpertCompute picks the device.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "runtime/base/status.h"
#include "runtime/base/tensor.h"

namespace moe {

class ExpertCompute {
 public:
  virtual ~ExpertCompute() = default;
  // y (rows x M, host) = expert_i(x) for each block. x must stay alive until Backward.
  virtual Status Forward(const std::vector<int64_t>& offsets, MatrixView<const float> x,
                         const std::vector<experts::FfnParams>& params, Tensor* y) = 0;
  // dx = d/dx of the blocks given dy (the last Forward's rows); weight gradients accumulated into
  // grads (same order as params).
  virtual Status Backward(const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                          const std::vector<experts::FfnParams>& params,
                          std::vector<experts::FfnParams>* grads, Tensor* dx) = 0;
};

// The experts of `num_experts` local experts on compute.device: ExpertBlocks for CPU, the grouped
// GPU FFN (experts/cuda/grouped_ffn.h) for CUDA on device compute.gpu (-1: rank mod devices).
// Fails with a clear message when CUDA is asked for and not built or no GPU is visible.
StatusOr<std::unique_ptr<ExpertCompute>> MakeExpertCompute(const experts::FfnShape& shape,
                                                           int num_experts,
                                                           const config::ComputeConfig& compute,
                                                           int rank);

class ExpertBlocks : public ExpertCompute {
 public:
  explicit ExpertBlocks(const experts::FfnShape& shape) : shape_(shape) {}

  Status Forward(const std::vector<int64_t>& offsets, MatrixView<const float> x,
                 const std::vector<experts::FfnParams>& params, Tensor* y) override;
  Status Backward(const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                  const std::vector<experts::FfnParams>& params,
                  std::vector<experts::FfnParams>* grads, Tensor* dx) override;

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
