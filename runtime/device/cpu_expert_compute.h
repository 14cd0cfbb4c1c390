// CpuExpertCompute: the host device's experts (experts/expert_ffn.h, OpenBLAS GEMMs), one block
// of rows per expert, with each pipeline part's activations kept for its backward.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/status.h"
#include "base/tensor.h"
#include "experts/expert_ffn.h"
#include "runtime/device/expert_compute.h"

namespace moe {

class CpuExpertCompute : public ExpertCompute {
 public:
  explicit CpuExpertCompute(const experts::FfnShape& shape) : shape_(shape) {}

  Status SetWeights(std::span<const experts::FfnParams> params) override;
  Status Forward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> x,
                 MatrixView<float> y, bool accumulate = false) override;
  Status Backward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                  MatrixView<float> dx, std::span<experts::FfnParams> grads,
                  bool accumulate_dx = false) override;
  Status AddGradients(std::span<experts::FfnParams>) override { return Status::Ok(); }

 private:
  // What a part's backward needs from its forward.
  struct Saved {
    MatrixView<const float> x;
    Tensor h, a, u;
    experts::FfnSaved Rows(bool swiglu, int64_t begin, int64_t end);  // views of rows [begin, end)
  };

  experts::FfnShape shape_;
  std::span<const experts::FfnParams> params_;
  bool have_weights_ = false;
  std::vector<Saved> parts_;
  Tensor scratch1_, scratch2_;
};

}  // namespace moe
