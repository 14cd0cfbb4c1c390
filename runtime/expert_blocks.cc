#include "runtime/expert_blocks.h"

namespace moe {

experts::FfnSaved ExpertBlocks::Saved(int64_t begin, int64_t end) {
  return {RowBlock(h_, begin, end), RowBlock(a_, begin, end),
          shape_.swiglu ? RowBlock(u_, begin, end) : MatrixView<float>()};
}

Status ExpertBlocks::Forward(const std::vector<int64_t>& offsets, MatrixView<const float> x,
                             const std::vector<experts::FfnParams>& params, Tensor* y) {
  const int64_t rows = x.rows(), h = shape_.hidden_dim;
  x_ = x;
  ResizeTensor(y, rows, shape_.model_dim);
  ResizeTensor(&h_, rows, h);
  ResizeTensor(&a_, rows, h);
  if (shape_.swiglu) ResizeTensor(&u_, rows, h);
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t b = offsets[e], end = offsets[e + 1];
    if (b == end) continue;
    experts::FfnForward(shape_, params[e], RowBlock(x, b, end), RowBlock(*y, b, end), false, Saved(b, end));
  }
  return Status::Ok();
}

Status ExpertBlocks::Backward(const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                              const std::vector<experts::FfnParams>& params,
                              std::vector<experts::FfnParams>* grads, Tensor* dx) {
  const int64_t rows = x_.rows(), h = shape_.hidden_dim;
  ResizeTensor(dx, rows, shape_.model_dim);
  ResizeTensor(&scratch1_, rows, h);
  if (shape_.swiglu) ResizeTensor(&scratch2_, rows, h);
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t b = offsets[e], end = offsets[e + 1];
    if (b == end) continue;
    experts::FfnBackward(shape_, params[e], RowBlock(x_, b, end), Saved(b, end), RowBlock(dy, b, end),
                         RowBlock(*dx, b, end), false, &(*grads)[e], RowBlock(scratch1_, b, end),
                         shape_.swiglu ? RowBlock(scratch2_, b, end) : MatrixView<float>());
  }
  return Status::Ok();
}

}  // namespace moe
