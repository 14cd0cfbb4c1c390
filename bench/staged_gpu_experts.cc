// The staged GPU experts (bench/staged_gpu_experts.h): rows and weights up, the grouped FFN, rows
// and weight gradients down, every call.
#include "bench/staged_gpu_experts.h"

#include <array>
#include <functional>
#include <string>

#include "experts/cuda/grouped_ffn.h"
#include "base/memory.h"
#include "runtime/device/compute.h"
#include "runtime/config/config.h"
#include "runtime/device/cpu_expert_compute.h"

namespace moe {
namespace {

// One GroupedFfn per part (each keeps its part's activations for the backward), made on first use.
class StagedGpuExpertCompute : public ExpertCompute {
 public:
  using Factory = std::function<StatusOr<std::unique_ptr<experts::cuda::GroupedFfn>>()>;
  StagedGpuExpertCompute(const experts::FfnShape& shape, Factory factory)
      : shape_(shape), factory_(std::move(factory)) {}

  // Creates part 0's GroupedFfn (a GPU or cuBLAS problem is then reported when the job starts).
  Status Warm() { return Part(0).status(); }

  Status SetWeights(std::span<const experts::FfnParams> params) override {
    params_ = params;
    return Status::Ok();
  }

  Status Forward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> x,
                 MatrixView<float> y, bool accumulate) override {
    MOE_ASSIGN_OR_RETURN(experts::cuda::GroupedFfn * ffn, Part(part));
    const int64_t rows = x.rows(),
                  bytes = rows * shape_.model_dim * static_cast<int64_t>(sizeof(float));
    MOE_RETURN_IF_ERROR(ffn->SetWeights(params_));
    MOE_ASSIGN_OR_RETURN(float* x_dev, Scratch(part, kX, bytes));
    MOE_ASSIGN_OR_RETURN(float* y_dev, Scratch(part, kY, bytes));
    MOE_RETURN_IF_ERROR(ffn->Upload(x_dev, x.data(), bytes));
    MOE_RETURN_IF_ERROR(ffn->Forward(offsets, x_dev, y_dev));
    return DownloadInto(ffn, y, y_dev, accumulate);
  }

  Status Backward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                  MatrixView<float> dx, std::span<experts::FfnParams> grads,
                  bool accumulate_dx) override {
    MOE_RETURN_IF_ERROR(CheckPart(part));
    if (static_cast<size_t>(part) >= parts_.size() ||
        parts_[static_cast<size_t>(part)] == nullptr || offsets.empty() ||
        dy.rows() != offsets.back()) {
      return FailedPrecondition("GPU experts: Backward of part " + std::to_string(part) + " with " +
                                std::to_string(dy.rows()) +
                                " rows does not follow a Forward of the same rows");
    }
    experts::cuda::GroupedFfn* ffn = parts_[static_cast<size_t>(part)].get();
    const int64_t rows = dy.rows(),
                  bytes = rows * shape_.model_dim * static_cast<int64_t>(sizeof(float));
    MOE_ASSIGN_OR_RETURN(float* dy_dev, Scratch(part, kDy, bytes));
    MOE_ASSIGN_OR_RETURN(float* dx_dev, Scratch(part, kDx, bytes));
    MOE_RETURN_IF_ERROR(ffn->Upload(dy_dev, dy.data(), bytes));
    MOE_RETURN_IF_ERROR(ffn->Backward(dy_dev, dx_dev));
    MOE_RETURN_IF_ERROR(DownloadInto(ffn, dx, dx_dev, accumulate_dx));
    return ffn->AddGradients(grads);
  }

  // The gradients came down with every Backward.
  Status AddGradients(std::span<experts::FfnParams>) override { return Status::Ok(); }

 private:
  enum Slot { kX = 0, kY = 1, kDy = 2, kDx = 3 };

  // Host rows `to` = (or +=) the device rows `from`.
  Status DownloadInto(experts::cuda::GroupedFfn* ffn, MatrixView<float> to, const float* from,
                      bool accumulate) {
    const int64_t bytes = to.size() * static_cast<int64_t>(sizeof(float));
    if (!accumulate) return ffn->Download(to.data(), from, bytes);
    host_.resize(static_cast<size_t>(to.size()));
    MOE_RETURN_IF_ERROR(ffn->Download(host_.data(), from, bytes));
    for (int64_t i = 0; i < to.size(); ++i) to.data()[i] += host_[static_cast<size_t>(i)];
    return Status::Ok();
  }
  // The device copies of a part's x, y, dy and dx, each kept at its largest size.
  using Scratches = std::array<Workspace, 4>;

  StatusOr<float*> Scratch(int part, Slot slot, int64_t bytes) {
    MOE_ASSIGN_OR_RETURN(void* p, scratch_[static_cast<size_t>(part)][slot].Get(bytes));
    return static_cast<float*>(p);
  }

  StatusOr<experts::cuda::GroupedFfn*> Part(int part) {
    MOE_RETURN_IF_ERROR(CheckPart(part));
    if (parts_.size() <= static_cast<size_t>(part)) {
      parts_.resize(static_cast<size_t>(part) + 1);
      while (scratch_.size() < parts_.size()) {
        const auto dev = MemorySpace::kDevice;
        scratch_.push_back(Scratches{Workspace(dev), Workspace(dev), Workspace(dev), Workspace(dev)});
      }
    }
    std::unique_ptr<experts::cuda::GroupedFfn>& ffn = parts_[static_cast<size_t>(part)];
    if (ffn == nullptr) {
      MOE_ASSIGN_OR_RETURN(ffn, factory_());
    }
    return ffn.get();
  }

  experts::FfnShape shape_;
  Factory factory_;
  std::span<const experts::FfnParams> params_;
  std::vector<float> host_;
  std::vector<std::unique_ptr<experts::cuda::GroupedFfn>> parts_;
  std::vector<Scratches> scratch_;
};

}  // namespace

StatusOr<std::unique_ptr<ExpertCompute>> MakeStagedExpertCompute(const experts::FfnShape& shape,
                                                                 int num_experts,
                                                                 const config::ComputeConfig& compute,
                                                                 int rank) {
  MOE_RETURN_IF_ERROR(ValidateCompute(compute));
  if (compute.device() == config::CPU) {
    return std::unique_ptr<ExpertCompute>(std::make_unique<CpuExpertCompute>(shape));
  }
  MOE_ASSIGN_OR_RETURN(const int gpu, ComputeGpu(compute, rank));
  const experts::cuda::Precision precision = ComputePrecision(compute);
  StagedGpuExpertCompute::Factory factory = [shape, num_experts, precision, gpu] {
    return experts::cuda::GroupedFfn::Create(shape, num_experts, precision, gpu);
  };
  auto gpu_compute = std::make_unique<StagedGpuExpertCompute>(shape, std::move(factory));
  MOE_RETURN_IF_ERROR(gpu_compute->Warm());
  return std::unique_ptr<ExpertCompute>(std::move(gpu_compute));
}

}  // namespace moe
