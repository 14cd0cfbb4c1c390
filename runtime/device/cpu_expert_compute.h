// CpuExpertCompute: the local experts on the CPU (experts/expert_ffn.h, OpenBLAS GEMMs), one block
// of rows per expert, with each pipeline part's activations kept for its backward.
#pragma once

#include <cstdint>
#include <vector>

#include "experts/expert_ffn.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/device/expert_compute.h"

namespace moe {

class CpuExpertCompute : public ExpertCompute {
 public:
  explicit CpuExpertCompute(const experts::FfnShape& shape) : shape_(shape) {}

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

}  // namespace moe
