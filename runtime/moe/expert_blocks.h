// Runs a set of experts on contiguous row blocks: rows [offsets[i], offsets[i+1]) go through
// expert i, and keeps what the backward needs. Used by the local executor (all experts in this
// process) and by the expert-parallel one (the local experts, on the rows received).
// ExpertBlocks runs them on the CPU (OpenBLAS); MakeExpertCompute picks the device.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "experts/cuda/grouped_ffn.h"
#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "runtime/base/status.h"
#include "runtime/base/tensor.h"

namespace moe {

class ExpertCompute {
 public:
  // Parts: the pipelined executor runs its rows in chunks (parallel.pipeline_degree); chunk j is
  // part j. Each part keeps its own saved state from its Forward to its Backward, so the parts'
  // forwards may all run before their backwards. part is in [0, kMaxParts).
  static constexpr int kMaxParts = 16;

  virtual ~ExpertCompute() = default;
  // y (rows x M, host) = expert_i(x) for each block. x must stay alive until Backward(part).
  virtual Status Forward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> x,
                         const std::vector<experts::FfnParams>& params, Tensor* y) = 0;
  // dx = d/dx of the blocks given dy (the rows of the part's last Forward); weight gradients
  // accumulated into grads (same order as params).
  virtual Status Backward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                          const std::vector<experts::FfnParams>& params,
                          std::vector<experts::FfnParams>* grads, Tensor* dx) = 0;

  // All rows as one part.
  Status Forward(const std::vector<int64_t>& offsets, MatrixView<const float> x,
                 const std::vector<experts::FfnParams>& params, Tensor* y) {
    return Forward(0, offsets, x, params, y);
  }
  Status Backward(const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                  const std::vector<experts::FfnParams>& params,
                  std::vector<experts::FfnParams>* grads, Tensor* dx) {
    return Backward(0, offsets, dy, params, grads, dx);
  }

 protected:
  // kInvalidArgument unless 0 <= part < kMaxParts.
  static Status CheckPart(int part);
};

// The experts of `num_experts` local experts on compute.device: ExpertBlocks for CPU, the grouped
// GPU FFN (experts/cuda/grouped_ffn.h) for CUDA on device compute.gpu (-1: rank mod devices).
// Fails with a clear message when CUDA is asked for and not built or no GPU is visible.
StatusOr<std::unique_ptr<ExpertCompute>> MakeExpertCompute(const experts::FfnShape& shape,
                                                           int num_experts,
                                                           const config::ComputeConfig& compute,
                                                           int rank);

// The CUDA device of `rank` under compute.gpu (-1: rank mod the visible devices); a clear error
// when no GPU is visible (or the build has no CUDA) or compute.gpu is not a visible device.
StatusOr<int> ComputeGpu(const config::ComputeConfig& compute, int rank);
// compute.expert_precision as the GPU experts' storage precision.
experts::cuda::Precision ComputePrecision(const config::ComputeConfig& compute);

class ExpertBlocks : public ExpertCompute {
 public:
  explicit ExpertBlocks(const experts::FfnShape& shape) : shape_(shape) {}

  using ExpertCompute::Backward;
  using ExpertCompute::Forward;
  Status Forward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> x,
                 const std::vector<experts::FfnParams>& params, Tensor* y) override;
  Status Backward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                  const std::vector<experts::FfnParams>& params,
                  std::vector<experts::FfnParams>* grads, Tensor* dx) override;

 private:
  // What a part's backward needs from its forward.
  struct Saved {
    MatrixView<const float> x;
    Tensor h, a, u;
    experts::FfnSaved Rows(bool swiglu, int64_t begin, int64_t end);  // views of rows [begin, end)
  };

  experts::FfnShape shape_;
  std::vector<Saved> parts_;
  Tensor scratch1_, scratch2_;
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
