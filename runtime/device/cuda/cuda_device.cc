// The CUDA Device (runtime/device/cuda/cuda_device.h). Host code only: the kernels are
// runtime/device/cuda/permute.cu, route.cu and experts/cuda/grouped_ffn.cu, the GEMMs cuBLAS.
//
// Row-major GEMMs go to column-major cuBLAS as their transposes: row-major C (m x n) = op(A)·op(B)
// is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, i.e. gemm(opB, opA, n, m, k, B, A, C).
#include "runtime/device/cuda/cuda_device.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "base/clock.h"
#include "experts/cuda/cublas_loader.h"
#include "runtime/config/config.h"
#include "runtime/config/limits.h"
#include "runtime/device/cuda/permute.h"
#include "runtime/device/cuda/route.h"
#include "runtime/device/expert_compute.h"
#include "runtime/device/host_device.h"
#include "runtime/device/layer_routing.h"
#include "runtime/device/staged_routing.h"

namespace moe {
namespace {

using experts::cuda::CublasApi;
using experts::cuda::CublasCheck;
using experts::cuda::CudaCheck;
using experts::cuda::GroupedFfn;

constexpr int64_t kFloat = sizeof(float);

class CudaDevice;

// Device memory of one GPU: selects it before every allocation and free.
static_assert(limits::kBf16DimMultiple == GroupedFfn::kBf16Multiple,
              "config validation and the grouped FFN agree on bf16 dimensions");

class GpuMemory final : public MemoryResource {
 public:
  explicit GpuMemory(int gpu) : gpu_(gpu) {}
  // Stream-ordered from here on (cudaMallocAsync / cudaFreeAsync on `stream`); null: cudaMalloc
  // and cudaFree (a GPU without memory pools, and while the device is destroyed).
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  MemorySpace space() const override { return MemorySpace::kDevice; }
  StatusOr<void*> Allocate(int64_t bytes) override {
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(gpu_), "cudaSetDevice"));
    if (stream_ == nullptr) return DefaultResource(MemorySpace::kDevice)->Allocate(bytes);
    void* p = nullptr;
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaMallocAsync(&p, static_cast<size_t>(bytes), stream_), "cudaMallocAsync")
            .WithContext(std::to_string(bytes) + " bytes"));
    return p;
  }
  void Free(void* p, int64_t bytes) override {
    (void)cudaSetDevice(gpu_);
    if (stream_ == nullptr) {
      DefaultResource(MemorySpace::kDevice)->Free(p, bytes);
    } else {
      (void)cudaFreeAsync(p, stream_);
    }
  }

 private:
  int gpu_;
  cudaStream_t stream_ = nullptr;
};

// The experts on the GPU: GroupedFfn, with the accumulating forms through a scratch buffer.
class CudaExperts final : public ExpertCompute {
 public:
  CudaExperts(CudaDevice* device, std::unique_ptr<GroupedFfn> ffn, int64_t model_dim,
              MemoryResource* memory)
      : device_(device), ffn_(std::move(ffn)), m_(model_dim), scratch_(memory) {}

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
  Status Reserve(int part, int64_t rows) override {
    MOE_RETURN_IF_ERROR(ffn_->Reserve(part, rows));
    return scratch_.Get(rows * m_ * kFloat).status();
  }

 private:
  CudaDevice* device_;
  std::unique_ptr<GroupedFfn> ffn_;
  int64_t m_;
  Workspace scratch_;
};

class CudaDevice final : public Device {
 public:
  CudaDevice(const CudaDeviceOptions& options, const CublasApi& api)
      : options_(options),
        api_(api),
        name_("cuda:" + std::to_string(options.gpu)),
        memory_(options.gpu) {}

  ~CudaDevice() override {
    (void)cudaSetDevice(options_.gpu);
    if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
    memory_.set_stream(nullptr);
    for (cudaEvent_t ev : timer_events_) (void)cudaEventDestroy(ev);
    if (handle_ != nullptr) (void)api_.destroy(handle_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  Status Init() {
    MOE_RETURN_IF_ERROR(Select());
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
    MOE_RETURN_IF_ERROR(CublasCheck(api_, api_.create(&handle_), "cublasCreate"));
    int pools = 0;
    MOE_RETURN_IF_ERROR(CudaCheck(
        cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, options_.gpu),
        "cudaDeviceGetAttribute (memory pools)"));
    if (pools != 0) memory_.set_stream(stream_);
    return CublasCheck(api_, api_.set_stream(handle_, stream_), "cublasSetStream");
  }

  // Makes this thread's current device the GPU (every call that allocates or launches).
  Status Select() const { return CudaCheck(cudaSetDevice(options_.gpu), "cudaSetDevice"); }
  const CudaDeviceOptions& options() const { return options_; }
  cudaStream_t cuda_stream() const { return stream_; }

  std::string_view name() const override { return name_; }
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  MemoryResource* memory() override { return &memory_; }
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
                                            stream_, &memory_));
    return std::unique_ptr<ExpertCompute>(
        std::make_unique<CudaExperts>(this, std::move(ffn), shape.model_dim, &memory_));
  }
  StatusOr<std::unique_ptr<LayerRouting>> MakeRouting(const config::LayerConfig& layer,
                                                      bool host_plan) override;

  // Expert timing: pairs of events, resolved when the seconds are taken (after the layer's
  // exchanges, whose waits have deadlines). Beyond kMaxTimers outstanding pairs the finished ones
  // are collected without waiting (cudaEventQuery); the pool grows while none has finished.
  Status BeginTiming() override {
    MOE_RETURN_IF_ERROR(Select());
    if (timers_used_ >= collect_at_) {
      MOE_RETURN_IF_ERROR(CollectTimers(/*wait=*/false));
      collect_at_ = std::max(kMaxTimers, 2 * timers_used_);
    }
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
    MOE_RETURN_IF_ERROR(CollectTimers(/*wait=*/true));
    return std::exchange(timed_, 0.0);
  }

 private:
  // Adds the finished pairs' intervals to timed_ and keeps the others (wait: every pair).
  Status CollectTimers(bool wait) {
    MOE_RETURN_IF_ERROR(Select());
    size_t kept = 0;
    for (size_t i = 0; i < timers_used_; ++i) {
      cudaEvent_t begin = timer_events_[2 * i], end = timer_events_[2 * i + 1];
      if (wait) {
        MOE_RETURN_IF_ERROR(CudaCheck(cudaEventSynchronize(end), "cudaEventSynchronize"));
      } else {
        const cudaError_t done = cudaEventQuery(end);
        if (done == cudaErrorNotReady) {
          std::swap(timer_events_[2 * kept], timer_events_[2 * i]);
          std::swap(timer_events_[2 * kept + 1], timer_events_[2 * i + 1]);
          ++kept;
          continue;
        }
        MOE_RETURN_IF_ERROR(CudaCheck(done, "cudaEventQuery"));
      }
      float ms = 0.0f;
      MOE_RETURN_IF_ERROR(
          CudaCheck(cudaEventElapsedTime(&ms, begin, end), "cudaEventElapsedTime"));
      timed_ += ms / 1e3;
    }
    timers_used_ = kept;
    return Status::Ok();
  }

  static constexpr size_t kMaxTimers = 64;
  CudaDeviceOptions options_;
  const CublasApi& api_;
  std::string name_;
  GpuMemory memory_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  std::vector<cudaEvent_t> timer_events_;
  size_t timers_used_ = 0;
  size_t collect_at_ = kMaxTimers;  // timers_used_ at which finished pairs are next collected
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
// host's routing code on the downloaded logits (StagedHostRouting).
class CudaRouting final : public LayerRouting {
 public:
  CudaRouting(CudaDevice* device, const config::LayerConfig& layer,
              std::unique_ptr<gpu::DeviceRouter> router)
      : device_(device),
        cfg_(ResolvedLayerConfig(layer)),
        router_dev_(std::move(router)),
        staged_(device, cfg_) {}

  Status Forward(const float* x, int64_t s, const float* wg, const float* wnoise,
                 const std::vector<float>& bias, const RouteContext& ctx) override {
    MOE_RETURN_IF_ERROR(staged_.ComputeLogits(x, s, wg, wnoise, ctx));
    // Router replay (a recorded selection in place of top-k) routes on the host.
    on_device_ = router_dev_ != nullptr && ctx.replay_selected == nullptr;
    if (!on_device_) return staged_.RouteOnHost(s, bias, ctx);
    const int64_t e = cfg_.num_experts();
    const StagedHostRouting::Arrays& a = staged_.arrays();
    noisy_ = RouterIsNoisy(cfg_.router(), ctx);
    // The selection bias as BuildDispatchPlan takes it: empty = zero, else E values.
    if (!bias.empty() && static_cast<int64_t>(bias.size()) != e) {
      return InvalidArgument("router bias has " + std::to_string(bias.size()) +
                             " entries, must have " + std::to_string(e) + " (moe.num_experts)");
    }
    if (!bias.empty()) MOE_RETURN_IF_ERROR(device_->Upload(a.bias, bias.data(), e * kFloat));
    plan_ = DispatchPlan();
    router_out_ = RouterOutput();
    router_out_.noisy = noisy_;
    MOE_RETURN_IF_ERROR(router_dev_->Forward(a.logits, noisy_ ? a.noise_in : nullptr,
                                             bias.empty() ? nullptr : a.bias, s, ctx, &plan_,
                                             &losses_));
    rows_ = router_dev_->device_plan();
    host_seconds_ = router_dev_->host_seconds();
    return Status::Ok();
  }

  const DispatchPlan& plan() const override { return on_device_ ? plan_ : staged_.plan(); }
  const PlanRows& rows() const override { return on_device_ ? rows_ : staged_.rows(); }
  bool routes_on_device() const override { return on_device_; }
  Status Fetch() override {
    if (!on_device_) return Status::Ok();
    MOE_RETURN_IF_ERROR(device_->Select());
    return router_dev_->Fetch(&plan_, &router_out_);
  }
  const RouterOutput& router_output() const override {
    return on_device_ ? router_out_ : staged_.router_output();
  }
  const RouterLosses& losses() const override { return on_device_ ? losses_ : staged_.losses(); }
  // aux_loss_scope GLOBAL never routes on the device (DeviceRouter::Supports).
  std::vector<double> BalanceCounts() const override { return staged_.BalanceCounts(); }
  void SetGlobalBalanceCounts(const std::vector<double>& world_counts) override {
    staged_.SetGlobalBalanceCounts(world_counts);
  }
  const float* combine_weights() const override { return staged_.combine_weights(); }
  const float* dispatch_weights() const override { return staged_.dispatch_weights(); }

  StatusOr<Gradients> Backward(const float* dgate, LossScale scale) override {
    if (!on_device_) return staged_.Backward(dgate, scale);
    const StagedHostRouting::Arrays& a = staged_.arrays();
    MOE_RETURN_IF_ERROR(router_dev_->Backward(dgate, scale, a.dlogits, a.dnoise));
    host_seconds_ += router_dev_->host_seconds();
    return Gradients{a.dlogits, noisy_ ? a.dnoise : nullptr};
  }
  StatusOr<const float*> SoftBackward(const float* dcombine, const float* ddispatch) override {
    return staged_.SoftBackward(dcombine, ddispatch);
  }
  double host_seconds() const override {
    return on_device_ ? host_seconds_ : staged_.host_seconds();
  }

 private:
  CudaDevice* device_;
  config::LayerConfig cfg_;
  std::unique_ptr<gpu::DeviceRouter> router_dev_;
  StagedHostRouting staged_;
  bool noisy_ = false;
  bool on_device_ = false;  // the last Forward routed on the device
  // Routed on the device: the plan's counts (until Fetch), its rows on the device, the router
  // output after Fetch, the losses.
  DispatchPlan plan_;
  PlanRows rows_;
  RouterOutput router_out_;
  RouterLosses losses_;
  double host_seconds_ = 0.0;
};

StatusOr<std::unique_ptr<LayerRouting>> CudaDevice::MakeRouting(const config::LayerConfig& layer,
                                                                bool host_plan) {
  MOE_RETURN_IF_ERROR(Select());
  const config::LayerConfig cfg = ResolvedLayerConfig(layer);
  std::unique_ptr<gpu::DeviceRouter> router;
  if (options_.route_on_device && !host_plan && gpu::DeviceRouter::Supports(cfg.router(), nullptr)) {
    MOE_ASSIGN_OR_RETURN(router, gpu::DeviceRouter::Create(cfg.router(), cfg.num_experts(), stream_, &memory_));
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
