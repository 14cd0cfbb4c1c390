// ExpertCompute on a GPU: the rows and the experts' weights travel to the device each call, the
// grouped FFN (experts/cuda/grouped_ffn.h) runs them, outputs and weight gradients come back.
// The host keeps the fp32 master weights and the optimizer, so the rest of the runtime (router,
// plan, exchanges, optimizer, checkpoints) is the same for both devices.
#include <string>

#include "comm/memory.h"
#include "experts/cuda/grouped_ffn.h"
#include "runtime/config.h"
#include "runtime/expert_blocks.h"

namespace moe {
namespace {

class GpuExpertCompute : public ExpertCompute {
 public:
  GpuExpertCompute(const experts::FfnShape& shape, std::unique_ptr<experts::cuda::GroupedFfn> ffn)
      : shape_(shape), ffn_(std::move(ffn)) {}

  Status Forward(const std::vector<int64_t>& offsets, MatrixView<const float> x,
                 const std::vector<experts::FfnParams>& params, Tensor* y) override {
    const int64_t rows = x.rows(),
                  bytes = rows * shape_.model_dim * static_cast<int64_t>(sizeof(float));
    ResizeTensor(y, rows, shape_.model_dim);
    MOE_RETURN_IF_ERROR(ffn_->SetWeights(params));
    MOE_ASSIGN_OR_RETURN(float* x_dev, ffn_->DeviceScratch(kX, bytes));
    MOE_ASSIGN_OR_RETURN(float* y_dev, ffn_->DeviceScratch(kY, bytes));
    MOE_RETURN_IF_ERROR(ffn_->Upload(x_dev, x.data(), bytes));
    MOE_RETURN_IF_ERROR(ffn_->Forward(offsets, x_dev, y_dev));
    return ffn_->Download(y->data(), y_dev, bytes);
  }

  Status Backward(const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                  const std::vector<experts::FfnParams>&, std::vector<experts::FfnParams>* grads,
                  Tensor* dx) override {
    if (offsets.empty() || dy.rows() != offsets.back()) {
      return FailedPrecondition("GPU experts: Backward with " + std::to_string(dy.rows()) +
                                " rows does not follow a Forward of the same rows");
    }
    const int64_t rows = dy.rows(),
                  bytes = rows * shape_.model_dim * static_cast<int64_t>(sizeof(float));
    ResizeTensor(dx, rows, shape_.model_dim);
    MOE_ASSIGN_OR_RETURN(float* dy_dev, ffn_->DeviceScratch(kDy, bytes));
    MOE_ASSIGN_OR_RETURN(float* dx_dev, ffn_->DeviceScratch(kDx, bytes));
    MOE_RETURN_IF_ERROR(ffn_->Upload(dy_dev, dy.data(), bytes));
    MOE_RETURN_IF_ERROR(ffn_->Backward(dy_dev, dx_dev));
    MOE_RETURN_IF_ERROR(ffn_->Download(dx->data(), dx_dev, bytes));
    return ffn_->AddGradients(grads);
  }

 private:
  enum Slot { kX = 0, kY = 1, kDy = 2, kDx = 3 };
  experts::FfnShape shape_;
  std::unique_ptr<experts::cuda::GroupedFfn> ffn_;
};

}  // namespace

StatusOr<std::unique_ptr<ExpertCompute>> MakeExpertCompute(const experts::FfnShape& shape,
                                                           int num_experts,
                                                           const config::ComputeConfig& compute,
                                                           int rank) {
  MOE_RETURN_IF_ERROR(ValidateCompute(compute));
  if (compute.device() == config::CPU) {
    return std::unique_ptr<ExpertCompute>(std::make_unique<ExpertBlocks>(shape));
  }
  const int devices = comm::CudaDeviceCount();
  if (devices == 0) {
    return FailedPrecondition(
        "compute.device=CUDA: no CUDA device is visible to this process (or this build has no "
        "CUDA)");
  }
  const int gpu = compute.gpu() >= 0 ? compute.gpu() : rank % devices;
  if (gpu >= devices) {
    return InvalidArgument("compute.gpu=" + std::to_string(gpu) + " must be < the " +
                           std::to_string(devices) + " visible CUDA device(s)");
  }
  const auto precision = compute.expert_precision() == config::BF16
                             ? experts::cuda::Precision::kBfloat16
                             : experts::cuda::Precision::kFloat32;
  MOE_ASSIGN_OR_RETURN(auto ffn,
                       experts::cuda::GroupedFfn::Create(shape, num_experts, precision, gpu));
  return std::unique_ptr<ExpertCompute>(std::make_unique<GpuExpertCompute>(shape, std::move(ffn)));
}

}  // namespace moe
