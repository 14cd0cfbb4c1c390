// CpuExpertCompute (runtime/device/cpu_expert_compute.h) and the part check of ExpertCompute.
#include "runtime/device/cpu_expert_compute.h"

#include <string>

namespace moe {

Status ExpertCompute::CheckPart(int part) {
  if (part < 0 || part >= kMaxParts) {
    return InvalidArgument("expert compute part " + std::to_string(part) + " must be in [0, " +
                           std::to_string(kMaxParts) + ")");
  }
  return Status::Ok();
}

experts::FfnSaved CpuExpertCompute::Saved::Rows(bool swiglu, int64_t begin, int64_t end) {
  return {RowBlock(h, begin, end), RowBlock(a, begin, end),
          swiglu ? RowBlock(u, begin, end) : MatrixView<float>()};
}

Status CpuExpertCompute::SetWeights(std::span<const experts::FfnParams> params) {
  params_ = params;
  have_weights_ = true;
  return Status::Ok();
}

Status CpuExpertCompute::Forward(int part, const std::vector<int64_t>& offsets,
                                 MatrixView<const float> x, MatrixView<float> y, bool accumulate) {
  MOE_RETURN_IF_ERROR(CheckPart(part));
  if (!have_weights_ || params_.size() + 1 < offsets.size()) {
    return FailedPrecondition("expert Forward before SetWeights of its " +
                              std::to_string(offsets.empty() ? 0 : offsets.size() - 1) +
                              " experts");
  }
  if (parts_.size() <= static_cast<size_t>(part)) parts_.resize(static_cast<size_t>(part) + 1);
  Saved& saved = parts_[static_cast<size_t>(part)];
  const int64_t rows = x.rows(), h = shape_.hidden_dim;
  saved.x = x;
  ResizeTensor(&saved.h, rows, h);
  ResizeTensor(&saved.a, rows, h);
  if (shape_.swiglu) ResizeTensor(&saved.u, rows, h);
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t b = offsets[e], end = offsets[e + 1];
    if (b == end) continue;
    experts::FfnForward(shape_, params_[e], RowBlock(x, b, end), RowBlock(y, b, end),
                        accumulate, saved.Rows(shape_.swiglu, b, end));
  }
  return Status::Ok();
}

Status CpuExpertCompute::Backward(int part, const std::vector<int64_t>& offsets,
                                  MatrixView<const float> dy, MatrixView<float> dx,
                                  std::span<experts::FfnParams> grads, bool accumulate_dx) {
  MOE_RETURN_IF_ERROR(CheckPart(part));
  if (parts_.size() <= static_cast<size_t>(part) ||
      parts_[static_cast<size_t>(part)].x.rows() != dy.rows()) {
    return FailedPrecondition("expert Backward of part " + std::to_string(part) + " with " +
                              std::to_string(dy.rows()) +
                              " rows does not follow a Forward of the same rows");
  }
  Saved& saved = parts_[static_cast<size_t>(part)];
  const int64_t rows = saved.x.rows(), h = shape_.hidden_dim;
  ResizeTensor(&scratch1_, rows, h);
  if (shape_.swiglu) ResizeTensor(&scratch2_, rows, h);
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t b = offsets[e], end = offsets[e + 1];
    if (b == end) continue;
    experts::FfnBackward(shape_, params_[e], RowBlock(saved.x, b, end),
                         saved.Rows(shape_.swiglu, b, end), RowBlock(dy, b, end),
                         RowBlock(dx, b, end), accumulate_dx, &grads[e],
                         RowBlock(scratch1_, b, end),
                         shape_.swiglu ? RowBlock(scratch2_, b, end) : MatrixView<float>());
  }
  return Status::Ok();
}

}  // namespace moe
