// GroupedFfn on CUDA: cuBLAS grouped GEMMs and the elementwise kernels between them.
//
// Row-major matrices are handed to column-major cuBLAS as their transposes: a row-major R x C
// matrix with leading dimension C is the column-major C x R one. So row-major C = A·B is
// gemm(N, N, m = cols(C), n = rows(C), k, B, A, C) with the operands swapped; the comment above
// each call gives the row-major product.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "experts/cuda/cublas_loader.h"
#include "experts/cuda/grouped_ffn.h"
#include "base/memory.h"

namespace moe::experts::cuda {
namespace {

using bf16 = __nv_bfloat16;

// ---- device memory
// --------------------------------------------------------------------------------

struct HostFree {
  void operator()(void* p) const {
    if (p != nullptr) (void)cudaFreeHost(p);
  }
};

// ---- elementwise math
// -----------------------------------------------------------------------------

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(bf16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ bf16 FromFloat<bf16>(float v) {
  return __float2bfloat16_rn(v);
}

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

__device__ __forceinline__ float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float Act(Activation act, float h) {
  switch (act) {
    case Activation::kRelu:
      return h > 0.0f ? h : 0.0f;
    case Activation::kGeluTanh:
      return 0.5f * h * (1.0f + tanhf(kGeluC * (h + kGeluA * h * h * h)));
    case Activation::kSilu:
      return h * Sigmoid(h);
  }
  return 0.0f;
}

__device__ __forceinline__ float ActGrad(Activation act, float h) {
  switch (act) {
    case Activation::kRelu:
      return h > 0.0f ? 1.0f : 0.0f;
    case Activation::kGeluTanh: {
      const float t = tanhf(kGeluC * (h + kGeluA * h * h * h));
      const float dt = kGeluC * (1.0f + 3.0f * kGeluA * h * h);
      return 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * dt;
    }
    case Activation::kSilu: {
      const float s = Sigmoid(h);
      return s * (1.0f + h * (1.0f - s));
    }
  }
  return 0.0f;
}

// The expert e whose block [offsets[e], offsets[e+1]) holds `row` (empty blocks skipped).
__device__ __forceinline__ int ExpertOf(const int64_t* offsets, int num_experts, int64_t row) {
  int lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---- kernels (one block per row unless said otherwise)
// --------------------------------------------

constexpr int kRowThreads = 256;

// hu = [h | u] (row stride hu_cols): h += b1[e]; a = act(h), or silu(h) * u for SwiGLU. The
// biased h is written back (the backward reads it).
template <typename T>
__global__ void BiasActivateKernel(T* hu, T* a, const float* b1, const int64_t* offsets,
                                   int num_experts, int hidden, int hu_cols, Activation act,
                                   bool swiglu) {
  const int64_t r = blockIdx.x;
  T* hrow = hu + r * hu_cols;
  T* arow = a + r * hidden;
  const float* b =
      b1 == nullptr ? nullptr : b1 + int64_t{ExpertOf(offsets, num_experts, r)} * hidden;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    float h = ToFloat(hrow[c]);
    if (b != nullptr) {
      hrow[c] = FromFloat<T>(h + b[c]);
      h = ToFloat(hrow[c]);  // the value the backward will see
    }
    const float out = swiglu ? h * Sigmoid(h) * ToFloat(hrow[hidden + c]) : Act(act, h);
    arow[c] = FromFloat<T>(out);
  }
}

// y = widen(y_gemm) + b2[e]; y_gemm may be y itself (fp32).
template <typename T>
__global__ void BiasOutputKernel(const T* y_gemm, float* y, const float* b2, const int64_t* offsets,
                                 int num_experts, int model) {
  const int64_t r = blockIdx.x;
  const float* b =
      b2 == nullptr ? nullptr : b2 + int64_t{ExpertOf(offsets, num_experts, r)} * model;
  for (int c = threadIdx.x; c < model; c += blockDim.x) {
    const float v = ToFloat(y_gemm[r * model + c]);
    y[r * model + c] = b == nullptr ? v : v + b[c];
  }
}

// dhu = [dh | du] from da: FFN dh = da · act'(h); SwiGLU (a = silu(h) · u) du = da · silu(h),
// dh = da · u · silu'(h).
template <typename T>
__global__ void ActivationBackwardKernel(const T* da, const T* hu, T* dhu, int hidden, int hu_cols,
                                         Activation act, bool swiglu) {
  const int64_t r = blockIdx.x;
  const T* hrow = hu + r * hu_cols;
  T* drow = dhu + r * hu_cols;
  for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
    const float d = ToFloat(da[r * hidden + c]);
    const float h = ToFloat(hrow[c]);
    if (swiglu) {
      const float u = ToFloat(hrow[hidden + c]);
      const float s = Sigmoid(h);
      drow[hidden + c] = FromFloat<T>(d * h * s);
      drow[c] = FromFloat<T>(d * u * s * (1.0f + h * (1.0f - s)));
    } else {
      drow[c] = FromFloat<T>(d * ActGrad(act, h));
    }
  }
}

// g[e][c] += Σ over rows of block e of m[r][c] (c < cols, row stride ld). Grid (ceil(cols/32), L),
// block (32, 8): 8 row lanes per column, reduced in shared memory; no atomics (deterministic).
constexpr int kSumLanes = 8;
template <typename T>
__global__ void ColumnSumKernel(const T* m, int64_t ld, int cols, const int64_t* offsets,
                                float* g) {
  __shared__ float part[kSumLanes][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int e = blockIdx.y;
  float s = 0.0f;
  if (c < cols) {
    for (int64_t r = offsets[e] + threadIdx.y; r < offsets[e + 1]; r += kSumLanes)
      s += ToFloat(m[r * ld + c]);
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0.0f;
    for (int i = 0; i < kSumLanes; ++i) t += part[i][threadIdx.x];
    g[int64_t{e} * cols + c] += t;
  }
}

template <typename From, typename To>
__global__ void ConvertKernel(const From* in, To* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = FromFloat<To>(ToFloat(in[i]));
  }
}

unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kRowThreads - 1) / kRowThreads, 4096));
}

// ---- one GEMM in cuBLAS (column-major) terms
// ------------------------------------------------------

struct Gemm {
  cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
  int m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int lda = 0;
  const void* b = nullptr;
  int ldb = 0;
  void* c = nullptr;
  int ldc = 0;
};

template <typename T>
constexpr cudaDataType_t kDataType = std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;

// Pointer arrays of grouped GEMMs: cublasGemmGroupedBatchedEx reads A/B/C pointers from device
// memory. They are staged in pinned host memory and copied with one async copy per grouped call;
// the staging area is reused only after the previous copy from it completed (event). A part's
// Forward and Backward stage two grouped calls each, so one layer call (at most kMaxParts parts)
// stages at most 2 * kMaxParts: with 4 * kMaxParts slots a slot's previous copy belongs to an
// earlier layer call, whose exchanges the host has already waited for (with their deadlines) —
// the event wait here never waits behind an exchange of a peer that may be dead.
class PointerTable {
 public:
  Status Init(int max_groups) {
    max_ = max_groups;
    const size_t bytes =
        sizeof(void*) * 3 * static_cast<size_t>(kSlots) * static_cast<size_t>(max_groups);
    void* host = nullptr;
    MOE_RETURN_IF_ERROR(CudaCheck(cudaMallocHost(&host, bytes), "cudaMallocHost (GEMM pointers)"));
    host_.reset(host);
    MOE_ASSIGN_OR_RETURN(device_, Buffer::Allocate(MemorySpace::kDevice, static_cast<int64_t>(bytes)));
    for (cudaEvent_t& ev : copied_) {
      MOE_RETURN_IF_ERROR(
          CudaCheck(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate"));
    }
    return Status::Ok();
  }
  ~PointerTable() {
    for (cudaEvent_t ev : copied_) {
      if (ev != nullptr) (void)cudaEventDestroy(ev);
    }
  }
  // Device arrays [A pointers | B pointers | C pointers] of `groups`, in a slot not in flight.
  StatusOr<const void* const*> Stage(const std::vector<Gemm>& groups, cudaStream_t stream) {
    const int slot = next_;
    next_ = (next_ + 1) % kSlots;
    MOE_RETURN_IF_ERROR(CudaCheck(cudaEventSynchronize(copied_[slot]), "cudaEventSynchronize"));
    const size_t n = groups.size();
    const void** host =
        static_cast<const void**>(host_.get()) + slot * 3 * static_cast<size_t>(max_);
    for (size_t i = 0; i < n; ++i) {
      host[i] = groups[i].a;
      host[n + i] = groups[i].b;
      host[2 * n + i] = groups[i].c;
    }
    const void** dev = device_.as<const void*>() + slot * 3 * static_cast<size_t>(max_);
    MOE_RETURN_IF_ERROR(
        CudaCheck(cudaMemcpyAsync(dev, host, 3 * n * sizeof(void*), cudaMemcpyHostToDevice, stream),
                  "copy of GEMM pointers"));
    MOE_RETURN_IF_ERROR(CudaCheck(cudaEventRecord(copied_[slot], stream), "cudaEventRecord"));
    return static_cast<const void* const*>(dev);
  }

 private:
  static constexpr int kSlots = 4 * GroupedFfn::kMaxParts;
  int max_ = 0;
  int next_ = 0;
  std::unique_ptr<void, HostFree> host_;
  Buffer device_;
  std::array<cudaEvent_t, kSlots> copied_{};
};

// ---- the grouped FFN
// ------------------------------------------------------------------------------

template <typename T>
class CudaGroupedFfn final : public GroupedFfn {
 public:
  CudaGroupedFfn(const CublasApi& api, const FfnShape& shape, int num_experts, int device,
                 cudaStream_t stream, MemoryResource* memory)
      : api_(api),
        shape_(shape),
        experts_(num_experts),
        device_(device),
        stream_(stream),
        owns_stream_(stream == nullptr),
        weights_(memory),
        backward_(memory),
        y16_(memory),
        wstage_(memory) {
    for (Part& part : parts_) part.memory = Workspace(memory);
  }

  ~CudaGroupedFfn() override {
    (void)cudaSetDevice(device_);
    if (handle_ != nullptr) (void)api_.destroy(handle_);
    if (owns_stream_ && stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  void* stream() const override { return stream_; }

  Status Init() {
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "cudaSetDevice"));
    if (owns_stream_) {
      MOE_RETURN_IF_ERROR(CudaCheck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                                    "cudaStreamCreate"));
    }
    MOE_RETURN_IF_ERROR(CublasCheck(api_, api_.create(&handle_), "cublasCreate"));
    MOE_RETURN_IF_ERROR(CublasCheck(api_, api_.set_stream(handle_, stream_), "cublasSetStream"));
    MOE_RETURN_IF_ERROR(pointers_.Init(experts_));
    const int64_t l = experts_, m = shape_.model_dim, h = shape_.hidden_dim, up = UpCols();
    const int64_t bias_h = shape_.bias ? l * h : 0, bias_m = shape_.bias ? l * m : 0;
    // Weights in the storage type, biases and every gradient in fp32: one allocation.
    MOE_ASSIGN_OR_RETURN(w_, weights_.Carve([&](Carver& c) {
      return Weights{c.Take<T>(l * m * up),        c.Take<T>(l * h * m),
                     c.Take<float>(bias_h),        c.Take<float>(bias_m),
                     c.Take<float>(l * m * up),    c.Take<float>(l * h * m),
                     c.Take<float>(bias_h),        c.Take<float>(bias_m)};
    }));
    return ZeroGradients();
  }

  Status SetWeights(std::span<const FfnParams> params) override {
    if (static_cast<int>(params.size()) != experts_) {
      return InvalidArgument("GroupedFfn::SetWeights: " + std::to_string(params.size()) +
                             " experts given, the object holds " + std::to_string(experts_));
    }
    const FfnParams want = FfnParams::Zeros(shape_);
    for (size_t e = 0; e < params.size(); ++e) {
      const FfnParams& p = params[e];
      if (!p.w1.SameShape(want.w1) || !p.w2.SameShape(want.w2) || !p.b1.SameShape(want.b1) ||
          !p.b2.SameShape(want.b2) || !p.w3.SameShape(want.w3)) {
        return InvalidArgument(
            "GroupedFfn::SetWeights: expert " + std::to_string(e) +
            " has tensors of the wrong shape for M=" + std::to_string(shape_.model_dim) +
            " H=" + std::to_string(shape_.hidden_dim));
      }
    }
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "cudaSetDevice"));
    const int64_t m = shape_.model_dim, h = shape_.hidden_dim, up = UpCols();
    // Wup = W1, or [W1 | W3] row by row.
    staging_.resize(static_cast<size_t>(experts_ * m * up));
    for (int e = 0; e < experts_; ++e) {
      const FfnParams& p = params[static_cast<size_t>(e)];
      float* dst = staging_.data() + e * m * up;
      for (int64_t i = 0; i < m; ++i) {
        std::memcpy(dst + i * up, p.w1.row(i), sizeof(float) * h);
        if (shape_.swiglu) std::memcpy(dst + i * up + h, p.w3.row(i), sizeof(float) * h);
      }
    }
    MOE_RETURN_IF_ERROR(UploadAs(w_.wup, staging_));
    staging_.resize(static_cast<size_t>(experts_ * h * m));
    for (int e = 0; e < experts_; ++e) {
      std::memcpy(staging_.data() + e * h * m, params[static_cast<size_t>(e)].w2.data(),
                  sizeof(float) * h * m);
    }
    MOE_RETURN_IF_ERROR(UploadAs(w_.w2, staging_));
    if (shape_.bias) {
      using Bias = std::tuple<float*, int64_t, Tensor FfnParams::*>;
      const std::array<Bias, 2> biases = {Bias(w_.b1, h, &FfnParams::b1),
                                          Bias(w_.b2, m, &FfnParams::b2)};
      for (auto [dst, cols, pick] : biases) {
        staging_.resize(static_cast<size_t>(experts_ * cols));
        for (int e = 0; e < experts_; ++e) {
          std::memcpy(staging_.data() + e * cols, (params[static_cast<size_t>(e)].*pick).data(),
                      sizeof(float) * cols);
        }
        MOE_RETURN_IF_ERROR(
            Upload(dst, staging_.data(), static_cast<int64_t>(staging_.size() * sizeof(float))));
      }
    }
    have_weights_ = true;
    return Status::Ok();
  }

  Status Reserve(int part, int64_t rows) override {
    if (part < 0 || part >= kMaxParts) {
      return InvalidArgument("GroupedFfn::Reserve: part " + std::to_string(part) + " not in [0, " +
                             std::to_string(kMaxParts) + ")");
    }
    if (rows <= 0) return Status::Ok();
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "cudaSetDevice"));
    MOE_RETURN_IF_ERROR(parts_[static_cast<size_t>(part)].memory.Carve(PartLayout(rows)).status());
    MOE_RETURN_IF_ERROR(backward_.Carve(BackwardLayout(rows)).status());
    if constexpr (kConverts) {
      MOE_RETURN_IF_ERROR(
          y16_.Get(rows * shape_.model_dim * static_cast<int64_t>(sizeof(T))).status());
    }
    return Status::Ok();
  }

  Status Forward(int part, const std::vector<int64_t>& offsets, const float* x, float* y) override {
    if (!have_weights_) return FailedPrecondition("GroupedFfn::Forward before SetWeights");
    MOE_RETURN_IF_ERROR(SelectPart("Forward", part));
    if (static_cast<int>(offsets.size()) != experts_ + 1 || offsets[0] != 0 ||
        !std::is_sorted(offsets.begin(), offsets.end())) {
      return InvalidArgument("GroupedFfn::Forward: offsets must be " +
                             std::to_string(experts_ + 1) +
                             " non-decreasing row offsets starting at 0");
    }
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "cudaSetDevice"));
    cur_->offsets = offsets;
    cur_->rows = offsets.back();
    cur_->forwarded = true;
    if (cur_->rows == 0) return Status::Ok();
    if (cur_->rows > (int64_t{1} << 31) - 1)
      return InvalidArgument("GroupedFfn::Forward: more than 2^31 - 1 rows");
    const int64_t m = shape_.model_dim, h = shape_.hidden_dim, up = UpCols();
    // What the part's Backward reads, in the part's own allocation.
    const int64_t rows = cur_->rows;
    MOE_ASSIGN_OR_RETURN(cur_->arrays, cur_->memory.Carve(PartLayout(rows)));
    MOE_RETURN_IF_ERROR(CudaCheck(
        cudaMemcpyAsync(cur_->arrays.offsets, cur_->offsets.data(),
                        cur_->offsets.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream_),
        "copy of row offsets"));
    cur_->x = GemmInput(x, cur_->arrays.x16);
    // HU = X · Wup (rows x up).
    MOE_RETURN_IF_ERROR(Grouped(
        [&](int e, int64_t b, int r) {
          return Gemm{CUBLAS_OP_N,          CUBLAS_OP_N,
                      static_cast<int>(up), r,
                      static_cast<int>(m),  w_.wup + e * m * up,
                      static_cast<int>(up), cur_->x + b * m,
                      static_cast<int>(m),  cur_->arrays.hu + b * up,
                      static_cast<int>(up)};
        },
        0.0f));
    BiasActivateKernel<T><<<static_cast<unsigned>(cur_->rows), kRowThreads, 0, stream_>>>(
        cur_->arrays.hu, cur_->arrays.a, shape_.bias ? w_.b1 : nullptr, cur_->arrays.offsets,
        experts_,
        static_cast<int>(h), static_cast<int>(up), shape_.activation, shape_.swiglu);
    // Y = A · W2 (rows x M), then + b2 (widened to fp32).
    T* y_gemm = nullptr;
    if constexpr (kConverts) {
      MOE_ASSIGN_OR_RETURN(void* staged, y16_.Get(rows * m * static_cast<int64_t>(sizeof(T))));
      y_gemm = static_cast<T*>(staged);
    } else {
      y_gemm = y;
    }
    MOE_RETURN_IF_ERROR(Grouped(
        [&](int e, int64_t b, int r) {
          return Gemm{CUBLAS_OP_N,         CUBLAS_OP_N,
                      static_cast<int>(m), r,
                      static_cast<int>(h), w_.w2 + e * h * m,
                      static_cast<int>(m), cur_->arrays.a + b * h,
                      static_cast<int>(h), y_gemm + b * m,
                      static_cast<int>(m)};
        },
        0.0f));
    BiasOutputKernel<T><<<static_cast<unsigned>(cur_->rows), kRowThreads, 0, stream_>>>(
        y_gemm, y, shape_.bias ? w_.b2 : nullptr, cur_->arrays.offsets, experts_,
        static_cast<int>(m));
    return CudaCheck(cudaGetLastError(), "GroupedFfn::Forward kernel launch");
  }

  Status Backward(int part, const float* dy, float* dx) override {
    MOE_RETURN_IF_ERROR(SelectPart("Backward", part));
    if (!cur_->forwarded) {
      return FailedPrecondition("GroupedFfn::Backward of part " + std::to_string(part) +
                                " without its Forward");
    }
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "cudaSetDevice"));
    if (cur_->rows == 0) return Status::Ok();
    const int64_t m = shape_.model_dim, h = shape_.hidden_dim, up = UpCols();
    MOE_ASSIGN_OR_RETURN(const BackwardArrays g, backward_.Carve(BackwardLayout(cur_->rows)));
    const T* dy_t = GemmInput(dy, g.dy16);
    // dW2 (H x M) += Aᵀ · dY; db2 += Σ dY (from the fp32 dy).
    MOE_RETURN_IF_ERROR(WeightGradient([&](int e, int64_t b, int r) {
      return Gemm{CUBLAS_OP_N,
                  CUBLAS_OP_T,
                  static_cast<int>(m),
                  static_cast<int>(h),
                  r,
                  dy_t + b * m,
                  static_cast<int>(m),
                  cur_->arrays.a + b * h,
                  static_cast<int>(h),
                  w_.gw2 + e * h * m,
                  static_cast<int>(m)};
    }));
    if (shape_.bias) ColumnSums(dy, m, static_cast<int>(m), w_.gb2);
    // dA = dY · W2ᵀ (rows x H).
    MOE_RETURN_IF_ERROR(Grouped(
        [&](int e, int64_t b, int r) {
          return Gemm{CUBLAS_OP_T,         CUBLAS_OP_N,
                      static_cast<int>(h), r,
                      static_cast<int>(m), w_.w2 + e * h * m,
                      static_cast<int>(m), dy_t + b * m,
                      static_cast<int>(m), g.da + b * h,
                      static_cast<int>(h)};
        },
        0.0f));
    ActivationBackwardKernel<T><<<static_cast<unsigned>(cur_->rows), kRowThreads, 0, stream_>>>(
        g.da, cur_->arrays.hu, g.dhu, static_cast<int>(h), static_cast<int>(up), shape_.activation,
        shape_.swiglu);
    if (shape_.bias) ColumnSums(g.dhu, up, static_cast<int>(h), w_.gb1);
    // dWup (M x up) += Xᵀ · dHU.
    MOE_RETURN_IF_ERROR(WeightGradient([&](int e, int64_t b, int r) {
      return Gemm{CUBLAS_OP_N,
                  CUBLAS_OP_T,
                  static_cast<int>(up),
                  static_cast<int>(m),
                  r,
                  g.dhu + b * up,
                  static_cast<int>(up),
                  cur_->x + b * m,
                  static_cast<int>(m),
                  w_.gwup + e * m * up,
                  static_cast<int>(up)};
    }));
    // dX = dHU · Wupᵀ (rows x M), in the storage type, then widened.
    T* dx_gemm = nullptr;
    if constexpr (kConverts) {
      dx_gemm = g.dx16;
    } else {
      dx_gemm = dx;
    }
    MOE_RETURN_IF_ERROR(Grouped(
        [&](int e, int64_t b, int r) {
          return Gemm{CUBLAS_OP_T,          CUBLAS_OP_N,
                      static_cast<int>(m),  r,
                      static_cast<int>(up), w_.wup + e * m * up,
                      static_cast<int>(up), g.dhu + b * up,
                      static_cast<int>(up), dx_gemm + b * m,
                      static_cast<int>(m)};
        },
        0.0f));
    if constexpr (!std::is_same_v<T, float>) {
      ConvertKernel<T, float>
          <<<GridFor(cur_->rows * m), kRowThreads, 0, stream_>>>(dx_gemm, dx, cur_->rows * m);
    }
    return CudaCheck(cudaGetLastError(), "GroupedFfn::Backward kernel launch");
  }

  Status AddGradients(std::span<FfnParams> grads) override {
    if (static_cast<int>(grads.size()) != experts_) {
      return InvalidArgument("GroupedFfn::AddGradients: " + std::to_string(grads.size()) +
                             " experts given, the object holds " + std::to_string(experts_));
    }
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "cudaSetDevice"));
    const int64_t m = shape_.model_dim, h = shape_.hidden_dim, up = UpCols();
    staging_.resize(static_cast<size_t>(experts_ * m * up));
    MOE_RETURN_IF_ERROR(Download(staging_.data(), w_.gwup,
                                 static_cast<int64_t>(staging_.size() * sizeof(float))));
    for (int e = 0; e < experts_; ++e) {
      FfnParams& g = grads[static_cast<size_t>(e)];
      const float* src = staging_.data() + e * m * up;
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t c = 0; c < h; ++c) g.w1(i, c) += src[i * up + c];
        if (shape_.swiglu) {
          for (int64_t c = 0; c < h; ++c) g.w3(i, c) += src[i * up + h + c];
        }
      }
    }
    auto add_blocks = [&](const float* from, int64_t per_expert,
                          Tensor FfnParams::*pick) -> Status {
      staging_.resize(static_cast<size_t>(experts_ * per_expert));
      MOE_RETURN_IF_ERROR(Download(staging_.data(), from,
                                   static_cast<int64_t>(staging_.size() * sizeof(float))));
      for (int e = 0; e < experts_; ++e) {
        Tensor& t = grads[static_cast<size_t>(e)].*pick;
        const float* src = staging_.data() + e * per_expert;
        for (int64_t i = 0; i < per_expert; ++i) t[i] += src[i];
      }
      return Status::Ok();
    };
    MOE_RETURN_IF_ERROR(add_blocks(w_.gw2, h * m, &FfnParams::w2));
    if (shape_.bias) {
      MOE_RETURN_IF_ERROR(add_blocks(w_.gb1, h, &FfnParams::b1));
      MOE_RETURN_IF_ERROR(add_blocks(w_.gb2, m, &FfnParams::b2));
    }
    return ZeroGradients();
  }

  Status Upload(void* device_dst, const void* host_src, int64_t bytes) override {
    if (bytes == 0) return Status::Ok();
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "cudaSetDevice"));
    MOE_RETURN_IF_ERROR(CudaCheck(cudaMemcpyAsync(device_dst, host_src, static_cast<size_t>(bytes),
                                                  cudaMemcpyHostToDevice, stream_),
                                  "host-to-device copy"));
    return CudaCheck(cudaStreamSynchronize(stream_),
                     "cudaStreamSynchronize after a host-to-device copy");
  }

  Status Download(void* host_dst, const void* device_src, int64_t bytes) override {
    if (bytes == 0) return Status::Ok();
    MOE_RETURN_IF_ERROR(CudaCheck(cudaSetDevice(device_), "cudaSetDevice"));
    MOE_RETURN_IF_ERROR(CudaCheck(cudaMemcpyAsync(host_dst, device_src, static_cast<size_t>(bytes),
                                                  cudaMemcpyDeviceToHost, stream_),
                                  "device-to-host copy"));
    return CudaCheck(cudaStreamSynchronize(stream_),
                     "cudaStreamSynchronize after a device-to-host copy");
  }

 private:
  // bf16 storage: fp32 operands are converted before and results widened after the GEMMs.
  static constexpr bool kConverts = !std::is_same_v<T, float>;

  struct Weights {
    T *wup = nullptr, *w2 = nullptr;           // storage type
    float *b1 = nullptr, *b2 = nullptr;        // biases (fp32)
    float *gwup = nullptr, *gw2 = nullptr, *gb1 = nullptr, *gb2 = nullptr;  // gradients (fp32)
  };
  struct PartArrays {
    int64_t* offsets = nullptr;  // the part's row offsets (L + 1)
    T *x16 = nullptr, *hu = nullptr, *a = nullptr;
  };
  struct BackwardArrays {
    T *dy16 = nullptr, *da = nullptr, *dhu = nullptr, *dx16 = nullptr;
  };
  // What one part's Forward keeps for its Backward.
  struct Part {
    std::vector<int64_t> offsets;
    int64_t rows = 0;
    bool forwarded = false;
    Workspace memory{MemorySpace::kDevice};  // carved into `arrays` by the part's Forward
    PartArrays arrays;
    const T* x = nullptr;  // the GEMM operand X: the caller's x (fp32) or arrays.x16
  };

  Status SelectPart(const char* what, int part) {
    if (part < 0 || part >= kMaxParts) {
      return InvalidArgument(std::string("GroupedFfn::") + what + ": part " + std::to_string(part) +
                             " not in [0, " + std::to_string(kMaxParts) + ")");
    }
    cur_ = &parts_[static_cast<size_t>(part)];
    return Status::Ok();
  }

  int64_t UpCols() const { return shape_.swiglu ? 2 * shape_.hidden_dim : shape_.hidden_dim; }

  // What a part's Forward keeps for its Backward, for `rows` rows: the row offsets, the input in
  // the storage type (bf16 only), the up projection and the activation.
  auto PartLayout(int64_t rows) const {
    const int64_t x16 = kConverts ? rows * shape_.model_dim : 0, l = experts_ + 1,
                  up = UpCols(), h = shape_.hidden_dim;
    return [=](Carver& c) {
      return PartArrays{c.Take<int64_t>(l), c.Take<T>(x16), c.Take<T>(rows * up),
                        c.Take<T>(rows * h)};
    };
  }
  // A Backward's scratch: dy and dx in the storage type (bf16 only), dA and dHU.
  auto BackwardLayout(int64_t rows) const {
    const int64_t converted = kConverts ? rows * shape_.model_dim : 0, up = UpCols(),
                  h = shape_.hidden_dim;
    return [=](Carver& c) {
      return BackwardArrays{c.Take<T>(converted), c.Take<T>(rows * h), c.Take<T>(rows * up),
                            c.Take<T>(converted)};
    };
  }

  // An fp32 rows x M operand in the storage type: `in` itself (fp32), or converted into `staging`.
  const T* GemmInput(const float* in, T* staging) {
    if constexpr (!kConverts) {
      return in;
    } else {
      const int64_t n = cur_->rows * shape_.model_dim;
      ConvertKernel<float, T><<<GridFor(n), kRowThreads, 0, stream_>>>(in, staging, n);
      return staging;
    }
  }

  // One grouped GEMM over the non-empty experts; make(e, first_row, rows) describes expert e's.
  template <typename Make>
  Status Grouped(Make make, float beta) {
    gemms_.clear();
    for (int e = 0; e < experts_; ++e) {
      const int64_t b = cur_->offsets[static_cast<size_t>(e)],
                    r = cur_->offsets[static_cast<size_t>(e) + 1] - b;
      if (r > 0) gemms_.push_back(make(e, b, static_cast<int>(r)));
    }
    if (gemms_.empty()) return Status::Ok();
    const size_t n = gemms_.size();
    ta_.resize(n);
    tb_.resize(n);
    m_.resize(n);
    n_.resize(n);
    k_.resize(n);
    lda_.resize(n);
    ldb_.resize(n);
    ldc_.resize(n);
    alpha_.assign(n, 1.0f);
    beta_.assign(n, beta);
    group_size_.assign(n, 1);
    for (size_t i = 0; i < n; ++i) {
      const Gemm& g = gemms_[i];
      ta_[i] = g.ta;
      tb_[i] = g.tb;
      m_[i] = g.m;
      n_[i] = g.n;
      k_[i] = g.k;
      lda_[i] = g.lda;
      ldb_[i] = g.ldb;
      ldc_[i] = g.ldc;
    }
    MOE_ASSIGN_OR_RETURN(const void* const* ptrs, pointers_.Stage(gemms_, stream_));
    return CublasCheck(
        api_,
        api_.gemm_grouped_batched_ex(
            handle_, ta_.data(), tb_.data(), m_.data(), n_.data(), k_.data(), alpha_.data(), ptrs,
            kDataType<T>, lda_.data(), ptrs + n, kDataType<T>, ldb_.data(), beta_.data(),
            const_cast<void* const*>(ptrs + 2 * n), kDataType<T>, ldc_.data(), static_cast<int>(n),
            group_size_.data(), CUBLAS_COMPUTE_32F),
        "cublasGemmGroupedBatchedEx");
  }

  // C (fp32) += op(A) · op(B) per non-empty expert, A and B in the storage type.
  template <typename Make>
  Status WeightGradient(Make make) {
    const float one = 1.0f;
    for (int e = 0; e < experts_; ++e) {
      const int64_t b = cur_->offsets[static_cast<size_t>(e)],
                    r = cur_->offsets[static_cast<size_t>(e) + 1] - b;
      if (r == 0) continue;
      const Gemm g = make(e, b, static_cast<int>(r));
      MOE_RETURN_IF_ERROR(
          CublasCheck(api_,
                      api_.gemm_ex(handle_, g.ta, g.tb, g.m, g.n, g.k, &one, g.a, kDataType<T>,
                                   g.lda, g.b, kDataType<T>, g.ldb, &one, g.c, CUDA_R_32F, g.ldc,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                      "cublasGemmEx (weight gradient)"));
    }
    return Status::Ok();
  }

  template <typename E>
  void ColumnSums(const E* mat, int64_t ld, int cols, float* g) {
    const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>(experts_));
    ColumnSumKernel<E><<<grid, dim3(32, kSumLanes), 0, stream_>>>(
        mat, ld, cols, cur_->arrays.offsets, g);
  }

  // fp32 host values into device storage of type T.
  Status UploadAs(T* dst, const std::vector<float>& src) {
    const int64_t n = static_cast<int64_t>(src.size());
    if constexpr (std::is_same_v<T, float>) {
      return Upload(dst, src.data(), n * static_cast<int64_t>(sizeof(float)));
    } else {
      MOE_ASSIGN_OR_RETURN(void* staged, wstage_.Get(n * static_cast<int64_t>(sizeof(float))));
      float* const fp32 = static_cast<float*>(staged);
      MOE_RETURN_IF_ERROR(Upload(fp32, src.data(), n * static_cast<int64_t>(sizeof(float))));
      ConvertKernel<float, T><<<GridFor(n), kRowThreads, 0, stream_>>>(fp32, dst, n);
      return CudaCheck(cudaGetLastError(), "weight conversion kernel launch");
    }
  }

  Status ZeroGradients() {
    const int64_t l = experts_, m = shape_.model_dim, h = shape_.hidden_dim;
    using Grad = std::pair<float*, int64_t>;
    const std::array<Grad, 4> grads = {Grad(w_.gwup, l * m * UpCols()), Grad(w_.gw2, l * h * m),
                                       Grad(w_.gb1, shape_.bias ? l * h : 0),
                                       Grad(w_.gb2, shape_.bias ? l * m : 0)};
    for (auto [grad, n] : grads) {
      if (n == 0) continue;
      MOE_RETURN_IF_ERROR(CudaCheck(
          cudaMemsetAsync(grad, 0, static_cast<size_t>(n) * sizeof(float), stream_),
          "cudaMemsetAsync (gradients)"));
    }
    return Status::Ok();
  }

  const CublasApi& api_;
  FfnShape shape_;
  int experts_;
  int device_;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = true;
  cublasHandle_t handle_ = nullptr;
  PointerTable pointers_;
  bool have_weights_ = false;

  // Device memory (base/memory.h): the weights and gradients carved once at Init, each
  // part's forward activations per Forward (Part::memory), the backward's per Backward; y16_ and
  // wstage_ are bf16 staging (the forward's output before widening, fp32 weights before narrowing).
  Workspace weights_, backward_, y16_, wstage_;
  Weights w_;
  std::array<Part, kMaxParts> parts_;  // forward activations, per part
  Part* cur_ = &parts_[0];             // the part of the running call
  std::vector<float> staging_;

  // Grouped-call argument arrays (host), reused.
  std::vector<Gemm> gemms_;
  std::vector<cublasOperation_t> ta_, tb_;
  std::vector<int> m_, n_, k_, lda_, ldb_, ldc_, group_size_;
  std::vector<float> alpha_, beta_;
};

template <typename T>
StatusOr<std::unique_ptr<GroupedFfn>> MakeGroupedFfn(const FfnShape& shape, int num_experts,
                                                     int device, cudaStream_t stream,
                                                     MemoryResource* memory) {
  MOE_ASSIGN_OR_RETURN(const CublasApi* api, Cublas());
  auto ffn =
      std::make_unique<CudaGroupedFfn<T>>(*api, shape, num_experts, device, stream, memory);
  MOE_RETURN_IF_ERROR(ffn->Init());
  return std::unique_ptr<GroupedFfn>(std::move(ffn));
}

}  // namespace

StatusOr<std::unique_ptr<GroupedFfn>> GroupedFfn::Create(const FfnShape& shape, int num_experts,
                                                         Precision precision, int device,
                                                         void* stream, MemoryResource* memory) {
  if (num_experts < 1 || shape.model_dim < 1 || shape.hidden_dim < 1) {
    return InvalidArgument("GroupedFfn: num_experts, model_dim and hidden_dim must be >= 1 (got " +
                           std::to_string(num_experts) + ", " + std::to_string(shape.model_dim) +
                           ", " + std::to_string(shape.hidden_dim) + ")");
  }
  if (precision == Precision::kBfloat16 &&
      (shape.model_dim % kBf16Multiple != 0 || shape.hidden_dim % kBf16Multiple != 0)) {
    return InvalidArgument("GroupedFfn: bf16 experts need model_dim and hidden_dim multiples of " +
                           std::to_string(kBf16Multiple) + " (got " +
                           std::to_string(shape.model_dim) + " and " +
                           std::to_string(shape.hidden_dim) +
                           "): each expert's rows must start 16-byte aligned for cuBLAS");
  }
  if (memory == nullptr) memory = DefaultResource(MemorySpace::kDevice);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    return FailedPrecondition("GroupedFfn: no CUDA device is visible to this process");
  }
  if (device < 0 || device >= count) {
    return InvalidArgument("GroupedFfn: device " + std::to_string(device) + " not in [0, " +
                           std::to_string(count) + ")");
  }
  auto s = static_cast<cudaStream_t>(stream);
  if (precision == Precision::kBfloat16) {
    return MakeGroupedFfn<bf16>(shape, num_experts, device, s, memory);
  }
  return MakeGroupedFfn<float>(shape, num_experts, device, s, memory);
}

}  // namespace moe::experts::cuda
