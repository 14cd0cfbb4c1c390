// The MoE layer interface (runtime/layer/moe_layer.h) on the CPU: parameter shapes without
// allocation, SetParams binding the caller's parameters in place, gradients accumulated inside the
// layer until AddGradients, HostLayerCall's shape checks, and MakeMoeLayer's choice of layer.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "comm/loopback/loopback_world.h"
#include "runtime/config/config.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/layer/host_layer_call.h"
#include "runtime/layer/make_moe_layer.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

using testing::FillRandom;
using testing::LayerFromText;

constexpr const char* kLayer =
    "model_dim: 6 num_experts: 4 num_shared_experts: 1 expert { hidden_dim: 5 } "
    "router { top_k: 2 num_local_groups: 2 }";

TEST(LayerParamShapes, EqualTheShapesOfTheAllocatedParameters) {
  for (const std::string& text :
       {std::string(kLayer),
        std::string("model_dim: 4 num_experts: 6 expert { hidden_dim: 3 kind: SWIGLU bias: false } "
                    "router { gate: NOISY_TOPK top_k: 2 }"),
        std::string("model_dim: 8 num_experts: 8 num_shared_experts: 2 expert { hidden_dim: 2 "
                    "activation: RELU } router { top_k: 1 }")}) {
    SCOPED_TRACE(text);
    const config::LayerConfig cfg = LayerFromText(text);
    for (const auto& [first, local] : {std::pair{0, -1}, std::pair{2, 2}, std::pair{1, 1}}) {
      const std::vector<ParamShape> want = ParamShapes(MakeLayerParams(cfg, first, local));
      const std::vector<ParamShape> got = LayerParamShapes(cfg, first, local);
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_EQ(got[i].name, want[i].name);
        EXPECT_EQ(got[i].rows, want[i].rows) << want[i].name;
        EXPECT_EQ(got[i].cols, want[i].cols) << want[i].name;
      }
    }
  }
}

// Random parameters and input, and the output/gradients of a layer that owns its parameters.
struct Reference {
  config::LayerConfig cfg = LayerFromText(kLayer);
  MoeLayerParams params = MakeLayerParams(cfg);
  Tensor x{8, 6}, dy{8, 6};
  Reference() {
    InitLayerParams(cfg, 11, &params);
    FillRandom(&x, 3, 1.0f);
    FillRandom(&dy, 4, 1.0f);
  }
};

TEST(MoeLayerApi, BoundParametersGiveTheOwnParametersResults) {
  Reference r;
  MoeLayer owning(r.cfg);
  owning.params() = r.params;
  Tensor y_own, dx_own;
  MoeLayerParams g_own = MakeLayerParams(r.cfg);
  ASSERT_TRUE(owning.Forward(r.x.view(), {}, &y_own).ok());
  ASSERT_TRUE(owning.Backward(r.dy.view(), &dx_own, &g_own).ok());

  MoeLayer bound(r.cfg);
  ASSERT_TRUE(bound.SetParams(r.params).ok());
  Tensor y(8, 6), dx(8, 6);
  ASSERT_TRUE(bound.Forward(r.x.data(), 8, {}, y.data()).ok());
  // Gradients without a destination stay in the layer until AddGradients.
  ASSERT_TRUE(bound.Backward(r.dy.data(), dx.data(), nullptr).ok());
  MoeLayerParams g = MakeLayerParams(r.cfg);
  ASSERT_TRUE(bound.AddGradients(&g).ok());
  EXPECT_EQ(y.vec(), y_own.vec());
  EXPECT_EQ(dx.vec(), dx_own.vec());
  std::vector<const Tensor*> want;
  g_own.ForEach([&](const std::string&, const Tensor& t) { want.push_back(&t); });
  size_t i = 0;
  g.ForEach([&](const std::string& name, const Tensor& t) {
    EXPECT_EQ(t.vec(), want[i++]->vec()) << name;
  });
  // AddGradients zeroed what it handed over: a second one adds nothing.
  MoeLayerParams again = MakeLayerParams(r.cfg);
  ASSERT_TRUE(bound.AddGradients(&again).ok());
  again.ForEach([&](const std::string& name, const Tensor& t) {
    for (int64_t j = 0; j < t.size(); ++j) ASSERT_EQ(t[j], 0.0f) << name;
  });
}

TEST(MoeLayerApi, SetParamsNamesTheTensorOfTheWrongShape) {
  Reference r;
  MoeLayer layer(r.cfg);
  MoeLayerParams bad = r.params;
  bad.experts[2].w1 = Tensor(6, 4);
  const Status s = layer.SetParams(bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("expert_2_w1 is 6x4, must be 6x5"), std::string::npos)
      << s.message();
}

TEST(HostLayerCallTest, ChecksShapesAndOrder) {
  Reference r;
  MoeLayer layer(r.cfg);
  HostLayerCall call(&layer);
  Tensor y, dx;
  MoeLayerParams g = MakeLayerParams(r.cfg);
  EXPECT_EQ(call.Backward(r.dy.view(), &dx, &g).code(), StatusCode::kFailedPrecondition);
  Tensor wide(8, 7);
  const Status cols = call.Forward(wide.view(), {}, &y);
  EXPECT_EQ(cols.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(cols.message().find("moe.model_dim=6"), std::string::npos) << cols.message();
  ASSERT_TRUE(call.Forward(r.x.view(), {}, &y).ok());
  EXPECT_EQ(y.rows(), 8);
  Tensor short_dy(7, 6);
  const Status rows = call.Backward(short_dy.view(), &dx, &g);
  EXPECT_EQ(rows.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(rows.message().find("7x6"), std::string::npos) << rows.message();
}

TEST(MakeMoeLayerTest, PicksTheLayerOfTheComputeSection) {
  const config::LayerConfig cfg = LayerFromText(kLayer);
  auto local = MakeMoeLayer(cfg, config::ComputeConfig());
  ASSERT_TRUE(local.ok()) << local.status().ToString();
  EXPECT_EQ((*local)->memory_space(), MemorySpace::kHost);
  EXPECT_EQ((*local)->num_local_experts(), 4);
  EXPECT_EQ((*local)->exchange_stats(), nullptr);

  // Expert-parallel over 2 loopback ranks: rank r holds experts 2r, 2r + 1 and records exchanges.
  auto world = comm::LoopbackWorld::Create(2, {});
  ASSERT_TRUE(world.ok());
  auto ep = MakeMoeLayer(cfg, config::ComputeConfig(), {.ep = &world->rank(1)});
  ASSERT_TRUE(ep.ok()) << ep.status().ToString();
  EXPECT_EQ((*ep)->first_expert(), 2);
  EXPECT_EQ((*ep)->num_local_experts(), 2);
  EXPECT_NE((*ep)->exchange_stats(), nullptr);

  auto world3 = comm::LoopbackWorld::Create(3, {});
  ASSERT_TRUE(world3.ok());
  const auto uneven = MakeMoeLayer(cfg, config::ComputeConfig(), {.ep = &world3->rank(0)});
  EXPECT_EQ(uneven.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(uneven.status().message().find("moe.num_experts=4"), std::string::npos)
      << uneven.status().message();

  // Options are checked, never clamped: a pipeline degree outside [1, 16] is refused.
  for (const int degree : {0, 17}) {
    const auto bad = MakeMoeLayer(cfg, config::ComputeConfig(),
                                  {.ep = &world->rank(0), .exchange = {.pipeline_degree = degree}});
    EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(bad.status().message().find("pipeline_degree=" + std::to_string(degree) +
                                          " must be in [1, 16]"),
              std::string::npos)
        << bad.status().message();
  }

  // CUDA without a GPU (or without a CUDA build) names the reason.
  if (CudaDeviceCount() == 0) {
    config::ComputeConfig cuda;
    cuda.set_device(config::CUDA);
    const auto gpu = MakeMoeLayer(cfg, cuda);
    EXPECT_FALSE(gpu.ok());
    EXPECT_NE(gpu.status().message().find("compute.device=CUDA"), std::string::npos)
        << gpu.status().message();
  }
}

}  // namespace
}  // namespace moe
