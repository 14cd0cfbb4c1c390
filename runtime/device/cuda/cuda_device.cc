// The CUDA Device (runtime/device/cuda/cuda_device.h). Host code only: the kernels are
// runtime/device/cuda/permute.cu, route.cu and experts/cuda/grouped_ffn.cu, the GEMMs cuBLAS.
//
// Row-major GEMMs go to column-major cuBLAS as their transposes: row-major C (m x n) = op(A)·op(B)
// is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, i.e. gemm(opB, opA, n, m, k, B, A, C).
#include "runtime/device/cuda/cuda_device.h"

#include <cuda_runtime.h>

#include <string>
#include <utility>
#include <vector>

#include "base/clock.h"
#include "experts/cuda/cublas_loader.h"
#include "runtime/config/config.h"
#include "runtime/device/cuda/permute.h"
#include "runtime/device/cuda/route.h"
#include "runtime/device/expert_compute.h"
#include "runtime/device/host_device.h"
#include "runtime/device/layer_routing.h"

namespace moe {
namespace {

using experts::cuda::CublasApi;
using experts::cuda::CublasCheck;
using experts::cuda::CudaCheck;
using experts::cuda::GroupedFfn;

constexpr int64_t kFloat = sizeof(float);

class CudaDevice;

// The experts on the GPU: GroupedFfn, with the accumulating forms through a scratch buffer.
class CudaExperts final : public ExpertCompute {
 public:
  CudaExperts(CudaDevice* device, std::unique_ptr<GroupedFfn> ffn, int64_t model_dim)
      : device_(device), ffn_(std::move(ffn)), m_(model_dim) {}

  Status SetWeights(std::span<const experts::FfnParams> params) override {
    return ffn_->SetWeights(params);
  }
  Status Forward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> x,
                 MatrixView<float> y, bool accumulate) override;
  Status Backward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                  MatrixView<float> dx, std::span<experts::FfnParams>,
                  bool accumulate_dx) override;
  Status AddGradients(std::span<experts::FfnParams> grads) override {
    return ffn_->AddGradients(grads);
  }

 private:
  CudaDevice* device_;
  std::unique_ptr<GroupedFfn> ffn_;
  int64_t m_;
  Workspace scratch_{MemorySpace::kDevice};
};

class CudaDevice final : public Device {
 public:
  CudaDevice(const CudaDeviceOptions& options, const CublasApi& api)
      : options_(options), api_(api), name_("cuda:" + std::to_string(options.gpu)) {}

  ~CudaDevice() override {
    (void)cudaSetDevice(options_.gpu);
    if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
    for (cudaEvent_t ev : timer_events_) (void)cudaEventDestroy(ev);
    if (handle_ != nullptr) (void)api_.destroy(handle_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  Status Init() {
    MOE_RETURN_IF_ERROR(Select());
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
    MOE_RETURN_IF_ERROR(CublasCheck(api_, api_.create(&handle_), "cublasCreate"));
    return CublasCheck(api_, api_.set_stream(handle_, stream_), "cublasSetStream");
  }

  // Makes this thread's current device the GPU (every call that allocates or launches).
  Status Select() const { return CudaCheck(cudaSetDevice(options_.gpu), "cudaSetDevice"); }
  const CudaDeviceOptions& options() const { return options_; }
  cudaStream_t cuda_stream() const { return stream_; }

  std::string_view name() const override { return name_; }
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  StreamHandle stream() const override { return stream_; }

  Status Upload(void* dst, const void* host_src, int64_t bytes) override {
    if (bytes <= 0) return Status::Ok();
    MOE_RETURN_IF_ERROR(Select());
    return CudaCheck(cudaMemcpyAsync(dst, host_src, static_cast<size_t>(bytes),
                                     cudaMemcpyHostToDevice, stream_),
                     "host-to-device copy");
  }
  Status Download(void* host_dst, const void* src, int64_t bytes) override {
    if (bytes <= 0) return Status::Ok();
    MOE_RETURN_IF_ERROR(Select());
    MOE_RETURN_IF_ERROR(CudaCheck(cudaMemcpyAsync(host_dst, src, static_cast<size_t>(bytes),
                                                  cudaMemcpyDeviceToHost, stream_),
                                  "device-to-host copy"));
    return Synchronize();
  }
  Status Copy(void* dst, const void* src, int64_t bytes) override {
    if (bytes <= 0 || dst == src) return Status::Ok();
    MOE_RETURN_IF_ERROR(Select());
    return CudaCheck(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes),
                                     cudaMemcpyDeviceToDevice, stream_),
                     "device-to-device copy");
  }
  Status Zero(void* dst, int64_t bytes) override {
    if (bytes <= 0) return Status::Ok();
    MOE_RETURN_IF_ERROR(Select());
    return CudaCheck(cudaMemsetAsync(dst, 0, static_cast<size_t>(bytes), stream_), "cudaMemset");
  }
  Status Synchronize() override {
    MOE_RETURN_IF_ERROR(Select());
    return CudaCheck(cudaStreamSynchronize(stream_), "CUDA device stream");
  }

  Status Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
              const float* b, float beta, float* c) override {
    if (m == 0 || n == 0) return Status::Ok();
    MOE_RETURN_IF_ERROR(Select());
    if (k == 0) {
      // BLAS leaves C · beta; the host's Gemm zeroes it for beta 0, and keeps it for beta 1.
      if (beta == 0.0f) return Zero(c, m * n * kFloat);
      if (beta == 1.0f) return Status::Ok();
      return InvalidArgument("Gemm: k = 0 with beta " + std::to_string(beta));
    }
    const auto lda = static_cast<int>(ta ? m : k), ldb = static_cast<int>(tb ? k : n);
    return CublasCheck(
        api_,
        api_.gemm_ex(handle_, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                     static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b,
                     CUDA_R_32F, ldb, a, CUDA_R_32F, lda, &beta, c, CUDA_R_32F, static_cast<int>(n),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "GEMM");
  }
  Status GatherRows(const RowGather& g) override {
    MOE_RETURN_IF_ERROR(Select());
    return gpu::GatherRows(g, stream_);
  }
  Status CombineRows(const RowCombine& c) override {
    MOE_RETURN_IF_ERROR(Select());
    return gpu::CombineRows(c, stream_);
  }
  Status GateGradients(const GateGradient& g) override {
    MOE_RETURN_IF_ERROR(Select());
    return gpu::GateGradients(g, stream_);
  }
  Status Cast(CastKind kind, const void* src, void* dst, int64_t count) override {
    MOE_RETURN_IF_ERROR(Select());
    return gpu::Cast(kind, src, dst, count, stream_);
  }
  Status AddInto(float* out, const float* in, int64_t n) {
    MOE_RETURN_IF_ERROR(Select());
    return gpu::AddInto(out, in, n, stream_);
  }

  StatusOr<std::unique_ptr<ExpertCompute>> MakeExperts(const experts::FfnShape& shape,
                                                       int count) override {
    MOE_RETURN_IF_ERROR(Select());
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<GroupedFfn> ffn,
                         GroupedFfn::Create(shape, count, options_.precision, options_.gpu,
                                            stream_));
    return std::unique_ptr<ExpertCompute>(
        std::make_unique<CudaExperts>(this, std::move(ffn), shape.model_dim));
  }
  StatusOr<std::unique_ptr<LayerRouting>> MakeRouting(const config::LayerConfig& layer,
                                                      bool host_plan) override;

  // Expert timing: pairs of events, resolved when the seconds are taken (at most kMaxTimers
  // pairs outstanding: the oldest are resolved first).
  Status BeginTiming() override {
    MOE_RETURN_IF_ERROR(Select());
    if (timers_used_ == kMaxTimers) MOE_RETURN_IF_ERROR(ResolveTimers());
    while (timer_events_.size() < 2 * (timers_used_ + 1)) {
      cudaEvent_t ev = nullptr;
      MOE_RETURN_IF_ERROR(CudaCheck(cudaEventCreate(&ev), "cudaEventCreate"));
      timer_events_.push_back(ev);
    }
    return CudaCheck(cudaEventRecord(timer_events_[2 * timers_used_], stream_), "cudaEventRecord");
  }
  Status EndTiming() override {
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaEventRecord(timer_events_[2 * timers_used_ + 1], stream_), "cudaEventRecord"));
    ++timers_used_;
    return Status::Ok();
  }
  StatusOr<double> TakeTimedSeconds() override {
    MOE_RETURN_IF_ERROR(ResolveTimers());
    return std::exchange(timed_, 0.0);
  }

 private:
  Status ResolveTimers() {
    MOE_RETURN_IF_ERROR(Select());
    for (size_t i = 0; i < timers_used_; ++i) {
      float ms = 0.0f;
      MOE_RETURN_IF_ERROR(
          CudaCheck(cudaEventSynchronize(timer_events_[2 * i + 1]), "cudaEventSynchronize"));
      MOE_RETURN_IF_ERROR(
          CudaCheck(cudaEventElapsedTime(&ms, timer_events_[2 * i], timer_events_[2 * i + 1]),
                    "cudaEventElapsedTime"));
      timed_ += ms / 1e3;
    }
    timers_used_ = 0;
    return Status::Ok();
  }

  static constexpr size_t kMaxTimers = 64;
  CudaDeviceOptions options_;
  const CublasApi& api_;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  std::vector<cudaEvent_t> timer_events_;
  size_t timers_used_ = 0;
  double timed_ = 0.0;
};

Status CudaExperts::Forward(int part, const std::vector<int64_t>& offsets,
                            MatrixView<const float> x, MatrixView<float> y, bool accumulate) {
  if (!accumulate) return ffn_->Forward(part, offsets, x.data(), y.data());
  MOE_ASSIGN_OR_RETURN(void* tmp, scratch_.Get(y.size() * kFloat));
  MOE_RETURN_IF_ERROR(ffn_->Forward(part, offsets, x.data(), static_cast<float*>(tmp)));
  return device_->AddInto(y.data(), static_cast<const float*>(tmp), y.size());
}

Status CudaExperts::Backward(int part, const std::vector<int64_t>&, MatrixView<const float> dy,
                             MatrixView<float> dx, std::span<experts::FfnParams>,
                             bool accumulate_dx) {
  if (!accumulate_dx) return ffn_->Backward(part, dy.data(), dx.data());
  MOE_ASSIGN_OR_RETURN(void* tmp, scratch_.Get(dx.size() * kFloat));
  MOE_RETURN_IF_ERROR(ffn_->Backward(part, dy.data(), static_cast<float*>(tmp)));
  return device_->AddInto(dx.data(), static_cast<const float*>(tmp), dx.size());
}

// The routing steps on the GPU: the router's GEMMs here, then the device router (route.h) or the
// host's routing code on the downloaded logits.
class CudaRouting final : public LayerRouting {
 public:
  CudaRouting(CudaDevice* device, const config::LayerConfig& layer,
              std::unique_ptr<gpu::DeviceRouter> router)
      : device_(device),
        cfg_(ResolvedLayerConfig(layer)),
        router_dev_(std::move(router)),
        host_(cfg_) {}

  Status Forward(const float* x, int64_t s, const float* wg, const float* wnoise,
                 const std::vector<float>& bias, const RouteContext& ctx) override {
    const int64_t m = cfg_.model_dim(), e = cfg_.num_experts(), cols = RouterColumns(cfg_);
    noisy_ = RouterIsNoisy(cfg_.router(), ctx);
    // The router's S x cols arrays (logits and their gradient; the noise's S x E after them).
    const int64_t noise = noisy_ ? s * e : 0;
    const bool soft = cfg_.router().gate() == config::SOFT;
    MOE_ASSIGN_OR_RETURN(arrays_, ws_.Carve([&](Carver& c) {
      return Arrays{c.Take<float>(s * cols), c.Take<float>(noise),
                    c.Take<float>(s * cols), c.Take<float>(noise),
                    c.Take<float>(e),        c.Take<float>(soft ? s * cols : 0),
                    c.Take<float>(soft ? s * cols : 0)};
    }));
    MOE_RETURN_IF_ERROR(device_->Gemm(false, false, s, cols, m, 1.0f, x, wg, 0.0f, arrays_.logits));
    if (noisy_) {
      MOE_RETURN_IF_ERROR(
          device_->Gemm(false, false, s, e, m, 1.0f, x, wnoise, 0.0f, arrays_.noise_in));
    }
    // Router replay (a recorded selection in place of top-k) routes on the host.
    on_device_ = router_dev_ != nullptr && ctx.replay_selected == nullptr;
    if (on_device_) {
      // The selection bias as BuildDispatchPlan takes it: empty = zero, else E values.
      if (!bias.empty() && static_cast<int64_t>(bias.size()) != e) {
        return InvalidArgument("router bias has " + std::to_string(bias.size()) +
                               " entries, must have " + std::to_string(e) + " (moe.num_experts)");
      }
      if (!bias.empty()) MOE_RETURN_IF_ERROR(device_->Upload(arrays_.bias, bias.data(), e * kFloat));
      on_device_plan_ = DispatchPlan();
      router_out_ = RouterOutput();
      router_out_.noisy = noisy_;
      MOE_RETURN_IF_ERROR(router_dev_->Forward(arrays_.logits, noisy_ ? arrays_.noise_in : nullptr,
                                               bias.empty() ? nullptr : arrays_.bias, s, ctx,
                                               &on_device_plan_, &device_losses_));
      rows_ = router_dev_->device_plan();
      return Status::Ok();
    }
    // On the host: the logits (and noise pre-activations) down, the host's code, the plan up.
    const double t0 = WallSeconds();
    logits_.resize(static_cast<size_t>(s * cols));
    MOE_RETURN_IF_ERROR(device_->Download(logits_.data(), arrays_.logits, s * cols * kFloat));
    if (noisy_) {
      noise_in_.resize(static_cast<size_t>(s * e));
      MOE_RETURN_IF_ERROR(device_->Download(noise_in_.data(), arrays_.noise_in, s * e * kFloat));
    }
    MOE_RETURN_IF_ERROR(
        host_.ForwardFromLogits(logits_.data(), noisy_ ? noise_in_.data() : nullptr, s, bias, ctx));
    MOE_ASSIGN_OR_RETURN(rows_, PlanRowsOn(*device_, host_.plan(), &plan_ws_));
    if (soft) {
      // Soft MoE's combine and dispatch weights, for the GEMMs on the device.
      const RouterOutput& r = host_.router_output();
      MOE_RETURN_IF_ERROR(device_->Upload(arrays_.combine, r.probs.data(), s * cols * kFloat));
      MOE_RETURN_IF_ERROR(device_->Upload(arrays_.dispatch, r.dispatch.data(), s * cols * kFloat));
    }
    // The staged uploads read host memory the next call rewrites: wait for them.
    MOE_RETURN_IF_ERROR(device_->Synchronize());
    host_seconds_ = WallSeconds() - t0;
    return Status::Ok();
  }

  const DispatchPlan& plan() const override { return on_device_ ? on_device_plan_ : host_.plan(); }
  const PlanRows& rows() const override { return rows_; }
  bool routes_on_device() const override { return on_device_; }
  Status Fetch() override {
    if (!on_device_) return Status::Ok();
    MOE_RETURN_IF_ERROR(device_->Select());
    return router_dev_->Fetch(&on_device_plan_, &router_out_);
  }
  const RouterOutput& router_output() const override {
    return on_device_ ? router_out_ : host_.router_output();
  }
  const RouterLosses& losses() const override {
    return on_device_ ? device_losses_ : host_.losses();
  }
  // aux_loss_scope GLOBAL never routes on the device (DeviceRouter::Supports).
  std::vector<double> BalanceCounts() const override { return host_.BalanceCounts(); }
  void SetGlobalBalanceCounts(const std::vector<double>& world_counts) override {
    host_.SetGlobalBalanceCounts(world_counts);
  }
  const float* combine_weights() const override { return arrays_.combine; }
  const float* dispatch_weights() const override { return arrays_.dispatch; }

  StatusOr<Gradients> Backward(const float* dgate, LossScale scale) override {
    const int64_t s = plan().num_tokens, e = cfg_.num_experts();
    if (on_device_) {
      MOE_RETURN_IF_ERROR(router_dev_->Backward(dgate, scale, arrays_.dlogits, arrays_.dnoise));
      host_seconds_ += router_dev_->host_seconds();
      return Gradients{arrays_.dlogits, noisy_ ? arrays_.dnoise : nullptr};
    }
    // The gates' gradients to the host, its S x E backward there, dlogits back.
    const int64_t rows = plan().num_rows();
    dgate_.resize(static_cast<size_t>(rows));
    MOE_RETURN_IF_ERROR(device_->Download(dgate_.data(), dgate, rows * kFloat));
    const double t0 = WallSeconds();
    MOE_ASSIGN_OR_RETURN(const Gradients g, host_.Backward(dgate_.data(), scale));
    host_seconds_ += WallSeconds() - t0;
    MOE_RETURN_IF_ERROR(device_->Upload(arrays_.dlogits, g.dlogits, s * e * kFloat));
    if (g.dnoise != nullptr) {
      MOE_RETURN_IF_ERROR(device_->Upload(arrays_.dnoise, g.dnoise, s * e * kFloat));
    }
    // The uploads read host scratch that the next backward reuses: wait for them.
    MOE_RETURN_IF_ERROR(device_->Synchronize());
    return Gradients{arrays_.dlogits, g.dnoise != nullptr ? arrays_.dnoise : nullptr};
  }

  StatusOr<const float*> SoftBackward(const float* dcombine, const float* ddispatch) override {
    const int64_t s = host_.router_output().probs.rows(), cols = RouterColumns(cfg_);
    soft_grads_.resize(static_cast<size_t>(2 * s * cols));
    MOE_RETURN_IF_ERROR(device_->Download(soft_grads_.data(), dcombine, s * cols * kFloat));
    MOE_RETURN_IF_ERROR(
        device_->Download(soft_grads_.data() + s * cols, ddispatch, s * cols * kFloat));
    MOE_ASSIGN_OR_RETURN(const float* dlogits,
                         host_.SoftBackward(soft_grads_.data(), soft_grads_.data() + s * cols));
    MOE_RETURN_IF_ERROR(device_->Upload(arrays_.dlogits, dlogits, s * cols * kFloat));
    MOE_RETURN_IF_ERROR(device_->Synchronize());
    return static_cast<const float*>(arrays_.dlogits);
  }

  double host_seconds() const override { return host_seconds_; }

 private:
  CudaDevice* device_;
  config::LayerConfig cfg_;
  std::unique_ptr<gpu::DeviceRouter> router_dev_;
  HostRouting host_;
  Workspace ws_{MemorySpace::kDevice}, plan_ws_{MemorySpace::kDevice};
  // Device memory of one call: logits and noise pre-activations, their gradients, the selection
  // bias, Soft MoE's combine and dispatch weights.
  struct Arrays {
    float *logits = nullptr, *noise_in = nullptr, *dlogits = nullptr, *dnoise = nullptr,
          *bias = nullptr, *combine = nullptr, *dispatch = nullptr;
  } arrays_;
  bool noisy_ = false;
  bool on_device_ = false;  // the last Forward routed on the device
  PlanRows rows_;
  // Routed on the device: the plan's counts (until Fetch), the router output after Fetch, the
  // losses.
  DispatchPlan on_device_plan_;
  RouterOutput router_out_;
  RouterLosses device_losses_;
  // Host scratch.
  std::vector<float> logits_, noise_in_, dgate_, soft_grads_;
  double host_seconds_ = 0.0;
};

StatusOr<std::unique_ptr<LayerRouting>> CudaDevice::MakeRouting(const config::LayerConfig& layer,
                                                                bool host_plan) {
  MOE_RETURN_IF_ERROR(Select());
  const config::LayerConfig cfg = ResolvedLayerConfig(layer);
  std::unique_ptr<gpu::DeviceRouter> router;
  if (options_.route_on_device && !host_plan && gpu::DeviceRouter::Supports(cfg.router(), nullptr)) {
    MOE_ASSIGN_OR_RETURN(router, gpu::DeviceRouter::Create(cfg.router(), cfg.num_experts(), stream_));
  }
  return std::unique_ptr<LayerRouting>(std::make_unique<CudaRouting>(this, cfg, std::move(router)));
}

}  // namespace

StatusOr<std::shared_ptr<Device>> MakeCudaDevice(const CudaDeviceOptions& options) {
  const int count = CudaDeviceCount();
  if (count == 0) {
    return FailedPrecondition("compute.device=CUDA: no CUDA device is visible to this process");
  }
  if (options.gpu < 0 || options.gpu >= count) {
    return InvalidArgument("compute.gpu=" + std::to_string(options.gpu) + " not in [0, " +
                           std::to_string(count) + ")");
  }
  MOE_ASSIGN_OR_RETURN(const CublasApi* api, experts::cuda::Cublas());
  auto device = std::make_shared<CudaDevice>(options, *api);
  MOE_RETURN_IF_ERROR(device->Init());
  return std::shared_ptr<Device>(std::move(device));
}

}  // namespace moe
