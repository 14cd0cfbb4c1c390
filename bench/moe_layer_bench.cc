// moe_layer_bench: forward + backward time of one MoE layer on CPU against (a) the expert GEMMs
// alone (same shapes, same rows per expert) and (b) a PyTorch implementation of the same layer,
// timed in the same run (bench/torch_layer_bench.py, through /usr/bin/python3 when present).
// A benchmark, not a test: it reports ratios and asserts nothing.
// --device cuda runs the experts on the GPU (compute.device=CUDA: router, plan and combine stay on
// the CPU, rows travel each call) against the PyTorch layer on the same GPU; the GEMM column is
// then not measured.
#include <CLI/CLI.hpp>
#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "experts/cpu/blas.h"
#include "launch/cli.h"
#include "runtime/base/clock.h"
#include "runtime/base/rng.h"
#include "runtime/config.h"
#include "runtime/expert_blocks.h"
#include "runtime/expert_executor.h"
#include "runtime/moe_layer.h"

namespace {

struct Shape {
  std::string name;
  int s, m, h, e, k;
};


template <typename F>
double MedianSeconds(int iters, F&& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    const double t0 = moe::WallSeconds();
    f();
    t.push_back(moe::WallSeconds() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

moe::config::LayerConfig MakeConfig(const Shape& sh) {
  moe::MoeConfig cfg;
  auto* l = cfg.mutable_moe();
  l->set_model_dim(sh.m);
  l->set_num_experts(sh.e);
  l->mutable_expert()->set_hidden_dim(sh.h);
  l->mutable_expert()->set_activation(moe::config::GELU_TANH);
  l->mutable_router()->set_gate(moe::config::TOPK);
  l->mutable_router()->set_top_k(sh.k);
  l->mutable_router()->set_capacity_factor_train(1.25);
  moe::ResolveConfig(&cfg);
  return cfg.moe();
}

// PyTorch timing of the same shape, in ms (fwd+bwd median), or < 0 if unavailable.
double TorchMs(const std::string& python, const std::string& script, const Shape& sh, int iters,
               const std::string& device, const std::string& precision) {
  const std::string cmd = "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 " + python + " " + script + " --s " + std::to_string(sh.s) + " --m " +
                          std::to_string(sh.m) + " --h " + std::to_string(sh.h) + " --e " +
                          std::to_string(sh.e) + " --k " + std::to_string(sh.k) + " --iters " +
                          std::to_string(iters) + " --device " + device + " --dtype " + precision + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  char buf[256] = {0};
  double ms = -1;
  if (std::fgets(buf, sizeof(buf), p) != nullptr) ms = std::atof(buf);
  if (pclose(p) != 0) return -1;
  return ms;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"MoE layer forward+backward benchmark (CPU, one thread by default)."};
  int iters = 5, threads = 1;
  std::string torch_script = "bench/torch_layer_bench.py";
  bool no_torch = false;
  std::string only, python = "/usr/bin/python3";
  moe::launch::ComputeFlags flags{"cpu", "fp32"};
  app.add_option("-n,--iters", iters, "timed iterations (median reported)")->check(CLI::Range(1, 1000));
  app.add_option("--threads", threads, "OpenBLAS threads")->check(CLI::Range(1, 256));
  app.add_option("--torch-script", torch_script, "PyTorch baseline script");
  app.add_flag("--no-torch", no_torch, "skip the PyTorch baseline");
  app.add_option("--shape", only, "run only this shape (small, medium, fine-grained)");
  moe::launch::AddComputeFlags(app, &flags);
  app.add_option("--python", python, "Python with torch for the baseline");
  if (const int rc = moe::launch::ParseFlags(app, argc, argv); rc >= 0) return rc;
  moe::blas::SetThreads(threads);
  if (std::getenv("MOE_BENCH_NO_MMAP")) { mallopt(M_MMAP_THRESHOLD, 1 << 30); mallopt(M_TRIM_THRESHOLD, 1 << 30); }
  const std::string& device = flags.device;
  const std::string& precision = flags.precision;
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  std::printf("# moe_layer_bench: OpenBLAS core %s (OPENBLAS_CORETYPE=%s), threads=%d, experts on %s (%s), GELU FFN\n",
              moe::blas::CoreName(), coretype ? coretype : "unset", moe::blas::GetThreads(), device.c_str(),
              precision.c_str());
  moe::config::ComputeConfig compute;
  moe::launch::ApplyComputeFlags(flags, &compute);
  if (const moe::Status s = moe::ValidateCompute(compute); !s.ok()) {
    std::fprintf(stderr, "moe_layer_bench: --device/--precision: %s\n", s.message().c_str());
    return 2;
  }
  std::printf("# %-12s %5s %4s %5s %3s %2s | %9s %9s %9s | %9s %9s\n", "shape", "S", "M", "H", "E", "k",
              "ours ms", "gemm ms", "ours/gemm", "torch ms", "torch/ours");
  const std::vector<Shape> shapes = {{"small", 1024, 256, 1024, 8, 2},
                                     {"medium", 2048, 512, 1024, 16, 2},
                                     {"fine-grained", 1024, 256, 256, 64, 6}};
  for (const Shape& sh : shapes) {
    if (!only.empty() && sh.name != only) continue;
    const auto cfg = MakeConfig(sh);
    auto experts = moe::MakeExpertCompute(moe::ExpertShape(cfg), sh.e, compute, 0);
    if (!experts.ok()) {
      std::fprintf(stderr, "moe_layer_bench: %s\n", experts.status().ToString().c_str());
      return 1;
    }
    moe::MoeLayer layer(cfg, std::make_unique<moe::LocalExpertExecutor>(std::move(experts).value()), 0, sh.e);
    moe::InitLayerParams(cfg, 1, &layer.params());
    moe::Tensor x(sh.s, sh.m), dy(sh.s, sh.m), y, dx;
    for (int64_t i = 0; i < x.size(); ++i) {
      x[i] = moe::CounterNormal(9, 0, static_cast<uint64_t>(i), moe::RngStream::kInit);
      dy[i] = moe::CounterNormal(10, 0, static_cast<uint64_t>(i), moe::RngStream::kInit);
    }
    moe::MoeLayerParams grads = moe::MakeLayerParams(cfg);
    moe::RouteContext ctx;
    ctx.train = true;
    const double ours = MedianSeconds(iters, [&] {
      MOE_CHECK_OK(layer.Forward(x.view(), ctx, &y));
      MOE_CHECK_OK(layer.Backward(dy.view(), &dx, &grads));
    });
    // The expert GEMMs alone: the layer's 2 forward + 4 backward GEMMs per expert, on the same
    // operands it uses — distinct weights and gradients per expert, each expert's rows a slice of
    // full-size activation buffers — so the memory traffic matches and only the GEMMs are timed.
    const auto& plan = layer.plan();
    const int64_t rows = plan.num_rows();
    moe::Tensor x_rows(rows, sh.m), h_rows(rows, sh.h), y_rows(rows, sh.m), dy_rows(rows, sh.m),
        dh_rows(rows, sh.h), dx_rows(rows, sh.m);
    std::vector<moe::Tensor> w1(sh.e, moe::Tensor(sh.m, sh.h)), w2(sh.e, moe::Tensor(sh.h, sh.m)),
        gw1(sh.e, moe::Tensor(sh.m, sh.h)), gw2(sh.e, moe::Tensor(sh.h, sh.m));
    const double gemm = device == "cuda" ? -1.0 : MedianSeconds(iters, [&] {
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
    const double torch_ms = no_torch ? -1 : TorchMs(python, torch_script, sh, iters, device, precision);
    char torch_col[32] = "n/a", ratio_col[32] = "n/a";
    if (torch_ms > 0) {
      std::snprintf(torch_col, sizeof(torch_col), "%.1f", torch_ms);
      std::snprintf(ratio_col, sizeof(ratio_col), "%.2fx", torch_ms / (ours * 1e3));
    }
    std::printf("  %-12s %5d %4d %5d %3d %2d | %9.1f %9.1f %9.3f | %9s %9s\n", sh.name.c_str(), sh.s,
                sh.m, sh.h, sh.e, sh.k, ours * 1e3, gemm * 1e3, gemm > 0 ? ours / gemm : 0.0, torch_col, ratio_col);
    std::fflush(stdout);
  }
  return 0;
}
