// The MoE layer on the CUDA device (runtime/layer/moe_layer.h over runtime/device/cuda/
// cuda_device.h) against the same layer on the host device, on the same parameters and inputs:
//  - routing identical, routed on the device (gpu::DeviceRouter, for the configs it supports) and
//    on the host (route_on_device false, and re-routing): the plan comes from the
//    GPU's fp32 logits; the inputs are random, so no two selection scores are within the GEMMs'
//    rounding of each other; gates equal within 1e-5; before FetchPlan the device-routed plan
//    already has the rows and per-expert counts;
//  - y, dx and every parameter gradient within 1e-4 of the largest reference magnitude in fp32
//    (summation order and FMA only) and 3e-2 in bf16 (expert operands rounded to 8 bits; the router
//    stays fp32, so routing is still identical);
//  - losses and metrics equal; two calls of different sizes before one AddGradients accumulate the
//    sum of both calls' gradients; bad parameter shapes and call order are clear errors;
//  - expert parallelism: W loopback ranks in device memory sharing the GPU, each a layer on the
//    CUDA device holding E/W experts, against the 1-rank host layer with G = W groups (routing
//    identical; y, dx, expert gradients and the router gradient summed over ranks within 1e-4),
//    with every exchange feature the host has: capacity and dropless, pipelined chunks, the bf16
//    wire, the two-stage all-to-all, redundant experts, Soft MoE and the GLOBAL balance loss; and
//    the same over NCCL with one GPU per rank (where there are two).
// Every GPU case skips with the reason when no CUDA device is visible; the no-GPU error runs
// everywhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "base/memory.h"
#include "comm/loopback/loopback_world.h"
#include "comm/world.h"
#include "experts/cuda/grouped_ffn.h"
#include "runtime/config/config.h"
#include "runtime/device/cuda/route.h"
#include "runtime/exchange/expert_placement.h"
#include "runtime/layer/make_moe_layer.h"
#include "runtime/layer/moe_layer.h"
#include "tests/gpu/device_util.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

using experts::cuda::Precision;

// compute.device=CUDA on GPU 0 (loopback ranks share it), experts in `precision`.
config::ComputeConfig Cuda(Precision precision = Precision::kFloat32) {
  config::ComputeConfig c;
  c.set_device(config::CUDA);
  c.set_gpu(0);
  c.set_expert_precision(precision == Precision::kBfloat16 ? config::BF16 : config::FP32);
  return c;
}

TEST(DeviceLayerNoDevice, CreateWithoutAGpuIsAClearError) {
  if (CudaDeviceCount() > 0)
    GTEST_SKIP() << "a CUDA device is visible; this checks the error without one";
  const config::LayerConfig cfg =
      testing::LayerFromText("model_dim: 8 num_experts: 2 expert { hidden_dim: 8 }");
  auto layer = MakeMoeLayer(cfg, Cuda());
  ASSERT_FALSE(layer.ok());
  EXPECT_EQ(layer.status().code(), StatusCode::kFailedPrecondition) << layer.status().ToString();
  EXPECT_NE(layer.status().message().find("compute.device=CUDA"), std::string::npos)
      << layer.status().ToString();
  EXPECT_NE(layer.status().message().find("no CUDA device"), std::string::npos)
      << layer.status().ToString();
}

struct Case {
  std::string name;
  std::string layer;  // LayerConfig text
  Precision precision;
  bool train;
  bool route_on_device = true;  // !MoeLayerOptions::host_routing
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class DeviceLayerVersusCpu : public ::testing::TestWithParam<Case> {};

// Runs `tokens` random rows forward and backward through both layers and compares the plans,
// losses, y and dx; the CPU layer's gradients are accumulated into g_cpu.
void CompareCall(MoeLayer& cpu, MoeLayer& gpu, int64_t tokens, uint64_t seed,
                 const RouteContext& ctx, double tol, MoeLayerParams* g_cpu) {
  const int64_t m = cpu.config().model_dim();
  Tensor x(tokens, m), dy(tokens, m);
  testing::FillRandom(&x, seed, 1.0f);
  testing::FillRandom(&dy, seed + 1, 1.0f);
  Tensor y_cpu, dx_cpu;
  ASSERT_TRUE(cpu.Forward(x.view(), ctx, &y_cpu).ok());
  ASSERT_TRUE(cpu.Backward(dy.view(), &dx_cpu, g_cpu).ok());

  Buffer x_dev = testing::ToDevice(std::vector<float>(x.data(), x.data() + x.size()));
  Buffer dy_dev = testing::ToDevice(std::vector<float>(dy.data(), dy.data() + dy.size()));
  Buffer y_dev = testing::DeviceArray<float>(x.size());
  Buffer dx_dev = testing::DeviceArray<float>(x.size());
  Status s = gpu.Forward(x_dev.as<float>(), tokens, ctx, y_dev.as<float>());
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(gpu.plan().num_rows(), cpu.plan().num_rows());
  EXPECT_EQ(gpu.plan().kept_per_expert, cpu.plan().kept_per_expert);
  s = gpu.FetchPlan();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(gpu.plan().slot_expert, cpu.plan().slot_expert);
  EXPECT_EQ(gpu.plan().row_token, cpu.plan().row_token);
  ASSERT_EQ(gpu.plan().row_gate.size(), cpu.plan().row_gate.size());
  for (size_t r = 0; r < cpu.plan().row_gate.size(); ++r) {
    // Gates come from the GPU's logits: equal up to the GEMMs' rounding.
    EXPECT_NEAR(gpu.plan().row_gate[r], cpu.plan().row_gate[r], 1e-5) << "row " << r;
  }
  EXPECT_NEAR(gpu.losses().aux, cpu.losses().aux, 1e-5 * std::max(1.0, cpu.losses().aux));
  EXPECT_NEAR(gpu.losses().z, cpu.losses().z, 1e-5 * std::max(1.0, cpu.losses().z));
  EXPECT_EQ(gpu.Metrics().dropped_slots(), cpu.Metrics().dropped_slots());
  s = gpu.Backward(dy_dev.as<float>(), dx_dev.as<float>(), nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(gpu.Synchronize().ok());
  Tensor y_gpu(tokens, m), dx_gpu(tokens, m);
  const std::vector<float> y_host = testing::FromDevice<float>(y_dev, x.size());
  const std::vector<float> dx_host = testing::FromDevice<float>(dx_dev, x.size());
  std::copy(y_host.begin(), y_host.end(), y_gpu.data());
  std::copy(dx_host.begin(), dx_host.end(), dx_gpu.data());
  EXPECT_LE(testing::RelativeError(y_gpu, y_cpu), tol) << tokens << " tokens";
  EXPECT_LE(testing::RelativeError(dx_gpu, dx_cpu), tol) << tokens << " tokens";
}

TEST_P(DeviceLayerVersusCpu, ForwardBackwardAndGradientsMatch) {
  MOE_REQUIRE_GPU();
  const Case& c = GetParam();
  const config::LayerConfig cfg = testing::LayerFromText(c.layer);
  MoeLayer cpu(cfg);
  InitLayerParams(cfg, 5, &cpu.params());
  auto made = MakeMoeLayer(cfg, Cuda(c.precision), {.host_routing = !c.route_on_device});
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  MoeLayer& gpu = **made;
  ASSERT_TRUE(gpu.SetParams(cpu.params()).ok());
  cpu.set_loss_gradient_scale(0.5);
  gpu.set_loss_gradient_scale(0.5);
  const double tol = c.precision == Precision::kFloat32 ? 1e-4 : 3e-2;

  RouteContext ctx;
  ctx.train = c.train;
  ctx.seed = 3;
  MoeLayerParams g_cpu = testing::ZeroGrads(cpu);
  // Two calls (the second larger: every device buffer grows) accumulate before one download.
  CompareCall(cpu, gpu, 48, 7, ctx, tol, &g_cpu);
  EXPECT_EQ(gpu.routes_on_device(),
            c.route_on_device && gpu::DeviceRouter::Supports(ResolvedLayerConfig(cfg).router(),
                                                             nullptr));
  ctx.step = 1;
  ctx.token_offset = 48;
  CompareCall(cpu, gpu, 96, 9, ctx, tol, &g_cpu);
  MoeLayerParams g_gpu = testing::ZeroGrads(cpu);
  Status s = gpu.AddGradients(&g_gpu);
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<std::pair<std::string, const Tensor*>> want, got;
  g_cpu.ForEach([&](const std::string& name, const Tensor& t) { want.push_back({name, &t}); });
  g_gpu.ForEach([&](const std::string& name, const Tensor& t) { got.push_back({name, &t}); });
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_LE(testing::RelativeError(*got[i].second, *want[i].second), tol) << want[i].first;
  }
  // The device gradients were zeroed by the download.
  MoeLayerParams again = testing::ZeroGrads(cpu);
  ASSERT_TRUE(gpu.AddGradients(&again).ok());
  again.ForEach([](const std::string& name, const Tensor& t) {
    for (int64_t i = 0; i < t.size(); ++i) ASSERT_EQ(t[i], 0.0f) << name << " element " << i;
  });
}

std::vector<Case> Cases() {
  const std::string capacity =
      "model_dim: 32 num_experts: 6 expert { hidden_dim: 40 activation: GELU_TANH } "
      "num_shared_experts: 1 router { gate: TOPK top_k: 2 normalization: RENORM_AFTER_CAPACITY "
      "capacity_factor_train: 1.0 min_capacity: 1 num_local_groups: 2 aux_loss_weight: 0.01 "
      "z_loss_weight: 0.001 }";
  const std::string dropless_swiglu =
      "model_dim: 24 num_experts: 8 expert { hidden_dim: 16 kind: SWIGLU bias: false } "
      "num_shared_experts: 2 shared_hidden_dim: 24 router { gate: TOPK top_k: 4 normalization: "
      "TOPK_SOFTMAX capacity_factor_train: 0 aux_loss: IMPORTANCE_CV aux_loss_weight: 0.1 }";
  const std::string noisy_random =
      "model_dim: 16 num_experts: 4 expert { hidden_dim: 32 activation: SILU } router { gate: "
      "NOISY_TOPK top_k: 2 random_routing: true drop_policy: PROBABILITY reroute_overflow: true "
      "capacity_factor_train: 0.75 min_capacity: 1 z_loss_weight: 0.01 }";
  const std::string noisy_random_probability =
      "model_dim: 16 num_experts: 4 expert { hidden_dim: 32 activation: SILU } router { gate: "
      "NOISY_TOPK top_k: 2 normalization: TOPK_SOFTMAX random_routing: true drop_policy: "
      "PROBABILITY capacity_factor_train: 0.75 min_capacity: 1 num_local_groups: 2 aux_loss: "
      "IMPORTANCE_CV aux_loss_weight: 0.1 z_loss_weight: 0.01 }";
  const std::string expert_choice =
      "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 activation: RELU } router { gate: "
      "EXPERT_CHOICE capacity_factor_train: 1.5 aux_loss: NO_AUX_LOSS z_loss_weight: 0.01 }";
  return {
      {"capacity_fp32", capacity, Precision::kFloat32, true},
      {"capacity_fp32_host_routing", capacity, Precision::kFloat32, true, false},
      {"capacity_eval_fp32", capacity, Precision::kFloat32, false},
      {"capacity_bf16", capacity, Precision::kBfloat16, true},
      {"dropless_swiglu_shared2_fp32", dropless_swiglu, Precision::kFloat32, true},
      {"dropless_swiglu_shared2_bf16", dropless_swiglu, Precision::kBfloat16, true},
      {"noisy_random_reroute_fp32", noisy_random, Precision::kFloat32, true},
      {"noisy_random_probability_fp32", noisy_random_probability, Precision::kFloat32, true},
      {"noisy_random_probability_fp32_host_routing", noisy_random_probability,
       Precision::kFloat32, true, false},
      {"expert_choice_fp32", expert_choice, Precision::kFloat32, true},
      {"expert_choice_fp32_host_routing", expert_choice, Precision::kFloat32, true, false},
  };
}

INSTANTIATE_TEST_SUITE_P(Layers, DeviceLayerVersusCpu, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& p) { return p.param.name; });

TEST(DeviceLayer, BadParametersAndCallOrderAreClearErrors) {
  MOE_REQUIRE_GPU();
  const config::LayerConfig cfg =
      testing::LayerFromText("model_dim: 8 num_experts: 2 expert { hidden_dim: 8 }");
  auto made = MakeMoeLayer(cfg, Cuda());
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  MoeLayer& gpu = **made;
  EXPECT_EQ(gpu.memory_space(), MemorySpace::kDevice);
  Buffer x = testing::DeviceArray<float>(8 * 4);
  Buffer y = testing::DeviceArray<float>(8 * 4);
  MoeLayerParams params = MakeLayerParams(cfg);
  params.experts[1].w2 = Tensor(8, 7);
  Status s = gpu.SetParams(params);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("expert_1_w2 is 8x7, must be 8x8"), std::string::npos) << s.ToString();
  const MoeLayerParams good = MakeLayerParams(cfg);
  ASSERT_TRUE(gpu.SetParams(good).ok());
  s = gpu.Backward(x.as<float>(), y.as<float>(), nullptr);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  s = gpu.Forward(x.as<float>(), 0, {}, y.as<float>());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
}

struct EpCase {
  std::string name;
  int world;
  std::string layer;  // LayerConfig text; num_local_groups is added (1 per rank, W for one rank)
  int pipeline_degree = 1;
  bool dropless_exchange = false;
  int ranks_per_node = 0;  // > 0: the two-stage all-to-all
  bool bf16_wire = false;
  bool global_balance = false;  // router.aux_loss_scope GLOBAL (over a host-memory world)
  int redundant = 0;            // parallel.num_redundant_experts (round-robin placement)
  bool nccl = false;  // the ranks over NCCL, one GPU each (skips with fewer GPUs than ranks)
  bool direct = false;  // parallel.exchange_transport DIRECT: writes into symmetric device memory
};
void PrintTo(const EpCase& c, std::ostream* os) { *os << c.name; }

class DeviceLayerExpertParallel : public ::testing::TestWithParam<EpCase> {};

config::LayerConfig EpLayer(const EpCase& c, int groups) {
  std::string text = c.layer;
  const std::string router = "router { ";
  text.insert(text.find(router) + router.size(),
              "num_local_groups: " + std::to_string(groups) + " ");
  return testing::LayerFromText(text);
}

TEST_P(DeviceLayerExpertParallel, RanksOnDeviceBuffersEqualOneCpuRankWithGroups) {
  MOE_REQUIRE_GPU();
  const EpCase& c = GetParam();
  const int w = c.world;
  constexpr int kTokensPerRank = 40;
  const config::LayerConfig ref_cfg = EpLayer(c, w), cfg = EpLayer(c, 1);
  const int64_t m = cfg.model_dim(), s = kTokensPerRank;
  const bool soft = cfg.router().gate() == config::SOFT;
  // This rank's experts: E / W, or its placement's physical experts (redundant).
  ExpertPlacement placement;
  if (c.redundant > 0) {
    auto made = IdentityPlacement(cfg.num_experts(), c.redundant, w);
    ASSERT_TRUE(made.ok()) << made.status().ToString();
    placement = *made;
  }
  const int local = c.redundant > 0 ? placement.per_rank : cfg.num_experts() / w;
  const auto logical = [&](int r, int l) {
    return c.redundant > 0 ? placement.logical_at(r, l) : r * local + l;
  };
  Tensor x(w * s, m), dy(w * s, m);
  testing::FillRandom(&x, 21, 1.0f);
  testing::FillRandom(&dy, 22, 1.0f);
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = 5;
  // The wire's bf16 rounding may land one bf16 step apart where the GPU's fp32 rows differ in the
  // last bits from the host's.
  const double tol = c.bf16_wire ? 2e-2 : 1e-4;

  // The reference: one host rank with G = W groups, the same wire dtype.
  auto made_ref = MakeMoeLayer(ref_cfg, config::ComputeConfig(),
                               {.exchange = {.bf16_wire = c.bf16_wire}});
  ASSERT_TRUE(made_ref.ok()) << made_ref.status().ToString();
  MoeLayer& ref = **made_ref;
  InitLayerParams(ref_cfg, 9, &ref.params());
  Tensor ref_y, ref_dx;
  ASSERT_TRUE(ref.Forward(x.view(), ctx, &ref_y).ok());
  MoeLayerParams ref_grads = testing::ZeroGrads(ref);
  ASSERT_TRUE(ref.Backward(dy.view(), &ref_dx, &ref_grads).ok());

  // GLOBAL's counts are all-reduced over a host-memory world of the same ranks.
  std::unique_ptr<comm::LoopbackWorld> host_world;
  if (c.global_balance) {
    auto made_host = comm::LoopbackWorld::Create(w, {});
    ASSERT_TRUE(made_host.ok()) << made_host.status().ToString();
    host_world = std::make_unique<comm::LoopbackWorld>(std::move(made_host).value());
  }
  std::vector<Tensor> y(w, Tensor(s, m)), dx(w, Tensor(s, m));
  std::vector<MoeLayerParams> grads(w);
  std::vector<DispatchPlan> plans(w);
  std::vector<Status> status(w);
  const auto rank_fn = [&](comm::Communicator& comm) {
    const int r = comm.rank();
    auto run = [&]() -> Status {
      MoeLayerOptions options{.ep = &comm,
                              .exchange = {.dropless = c.dropless_exchange,
                                           .pipeline_degree = c.pipeline_degree,
                                           .ranks_per_node = c.ranks_per_node,
                                           .bf16_wire = c.bf16_wire,
                                           .transport = c.direct ? ExchangeTransport::kDirect
                                                                 : ExchangeTransport::kAuto},
                              .local_rank = r,
                              .balance = host_world ? &host_world->rank(r) : nullptr,
                              .placement = placement};
      MOE_ASSIGN_OR_RETURN(auto layer, MakeMoeLayer(cfg, Cuda(), options));
      MoeLayerParams all = MakeLayerParams(cfg);
      InitLayerParams(cfg, 9, &all);
      MoeLayerParams mine = MakeLayerParams(cfg, r * local, local);
      mine.router = all.router;
      mine.router_noise = all.router_noise;
      mine.shared = all.shared;
      for (int l = 0; l < local; ++l) {
        if (c.redundant > 0) mine.expert_ids.push_back(logical(r, l));
        mine.experts[l] = all.experts[logical(r, l)];
      }
      MOE_RETURN_IF_ERROR(layer->SetParams(mine));
      layer->set_loss_gradient_scale(1.0 / w);
      const int64_t bytes = s * m * static_cast<int64_t>(sizeof(float));
      const auto dev = MemorySpace::kDevice;
      MOE_ASSIGN_OR_RETURN(auto x_dev, Buffer::FromHost(dev, x.row(r * s), bytes));
      MOE_ASSIGN_OR_RETURN(auto dy_dev, Buffer::FromHost(dev, dy.row(r * s), bytes));
      MOE_ASSIGN_OR_RETURN(auto y_dev, Buffer::Allocate(dev, bytes));
      MOE_ASSIGN_OR_RETURN(auto dx_dev, Buffer::Allocate(dev, bytes));
      RouteContext rctx = ctx;
      rctx.token_offset = r * s;
      MOE_RETURN_IF_ERROR(layer->Forward(x_dev.as<float>(), s, rctx, y_dev.as<float>()));
      MOE_RETURN_IF_ERROR(layer->Backward(dy_dev.as<float>(), dx_dev.as<float>(), nullptr));
      MOE_RETURN_IF_ERROR(layer->Synchronize());
      MOE_RETURN_IF_ERROR(
          CopyToHost(MemorySpace::kDevice, y[r].data(), y_dev.data(), bytes));
      MOE_RETURN_IF_ERROR(
          CopyToHost(MemorySpace::kDevice, dx[r].data(), dx_dev.data(), bytes));
      grads[r] = MakeLayerParams(cfg, r * local, local);
      grads[r].expert_ids = mine.expert_ids;
      grads[r].Zero();
      MOE_RETURN_IF_ERROR(layer->FetchPlan());
      plans[r] = layer->plan();
      return layer->AddGradients(&grads[r]);
    };
    status[r] = run();
  };
  if (c.nccl) {
    // NCCL refuses two ranks on one GPU: rank r on GPU r, as moe_train --backend nccl does.
    if (CudaDeviceCount() < w) {
      GTEST_SKIP() << "the layer over NCCL needs " << w << " GPUs (one per rank); "
                   << CudaDeviceCount() << " visible";
    }
    auto world = comm::MakeWorld({.backend = "nccl", .ranks = w});
    ASSERT_TRUE(world.ok()) << world.status().ToString();
    const Status ran = (*world)->Run([&](comm::RankContext& rank) {
      rank_fn(rank.comm);
      return Status::Ok();
    });
    ASSERT_TRUE(ran.ok()) << ran.ToString();
  } else {
    // W ranks sharing the GPU: loopback in device memory.
    auto world = comm::LoopbackWorld::Create(w, {MemorySpace::kDevice, {}});
    ASSERT_TRUE(world.ok()) << world.status().ToString();
    world->RunPerRank(rank_fn);
  }
  for (int r = 0; r < w; ++r) {
    ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r].ToString();
  }
  const DispatchPlan& rp = ref.plan();
  const int64_t k = rp.top_k;
  Tensor router_sum(ref_grads.router.rows(), ref_grads.router.cols());
  // A logical expert's gradient: the sum over its replicas.
  std::vector<experts::FfnParams> expert_sum;
  for (size_t e = 0; e < ref_grads.experts.size(); ++e) {
    expert_sum.push_back(experts::FfnParams::Zeros(ExpertShape(cfg)));
  }
  for (int r = 0; r < w; ++r) {
    if (!soft) {
      for (int64_t i = 0; i < s * k; ++i) {
        ASSERT_EQ(plans[r].slot_expert[i], rp.slot_expert[r * s * k + i]) << "rank " << r;
      }
    }
    Tensor ref_y_r(s, m), ref_dx_r(s, m);
    std::copy(ref_y.row(r * s), ref_y.row(r * s) + s * m, ref_y_r.data());
    std::copy(ref_dx.row(r * s), ref_dx.row(r * s) + s * m, ref_dx_r.data());
    EXPECT_LE(testing::RelativeError(y[r], ref_y_r), tol) << "y of rank " << r;
    EXPECT_LE(testing::RelativeError(dx[r], ref_dx_r), tol) << "dx of rank " << r;
    for (int l = 0; l < local; ++l) {
      experts::FfnParams& sum = expert_sum[static_cast<size_t>(logical(r, l))];
      const experts::FfnParams& got = grads[r].experts[l];
      for (int64_t i = 0; i < got.w1.size(); ++i) sum.w1[i] += got.w1[i];
      for (int64_t i = 0; i < got.w2.size(); ++i) sum.w2[i] += got.w2[i];
    }
    for (int64_t i = 0; i < router_sum.size(); ++i) router_sum[i] += grads[r].router[i];
  }
  for (size_t e = 0; e < expert_sum.size(); ++e) {
    EXPECT_LE(testing::RelativeError(expert_sum[e].w1, ref_grads.experts[e].w1), tol) << "expert " << e;
    EXPECT_LE(testing::RelativeError(expert_sum[e].w2, ref_grads.experts[e].w2), tol) << "expert " << e;
  }
  EXPECT_LE(testing::RelativeError(router_sum, ref_grads.router), tol);
}

INSTANTIATE_TEST_SUITE_P(
    Worlds, DeviceLayerExpertParallel,
    ::testing::Values(
        EpCase{"two_ranks_capacity", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "capacity_factor_train: 1.0 min_capacity: 1 aux_loss_weight: 0.1 z_loss_weight: "
               "0.01 }"},
        EpCase{"four_ranks_dropless_shared", 4,
               "model_dim: 16 num_experts: 8 num_shared_experts: 1 expert { hidden_dim: 12 kind: "
               "SWIGLU bias: false } router { top_k: 3 normalization: TOPK_SOFTMAX "
               "capacity_factor_train: 0 }"},
        EpCase{"three_ranks_one_expert_each", 3,
               "model_dim: 8 num_experts: 3 expert { hidden_dim: 8 activation: RELU } router { "
               "top_k: 1 capacity_factor_train: 0.5 min_capacity: 1 }"},
        // Pipelined: each (rank, expert) block split into chunks, one all-to-all-v and one grouped
        // FFN part per chunk; 4 chunks of blocks of a few rows leave some chunks empty.
        EpCase{"two_ranks_capacity_two_chunks", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "capacity_factor_train: 1.0 min_capacity: 1 aux_loss_weight: 0.1 z_loss_weight: "
               "0.01 }",
               2},
        EpCase{"four_ranks_dropless_shared_three_chunks", 4,
               "model_dim: 16 num_experts: 8 num_shared_experts: 1 expert { hidden_dim: 12 kind: "
               "SWIGLU bias: false } router { top_k: 3 normalization: TOPK_SOFTMAX "
               "capacity_factor_train: 0 }",
               3},
        EpCase{"three_ranks_one_expert_each_four_chunks", 3,
               "model_dim: 8 num_experts: 3 expert { hidden_dim: 8 activation: RELU } router { "
               "top_k: 1 capacity_factor_train: 0.5 min_capacity: 1 }",
               4},
        // What the device layer used to refuse, now the one layer's on the GPU too.
        EpCase{"four_ranks_real_rows_two_stage", 4,
               "model_dim: 16 num_experts: 8 expert { hidden_dim: 12 } router { top_k: 2 "
               "capacity_factor_train: 1.25 min_capacity: 1 }",
               2, /*dropless_exchange=*/true, /*ranks_per_node=*/2},
        EpCase{"two_ranks_bf16_wire_chunks", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "capacity_factor_train: 1.0 min_capacity: 1 }",
               2, false, 0, /*bf16_wire=*/true},
        EpCase{"two_ranks_global_balance_sigmoid", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "score_function: SIGMOID aux_loss_scope: GLOBAL aux_loss_weight: 0.1 "
               "capacity_factor_train: 1.0 min_capacity: 1 }",
               1, false, 0, false, /*global_balance=*/true},
        EpCase{"two_ranks_redundant_experts", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "capacity_factor_train: 1.0 min_capacity: 1 }",
               1, false, 0, false, false, /*redundant=*/2},
        EpCase{"two_ranks_soft_moe", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { gate: SOFT "
               "slots_per_expert: 2 }",
               2},
        // Over NCCL, one GPU per rank (scripts/device_check.sh runs them where there are two).
        EpCase{"nccl_two_ranks_capacity_two_chunks", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "capacity_factor_train: 1.0 min_capacity: 1 aux_loss_weight: 0.1 }",
               2, false, 0, false, false, 0, /*nccl=*/true},
        EpCase{"nccl_two_ranks_dropless_bf16_wire", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "capacity_factor_train: 0 }",
               3, /*dropless_exchange=*/true, 0, /*bf16_wire=*/true, false, 0, /*nccl=*/true},
        // Direct writes into symmetric device memory (one cudaMalloc shared by the loopback ranks;
        // NCCL symmetric windows across GPUs), forced: AUTO keeps the all-to-all on devices.
        EpCase{"two_ranks_direct_writes_two_chunks", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "capacity_factor_train: 1.0 min_capacity: 1 aux_loss_weight: 0.1 }",
               2, false, 0, false, false, 0, false, /*direct=*/true},
        EpCase{"four_ranks_direct_writes_dropless_bf16_wire", 4,
               "model_dim: 16 num_experts: 8 num_shared_experts: 1 expert { hidden_dim: 12 kind: "
               "SWIGLU bias: false } router { top_k: 3 normalization: TOPK_SOFTMAX "
               "capacity_factor_train: 0 }",
               3, /*dropless_exchange=*/true, 0, /*bf16_wire=*/true, false, 0, false,
               /*direct=*/true},
        EpCase{"nccl_two_ranks_direct_writes", 2,
               "model_dim: 16 num_experts: 4 expert { hidden_dim: 24 } router { top_k: 2 "
               "capacity_factor_train: 1.0 min_capacity: 1 }",
               2, false, 0, false, false, 0, /*nccl=*/true, /*direct=*/true}),
    [](const ::testing::TestParamInfo<EpCase>& p) { return p.param.name; });

}  // namespace
}  // namespace moe
