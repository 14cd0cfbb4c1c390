// moe_gpu_bench: the GPU stages of the MoE layer against baselines measured in the same run.
// A benchmark, not a test: it prints ratios and asserts nothing (it does check that every output
// element was written and finite, and fails with exit code 1 otherwise).
//
//   permute     the CUDA device's GatherRows (S·k rows of M fp32) and CombineRows (gated sum into
//               S rows): bytes read + written per second ÷ those of a device-to-device cudaMemcpy
//               of the gathered size (counted the same way);
//   experts     GroupedFfn forward, and forward + backward, over E experts with S·k/E rows each
//               (bf16 and fp32) ÷ dense cuBLAS GEMMs of the same FLOPs on the same precision
//               (the forward's two GEMMs, the backward's four; one GEMM each over all rows);
//               TFLOP/s of both.
// Timing: the shared loop of comm/bench/bench_loop.h — each case warmed up, then run --iters times
// with a device synchronization around each run (host clock); the median is reported. Inputs are random (never zeros); outputs are
// poisoned with NaN before the first run.
//
//   moe_gpu_bench [--tokens 16384] [--model 2048] [--hidden 8192] [--experts 8] [--topk 2]
//                 [--iters 20]
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "comm/bench/bench_loop.h"
#include "experts/cuda/grouped_ffn.h"
#include "runtime/config/flags.h"
#include "base/clock.h"
#include "runtime/device/cuda/permute.h"

namespace {

using moe::Status;

struct Flags {
  int64_t tokens = 16384, model = 2048, hidden = 8192;
  int experts = 8, topk = 2, iters = 20;
};

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "moe_gpu_bench: %s\n", what.c_str());
  std::exit(1);
}
void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) Die(std::string(what) + ": " + cudaGetErrorString(e));
}
void Check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) Die(std::string(what) + ": " + cublasGetStatusString(s));
}
void Check(const Status& s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.ToString());
}

// Device memory, freed at exit of scope.
struct Device {
  void* p = nullptr;
  explicit Device(size_t bytes) { Check(cudaMalloc(&p, bytes), "cudaMalloc"); }
  ~Device() { cudaFree(p); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

template <typename T>
void Upload(const Device& d, const std::vector<T>& v) {
  Check(cudaMemcpy(d.p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
}

std::vector<float> Random(int64_t n, uint64_t seed, float scale) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(g);
  return v;
}

// Median seconds of f() in the shared timing loop (comm/bench/bench_loop.h: 3 warm-up runs, then
// `iters` runs timed one by one), each run between two device synchronizations.
double Median(int iters, const std::function<void()>& f) {
  auto timing = moe::comm::bench::TimeCalls(3, iters, [&] {
    Check(cudaDeviceSynchronize(), "sync");
    f();
    Check(cudaDeviceSynchronize(), "sync");
    return Status::Ok();
  });
  Check(timing.status(), "timing loop");
  return timing->median_us * 1e-6;
}

void ExpectWritten(const Device& d, int64_t n, const char* what) {
  std::vector<float> v(static_cast<size_t>(n));
  Check(cudaMemcpy(v.data(), d.p, v.size() * sizeof(float), cudaMemcpyDeviceToHost), "download");
  for (float x : v) {
    if (!std::isfinite(x))
      Die(std::string(what) + ": an output element was not written (or is not finite)");
  }
}

void Poison(const Device& d, int64_t n) {
  Upload(d, std::vector<float>(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN()));
}

// ---- permute ---------------------------------------------------------------------------------

void BenchPermute(const Flags& f) {
  const int64_t s = f.tokens, m = f.model, k = f.topk, rows = s * k;
  // Random top-k experts per token (distinct), rows in expert-major order.
  std::mt19937_64 g(7);
  std::vector<std::vector<int32_t>> by_expert(static_cast<size_t>(f.experts));
  std::vector<int32_t> pick(static_cast<size_t>(f.experts));
  for (int64_t t = 0; t < s; ++t) {
    for (int e = 0; e < f.experts; ++e) pick[static_cast<size_t>(e)] = e;
    std::shuffle(pick.begin(), pick.end(), g);
    for (int64_t j = 0; j < k; ++j)
      by_expert[static_cast<size_t>(pick[static_cast<size_t>(j)])].push_back(
          static_cast<int32_t>(t));
  }
  std::vector<int32_t> row_token, token_rows(static_cast<size_t>(rows));
  for (const auto& v : by_expert) row_token.insert(row_token.end(), v.begin(), v.end());
  std::vector<int64_t> offset(static_cast<size_t>(s + 1), 0);
  for (int32_t t : row_token) ++offset[static_cast<size_t>(t) + 1];
  for (int64_t t = 0; t < s; ++t)
    offset[static_cast<size_t>(t + 1)] += offset[static_cast<size_t>(t)];
  std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
  for (int64_t r = 0; r < rows; ++r)
    token_rows[static_cast<size_t>(
        fill[static_cast<size_t>(row_token[static_cast<size_t>(r)])]++)] = static_cast<int32_t>(r);
  const std::vector<float> gates = Random(rows, 3, 1.0f);

  Device d_row_token(rows * 4), d_token_rows(rows * 4), d_offset((s + 1) * 8), d_gate(rows * 4);
  Upload(d_row_token, row_token);
  Upload(d_token_rows, token_rows);
  Upload(d_offset, offset);
  Upload(d_gate, gates);
  const moe::PlanRows plan{rows,
                           s,
                           d_row_token.as<int32_t>(),
                           d_gate.as<float>(),
                           d_offset.as<int64_t>(),
                           d_token_rows.as<int32_t>()};
  Device x(s * m * 4), packed(rows * m * 4), out(s * m * 4), copy(rows * m * 4);
  Upload(x, Random(s * m, 1, 1.0f));
  Poison(packed, rows * m);
  // CombineRows adds into its output (y += Σ gate · row): it starts from zeros, not poison.
  Check(cudaMemset(out.p, 0, s * m * 4), "cudaMemset");

  const double t_copy = Median(f.iters, [&] {
    Check(cudaMemcpyAsync(copy.p, packed.p, rows * m * 4, cudaMemcpyDeviceToDevice, nullptr),
          "memcpy");
  });
  const double t_gather = Median(f.iters, [&] {
    Check(moe::gpu::GatherRows({.rows = rows,
                                .cols = m,
                                .src_row = plan.row_token,
                                .src = x.as<float>(),
                                .dst = packed.as<float>(),
                                .src_rows = s,
                                .dst_rows = rows},
                               nullptr),
          "GatherRows");
  });
  const double t_combine = Median(f.iters, [&] {
    Check(moe::gpu::CombineRows({.cols = m,
                                 .plan = plan,
                                 .returned = {.rows = packed.as<float>(), .num_rows = rows},
                                 .gated = true,
                                 .y = out.as<float>()},
                                nullptr),
          "CombineRows");
  });
  ExpectWritten(packed, rows * m, "GatherRows");
  ExpectWritten(out, s * m, "CombineRows");
  const double copy_bw = 2.0 * rows * m * 4 / t_copy;          // read + write
  const double gather_bw = 2.0 * rows * m * 4 / t_gather;      // read x rows + write packed
  const double combine_bw = (rows + 2 * s) * m * 4.0 / t_combine;  // read packed and out, write out
  std::printf("# permute: S=%lld M=%lld k=%lld rows=%lld (fp32)\n", static_cast<long long>(s),
              static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(rows));
  std::printf("%-28s %10s %10s %14s\n", "stage", "ms", "GB/s", "ratio_vs_memcpy");
  std::printf("%-28s %10.3f %10.1f %14s\n", "cudaMemcpy D2D", t_copy * 1e3, copy_bw / 1e9, "1.00");
  std::printf("%-28s %10.3f %10.1f %14.2f\n", "GatherRows (gather)", t_gather * 1e3,
              gather_bw / 1e9, gather_bw / copy_bw);
  std::printf("%-28s %10.3f %10.1f %14.2f\n", "CombineRows (combine)", t_combine * 1e3,
              combine_bw / 1e9, combine_bw / copy_bw);
}

// ---- experts ---------------------------------------------------------------------------------

void BenchExperts(const Flags& f, moe::experts::cuda::Precision precision) {
  using moe::experts::cuda::GroupedFfn;
  const int64_t m = f.model, h = f.hidden, e = f.experts, rows = f.tokens * f.topk;
  const moe::experts::FfnShape shape{m, h, moe::experts::Activation::kGeluTanh, false, false};
  auto ffn_or = GroupedFfn::Create(shape, static_cast<int>(e), precision, 0);
  Check(ffn_or.status(), "GroupedFfn::Create");
  GroupedFfn& ffn = **ffn_or;
  std::vector<moe::experts::FfnParams> params(static_cast<size_t>(e),
                                              moe::experts::FfnParams::Zeros(shape));
  uint64_t seed = 10;
  for (auto& p : params) {
    p.w1.vec() = Random(m * h, seed++, 1.0f / std::sqrt(static_cast<float>(m)));
    p.w2.vec() = Random(h * m, seed++, 1.0f / std::sqrt(static_cast<float>(h)));
  }
  Check(ffn.SetWeights(params), "SetWeights");
  std::vector<int64_t> offsets(static_cast<size_t>(e + 1));
  for (int64_t i = 0; i <= e; ++i) offsets[static_cast<size_t>(i)] = rows * i / e;
  Device x(rows * m * 4), y(rows * m * 4), dy(rows * m * 4), dx(rows * m * 4);
  Upload(x, Random(rows * m, 1, 1.0f));
  Upload(dy, Random(rows * m, 2, 1.0f));
  Poison(y, rows * m);
  Poison(dx, rows * m);
  const double t_fwd = Median(
      f.iters, [&] { Check(ffn.Forward(offsets, x.as<float>(), y.as<float>()), "Forward"); });
  const double t_fwd_bwd = Median(f.iters, [&] {
    Check(ffn.Forward(offsets, x.as<float>(), y.as<float>()), "Forward");
    Check(ffn.Backward(dy.as<float>(), dx.as<float>()), "Backward");
  });
  ExpectWritten(y, rows * m, "GroupedFfn::Forward");
  ExpectWritten(dx, rows * m, "GroupedFfn::Backward");

  // Dense baseline: GEMMs over all rows at once, in the same storage type (fp32 accumulate).
  const bool bf16 = precision == moe::experts::cuda::Precision::kBfloat16;
  const cudaDataType_t type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const size_t es = bf16 ? 2 : 4;
  Device a(rows * m * es), w_up(m * h * es), hid(rows * h * es), w_dn(h * m * es),
      out(rows * m * es), gw(m * h * 4);
  // Random operands (converted on the device to bf16 where needed through the fp32 buffers).
  auto fill = [&](const Device& d, int64_t n, uint64_t s) {
    const std::vector<float> v = Random(n, s, 0.5f);
    if (!bf16) return Upload(d, v);
    std::vector<__nv_bfloat16> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = __float2bfloat16(v[i]);
    Upload(d, b);
  };
  fill(a, rows * m, 3);
  fill(w_up, m * h, 4);
  fill(hid, rows * h, 5);
  fill(w_dn, h * m, 6);
  cublasHandle_t handle;
  Check(cublasCreate(&handle), "cublasCreate");
  const float one = 1.0f, zero = 0.0f;
  auto gemm = [&](cublasOperation_t ta, cublasOperation_t tb, int64_t mm, int64_t nn, int64_t kk,
                  const void* pa, int64_t lda, const void* pb, int64_t ldb, void* pc, int64_t ldc,
                  cudaDataType_t ctype) {
    Check(cublasGemmEx(handle, ta, tb, static_cast<int>(mm), static_cast<int>(nn),
                       static_cast<int>(kk), &one, pa, type, static_cast<int>(lda), pb, type,
                       static_cast<int>(ldb), &zero, pc, ctype, static_cast<int>(ldc),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  };
  // Forward: H = X·Wup (rows x h), Y = H·Wdn (rows x m), row-major as in GroupedFfn.
  auto dense_fwd = [&] {
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, h, rows, m, w_up.p, h, a.p, m, hid.p, h, type);
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, m, rows, h, w_dn.p, m, hid.p, h, out.p, m, type);
  };
  // Backward: dWdn = Hᵀ·dY, dH = dY·Wdnᵀ, dWup = Xᵀ·dH, dX = dH·Wupᵀ (weight grads in fp32).
  auto dense_bwd = [&] {
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, m, h, rows, out.p, m, hid.p, h, gw.p, m, CUDA_R_32F);
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, h, rows, m, w_dn.p, m, out.p, m, hid.p, h, type);
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, h, m, rows, hid.p, h, a.p, m, gw.p, h, CUDA_R_32F);
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, m, rows, h, w_up.p, h, hid.p, h, a.p, m, type);
  };
  const double d_fwd = Median(f.iters, dense_fwd);
  const double d_fwd_bwd = Median(f.iters, [&] {
    dense_fwd();
    dense_bwd();
  });
  cublasDestroy(handle);
  const double flop_fwd = 2.0 * 2.0 * rows * m * h, flop_fwd_bwd = 3.0 * flop_fwd;
  std::printf("# experts (%s): E=%lld, %lld rows each, M=%lld H=%lld, GELU, no bias\n",
              moe::experts::cuda::PrecisionName(precision), static_cast<long long>(e),
              static_cast<long long>(rows / e), static_cast<long long>(m),
              static_cast<long long>(h));
  std::printf("%-28s %10s %10s %10s %10s %14s\n", "pass", "ms", "TFLOP/s", "dense_ms", "dense_TF/s",
              "ratio_vs_dense");
  std::printf("%-28s %10.3f %10.1f %10.3f %10.1f %14.2f\n", "forward", t_fwd * 1e3,
              flop_fwd / t_fwd / 1e12, d_fwd * 1e3, flop_fwd / d_fwd / 1e12, d_fwd / t_fwd);
  std::printf("%-28s %10.3f %10.1f %10.3f %10.1f %14.2f\n", "forward+backward", t_fwd_bwd * 1e3,
              flop_fwd_bwd / t_fwd_bwd / 1e12, d_fwd_bwd * 1e3, flop_fwd_bwd / d_fwd_bwd / 1e12,
              d_fwd_bwd / t_fwd_bwd);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "GPU stages of the MoE layer against same-run baselines (cudaMemcpy, dense cuBLAS GEMMs)."};
  Flags f;
  app.add_option("--tokens", f.tokens, "S tokens")->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  app.add_option("--model", f.model, "M")->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
  app.add_option("--hidden", f.hidden, "H of each expert")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 17));
  app.add_option("--experts", f.experts, "E")->check(CLI::Range(1, 4096));
  app.add_option("--topk", f.topk, "k")->check(CLI::Range(1, 64));
  app.add_option("--iters", f.iters, "timed runs per case (median)")->check(CLI::Range(1, 100000));
  if (const int rc = moe::flags::ParseFlags(app, argc, argv); rc >= 0) return rc;
  if (f.topk > f.experts) Die("--topk must be <= --experts");
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) Die("no CUDA device is visible");
  cudaDeviceProp prop{};
  Check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("# moe_gpu_bench on %s (%d SMs, %.0f GiB), median of %d runs each\n", prop.name,
              prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0, f.iters);
  BenchPermute(f);
  BenchExperts(f, moe::experts::cuda::Precision::kBfloat16);
  BenchExperts(f, moe::experts::cuda::Precision::kFloat32);
  return 0;
}
