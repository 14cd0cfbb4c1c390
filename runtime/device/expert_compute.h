// ExpertCompute: what runs a set of local experts on contiguous row blocks — rows
// [offsets[i], offsets[i+1]) go through expert i — and keeps what their backward needs. The layer's
// executors (runtime/exchange/expert_executor.h) hand it the rows that reached this rank's experts. The
// runtime's implementation is the CPU one (runtime/device/cpu_expert_compute.h, OpenBLAS); the device
// layer runs its experts through experts/cuda/grouped_ffn.h directly, and the staged GPU baseline
// of the layer benchmark (bench/staged_gpu_experts.h) is another implementation.
#pragma once

#include <cstdint>
#include <vector>

#include "experts/expert_ffn.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/config/limits.h"

namespace moe {

class ExpertCompute {
 public:
  // Parts: the pipelined executor runs its rows in chunks (parallel.pipeline_degree); chunk j is
  // part j. Each part keeps its own saved state from its Forward to its Backward, so the parts'
  // forwards may all run before their backwards. part is in [0, kMaxParts).
  static constexpr int kMaxParts = limits::kMaxPipelineDegree;

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

}  // namespace moe
