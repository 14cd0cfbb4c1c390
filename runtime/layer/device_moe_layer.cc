// DeviceMoeLayer on CUDA (see runtime/layer/device_moe_layer.h for the data flow). Host code only: the
// kernels are runtime/device/cuda/permute.cu and experts/cuda/grouped_ffn.cu, the GEMMs cuBLAS.
//
// Row-major GEMMs go to column-major cuBLAS as their transposes: row-major C (m x n) = op(A)·op(B)
// is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, i.e. gemm(opB, opA, n, m, k, B, A, C) — see RowMajorGemm.
#include "runtime/layer/device_moe_layer.h"

#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "base/memory.h"
#include "experts/cuda/cublas_loader.h"
#include "base/clock.h"
#include "runtime/config/config.h"
#include "runtime/device/cuda/permute.h"
#include "runtime/device/cuda/route.h"
#include "runtime/exchange/exchange_layout.h"
#include "runtime/device/expert_compute.h"
#include "runtime/exchange/expert_exchange.h"
#include "base/tensor.h"

namespace moe {
namespace {

using experts::cuda::CublasApi;
using experts::cuda::CublasCheck;
using experts::cuda::CudaCheck;
using experts::cuda::GroupedFfn;

// v[i] · k for every entry (rows to floats, floats to bytes).
std::vector<int64_t> Scaled(const std::vector<int64_t>& v, int64_t k) {
  std::vector<int64_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = v[i] * k;
  return out;
}

class CudaMoeLayer final : public DeviceMoeLayer {
 public:
  CudaMoeLayer(const config::LayerConfig& cfg, const DeviceLayerOptions& options,
               const CublasApi& api)
      : cfg_(ResolvedLayerConfig(cfg)),
        options_(options),
        api_(api),
        ranks_(options.comm == nullptr ? 1 : options.comm->size()),
        rank_(options.comm == nullptr ? 0 : options.comm->rank()),
        local_(cfg.num_experts() / ranks_),
        bias_(static_cast<size_t>(cfg.num_experts()), 0.0f) {}

  ~CudaMoeLayer() override {
    (void)cudaSetDevice(options_.device);
    if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
    for (cudaEvent_t ev : timer_events_) (void)cudaEventDestroy(ev);
    experts_.reset();
    shared_.clear();
    if (handle_ != nullptr) (void)api_.destroy(handle_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  Status Init() {
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(options_.device), "cudaSetDevice"));
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
    MOE_RETURN_IF_ERROR(CublasCheck(api_, api_.create(&handle_), "cublasCreate"));
    MOE_RETURN_IF_ERROR(CublasCheck(api_, api_.set_stream(handle_, stream_), "cublasSetStream"));
    const int64_t m = cfg_.model_dim(), e = cfg_.num_experts();
    shapes_ = LayerParamShapes(cfg_, rank_ * local_, local_);
    MOE_ASSIGN_OR_RETURN(experts_, GroupedFfn::Create(ExpertShape(cfg_), local_, options_.precision,
                                                      options_.device, stream_));
    for (int i = 0; i < cfg_.num_shared_experts(); ++i) {
      MOE_ASSIGN_OR_RETURN(auto ffn, GroupedFfn::Create(SharedShape(cfg_), 1, options_.precision,
                                                        options_.device, stream_));
      shared_.push_back(std::move(ffn));
    }
    if (options_.route_on_device && gpu::DeviceRouter::Supports(cfg_.router(), nullptr)) {
      MOE_ASSIGN_OR_RETURN(router_dev_, gpu::DeviceRouter::Create(cfg_.router(), e, stream_));
    }
    // What lives as long as the layer: router weights and gradients, the selection bias's device
    // copy, the expert-parallel row counts.
    struct Fixed {
      float *wg, *gwg, *wn, *gwn, *bias;
      int64_t* counts;
    };
    const bool noise = HasNoiseWeights(), bias = router_dev_ != nullptr;
    MOE_ASSIGN_OR_RETURN(const Fixed f, fixed_.Carve([&](Carver& c) {
      return Fixed{c.Take<float>(m * e),
                   c.Take<float>(m * e),
                   noise ? c.Take<float>(m * e) : nullptr,
                   noise ? c.Take<float>(m * e) : nullptr,
                   bias ? c.Take<float>(e) : nullptr,
                   c.Take<int64_t>(2 * ranks_ * local_)};
    }));
    wg_ = f.wg;
    gwg_ = f.gwg;
    wn_ = f.wn;
    gwn_ = f.gwn;
    bias_dev_ = f.bias;
    counts_ = f.counts;
    return ZeroRouterGradients();
  }

  const config::LayerConfig& config() const override { return cfg_; }
  int first_expert() const override { return rank_ * local_; }
  int num_local_experts() const override { return local_; }
  void* stream() const override { return stream_; }
  double host_seconds() const override { return host_seconds_; }
  bool routes_on_device() const override { return router_dev_ != nullptr; }
  const DispatchPlan& plan() const override { return plan_; }
  int64_t forward_tokens() const override { return plan_.num_tokens; }
  Status FetchPlan() override {
    if (router_dev_ == nullptr) return Status::Ok();
    if (!have_forward_) return FailedPrecondition("DeviceMoeLayer::FetchPlan without a Forward");
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(options_.device), "cudaSetDevice"));
    return router_dev_->Fetch(&plan_, &router_);
  }
  const RouterOutput& router_output() const override { return router_; }
  const RouterLosses& losses() const override { return losses_; }
  std::vector<float>& router_bias() override { return bias_; }
  void set_loss_gradient_scale(LossScale s) override { loss_grad_scale_ = s; }

  ExchangeStats* exchange_stats() override {
    (void)ResolveExpertTimers();
    return &stats_;
  }

  Status Synchronize() override {
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(options_.device), "cudaSetDevice"));
    return CudaCheck(cudaStreamSynchronize(stream_), "DeviceMoeLayer stream");
  }

  Status SetParams(const MoeLayerParams& params) override {
    const int64_t m = cfg_.model_dim(), e = cfg_.num_experts();
    MOE_RETURN_IF_ERROR(CheckExperts("DeviceMoeLayer::SetParams", params));
    MOE_RETURN_IF_ERROR(Upload(wg_, params.router.data(), m * e));
    if (HasNoiseWeights()) MOE_RETURN_IF_ERROR(Upload(wn_, params.router_noise.data(), m * e));
    MOE_RETURN_IF_ERROR(experts_->SetWeights(params.experts));
    for (size_t i = 0; i < shared_.size(); ++i) {
      MOE_RETURN_IF_ERROR(shared_[i]->SetWeights({params.shared[i]}));
    }
    have_params_ = true;
    return Synchronize();
  }

  Status Forward(const float* x, int64_t tokens, const RouteContext& ctx, float* y) override {
    if (!have_params_) return FailedPrecondition("DeviceMoeLayer::Forward before SetParams");
    if (tokens < 1) return InvalidArgument("input has no tokens (S=0)");
    if (tokens > (int64_t{1} << 31) - 1) {
      return InvalidArgument("input has " + std::to_string(tokens) + " tokens, must be < 2^31");
    }
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(options_.device), "cudaSetDevice"));
    have_forward_ = false;
    const int64_t s = tokens, m = cfg_.model_dim(), e = cfg_.num_experts();
    x_ = x;

    // Router logits on the device; the rest of the router and the plan on the device or the host.
    const bool noisy = RouterIsNoisy(cfg_.router(), ctx);
    // Sized per call: the router's S x E arrays now, the packed rows' once the plan is known.
    MOE_ASSIGN_OR_RETURN(router_arrays_, router_ws_.Carve([&](Carver& c) {
      return RouterArrays{c.Take<float>(2 * s * e), c.Take<float>(2 * s * e)};
    }));
    float* const logits = router_arrays_.logits;
    MOE_RETURN_IF_ERROR(RowMajorGemm(false, false, s, e, m, x, wg_, 0.0f, logits));
    if (noisy)
      MOE_RETURN_IF_ERROR(RowMajorGemm(false, false, s, e, m, x, wn_, 0.0f, logits + s * e));
    if (router_dev_ != nullptr) {
      MOE_RETURN_IF_ERROR(RouteOnDevice(logits, noisy ? logits + s * e : nullptr, s, ctx));
    } else {
      MOE_RETURN_IF_ERROR(RouteOnHost(logits, noisy, s, ctx));
    }

    // Pack, experts, shared experts, gated combine.
    const int64_t rows = plan_.num_rows();
    const int64_t shared_tmp = shared_.size() > 1 ? s * m : 0;
    MOE_ASSIGN_OR_RETURN(rows_, rows_ws_.Carve([&](Carver& c) {
      return RowArrays{c.Take<float>(rows * m), c.Take<float>(rows * m), c.Take<float>(rows * m),
                       c.Take<float>(rows * m), c.Take<float>(rows), c.Take<float>(shared_tmp)};
    }));
    MOE_RETURN_IF_ERROR(gpu::PermuteRows(dplan_, x, m, rows_.packed_x, stream_));
    if (options_.comm == nullptr) {
      MOE_RETURN_IF_ERROR(TimedExperts(
          [&] { return experts_->Forward(plan_.expert_offset, rows_.packed_x, rows_.packed_y); }));
    } else {
      MOE_RETURN_IF_ERROR(BuildExchangeLayout());
      MOE_RETURN_IF_ERROR(
          ExpertParallel(/*backward=*/false, rows_.packed_x, exchange_.expert_x, exchange_.expert_y,
                         rows_.packed_y,
                         [&](int part, const std::vector<int64_t>& offsets, const float* in,
                             float* out) { return experts_->Forward(part, offsets, in, out); }));
    }
    const std::vector<int64_t> all_tokens = {0, s};
    for (size_t i = 0; i < shared_.size(); ++i) {
      if (i == 0) {
        MOE_RETURN_IF_ERROR(shared_[i]->Forward(all_tokens, x, y));
        continue;
      }
      float* const tmp = rows_.shared_tmp;
      MOE_RETURN_IF_ERROR(shared_[i]->Forward(all_tokens, x, tmp));
      MOE_RETURN_IF_ERROR(gpu::AddInto(y, tmp, s * m, stream_));
    }
    MOE_RETURN_IF_ERROR(gpu::UnpermuteRows(dplan_, rows_.packed_y, m, /*with_gates=*/true,
                                           /*accumulate=*/!shared_.empty(), y, stream_));
    have_forward_ = true;
    return Status::Ok();
  }

  Status Backward(const float* dy, float* dx, MoeLayerParams* grads) override {
    MOE_RETURN_IF_ERROR(BackwardOnDevice(dy, dx));
    return grads == nullptr ? Status::Ok() : AddGradients(grads);
  }

  Status AddGradients(MoeLayerParams* grads) override {
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(options_.device), "cudaSetDevice"));
    MOE_RETURN_IF_ERROR(CheckExperts("DeviceMoeLayer::AddGradients", *grads));
    MOE_RETURN_IF_ERROR(AddRouterGradient(gwg_, &grads->router));
    if (HasNoiseWeights()) MOE_RETURN_IF_ERROR(AddRouterGradient(gwn_, &grads->router_noise));
    MOE_RETURN_IF_ERROR(experts_->AddGradients(&grads->experts));
    for (size_t i = 0; i < shared_.size(); ++i) {
      std::vector<experts::FfnParams> one;
      one.push_back(std::move(grads->shared[i]));
      const Status st = shared_[i]->AddGradients(&one);
      grads->shared[i] = std::move(one[0]);
      MOE_RETURN_IF_ERROR(st);
    }
    return ZeroRouterGradients();
  }

 private:
  // The backward on the device; the parameter gradients accumulate there.
  Status BackwardOnDevice(const float* dy, float* dx) {
    if (!have_forward_)
      return FailedPrecondition("DeviceMoeLayer::Backward called without a Forward");
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(options_.device), "cudaSetDevice"));
    const int64_t s = plan_.num_tokens, m = cfg_.model_dim(), e = cfg_.num_experts();
    const int64_t rows = plan_.num_rows();
    float *const packed_dy = rows_.packed_dy, *const packed_dx = rows_.packed_dx,
                 *const dgate = rows_.dgate;
    MOE_RETURN_IF_ERROR(
        gpu::PermuteGradRows(dplan_, dy, rows_.packed_y, m, packed_dy, dgate, stream_));
    if (options_.comm == nullptr) {
      MOE_RETURN_IF_ERROR(TimedExperts([&] { return experts_->Backward(packed_dy, packed_dx); }));
    } else {
      MOE_RETURN_IF_ERROR(
          ExpertParallel(/*backward=*/true, packed_dy, exchange_.expert_dy, exchange_.expert_dx,
                         packed_dx,
                         [&](int part, const std::vector<int64_t>&, const float* in, float* out) {
                           return experts_->Backward(part, in, out);
                         }));
    }
    for (size_t i = 0; i < shared_.size(); ++i) {
      if (i == 0) {
        MOE_RETURN_IF_ERROR(shared_[i]->Backward(dy, dx));
        continue;
      }
      float* const tmp = rows_.shared_tmp;
      MOE_RETURN_IF_ERROR(shared_[i]->Backward(dy, tmp));
      MOE_RETURN_IF_ERROR(gpu::AddInto(dx, tmp, s * m, stream_));
    }
    MOE_RETURN_IF_ERROR(gpu::UnpermuteRows(dplan_, packed_dx, m, /*with_gates=*/false,
                                           /*accumulate=*/!shared_.empty(), dx, stream_));

    // The router's backward, to dlogits (and dnoise) on the device.
    float* const dlogits = router_arrays_.dlogits;
    float* dnoise = dlogits + s * e;
    if (router_dev_ != nullptr) {
      MOE_RETURN_IF_ERROR(router_dev_->Backward(dgate, loss_grad_scale_, dlogits, dnoise));
      host_seconds_ += router_dev_->host_seconds();
    } else {
      // The gates' gradients to the host, its S x E backward there, dlogits back.
      dgate_host_.resize(static_cast<size_t>(rows));
      MOE_RETURN_IF_ERROR(Download(dgate_host_.data(), dgate, rows, true));
      const double t0 = WallSeconds();
      RouterScoreGradients(cfg_.router(), plan_, router_, dgate_host_, loss_grad_scale_, &grads_);
      host_seconds_ += WallSeconds() - t0;
      MOE_RETURN_IF_ERROR(Upload(dlogits, grads_.dlogits.data(), s * e));
      if (router_.noisy) MOE_RETURN_IF_ERROR(Upload(dnoise, grads_.dnoise.data(), s * e));
    }
    if (noisy_) {
      MOE_RETURN_IF_ERROR(RowMajorGemm(true, false, m, e, s, x_, dnoise, 1.0f, gwn_));
      MOE_RETURN_IF_ERROR(RowMajorGemm(false, true, s, m, e, dnoise, wn_, 1.0f, dx));
    }
    MOE_RETURN_IF_ERROR(RowMajorGemm(true, false, m, e, s, x_, dlogits, 1.0f, gwg_));
    MOE_RETURN_IF_ERROR(RowMajorGemm(false, true, s, m, e, dlogits, wg_, 1.0f, dx));
    return Status::Ok();
  }

  // The router after its GEMMs on the device: plan_ gets the counts and metrics, dplan_ the
  // device plan; router_ stays empty until FetchPlan.
  Status RouteOnDevice(const float* logits, const float* noise_in, int64_t s,
                       const RouteContext& ctx) {
    const int64_t e = cfg_.num_experts();
    noisy_ = noise_in != nullptr;
    router_ = RouterOutput();
    router_.noisy = noisy_;
    // The selection bias as BuildDispatchPlan takes it: empty = zero, else E values.
    if (!bias_.empty() && static_cast<int64_t>(bias_.size()) != e) {
      return InvalidArgument("router bias has " + std::to_string(bias_.size()) +
                             " entries, must have " + std::to_string(e) + " (moe.num_experts)");
    }
    if (!bias_.empty()) MOE_RETURN_IF_ERROR(Upload(bias_dev_, bias_.data(), e));  // pageable
    MOE_RETURN_IF_ERROR(router_dev_->Forward(logits, noise_in, bias_.empty() ? nullptr : bias_dev_,
                                             s, ctx, &plan_, &losses_));
    host_seconds_ = router_dev_->host_seconds();
    dplan_ = router_dev_->device_plan();
    return Status::Ok();
  }

  // The router after its GEMMs on the host (the CPU layer's code): the logits (and noise
  // pre-activations) down, FinishRouter, the plan and the losses, the plan's index arrays up.
  Status RouteOnHost(const float* logits, bool noisy, int64_t s, const RouteContext& ctx) {
    const int64_t e = cfg_.num_experts();
    noisy_ = noisy;
    ResizeTensor(&router_.logits, s, e);
    MOE_RETURN_IF_ERROR(Download(router_.logits.data(), logits, s * e, /*sync=*/!noisy));
    if (noisy) {
      ResizeTensor(&router_.noise_in, s, e);
      MOE_RETURN_IF_ERROR(Download(router_.noise_in.data(), logits + s * e, s * e, true));
    }
    const double t0 = WallSeconds();
    FinishRouter(cfg_.router(), ctx, &router_);
    MOE_ASSIGN_OR_RETURN(plan_, BuildDispatchPlan(cfg_.router(), router_.probs, bias_, ctx));
    losses_ = ComputeRouterLosses(cfg_.router(), plan_, router_.probs, router_.logits);
    host_seconds_ = WallSeconds() - t0;
    return UploadPlan();
  }

  // `p` holds this rank's experts and every tensor in the shapes of MakeLayerParams for them.
  Status CheckExperts(const std::string& what, const MoeLayerParams& p) const {
    if (p.experts.size() != static_cast<size_t>(local_) || p.first_expert != rank_ * local_ ||
        p.shared.size() != shared_.size()) {
      return InvalidArgument(
          what + ": needs the " + std::to_string(local_) + " experts from expert " +
          std::to_string(rank_ * local_) + " and " + std::to_string(shared_.size()) +
          " shared experts (got " + std::to_string(p.experts.size()) + " from expert " +
          std::to_string(p.first_expert) + " and " + std::to_string(p.shared.size()) + ")");
    }
    return CheckParamShapes(what, p, shapes_);
  }

  // Expert parallelism, once per forward: the (destination, local expert) row counts of this rank's
  // plan go to every rank (a W x L all-to-all in the communicator's memory); both count matrices
  // give the pipelined exchange layout, whose index maps go to the device in one copy.
  Status BuildExchangeLayout() {
    const int64_t w = ranks_, l = local_, m = cfg_.model_dim();
    const std::vector<int64_t>& off = plan_.expert_offset;
    send_le_.assign(static_cast<size_t>(w * l), 0);
    for (int64_t i = 0; i < w * l; ++i) send_le_[static_cast<size_t>(i)] = off[i + 1] - off[i];
    recv_le_.assign(static_cast<size_t>(w * l), 0);
    const int64_t bytes = w * l * static_cast<int64_t>(sizeof(int64_t));
    // The counts travel by blocking copies and the communicator, nothing on this layer's stream
    // touches them: no wait here (ExpertParallel waits before the rows go).
    int64_t* const counts = counts_;
    MOE_RETURN_IF_ERROR(
        CopyFromHost(MemorySpace::kDevice, counts, send_le_.data(), bytes));
    const std::vector<int64_t> count_bytes(static_cast<size_t>(w), l * 8);
    const size_t record = stats_.Record(ExchangeCall::Kind::kCounts, false, 0,
                                        options_.pipeline_degree, count_bytes, count_bytes);
    MOE_RETURN_IF_ERROR(stats_.Timed(record, [&] {
      return options_.comm->AllToAll(counts, counts + w * l, l, comm::DataType::kInt64);
    }));
    MOE_RETURN_IF_ERROR(
        CopyToHost(MemorySpace::kDevice, recv_le_.data(), counts + w * l, bytes));
    const double t0 = WallSeconds();
    // The plan's rows are expert-major with every group inside its expert's block: one group.
    MOE_ASSIGN_OR_RETURN(layout_, MakeExchangeLayout({.ranks = static_cast<int>(w),
                                                      .local_experts = static_cast<int>(l),
                                                      .groups = 1,
                                                      .chunks = options_.pipeline_degree,
                                                      .capacity = 0},
                                                     send_le_, recv_le_));
    maps_ = MakeExchangeMaps(layout_);
    // Per chunk, the rows' counts and displacements in floats.
    chunk_floats_.clear();
    for (const ExchangeChunk& c : layout_.chunks) {
      chunk_floats_.push_back({Scaled(c.send_counts, m), Scaled(c.send_displs, m),
                               Scaled(c.recv_counts, m), Scaled(c.recv_displs, m)});
    }
    // [send_gather | plan_gather | to_expert_major | to_source_major], one staging copy.
    std::vector<int32_t>& maps = maps_staging_;
    maps.clear();
    for (const std::vector<int32_t>* v : {&maps_.send_gather, &maps_.plan_gather,
                                          &maps_.to_expert_major, &maps_.to_source_major}) {
      maps.insert(maps.end(), v->begin(), v->end());
    }
    host_seconds_ += WallSeconds() - t0;
    // Everything the exchange moves, forward and backward, sized now that the layout is known.
    const int64_t recv = layout_.recv_rows * m,
                  send = maps_.send_gather.empty() ? 0 : layout_.send_rows * m;
    MOE_ASSIGN_OR_RETURN(exchange_, exchange_ws_.Carve([&](Carver& c) {
      return ExchangeArrays{c.Take<int32_t>(static_cast<int64_t>(maps.size())),
                            c.Take<float>(recv),
                            c.Take<float>(send),
                            c.Take<float>(recv),
                            c.Take<float>(recv),
                            c.Take<float>(recv),
                            c.Take<float>(recv)};
    }));
    int32_t* const idx = exchange_.maps;
    if (!maps.empty()) {
      MOE_RETURN_IF_ERROR(CudaCheck(cudaMemcpyAsync(idx, maps.data(), maps.size() * sizeof(int32_t),
                                                    cudaMemcpyHostToDevice, stream_),
                                    "copy of the expert-parallel row maps"));
    }
    const int64_t gathers = static_cast<int64_t>(maps_.send_gather.size());
    send_gather_ = idx;
    plan_gather_ = idx + gathers;
    to_expert_major_ = idx + 2 * gathers;
    to_source_major_ = idx + 2 * gathers + layout_.recv_rows;
    return Status::Ok();
  }

  // The expert step of this rank's rows under expert parallelism, `packed_in` (plan order) to
  // `packed_out`: gather into the send order; per chunk j the dispatch all-to-all, the regroup into
  // `expert_in` (local-expert-major), experts(j, offsets, in, out) into `expert_out`, the regroup
  // back and the combine all-to-all; then gather back into the plan order. Chunk j + 1's dispatch
  // is issued before chunk j's experts run and chunk j's combine as soon as they are done, so on
  // NCCL (its own stream) one chunk's exchange is in flight while another chunk's experts run.
  // expert_in / expert_out hold every chunk's rows (recv_rows), chunk j at its recv_begin: the
  // Forward keeps expert_in for the experts' backward.
  template <typename Experts>
  Status ExpertParallel(bool backward, const float* packed_in, float* expert_in, float* expert_out,
                        float* packed_out, Experts experts) {
    const int64_t m = cfg_.model_dim(), chunks = static_cast<int64_t>(layout_.chunks.size());
    const bool gathered = !maps_.send_gather.empty();
    // Received rows; each chunk's region is reused, once its experts ran, for its rows going back.
    float* const recv = exchange_.recv;
    // With chunks, the send-order rows; each chunk's region is reused, once its dispatch is
    // complete, for its combined rows (send and receive blocks of an exchange are the same).
    const float* send = packed_in;
    float* combined = packed_out;
    if (gathered) {
      float* const buf = exchange_.send;
      MOE_RETURN_IF_ERROR(
          gpu::PermuteRows(Gather(send_gather_, layout_.send_rows), packed_in, m, buf, stream_));
      send = buf;
      combined = buf;
    }
    // No host synchronization from here to the end of the exchange: every all-to-all starts after
    // the work queued on this layer's stream (StartAllToAllV's `after`: the gather, or the chunk's
    // experts and regroup), and the stream waits for its completion (Request::Then) before the
    // kernels that read what it delivered. On NCCL both are device-side event waits.
    // Chunk j's dispatch (from send into recv) or combine (from recv into combined), recorded.
    std::vector<std::unique_ptr<comm::Request>> requests(static_cast<size_t>(2 * chunks));
    std::vector<size_t> records(static_cast<size_t>(2 * chunks));
    const auto start = [&](int64_t j, bool dispatch) -> Status {
      const ChunkFloats& f = chunk_floats_[static_cast<size_t>(j)];
      const size_t slot = static_cast<size_t>(2 * j + (dispatch ? 0 : 1));
      records[slot] =
          stats_.Record(dispatch ? ExchangeCall::Kind::kDispatch : ExchangeCall::Kind::kCombine,
                        backward, static_cast<int>(j), options_.pipeline_degree,
                        Scaled(dispatch ? f.send_counts : f.recv_counts, sizeof(float)),
                        Scaled(dispatch ? f.recv_counts : f.send_counts, sizeof(float)));
      return stats_.Timed(records[slot], [&]() -> Status {
        MOE_ASSIGN_OR_RETURN(
            requests[slot], dispatch ? options_.comm->StartAllToAllV(
                                           send, f.send_counts, f.send_displs, recv, f.recv_counts,
                                           f.recv_displs, comm::DataType::kFloat32, stream_)
                                     : options_.comm->StartAllToAllV(
                                           recv, f.recv_counts, f.recv_displs, combined,
                                           f.send_counts, f.send_displs, comm::DataType::kFloat32,
                                           stream_));
        return Status::Ok();
      });
    };
    // The stream (not the host) waits for chunk j's exchange.
    const auto then = [&](int64_t j, bool dispatch) {
      const size_t slot = static_cast<size_t>(2 * j + (dispatch ? 0 : 1));
      return stats_.Timed(records[slot], [&] { return requests[slot]->Then(stream_); });
    };
    const auto experts_of = [&](int j) -> Status {
      const ExchangeChunk& c = layout_.chunks[static_cast<size_t>(j)];
      const int64_t at = c.recv_begin;
      // Gather maps hold absolute rows, so each reads from the whole buffer.
      MOE_RETURN_IF_ERROR(gpu::PermuteRows(Gather(to_expert_major_ + at, c.recv_rows), recv, m,
                                           expert_in + at * m, stream_));
      MOE_RETURN_IF_ERROR(TimedExperts([&] {
        return experts(j, c.expert_offsets, expert_in + at * m, expert_out + at * m);
      }));
      return gpu::PermuteRows(Gather(to_source_major_ + at, c.recv_rows), expert_out, m,
                              recv + at * m, stream_);
    };
    MOE_RETURN_IF_ERROR(RunChunked(
        static_cast<int>(chunks),
        {.start_dispatch = [&](int j) { return start(j, /*dispatch=*/true); },
         .wait_dispatch = [&](int j) { return then(j, /*dispatch=*/true); },
         .experts = experts_of,
         .start_combine = [&](int j) { return start(j, /*dispatch=*/false); },
         .wait_combine = [&](int j) { return then(j, /*dispatch=*/false); }}));
    // Everything is queued; the host now collects each exchange's status (deadline, errors).
    for (size_t slot = 0; slot < requests.size(); ++slot) {
      MOE_RETURN_IF_ERROR(stats_.Timed(records[slot], [&] { return requests[slot]->Wait(); }));
    }
    if (!gathered) return Status::Ok();
    return gpu::PermuteRows(Gather(plan_gather_, layout_.send_rows), combined, m, packed_out,
                            stream_);
  }

  // Enqueues fn's expert work between two timing events (read by ResolveExpertTimers).
  template <typename F>
  Status TimedExperts(F fn) {
    if (timers_used_ == kMaxTimers) MOE_RETURN_IF_ERROR(ResolveExpertTimers());
    while (timer_events_.size() < 2 * (timers_used_ + 1)) {
      cudaEvent_t ev = nullptr;
      MOE_RETURN_IF_ERROR(CudaCheck(cudaEventCreate(&ev), "cudaEventCreate"));
      timer_events_.push_back(ev);
    }
    cudaEvent_t begin = timer_events_[2 * timers_used_], end = timer_events_[2 * timers_used_ + 1];
    MOE_RETURN_IF_ERROR(CudaCheck(cudaEventRecord(begin, stream_), "cudaEventRecord"));
    MOE_RETURN_IF_ERROR(fn());
    MOE_RETURN_IF_ERROR(CudaCheck(cudaEventRecord(end, stream_), "cudaEventRecord"));
    ++timers_used_;
    return Status::Ok();
  }

  // Adds the GPU time of every recorded expert interval to stats_.expert_seconds (waits for them).
  Status ResolveExpertTimers() {
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(options_.device), "cudaSetDevice"));
    for (size_t i = 0; i < timers_used_; ++i) {
      float ms = 0.0f;
      MOE_RETURN_IF_ERROR(
          CudaCheck(cudaEventSynchronize(timer_events_[2 * i + 1]), "cudaEventSynchronize"));
      MOE_RETURN_IF_ERROR(
          CudaCheck(cudaEventElapsedTime(&ms, timer_events_[2 * i], timer_events_[2 * i + 1]),
                    "cudaEventElapsedTime"));
      stats_.expert_seconds += ms / 1e3;
    }
    timers_used_ = 0;
    return Status::Ok();
  }

  // out[i] = in[idx[i]] for `rows` rows, as a PermuteRows plan.
  static gpu::DevicePlan Gather(const int32_t* idx, int64_t rows) {
    return gpu::DevicePlan{.rows = rows, .tokens = rows, .row_token = idx};
  }

  bool HasNoiseWeights() const { return cfg_.router().gate() == config::NOISY_TOPK; }

  // Row-major c (m x n) = op(a)·op(b) + beta·c, fp32 with fp32 accumulation (no TF32).
  Status RowMajorGemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a,
                      const float* b, float beta, float* c) {
    const float alpha = 1.0f;
    const auto lda = static_cast<int>(ta ? m : k), ldb = static_cast<int>(tb ? k : n);
    return CublasCheck(
        api_,
        api_.gemm_ex(handle_, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                     static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b,
                     CUDA_R_32F, ldb, a, CUDA_R_32F, lda, &beta, c, CUDA_R_32F, static_cast<int>(n),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "router GEMM");
  }

  Status Upload(float* dst, const float* src, int64_t count) {
    return CudaCheck(cudaMemcpyAsync(dst, src, static_cast<size_t>(count) * sizeof(float),
                                     cudaMemcpyHostToDevice, stream_),
                     "host-to-device copy");
  }

  // `sync`: wait until the copy (and all earlier work on the stream) is done.
  Status Download(float* dst, const float* src, int64_t count, bool sync) {
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaMemcpyAsync(dst, src, static_cast<size_t>(count) * sizeof(float),
                                  cudaMemcpyDeviceToHost, stream_),
                  "device-to-host copy"));
    return sync ? CudaCheck(cudaStreamSynchronize(stream_), "DeviceMoeLayer stream") : Status::Ok();
  }

  // The plan's index arrays in one staging buffer and one copy: token_row_offset (int64, S + 1),
  // row_gate (float, rows), row_token (int32, rows), token_rows (int32, rows).
  Status UploadPlan() {
    const int64_t s = plan_.num_tokens, rows = plan_.num_rows();
    const size_t off_bytes = static_cast<size_t>(s + 1) * sizeof(int64_t);
    const size_t row_bytes = static_cast<size_t>(rows) * 4;
    staging_.resize(off_bytes + 3 * row_bytes);
    const double t0 = WallSeconds();
    std::memcpy(staging_.data(), plan_.token_row_offset.data(), off_bytes);
    if (rows > 0) {  // (empty vectors may have null data())
      std::memcpy(staging_.data() + off_bytes, plan_.row_gate.data(), row_bytes);
      std::memcpy(staging_.data() + off_bytes + row_bytes, plan_.row_token.data(), row_bytes);
      std::memcpy(staging_.data() + off_bytes + 2 * row_bytes, plan_.token_rows.data(), row_bytes);
    }
    host_seconds_ += WallSeconds() - t0;
    MOE_ASSIGN_OR_RETURN(void* staged, plan_ws_.Get(static_cast<int64_t>(staging_.size())));
    char* const dev = static_cast<char*>(staged);
    MOE_RETURN_IF_ERROR(CudaCheck(
        cudaMemcpyAsync(dev, staging_.data(), staging_.size(), cudaMemcpyHostToDevice, stream_),
        "copy of the dispatch plan"));
    dplan_.rows = rows;
    dplan_.tokens = s;
    dplan_.token_row_offset = reinterpret_cast<const int64_t*>(dev);
    dplan_.row_gate = reinterpret_cast<const float*>(dev + off_bytes);
    dplan_.row_token = reinterpret_cast<const int32_t*>(dev + off_bytes + row_bytes);
    dplan_.token_rows = reinterpret_cast<const int32_t*>(dev + off_bytes + 2 * row_bytes);
    // The staging buffer is pageable: cudaMemcpyAsync has read it when it returns, so no wait.
    return Status::Ok();
  }

  Status AddRouterGradient(const float* dev, Tensor* host) {
    scratch_.resize(static_cast<size_t>(host->size()));
    MOE_RETURN_IF_ERROR(Download(scratch_.data(), dev, host->size(), true));
    for (int64_t i = 0; i < host->size(); ++i) (*host)[i] += scratch_[static_cast<size_t>(i)];
    return Status::Ok();
  }

  Status ZeroRouterGradients() {
    const size_t bytes = static_cast<size_t>(cfg_.model_dim() * cfg_.num_experts()) * sizeof(float);
    MOE_RETURN_IF_ERROR(CudaCheck(cudaMemsetAsync(gwg_, 0, bytes, stream_), "cudaMemset"));
    if (gwn_ != nullptr) {
      MOE_RETURN_IF_ERROR(CudaCheck(cudaMemsetAsync(gwn_, 0, bytes, stream_), "cudaMemset"));
    }
    return Synchronize();
  }

  config::LayerConfig cfg_;
  DeviceLayerOptions options_;
  const CublasApi& api_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  int ranks_ = 1, rank_ = 0, local_ = 0;  // expert parallelism: W, this rank, E / W
  std::vector<ParamShape> shapes_;        // of this rank's parameters (and gradients)
  std::unique_ptr<GroupedFfn> experts_;
  std::vector<std::unique_ptr<GroupedFfn>> shared_;
  std::vector<float> bias_;
  LossScale loss_grad_scale_;
  bool have_params_ = false, have_forward_ = false;

  // Device memory, each workspace carved in one piece (base/memory.h) when its sizes are
  // known: fixed_ at Init (router weights and gradients, the bias's device copy, the row counts);
  // per Forward router_ws_ (logits and their gradient), rows_ws_ once the plan is known (packed
  // rows both ways, the gates' gradient, shared-expert scratch), exchange_ws_ once the exchange
  // layout is known (regroup maps, received and sent rows, the experts' rows both ways), plan_ws_
  // for a plan routed on the host. The Backward uses what its Forward carved.
  Workspace fixed_{MemorySpace::kDevice}, router_ws_{MemorySpace::kDevice},
      rows_ws_{MemorySpace::kDevice}, exchange_ws_{MemorySpace::kDevice},
      plan_ws_{MemorySpace::kDevice};
  float *wg_ = nullptr, *gwg_ = nullptr, *wn_ = nullptr, *gwn_ = nullptr;
  int64_t* counts_ = nullptr;  // expert parallelism: sent and received row counts (2 x W x L)
  struct RouterArrays {
    float *logits = nullptr, *dlogits = nullptr;  // S x E each, then the noise's S x E
  } router_arrays_;
  struct RowArrays {
    float *packed_x = nullptr, *packed_y = nullptr, *packed_dy = nullptr, *packed_dx = nullptr,
          *dgate = nullptr, *shared_tmp = nullptr;
  } rows_;
  struct ExchangeArrays {
    int32_t* maps = nullptr;
    float *recv = nullptr, *send = nullptr, *expert_x = nullptr, *expert_y = nullptr,
          *expert_dy = nullptr, *expert_dx = nullptr;
  } exchange_;
  // Routing on the device: the router and the selection bias's device copy.
  std::unique_ptr<gpu::DeviceRouter> router_dev_;
  float* bias_dev_ = nullptr;
  // Expert parallelism: the per-forward layout.
  std::vector<int64_t> send_le_, recv_le_;
  ExchangeLayout layout_;  // the exchange's layout (runtime/exchange/exchange_layout.h), one group
  ExchangeMaps maps_;      // ... as gather indices
  struct ChunkFloats {
    std::vector<int64_t> send_counts, send_displs, recv_counts, recv_displs;
  };
  std::vector<ChunkFloats> chunk_floats_;  // per chunk: layout_'s rows times M
  std::vector<int32_t> maps_staging_;
  const int32_t *send_gather_ = nullptr, *plan_gather_ = nullptr, *to_expert_major_ = nullptr,
                *to_source_major_ = nullptr;  // layout_'s maps on the device

  // Saved by Forward.
  const float* x_ = nullptr;
  bool noisy_ = false;
  RouterOutput router_;
  DispatchPlan plan_;
  RouterLosses losses_;
  gpu::DevicePlan dplan_;

  // Exchange records and the expert timing events (pairs: begin, end).
  static constexpr size_t kMaxTimers = 64;
  ExchangeStats stats_;
  std::vector<cudaEvent_t> timer_events_;
  size_t timers_used_ = 0;

  // Host scratch.
  double host_seconds_ = 0.0;
  std::vector<char> staging_;
  std::vector<float> dgate_host_, scratch_;
  RouterGradients grads_;
};

}  // namespace

StatusOr<std::unique_ptr<DeviceMoeLayer>> DeviceMoeLayer::Create(
    const config::LayerConfig& cfg, const DeviceLayerOptions& options) {
  const int count = CudaDeviceCount();
  if (count == 0) {
    return FailedPrecondition("DeviceMoeLayer: no CUDA device is visible to this process");
  }
  if (options.device < 0 || options.device >= count) {
    return InvalidArgument("DeviceMoeLayer: device " + std::to_string(options.device) +
                           " not in [0, " + std::to_string(count) + ")");
  }
  static_assert(GroupedFfn::kMaxParts == ExpertCompute::kMaxParts);
  MOE_RETURN_IF_ERROR(ValidateExchangeOptions({.pipeline_degree = options.pipeline_degree})
                          .WithContext("DeviceMoeLayer"));
  if (options.comm != nullptr) {
    const int w = options.comm->size();
    if (cfg.num_experts() % w != 0) {
      return InvalidArgument(
          "DeviceMoeLayer: moe.num_experts=" + std::to_string(cfg.num_experts()) +
          " must be a multiple of the " + std::to_string(w) + " ranks of the communicator");
    }
    if (options.comm->memory_space() != MemorySpace::kDevice) {
      return InvalidArgument(
          "DeviceMoeLayer: the communicator (backend " + std::string(options.comm->backend()) +
          ") must use device memory (NCCL, or loopback ranks with memory=kDevice)");
    }
  }
  MOE_ASSIGN_OR_RETURN(const CublasApi* api, experts::cuda::Cublas());
  auto layer = std::make_unique<CudaMoeLayer>(cfg, options, *api);
  MOE_RETURN_IF_ERROR(layer->Init());
  return std::unique_ptr<DeviceMoeLayer>(std::move(layer));
}

}  // namespace moe
