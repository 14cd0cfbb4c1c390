// The GPU experts (experts/cuda/grouped_ffn.h, runtime MakeStagedExpertCompute) against the CPU path:
//  - exact answers with identity weights (fp32 and bf16: the values are exact in bf16);
//  - every FFN kind x bias x precision against experts/cpu/ffn.cc on the same weights and rows,
//    forward, dX and every weight gradient, with an empty expert among the blocks: fp32 within
//    1e-4 of the largest reference magnitude (summation order only), bf16 within 2e-2 of it
//    (inputs, weights and activations rounded to 8 significant bits);
//  - GroupedFfn parts (pipeline chunks): interleaved forwards and backwards keep their own rows;
//  - the MoE layer and a 2-rank expert-parallel training job with compute.device=CUDA against the
//    same on the CPU.
// Every GPU case skips with the reason when no CUDA device is visible; the no-GPU error path runs
// everywhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "comm/world.h"
#include "base/memory.h"
#include "experts/cuda/grouped_ffn.h"
#include "runtime/config/config.h"
#include "bench/staged_gpu_experts.h"
#include "runtime/device/compute.h"
#include "runtime/device/cpu_expert_compute.h"
#include "runtime/device/host_device.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/train/trainer.h"
#include "tests/gpu/device_util.h"
#include "tests/unit/test_util.h"
#include "tests/unit/train_util.h"

namespace moe {
namespace {

using experts::Activation;
using experts::FfnParams;
using experts::FfnShape;
using experts::cuda::Precision;

config::ComputeConfig Cuda(Precision p) {
  config::ComputeConfig c;
  c.set_device(config::CUDA);
  c.set_expert_precision(p == Precision::kBfloat16 ? config::BF16 : config::FP32);
  return c;
}

TEST(GpuExpertsNoDevice, CudaWithoutAGpuIsAClearError) {
  if (CudaDeviceCount() > 0)
    GTEST_SKIP() << "a CUDA device is visible; this checks the error without one";
  FfnShape shape{8, 16, Activation::kRelu, false, true};
  auto compute = MakeStagedExpertCompute(shape, 2, Cuda(Precision::kFloat32), 0);
  ASSERT_FALSE(compute.ok());
  EXPECT_EQ(compute.status().code(), StatusCode::kFailedPrecondition)
      << compute.status().ToString();
  EXPECT_NE(compute.status().message().find("compute.device=CUDA"), std::string::npos)
      << compute.status().ToString();
}

// cuBLAS is loaded on first use, not linked; the loader needs the library, not a GPU.
TEST(GpuExpertsNoDevice, CublasLoadsInACudaBuild) {
#if MOE_EXPERTS_HAVE_CUDA
  const Status s = experts::cuda::LoadCublas();
  EXPECT_TRUE(s.ok()) << s.ToString();
#else
  EXPECT_EQ(experts::cuda::LoadCublas().code(), StatusCode::kUnimplemented);
#endif
}

TEST(GpuExpertsConfig, Bf16NeedsCuda) {
  StatusOr<MoeConfig> cfg = ParseConfig(
      "moe { model_dim: 4 num_experts: 2 expert { hidden_dim: 4 } } compute { expert_precision: "
      "BF16 }",
      "t");
  ASSERT_FALSE(cfg.ok());
  EXPECT_NE(cfg.status().message().find("compute.expert_precision=BF16"), std::string::npos)
      << cfg.status().ToString();
  EXPECT_TRUE(ParseConfig("moe { model_dim: 8 num_experts: 2 expert { hidden_dim: 8 } } "
                          "compute { device: CUDA expert_precision: BF16 gpu: 0 }",
                          "t")
                  .ok());
}

// Identity weights, ReLU, no bias, x >= 0: y = x and dx = dy exactly (all values are multiples
// of 1/4 below 4, exact in bf16).
TEST(GpuExperts, IdentityWeightsGiveExactAnswers) {
  MOE_REQUIRE_GPU();
  constexpr int kDim = 8, kExperts = 2;
  const FfnShape shape{kDim, kDim, Activation::kRelu, false, false};
  std::vector<FfnParams> params(kExperts, FfnParams::Zeros(shape));
  for (auto& p : params) {
    for (int i = 0; i < kDim; ++i) p.w1(i, i) = p.w2(i, i) = 1.0f;
  }
  const std::vector<int64_t> offsets = {0, 3, 7};
  Tensor x(7, kDim), dy(7, kDim);
  for (int64_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<float>((i * 5) % 16) / 4.0f;
    dy[i] = static_cast<float>((i * 3) % 13) / 4.0f - 1.5f;
  }
  for (Precision p : {Precision::kFloat32, Precision::kBfloat16}) {
    SCOPED_TRACE(experts::cuda::PrecisionName(p));
    auto compute = MakeStagedExpertCompute(shape, kExperts, Cuda(p), 0);
    ASSERT_TRUE(compute.ok()) << compute.status().ToString();
    Tensor y(7, kDim), dx(7, kDim);
    ASSERT_TRUE((*compute)->SetWeights(params).ok());
    ASSERT_TRUE((*compute)->Forward(0, offsets, x.view(), y.view()).ok());
    std::vector<FfnParams> grads(kExperts, FfnParams::Zeros(shape));
    ASSERT_TRUE((*compute)->Backward(0, offsets, dy.view(), dx.view(), grads).ok());
    for (int64_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(y[i], x[i]) << "y element " << i;
      ASSERT_EQ(dx[i], x[i] > 0 ? dy[i] : 0.0f) << "dx element " << i;
    }
  }
}

struct FfnCase {
  std::string name;
  Activation activation;
  bool swiglu;
  bool bias;
  Precision precision;
};
void PrintTo(const FfnCase& c, std::ostream* os) { *os << c.name; }

class GpuFfnVersusCpu : public ::testing::TestWithParam<FfnCase> {};

TEST_P(GpuFfnVersusCpu, ForwardBackwardAndGradientsMatch) {
  MOE_REQUIRE_GPU();
  const FfnCase& c = GetParam();
  const FfnShape shape{48, 80, c.activation, c.swiglu, c.bias};
  constexpr int kExperts = 4;
  const std::vector<int64_t> offsets = {0, 37, 37, 101, 130};  // expert 1 gets no rows
  const int64_t rows = offsets.back();
  std::vector<FfnParams> params(kExperts, FfnParams::Zeros(shape));
  uint64_t seed = 1;
  for (auto& p : params) {
    for (Tensor* t : {&p.w1, &p.b1, &p.w2, &p.b2, &p.w3}) testing::FillRandom(t, seed++, 0.2f);
  }
  Tensor x(rows, shape.model_dim), dy(rows, shape.model_dim);
  testing::FillRandom(&x, 100, 1.0f);
  testing::FillRandom(&dy, 101, 1.0f);

  CpuExpertCompute cpu(shape);
  Tensor want_y(rows, shape.model_dim), want_dx(rows, shape.model_dim);
  std::vector<FfnParams> want_g(kExperts, FfnParams::Zeros(shape));
  ASSERT_TRUE(cpu.SetWeights(params).ok());
  ASSERT_TRUE(cpu.Forward(0, offsets, x.view(), want_y.view()).ok());
  ASSERT_TRUE(cpu.Backward(0, offsets, dy.view(), want_dx.view(), want_g).ok());

  auto gpu = MakeStagedExpertCompute(shape, kExperts, Cuda(c.precision), 0);
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  ASSERT_TRUE((*gpu)->SetWeights(params).ok());
  Tensor y(rows, shape.model_dim), dx(rows, shape.model_dim);
  std::vector<FfnParams> g(kExperts, FfnParams::Zeros(shape));
  // Two steps: gradients accumulate on the device and are handed back once per Backward.
  for (int step = 0; step < 2; ++step) {
    Status s = (*gpu)->Forward(0, offsets, x.view(), y.view());
    ASSERT_TRUE(s.ok()) << s.ToString();
    s = (*gpu)->Backward(0, offsets, dy.view(), dx.view(), g);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  const double tol = c.precision == Precision::kFloat32 ? 1e-4 : 2e-2;
  EXPECT_LE(testing::RelativeError(y, want_y), tol) << "y";
  EXPECT_LE(testing::RelativeError(dx, want_dx), tol) << "dx";
  for (int e = 0; e < kExperts; ++e) {
    SCOPED_TRACE("expert " + std::to_string(e));
    const FfnParams& got = g[static_cast<size_t>(e)];
    const FfnParams& want = want_g[static_cast<size_t>(e)];
    for (auto [gt, wt, name] :
         {std::tuple{&got.w1, &want.w1, "w1"}, std::tuple{&got.b1, &want.b1, "b1"},
          std::tuple{&got.w2, &want.w2, "w2"}, std::tuple{&got.b2, &want.b2, "b2"},
          std::tuple{&got.w3, &want.w3, "w3"}}) {
      Tensor twice = *wt;  // two backward passes accumulated
      for (int64_t i = 0; i < twice.size(); ++i) twice[i] *= 2.0f;
      EXPECT_LE(testing::RelativeError(*gt, twice), tol) << name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, GpuFfnVersusCpu,
    ::testing::Values(
        FfnCase{"relu_bias_fp32", Activation::kRelu, false, true, Precision::kFloat32},
        FfnCase{"gelu_bias_fp32", Activation::kGeluTanh, false, true, Precision::kFloat32},
        FfnCase{"silu_nobias_fp32", Activation::kSilu, false, false, Precision::kFloat32},
        FfnCase{"swiglu_nobias_fp32", Activation::kSilu, true, false, Precision::kFloat32},
        FfnCase{"swiglu_bias_fp32", Activation::kSilu, true, true, Precision::kFloat32},
        FfnCase{"gelu_bias_bf16", Activation::kGeluTanh, false, true, Precision::kBfloat16},
        FfnCase{"relu_nobias_bf16", Activation::kRelu, false, false, Precision::kBfloat16},
        FfnCase{"swiglu_nobias_bf16", Activation::kSilu, true, false, Precision::kBfloat16}),
    [](const ::testing::TestParamInfo<FfnCase>& p) { return p.param.name; });

// bf16 experts refuse dimensions that would misalign an expert's rows for cuBLAS, with the rule —
// before looking for a GPU, so this runs in every CUDA build.
TEST(GpuExpertsNoDevice, Bf16RefusesUnalignedDimensions) {
  for (const FfnShape& shape : {FfnShape{12, 16, Activation::kRelu, false, true},
                                FfnShape{16, 20, Activation::kRelu, true, false}}) {
    auto ffn = experts::cuda::GroupedFfn::Create(shape, 2, Precision::kBfloat16, 0);
    if (ffn.status().code() == StatusCode::kUnimplemented) GTEST_SKIP() << "no CUDA build";
    ASSERT_FALSE(ffn.ok());
    EXPECT_EQ(ffn.status().code(), StatusCode::kInvalidArgument) << ffn.status().ToString();
    EXPECT_NE(ffn.status().message().find("multiples of 8"), std::string::npos)
        << ffn.status().ToString();
  }
}

// Parts (pipeline chunks): two forwards on different rows before both backwards, in the other
// order, give each part's own outputs and dX and the sum of both parts' weight gradients — in fp32
// and bf16 (where part 1 must not overwrite part 0's bf16 copy of X).
TEST(GpuExperts, GroupedFfnPartsKeepTheirOwnActivations) {
  MOE_REQUIRE_GPU();
  for (Precision precision : {Precision::kFloat32, Precision::kBfloat16}) {
    SCOPED_TRACE(experts::cuda::PrecisionName(precision));
    const FfnShape shape{24, 40, Activation::kGeluTanh, false, true};
    constexpr int kExperts = 3;
    const std::vector<std::vector<int64_t>> offsets = {{0, 11, 11, 30}, {0, 5, 22, 23}};
    std::vector<FfnParams> params(kExperts, FfnParams::Zeros(shape));
    uint64_t seed = 40;
    for (auto& p : params) {
      for (Tensor* t : {&p.w1, &p.b1, &p.w2, &p.b2}) testing::FillRandom(t, seed++, 0.2f);
    }
    auto ffn = experts::cuda::GroupedFfn::Create(shape, kExperts, precision, 0);
    ASSERT_TRUE(ffn.ok()) << ffn.status().ToString();
    ASSERT_TRUE((*ffn)->SetWeights(params).ok());
    CpuExpertCompute cpu(shape);
    ASSERT_TRUE(cpu.SetWeights(params).ok());
    std::vector<FfnParams> want_g(kExperts, FfnParams::Zeros(shape));
    std::vector<Tensor> x(2), dy(2), want_y(2), want_dx(2);
    std::vector<Buffer> x_dev, dy_dev, y_dev, dx_dev;
    for (int part = 0; part < 2; ++part) {
      const int64_t rows = offsets[part].back();
      x[part] = Tensor(rows, shape.model_dim);
      dy[part] = Tensor(rows, shape.model_dim);
      testing::FillRandom(&x[part], 50 + part, 1.0f);
      testing::FillRandom(&dy[part], 60 + part, 1.0f);
      want_y[part] = Tensor(rows, shape.model_dim);
      want_dx[part] = Tensor(rows, shape.model_dim);
      ASSERT_TRUE(cpu.Forward(0, offsets[part], x[part].view(), want_y[part].view()).ok());
      ASSERT_TRUE(
          cpu.Backward(0, offsets[part], dy[part].view(), want_dx[part].view(), want_g).ok());
      x_dev.push_back(
          testing::ToDevice(std::vector<float>(x[part].data(), x[part].data() + x[part].size())));
      dy_dev.push_back(testing::ToDevice(
          std::vector<float>(dy[part].data(), dy[part].data() + dy[part].size())));
      y_dev.push_back(testing::DeviceArray<float>(x[part].size()));
      dx_dev.push_back(testing::DeviceArray<float>(x[part].size()));
    }
    for (int part = 0; part < 2; ++part) {
      Status st =
          (*ffn)->Forward(part, offsets[part], x_dev[part].as<float>(), y_dev[part].as<float>());
      ASSERT_TRUE(st.ok()) << st.ToString();
    }
    for (int part = 1; part >= 0; --part) {
      Status st = (*ffn)->Backward(part, dy_dev[part].as<float>(), dx_dev[part].as<float>());
      ASSERT_TRUE(st.ok()) << st.ToString();
    }
    std::vector<FfnParams> g(kExperts, FfnParams::Zeros(shape));
    ASSERT_TRUE((*ffn)->AddGradients(g).ok());
    const double tol = precision == Precision::kFloat32 ? 1e-4 : 2e-2;
    for (int part = 0; part < 2; ++part) {
      const int64_t n = x[part].size();
      Tensor y(x[part].rows(), shape.model_dim), dx(x[part].rows(), shape.model_dim);
      const std::vector<float> yv = testing::FromDevice<float>(y_dev[part], n);
      const std::vector<float> dxv = testing::FromDevice<float>(dx_dev[part], n);
      std::copy(yv.begin(), yv.end(), y.data());
      std::copy(dxv.begin(), dxv.end(), dx.data());
      EXPECT_LE(testing::RelativeError(y, want_y[part]), tol) << "y of part " << part;
      EXPECT_LE(testing::RelativeError(dx, want_dx[part]), tol) << "dx of part " << part;
    }
    for (int e = 0; e < kExperts; ++e) {
      EXPECT_LE(testing::RelativeError(g[e].w1, want_g[e].w1), tol) << "w1 of expert " << e;
      EXPECT_LE(testing::RelativeError(g[e].w2, want_g[e].w2), tol) << "w2 of expert " << e;
      EXPECT_LE(testing::RelativeError(g[e].b1, want_g[e].b1), tol) << "b1 of expert " << e;
    }
    EXPECT_EQ((*ffn)->Backward(2, dy_dev[0].as<float>(), dx_dev[0].as<float>()).code(),
              StatusCode::kFailedPrecondition);
    EXPECT_EQ((*ffn)
                  ->Forward(experts::cuda::GroupedFfn::kMaxParts, offsets[0], x_dev[0].as<float>(),
                            y_dev[0].as<float>())
                  .code(),
              StatusCode::kInvalidArgument);
  }
}

// The layer on the host device with the staged GPU experts (router and plan on the host either
// way): same routing, outputs and gradients within the fp32 tolerance.
TEST(GpuExperts, MoeLayerMatchesCpu) {
  MOE_REQUIRE_GPU();
  const config::LayerConfig cfg = testing::LayerFromText(
      "model_dim: 32 num_experts: 6 expert { hidden_dim: 40 activation: GELU_TANH } "
      "num_shared_experts: 1 "
      "router { gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY capacity_factor_train: "
      "1.0 "
      "min_capacity: 1 num_local_groups: 2 aux_loss_weight: 0.01 z_loss_weight: 0.001 }");
  Tensor x(64, 32), dy(64, 32);
  testing::FillRandom(&x, 7, 1.0f);
  testing::FillRandom(&dy, 8, 1.0f);
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = 3;

  MoeLayer cpu(cfg);
  InitLayerParams(cfg, 5, &cpu.params());
  auto compute =
      MakeStagedExpertCompute(ExpertShape(cfg), cfg.num_experts(), Cuda(Precision::kFloat32), 0);
  ASSERT_TRUE(compute.ok()) << compute.status().ToString();
  const auto host = std::make_shared<HostDevice>();
  MoeLayer gpu(cfg, host,
               std::make_unique<LocalExpertExecutor>(host.get(), ExpertShape(cfg),
                                                     cfg.num_experts(), ExchangeOptions{},
                                                     std::move(compute).value()),
               0, cfg.num_experts());
  InitLayerParams(cfg, 5, &gpu.params());

  Tensor y_cpu, y_gpu, dx_cpu, dx_gpu;
  ASSERT_TRUE(cpu.Forward(x.view(), ctx, &y_cpu).ok());
  Status s = gpu.Forward(x.view(), ctx, &y_gpu);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(cpu.plan().slot_expert, gpu.plan().slot_expert);
  EXPECT_EQ(cpu.plan().slot_gate, gpu.plan().slot_gate);
  EXPECT_LE(testing::RelativeError(y_gpu, y_cpu), 1e-4);
  MoeLayerParams g_cpu = testing::ZeroGrads(cpu), g_gpu = testing::ZeroGrads(gpu);
  ASSERT_TRUE(cpu.Backward(dy.view(), &dx_cpu, &g_cpu).ok());
  s = gpu.Backward(dy.view(), &dx_gpu, &g_gpu);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_LE(testing::RelativeError(dx_gpu, dx_cpu), 1e-4);
  EXPECT_LE(testing::RelativeError(g_gpu.router, g_cpu.router), 1e-4);
  for (size_t e = 0; e < g_cpu.experts.size(); ++e) {
    EXPECT_LE(testing::RelativeError(g_gpu.experts[e].w1, g_cpu.experts[e].w1), 1e-4)
        << "expert " << e;
    EXPECT_LE(testing::RelativeError(g_gpu.experts[e].w2, g_cpu.experts[e].w2), 1e-4)
        << "expert " << e;
  }
}

// A 2-rank expert-parallel job (ranks as threads, both on GPU 0 through the in-process backend):
// the per-step losses of compute.device=CUDA follow the CPU run's.
TEST(GpuExperts, ExpertParallelTrainingFollowsCpu) {
  MOE_REQUIRE_GPU();
  auto losses = [](const config::ComputeConfig& compute, int pipeline_degree = 1) {
    MoeConfig cfg = testing::TinyTrainConfig(6, 1);
    *cfg.mutable_compute() = compute;
    cfg.mutable_parallel()->set_pipeline_degree(pipeline_degree);
    std::vector<double> out;
    // The device-resident layers exchange over the same ranks in device memory (one GPU): the
    // world's device-memory twin.
    comm::WorldOptions w;
    w.ranks = 2;
    w.device_twin = true;
    auto world = comm::MakeWorld(w);
    EXPECT_TRUE(world.ok()) << world.status().ToString();
    const bool on_device = compute.device() == config::CUDA;
    const Status ran = (*world)->Run([&](comm::RankContext& rank) -> Status {
      comm::Communicator& comm = rank.comm;
      TrainOptions opts;
      opts.quiet = true;
      opts.device_communicators = rank.device;
      MOE_ASSIGN_OR_RETURN(std::unique_ptr<Trainer> trainer, Trainer::Create(cfg, &comm, opts));
      MOE_RETURN_IF_ERROR(trainer->Run());
      if (comm.rank() == 0) {
        for (const auto& m : trainer->history()) {
          out.push_back(m.loss());
          // The device layers report their exchanges and expert time as the executors do.
          EXPECT_GT(m.alltoall_seconds(), 0.0);
          if (on_device) {
            EXPECT_GT(m.expert_seconds(), 0.0);
          }
        }
        std::vector<ExchangeStats*> stats = trainer->LayerExchangeStats();
        EXPECT_EQ(stats.size(), 2u);  // two MoE layers
        int dispatches = 0;
        for (const ExchangeCall& c : stats.at(0)->calls) {
          dispatches += c.kind == ExchangeCall::Kind::kDispatch ? 1 : 0;
        }
        EXPECT_EQ(dispatches, 2 * pipeline_degree);  // forward and backward, every chunk
      }
      return Status::Ok();
    });
    EXPECT_TRUE(ran.ok()) << ran.ToString();
    return out;
  };
  const std::vector<double> cpu = losses(config::ComputeConfig());
  const std::vector<double> gpu = losses(Cuda(Precision::kFloat32));
  // The device-resident layers with pipelined exchanges: one grouped-FFN part per chunk.
  const std::vector<double> gpu_pipelined = losses(Cuda(Precision::kFloat32), 3);
  ASSERT_EQ(cpu.size(), 6u);
  ASSERT_EQ(gpu.size(), cpu.size());
  ASSERT_EQ(gpu_pipelined.size(), cpu.size());
  for (size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_NEAR(gpu[i], cpu[i], 1e-4 * std::abs(cpu[i])) << "step " << i;
    EXPECT_NEAR(gpu_pipelined[i], cpu[i], 1e-4 * std::abs(cpu[i])) << "pipelined, step " << i;
  }
}

}  // namespace
}  // namespace moe
