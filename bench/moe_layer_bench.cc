// moe_layer_bench: forward + backward time of one MoE layer on CPU against (a) the expert GEMMs
// alone (same shapes, same rows per expert) and (b) a PyTorch implementation of the same layer,
// timed in the same run (bench/torch_layer_bench.py, through /usr/bin/python3 when present).
// A benchmark, not a test: it reports ratios and asserts nothing.
// --device cuda runs the layer on the CUDA device (runtime/layer/moe_layer.h over
// runtime/device/cuda/cuda_device.h: inputs, outputs, weights and gradients on the GPU) against the
// PyTorch layer on the same GPU, forward and fwd+bwd, and also the staged layer (the layer on the
// host device with only the experts on the GPU, rows travel each call) as a baseline; the GEMM
// column is then not measured.
#include <CLI/CLI.hpp>
#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_json.h"
#include "bench/layer_shapes.h"
#include "comm/bench/bench_loop.h"
#include "experts/cpu/blas.h"
#include "runtime/config/flags.h"
#include "base/memory.h"
#include "base/clock.h"
#include "base/rng.h"
#include "runtime/config/config.h"
#include "bench/staged_gpu_experts.h"
#include "runtime/device/compute.h"
#include "runtime/device/host_device.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/layer/make_moe_layer.h"
#include "runtime/layer/moe_layer.h"

namespace {

using Shape = moe::bench::LayerShape;


// f() in the shared timing loop (comm/bench/bench_loop.h): one warm-up call, then `iters` calls
// timed one by one.
template <typename F>
moe::comm::bench::Timing Time(int iters, F&& f) {
  auto timing = moe::comm::bench::TimeCalls(1, iters, [&] {
    f();
    return moe::Status::Ok();
  });
  MOE_CHECK_OK(timing.status());
  return *timing;
}

// The median seconds of f() in that loop (what the tables print).
template <typename F>
double MedianSeconds(int iters, F&& f) {
  return Time(iters, std::forward<F>(f)).median_us * 1e-6;
}

// -J: one BenchResult JSON line per measurement (bench/bench_json.h), beside its baseline.
struct JsonRows {
  std::ofstream out;
  void Add(const std::string& op, const Shape& sh, const moe::comm::bench::Timing& t,
           const std::string& baseline, double baseline_us) {
    if (!out.is_open()) return;
    moe::comm::bench::BenchRow row;
    row.op = op + "/" + sh.name;
    row.backend = "local";
    row.ranks = 1;
    row.count = sh.s;
    row.bytes = static_cast<int64_t>(sh.s) * sh.m * 4;
    row.dtype = "float32";
    moe::comm::bench::SetTiming(&row, t);
    row.baseline = baseline;
    row.baseline_time_us = baseline_us;
    MOE_CHECK_OK(moe::WriteBenchJson(out, row));
  }
};

moe::config::LayerConfig MakeConfig(const Shape& sh) { return moe::bench::LayerShapeConfig(sh); }

struct TorchTimes {
  double fwd_ms = -1, fwd_bwd_ms = -1;  // < 0: unavailable
};

// PyTorch timing of the same shape (medians of forward and of fwd+bwd).
TorchTimes TorchMs(const std::string& python, const std::string& script, const Shape& sh,
                   int iters, const std::string& device, const std::string& precision) {
  const std::string cmd = "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 " + python + " " + script +
                          " --s " + std::to_string(sh.s) + " --m " + std::to_string(sh.m) +
                          " --h " + std::to_string(sh.h) + " --e " + std::to_string(sh.e) +
                          " --k " + std::to_string(sh.k) + " --iters " + std::to_string(iters) +
                          " --device " + device + " --dtype " + precision + " 2>/dev/null";
  TorchTimes t;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return t;
  char buf[256] = {0};
  if (std::fgets(buf, sizeof(buf), p) == nullptr ||
      std::sscanf(buf, "%lf %lf", &t.fwd_ms, &t.fwd_bwd_ms) != 2) {
    t = TorchTimes();
  }
  if (pclose(p) != 0) t = TorchTimes();
  return t;
}

std::string Ratio(double baseline_ms, double ours_ms) {
  if (baseline_ms <= 0 || ours_ms <= 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2fx", baseline_ms / ours_ms);
  return buf;
}

std::string Ms(double ms) {
  if (ms <= 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", ms);
  return buf;
}

void FillInputs(moe::Tensor* x, moe::Tensor* dy) {
  for (int64_t i = 0; i < x->size(); ++i) {
    (*x)[i] = moe::CounterNormal(9, 0, static_cast<uint64_t>(i), moe::RngStream::kInit);
    (*dy)[i] = moe::CounterNormal(10, 0, static_cast<uint64_t>(i), moe::RngStream::kInit);
  }
}

// --device cuda: the device-resident layer (forward, fwd+bwd) and the staged layer (fwd+bwd)
// against PyTorch on the same GPU. Returns the process exit code.
int RunCuda(const std::vector<Shape>& shapes, const std::string& only, int iters, bool no_torch,
            const std::string& python, const std::string& torch_script,
            const moe::config::ComputeConfig& compute, const std::string& precision,
            bool host_routing) {
  std::printf("# routing on the %s\n", host_routing ? "host (--host-routing)" : "device");
  std::printf("# %-12s %5s %4s %5s %3s %2s | %9s %9s %9s %9s | %9s %9s %9s %9s | %9s %9s\n",
              "shape", "S", "M", "H", "E", "k", "fwd ms", "f+b ms", "host ms", "staged", "torch fwd",
              "torch f+b", "fwd x", "f+b x", "staged x", "f+b/stgd");
  for (const Shape& sh : shapes) {
    if (!only.empty() && sh.name != only) continue;
    const auto cfg = MakeConfig(sh);
    auto made = moe::MakeMoeLayer(cfg, compute, {.host_routing = host_routing});
    if (!made.ok()) {
      std::fprintf(stderr, "moe_layer_bench: %s\n", made.status().ToString().c_str());
      return 1;
    }
    moe::MoeLayer& layer = **made;
    moe::MoeLayerParams params = moe::MakeLayerParams(cfg);
    moe::InitLayerParams(cfg, 1, &params);
    MOE_CHECK_OK(layer.SetParams(params));
    moe::Tensor x(sh.s, sh.m), dy(sh.s, sh.m), y, dx;
    FillInputs(&x, &dy);
    const int64_t bytes = x.size() * static_cast<int64_t>(sizeof(float));
    const auto dev = moe::MemorySpace::kDevice;
    auto checked = [](moe::StatusOr<moe::Buffer> b) {
      MOE_CHECK_OK(b.status());
      return std::move(b).value();
    };
    moe::Buffer x_dev = checked(moe::Buffer::FromHost(dev, x.data(), bytes)),
                      dy_dev = checked(moe::Buffer::FromHost(dev, dy.data(), bytes)),
                      y_dev = checked(moe::Buffer::Allocate(dev, bytes)),
                      dx_dev = checked(moe::Buffer::Allocate(dev, bytes));
    moe::RouteContext ctx;
    ctx.train = true;
    const double fwd = MedianSeconds(iters, [&] {
      MOE_CHECK_OK(layer.Forward(x_dev.as<float>(), sh.s, ctx, y_dev.as<float>()));
      MOE_CHECK_OK(layer.Synchronize());
    });
    const double fwd_bwd = MedianSeconds(iters, [&] {
      MOE_CHECK_OK(layer.Forward(x_dev.as<float>(), sh.s, ctx, y_dev.as<float>()));
      MOE_CHECK_OK(layer.Backward(dy_dev.as<float>(), dx_dev.as<float>(), nullptr));
      MOE_CHECK_OK(layer.Synchronize());
    });
    // The staged layer: host tensors, experts on the GPU.
    auto experts = moe::MakeStagedExpertCompute(moe::ExpertShape(cfg), sh.e, compute, 0);
    MOE_CHECK_OK(experts.status());
    const auto host = std::make_shared<moe::HostDevice>();
    moe::MoeLayer staged(cfg, host,
                         std::make_unique<moe::LocalExpertExecutor>(
                             host.get(), moe::ExpertShape(cfg), sh.e, moe::ExchangeOptions{},
                             std::move(experts).value()),
                         0, sh.e);
    staged.params() = params;
    moe::MoeLayerParams grads = moe::MakeLayerParams(cfg);
    const double staged_s = MedianSeconds(iters, [&] {
      MOE_CHECK_OK(staged.Forward(x.view(), ctx, &y));
      MOE_CHECK_OK(staged.Backward(dy.view(), &dx, &grads));
    });
    const TorchTimes torch =
        no_torch ? TorchTimes() : TorchMs(python, torch_script, sh, iters, "cuda", precision);
    std::printf(
        "  %-12s %5d %4d %5d %3d %2d | %9.3f %9.3f %9.3f %9.3f | %9s %9s %9s %9s | %9s %9s\n",
        sh.name.c_str(), sh.s, sh.m, sh.h, sh.e, sh.k, fwd * 1e3, fwd_bwd * 1e3,
        layer.host_seconds() * 1e3, staged_s * 1e3, Ms(torch.fwd_ms).c_str(), Ms(torch.fwd_bwd_ms).c_str(),
                Ratio(torch.fwd_ms, fwd * 1e3).c_str(), Ratio(torch.fwd_bwd_ms, fwd_bwd * 1e3).c_str(),
                Ratio(torch.fwd_bwd_ms, staged_s * 1e3).c_str(),
                Ratio(staged_s * 1e3, fwd_bwd * 1e3).c_str());
    std::fflush(stdout);
  }
  std::printf(
      "# x = PyTorch ms / ours ms (> 1: ours faster); f+b/stgd = staged ms / resident ms; host ms "
      "= the resident layer's host work per fwd+bwd (in f+b ms): routing on the host, or launching the "
      "device router and finishing its counts and losses\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"MoE layer forward+backward benchmark (CPU, one thread by default)."};
  int iters = 5, threads = 1;
  std::string torch_script = "bench/torch_layer_bench.py";
  bool no_torch = false, host_routing = false;
  std::string only, python = "/usr/bin/python3";
  moe::flags::ComputeFlags flags{"cpu", "fp32"};
  app.add_option("-n,--iters", iters, "timed iterations (median reported)")->check(CLI::Range(1, 1000));
  app.add_option("--threads", threads, "OpenBLAS threads")->check(CLI::Range(1, 256));
  app.add_option("--torch-script", torch_script, "PyTorch baseline script");
  app.add_flag("--no-torch", no_torch, "skip the PyTorch baseline");
  app.add_option("--shape", only, "run only this shape (CPU: small, medium, fine-grained; cuda: small, large, fine-grained)");
  moe::flags::AddComputeFlags(app, &flags);
  app.add_option("--python", python, "Python with torch for the baseline");
  std::string json_path;
  app.add_option("-J,--json", json_path, "CPU: write one JSON line (BenchResult) per measurement");
  app.add_flag("--host-routing", host_routing,
               "--device cuda: route on the host (the CPU plan) instead of on the device");
  if (const int rc = moe::flags::ParseFlags(app, argc, argv); rc >= 0) return rc;
  moe::blas::SetThreads(threads);
  if (std::getenv("MOE_BENCH_NO_MMAP")) { mallopt(M_MMAP_THRESHOLD, 1 << 30); mallopt(M_TRIM_THRESHOLD, 1 << 30); }
  const std::string& device = flags.device;
  const std::string& precision = flags.precision;
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  std::printf("# moe_layer_bench: OpenBLAS core %s (OPENBLAS_CORETYPE=%s), threads=%d, experts on %s (%s), GELU FFN\n",
              moe::blas::CoreName(), coretype ? coretype : "unset", moe::blas::GetThreads(), device.c_str(),
              precision.c_str());
  moe::config::ComputeConfig compute;
  moe::flags::ApplyComputeFlags(flags, &compute);
  if (const moe::Status s = moe::ValidateCompute(compute); !s.ok()) {
    std::fprintf(stderr, "moe_layer_bench: --device/--precision: %s\n", s.message().c_str());
    return 2;
  }
  if (device == "cuda") {
    const std::vector<Shape> gpu_shapes = {{"small", 1024, 256, 1024, 8, 2},
                                           {"large", 8192, 1024, 4096, 8, 2},
                                           {"fine-grained", 8192, 1024, 512, 64, 6}};
    return RunCuda(gpu_shapes, only, iters, no_torch, python, torch_script, compute, precision,
                   host_routing);
  }
  JsonRows json;
  if (!json_path.empty()) {
    json.out.open(json_path, std::ios::out | std::ios::trunc);
    if (!json.out) {
      std::fprintf(stderr, "moe_layer_bench: -J %s: cannot open for writing\n", json_path.c_str());
      return 2;
    }
  }
  std::printf("# %-12s %5s %4s %5s %3s %2s | %9s %9s %9s | %9s %9s   (medians of %d calls)\n",
              "shape", "S", "M", "H", "E", "k", "ours ms", "gemm ms", "ours/gemm", "torch ms",
              "torch/ours", iters);
  for (const Shape& sh : moe::bench::CpuLayerShapes()) {
    if (!only.empty() && sh.name != only) continue;
    const auto cfg = MakeConfig(sh);
    moe::MoeLayer layer(cfg);
    moe::InitLayerParams(cfg, 1, &layer.params());
    moe::Tensor x(sh.s, sh.m), dy(sh.s, sh.m), y, dx;
    FillInputs(&x, &dy);
    moe::MoeLayerParams grads = moe::MakeLayerParams(cfg);
    moe::RouteContext ctx;
    ctx.train = true;
    const moe::comm::bench::Timing ours_t = Time(iters, [&] {
      MOE_CHECK_OK(layer.Forward(x.view(), ctx, &y));
      MOE_CHECK_OK(layer.Backward(dy.view(), &dx, &grads));
    });
    const double ours = ours_t.median_us * 1e-6;
    // The expert GEMMs alone: the layer's 2 forward + 4 backward GEMMs per expert, on the same
    // operands it uses — distinct weights and gradients per expert, each expert's rows a slice of
    // full-size activation buffers — so the memory traffic matches and only the GEMMs are timed.
    const auto& plan = layer.plan();
    const int64_t rows = plan.num_rows();
    moe::Tensor x_rows(rows, sh.m), h_rows(rows, sh.h), y_rows(rows, sh.m), dy_rows(rows, sh.m),
        dh_rows(rows, sh.h), dx_rows(rows, sh.m);
    std::vector<moe::Tensor> w1(sh.e, moe::Tensor(sh.m, sh.h)), w2(sh.e, moe::Tensor(sh.h, sh.m)),
        gw1(sh.e, moe::Tensor(sh.m, sh.h)), gw2(sh.e, moe::Tensor(sh.h, sh.m));
    const moe::comm::bench::Timing gemm_t = Time(iters, [&] {
      for (int e = 0; e < sh.e; ++e) {
        const int64_t b0 = plan.expert_offset[e], r = plan.expert_offset[e + 1] - b0;
        float* xe = x_rows.row(b0);
        float* hh = h_rows.row(b0);
        float* ye = y_rows.row(b0);
        float* dy_e = dy_rows.row(b0);
        float* dh = dh_rows.row(b0);
        float* dx_e = dx_rows.row(b0);
        moe::blas::Gemm(false, false, r, sh.h, sh.m, 1, xe, w1[e].data(), 0, hh);
        moe::blas::Gemm(false, false, r, sh.m, sh.h, 1, hh, w2[e].data(), 0, ye);
        moe::blas::Gemm(true, false, sh.h, sh.m, r, 1, hh, dy_e, 1, gw2[e].data());
        moe::blas::Gemm(false, true, r, sh.h, sh.m, 1, dy_e, w2[e].data(), 0, dh);
        moe::blas::Gemm(true, false, sh.m, sh.h, r, 1, xe, dh, 1, gw1[e].data());
        moe::blas::Gemm(false, true, r, sh.m, sh.h, 1, dh, w1[e].data(), 0, dx_e);
      }
    });
    const double gemm = gemm_t.median_us * 1e-6;
    const double torch_ms =
        no_torch ? -1 : TorchMs(python, torch_script, sh, iters, device, precision).fwd_bwd_ms;
    char torch_col[32] = "n/a", ratio_col[32] = "n/a";
    if (torch_ms > 0) {
      std::snprintf(torch_col, sizeof(torch_col), "%.1f", torch_ms);
      std::snprintf(ratio_col, sizeof(ratio_col), "%.2fx", torch_ms / (ours * 1e3));
    }
    json.Add("moe_layer_fwd_bwd", sh, ours_t, "expert_gemms", gemm_t.mean_us);
    json.Add("expert_gemms_fwd_bwd", sh, gemm_t, "", 0);
    if (torch_ms > 0) json.Add("moe_layer_fwd_bwd", sh, ours_t, "pytorch (median)", torch_ms * 1e3);
    std::printf("  %-12s %5d %4d %5d %3d %2d | %9.1f %9.1f %9.3f | %9s %9s\n", sh.name.c_str(), sh.s,
                sh.m, sh.h, sh.e, sh.k, ours * 1e3, gemm * 1e3, gemm > 0 ? ours / gemm : 0.0, torch_col, ratio_col);
    std::fflush(stdout);
  }
  return 0;
}
