// The checked host device (runtime/device/checked_device.h): the layer's whole sequence on it —
// deferred streams, events as the only cross-stream order, poisoned memory — over 1-4 loopback
// ranks gives the host device's results (y, dx and every gradient equal; the operations are the
// same, only deferred), for capacity and dropless exchanges, pipelined chunks, the bf16 wire,
// redundant experts, shared experts, expert choice and Soft MoE. And it catches what it claims,
// each with the pair of operations named: a missing event wait (a dropped Request::Then), a buffer
// reused one chunk early (a chunk's send rows rewritten while its all-to-all is in flight), a free
// under work still in flight (a released receive buffer), an allocation while an exchange is in
// flight (experts called on more rows than were reserved), and a host read without a wait (it
// sees the poison).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "comm/loopback/loopback_world.h"
#include "runtime/device/checked_device.h"
#include "runtime/exchange/expert_placement.h"
#include "runtime/layer/make_moe_layer.h"
#include "tests/unit/test_util.h"

namespace moe {
namespace {

struct Case {
  std::string name;
  int ranks;
  std::string layer;  // LayerConfig text; num_local_groups is added
  ExchangeOptions exchange;
  int redundant = 0;  // parallel.num_redundant_experts (round-robin placement)
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

constexpr int kTokens = 24;

config::LayerConfig CaseLayer(const Case& c) {
  std::string text = c.layer;
  const std::string router = "router { ";
  text.insert(text.find(router) + router.size(), "num_local_groups: 2 ");
  return testing::LayerFromText(text);
}

// Everything one rank's call produced.
struct Result {
  Tensor y, dx;
  MoeLayerParams grads;
  Status status;
};

// Runs every rank's layer forward and backward on `checked` devices (else the host device).
std::vector<Result> RunRanks(const Case& c, bool checked) {
  const config::LayerConfig cfg = CaseLayer(c);
  const int w = c.ranks;
  ExpertPlacement placement;
  if (c.redundant > 0) placement = *IdentityPlacement(cfg.num_experts(), c.redundant, w);
  auto world = comm::LoopbackWorld::Create(w, {MemorySpace::kHost, {.deadline_seconds = 20}});
  EXPECT_TRUE(world.ok()) << world.status().ToString();
  std::vector<Result> out(static_cast<size_t>(w));
  world->RunPerRank([&](comm::Communicator& host_comm) {
    const int r = host_comm.rank();
    Result& res = out[static_cast<size_t>(r)];
    auto run = [&]() -> Status {
      std::shared_ptr<CheckedDevice> device;
      std::unique_ptr<comm::Communicator> checked_comm;
      MoeLayerOptions options{.ep = w > 1 ? &host_comm : nullptr,
                              .exchange = c.exchange,
                              .local_rank = r,
                              .placement = placement};
      if (checked) {
        device = std::make_shared<CheckedDevice>();
        options.device = device;
        if (w > 1) {
          checked_comm = MakeCheckedCommunicator(device.get(), &host_comm);
          options.ep = checked_comm.get();
        }
      }
      MOE_ASSIGN_OR_RETURN(std::unique_ptr<MoeLayer> layer,
                           MakeMoeLayer(cfg, config::ComputeConfig(), options));
      MoeLayerParams params = MakeLayerParams(cfg, layer->first_expert(),
                                              layer->num_local_experts());
      if (c.redundant > 0) {
        for (int s = 0; s < placement.per_rank; ++s) {
          params.expert_ids.push_back(placement.logical_at(r, s));
        }
      }
      InitLayerParams(cfg, 3, &params);
      MOE_RETURN_IF_ERROR(layer->SetParams(params));
      layer->set_loss_gradient_scale(0.5);
      // Two calls on the device's own buffers, the second larger (every workspace grows while
      // the first call's work may be queued), gradients accumulated on the device over both;
      // the host reads only at the end.
      Device& dev = layer->device();
      const int64_t m = cfg.model_dim();
      Workspace xs(dev.memory()), ys(dev.memory()), dys(dev.memory()), dxs(dev.memory());
      for (const int64_t tokens : {int64_t{kTokens}, int64_t{kTokens + 16}}) {
        Tensor x(tokens, m), dy(tokens, m);
        testing::FillRandom(&x, 10 + r + tokens, 1.0f);
        testing::FillRandom(&dy, 20 + r + tokens, 1.0f);
        const int64_t bytes = tokens * m * static_cast<int64_t>(sizeof(float));
        MOE_ASSIGN_OR_RETURN(void* xd, xs.Get(bytes));
        MOE_ASSIGN_OR_RETURN(void* yd, ys.Get(bytes));
        MOE_ASSIGN_OR_RETURN(void* dyd, dys.Get(bytes));
        MOE_ASSIGN_OR_RETURN(void* dxd, dxs.Get(bytes));
        MOE_RETURN_IF_ERROR(dev.Upload(xd, x.data(), bytes));
        MOE_RETURN_IF_ERROR(dev.Upload(dyd, dy.data(), bytes));
        RouteContext ctx;
        ctx.train = true;
        ctx.seed = 9;
        ctx.step = static_cast<uint64_t>(tokens);
        ctx.token_offset = r * tokens;
        MOE_RETURN_IF_ERROR(layer->Forward(static_cast<const float*>(xd), tokens, ctx,
                                           static_cast<float*>(yd)));
        MOE_RETURN_IF_ERROR(layer->Backward(static_cast<const float*>(dyd),
                                            static_cast<float*>(dxd), nullptr));
        if (tokens == kTokens) continue;  // the first call's results are not read
        res.y = Tensor(tokens, m);
        res.dx = Tensor(tokens, m);
        MOE_RETURN_IF_ERROR(dev.Download(res.y.data(), yd, bytes));
        MOE_RETURN_IF_ERROR(dev.Download(res.dx.data(), dxd, bytes));
      }
      res.grads = MakeLayerParams(cfg, layer->first_expert(), layer->num_local_experts());
      res.grads.expert_ids = params.expert_ids;
      res.grads.Zero();
      return layer->AddGradients(&res.grads);
    };
    res.status = run();
  });
  return out;
}

class CheckedLayer : public ::testing::TestWithParam<Case> {};

// Equal values (the device keeps gradients in accumulators of its own, so a zero's sign may
// differ from the host's direct accumulation).
void ExpectEqual(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (int64_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i], want[i]) << what << " element " << i;
  }
}

TEST_P(CheckedLayer, EqualsTheHostDevice) {
  const Case& c = GetParam();
  const std::vector<Result> host = RunRanks(c, false), checked = RunRanks(c, true);
  for (int r = 0; r < c.ranks; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(host[r].status.ok()) << host[r].status.ToString();
    ASSERT_TRUE(checked[r].status.ok()) << checked[r].status.ToString();
    ExpectEqual(checked[r].y, host[r].y, "y");
    ExpectEqual(checked[r].dx, host[r].dx, "dx");
    std::vector<std::pair<std::string, const Tensor*>> want;
    host[r].grads.ForEach([&](const std::string& n, const Tensor& t) { want.push_back({n, &t}); });
    size_t i = 0;
    checked[r].grads.ForEach([&](const std::string& n, const Tensor& t) {
      ASSERT_LT(i, want.size());
      ExpectEqual(t, *want[i++].second, n);
    });
  }
}

ExchangeOptions Ex(bool dropless, int chunks, bool bf16 = false) {
  return {.dropless = dropless, .pipeline_degree = chunks, .bf16_wire = bf16};
}

ExchangeOptions Direct(bool dropless, int chunks, bool bf16 = false) {
  ExchangeOptions o = Ex(dropless, chunks, bf16);
  o.transport = ExchangeTransport::kDirect;
  return o;
}

const char kTop2[] =
    "model_dim: 8 num_experts: 4 expert { hidden_dim: 12 } router { top_k: 2 "
    "capacity_factor_train: 1.0 min_capacity: 1 aux_loss_weight: 0.1 z_loss_weight: 0.01 }";
const char kDropless[] =
    "model_dim: 8 num_experts: 8 num_shared_experts: 2 expert { hidden_dim: 8 kind: SWIGLU "
    "bias: false } router { top_k: 3 normalization: TOPK_SOFTMAX capacity_factor_train: 0 }";
const char kNoisy[] =
    "model_dim: 8 num_experts: 4 expert { hidden_dim: 12 activation: SILU } router { gate: "
    "NOISY_TOPK top_k: 2 random_routing: true drop_policy: PROBABILITY capacity_factor_train: "
    "0.75 min_capacity: 1 z_loss_weight: 0.01 }";
const char kNoisy6[] =
    "model_dim: 8 num_experts: 6 expert { hidden_dim: 12 activation: SILU } router { gate: "
    "NOISY_TOPK top_k: 2 random_routing: true capacity_factor_train: 0.75 min_capacity: 1 "
    "z_loss_weight: 0.01 }";
const char kExpertChoice[] =
    "model_dim: 8 num_experts: 4 expert { hidden_dim: 12 activation: RELU } router { gate: "
    "EXPERT_CHOICE capacity_factor_train: 1.5 aux_loss: NO_AUX_LOSS z_loss_weight: 0.01 }";
const char kSoft[] =
    "model_dim: 8 num_experts: 4 expert { hidden_dim: 12 } router { gate: SOFT "
    "slots_per_expert: 2 }";

INSTANTIATE_TEST_SUITE_P(
    Layers, CheckedLayer,
    ::testing::Values(Case{"one_rank_capacity", 1, kTop2, Ex(false, 1)},
                      Case{"one_rank_noisy_bf16", 1, kNoisy, Ex(true, 1, true)},
                      Case{"two_ranks_capacity", 2, kTop2, Ex(false, 1)},
                      Case{"two_ranks_capacity_pipelined", 2, kTop2, Ex(false, 3)},
                      Case{"two_ranks_dropless_shared_pipelined", 2, kDropless, Ex(true, 2)},
                      Case{"two_ranks_bf16_pipelined", 2, kTop2, Ex(false, 2, true)},
                      Case{"three_ranks_noisy_pipelined", 3, kNoisy6, Ex(true, 2)},
                      Case{"four_ranks_dropless_bf16", 4, kDropless, Ex(true, 3, true)},
                      Case{"two_ranks_redundant_pipelined", 2, kTop2, Ex(true, 2), 2},
                      Case{"four_ranks_redundant_capacity", 4, kTop2, Ex(false, 1), 4},
                      Case{"two_ranks_expert_choice", 2, kExpertChoice, Ex(false, 2)},
                      Case{"two_ranks_soft_moe_pipelined", 2, kSoft, Ex(false, 2)},
                      // Direct writes into symmetric "device" memory (DIRECT: AUTO keeps the
                      // all-to-all on devices): gathers and copies into the peers' buffers queued
                      // on the stream, fences after the host waited for them.
                      Case{"two_ranks_direct_capacity_pipelined", 2, kTop2, Direct(false, 3)},
                      Case{"three_ranks_direct_noisy", 3, kNoisy6, Direct(true, 1)},
                      Case{"four_ranks_direct_dropless_bf16_pipelined", 4, kDropless,
                           Direct(true, 2, true)}),
    [](const ::testing::TestParamInfo<Case>& p) { return p.param.name; });

// A dropped Request::Then: the first exchange's receive rows are read by the compute stream with
// no event after the all-to-all that writes them.
TEST(CheckedDeviceBugs, MissingEventWaitNamesBothOperations) {
  const config::LayerConfig cfg = CaseLayer({"", 2, kTop2, {}});
  auto world = comm::LoopbackWorld::Create(2, {MemorySpace::kHost, {.deadline_seconds = 20}});
  ASSERT_TRUE(world.ok());
  std::vector<Status> status(2);
  world->RunPerRank([&](comm::Communicator& host_comm) {
    const int r = host_comm.rank();
    auto device = std::make_shared<CheckedDevice>();
    // Both ranks drop the same wait, so they fail at the same point.
    auto comm = MakeCheckedCommunicator(device.get(), &host_comm, /*drop_then=*/1);
    auto layer = MakeMoeLayer(cfg, config::ComputeConfig(),
                              {.ep = comm.get(), .exchange = Ex(false, 2), .local_rank = r,
                               .device = device});
    if (!layer.ok()) {
      status[r] = layer.status();
      return;
    }
    Tensor x(kTokens, 8), y;
    testing::FillRandom(&x, 1 + r, 1.0f);
    status[r] = (*layer)->Forward(x.view(), RouteContext{}, &y);
  });
  for (int r = 0; r < 2; ++r) {
    const std::string msg = status[r].message();
    EXPECT_EQ(status[r].code(), StatusCode::kFailedPrecondition) << status[r].ToString();
    EXPECT_NE(msg.find("alltoallv #"), std::string::npos) << msg;
    EXPECT_NE(msg.find("writes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("compute stream) reads"), std::string::npos) << msg;
    EXPECT_NE(msg.find("with no stream order, event or host wait between them"), std::string::npos)
        << msg;
  }
}

// Chunk 1's send rows rewritten after its all-to-all started and before any wait for it: what a
// pipeline that reuses a chunk's buffer one chunk early does.
TEST(CheckedDeviceBugs, BufferReusedOneChunkEarlyNamesBothOperations) {
  auto world = comm::LoopbackWorld::Create(2, {MemorySpace::kHost, {.deadline_seconds = 20}});
  ASSERT_TRUE(world.ok());
  std::vector<std::string> errors(2);
  world->RunPerRank([&](comm::Communicator& host_comm) {
    const int r = host_comm.rank();
    CheckedDevice device;
    auto comm = MakeCheckedCommunicator(&device, &host_comm);
    Workspace send(device.memory()), recv(device.memory());
    constexpr int64_t kChunk = 4;  // floats per peer and chunk
    float* s = static_cast<float*>(*send.Get(4 * kChunk * sizeof(float)));
    float* d = static_cast<float*>(*recv.Get(4 * kChunk * sizeof(float)));
    const std::vector<float> ones(4 * kChunk, 1.0f);
    EXPECT_TRUE(device.Upload(s, ones.data(), 4 * kChunk * sizeof(float)).ok());
    std::vector<std::unique_ptr<comm::Request>> chunks;
    for (int j = 0; j < 2; ++j) {  // chunk j: [2j·kChunk, (2j+2)·kChunk), kChunk per peer
      const std::vector<int64_t> counts = {kChunk, kChunk},
                                 displs = {2 * j * kChunk, (2 * j + 1) * kChunk};
      auto req = comm->StartAllToAllV(s, counts, displs, d, counts, displs,
                                      comm::DataType::kFloat32, device.stream());
      EXPECT_TRUE(req.ok()) << req.status().ToString();
      chunks.push_back(std::move(req).value());
    }
    EXPECT_TRUE(chunks[0]->Then(device.stream()).ok());
    // The bug: chunk 1's send rows zeroed while its exchange may still read them.
    const Status bad = device.Zero(s + 2 * kChunk, 2 * kChunk * sizeof(float));
    errors[r] = bad.message();
    EXPECT_TRUE(chunks[1]->Then(device.stream()).ok());
    for (auto& c : chunks) EXPECT_TRUE(c->Wait().ok());
  });
  for (const std::string& msg : errors) {
    EXPECT_NE(msg.find("Zero (operation"), std::string::npos) << msg;
    EXPECT_NE(msg.find("compute stream) writes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("alltoallv #"), std::string::npos) << msg;
    EXPECT_NE(msg.find("communication stream) reads"), std::string::npos) << msg;
  }
}

// A row written into a peer's symmetric buffer by the device, then a fence before the host waited
// for the write: on a GPU the peer would read the buffer while the copy may not have run.
TEST(CheckedDeviceBugs, FenceBeforeTheDeviceWroteNamesTheWrite) {
  auto world = comm::LoopbackWorld::Create(2, {MemorySpace::kHost, {.deadline_seconds = 5}});
  ASSERT_TRUE(world.ok());
  std::vector<Status> first(2), second(2);
  std::vector<float> got(2, 0.0f);
  world->RunPerRank([&](comm::Communicator& host_comm) {
    const int r = host_comm.rank();
    CheckedDevice device;
    auto comm = MakeCheckedCommunicator(&device, &host_comm);
    auto buffer = comm->AllocateSymmetric(64, 1);
    ASSERT_TRUE(buffer.ok()) << buffer.status().ToString();
    comm::SymmetricBuffer& buf = **buffer;
    EXPECT_EQ(buf.memory_space(), MemorySpace::kDevice);
    Workspace row(device.memory());
    float* value = static_cast<float*>(*row.Get(sizeof(float)));
    const float mine = 10.0f + static_cast<float>(r);
    EXPECT_TRUE(device.Upload(value, &mine, sizeof(float)).ok());
    // Right: the host waits for the copy into the peer's buffer, then fences.
    EXPECT_TRUE(device.Copy(buf.peer(1 - r), value, sizeof(float)).ok());
    EXPECT_TRUE(device.Synchronize().ok());
    first[r] = buf.Fence();
    EXPECT_TRUE(device.Download(&got[r], buf.local(), sizeof(float)).ok());
    // The bug: the next copy is still queued when the fence signals.
    EXPECT_TRUE(device.Copy(buf.peer(1 - r), value, sizeof(float)).ok());
    second[r] = buf.Signal();
    (void)device.Synchronize();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(first[r].ok()) << first[r].ToString();
    EXPECT_EQ(got[r], 10.0f + static_cast<float>(1 - r)) << "rank " << r;
    const std::string msg = second[r].message();
    EXPECT_EQ(second[r].code(), StatusCode::kFailedPrecondition) << second[r].ToString();
    EXPECT_NE(msg.find("symmetric fence #2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("Copy (operation"), std::string::npos) << msg;
    EXPECT_NE(msg.find("which the host has not waited for"), std::string::npos) << msg;
  }
}

// A workspace freed while an all-to-all that writes it is in flight with no event after it: the
// free, ordered on the compute stream, conflicts with it.
TEST(CheckedDeviceBugs, FreeUnderInFlightWorkNamesBothOperations) {
  auto world = comm::LoopbackWorld::Create(2, {MemorySpace::kHost, {.deadline_seconds = 20}});
  ASSERT_TRUE(world.ok());
  std::vector<Status> status(2);
  world->RunPerRank([&](comm::Communicator& host_comm) {
    CheckedDevice device;
    auto comm = MakeCheckedCommunicator(&device, &host_comm);
    Workspace send(device.memory()), recv(device.memory());
    void* s = *send.Get(8 * sizeof(float));
    void* d = *recv.Get(8 * sizeof(float));
    EXPECT_TRUE(device.Zero(s, 8 * sizeof(float)).ok());
    const std::vector<int64_t> counts = {4, 4}, displs = {0, 4};
    auto req = comm->StartAllToAllV(s, counts, displs, d, counts, displs,
                                    comm::DataType::kFloat32, device.stream());
    EXPECT_TRUE(req.ok());
    // The bug: the receive buffer is released under the exchange.
    recv = Workspace(device.memory());
    status[host_comm.rank()] = device.Synchronize();
    (void)(*req)->Wait();
  });
  for (const Status& s : status) {
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
    EXPECT_NE(s.message().find("Free of 32 bytes (operation"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("alltoallv #1 (operation"), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("communication stream) writes"), std::string::npos) << s.ToString();
  }
}

// Each of `ranks` ranks reserves `reserved` rows of its checked experts, starts an all-to-all (one
// float to itself) and, while it is in flight, runs the experts on 3 rows; each rank's status.
std::vector<Status> ExpertCallUnderExchange(int ranks, int64_t reserved) {
  auto world = comm::LoopbackWorld::Create(ranks, {MemorySpace::kHost, {.deadline_seconds = 20}});
  EXPECT_TRUE(world.ok());
  std::vector<Status> status(static_cast<size_t>(ranks));
  world->RunPerRank([&](comm::Communicator& host_comm) {
    const int r = host_comm.rank();
    CheckedDevice device;
    auto comm = MakeCheckedCommunicator(&device, &host_comm);
    const experts::FfnShape shape{.model_dim = 4, .hidden_dim = 8};
    auto experts = device.MakeExperts(shape, 1);
    ASSERT_TRUE(experts.ok());
    ASSERT_TRUE((*experts)->SetWeights(std::vector<experts::FfnParams>{
                                           experts::FfnParams::Zeros(shape)})
                    .ok());
    Workspace rows(device.memory()), out(device.memory()), exchanged(device.memory());
    float* x = static_cast<float*>(*rows.Get(3 * 4 * sizeof(float)));
    float* y = static_cast<float*>(*out.Get(3 * 4 * sizeof(float)));
    float* e = static_cast<float*>(*exchanged.Get(2 * sizeof(float)));
    EXPECT_TRUE(device.Zero(x, 3 * 4 * sizeof(float)).ok());
    EXPECT_TRUE(device.Zero(e, sizeof(float)).ok());
    EXPECT_TRUE((*experts)->Reserve(0, reserved).ok());  // before the exchange
    std::vector<int64_t> counts(static_cast<size_t>(ranks), 0), displs(counts.size(), 0);
    counts[static_cast<size_t>(r)] = 1;
    auto req = comm->StartAllToAllV(e, counts, displs, e + 1, counts, displs,
                                    comm::DataType::kFloat32, device.stream());
    ASSERT_TRUE(req.ok());
    EXPECT_TRUE((*req)->Then(device.stream()).ok());
    Status s = (*experts)->Forward(0, {0, 3}, {x, 3, 4}, {y, 3, 4}, /*accumulate=*/false);
    const Status waited = (*req)->Wait();
    if (s.ok()) s = waited;
    if (s.ok()) s = device.Synchronize();
    status[static_cast<size_t>(r)] = s;
  });
  return status;
}

// The experts' memory grown while an all-to-all is in flight — an expert call on more rows than
// were reserved before the exchanges started — fails naming the allocation and the exchange.
TEST(CheckedDeviceBugs, AllocationUnderInFlightExchangeNamesBoth) {
  for (const Status& s : ExpertCallUnderExchange(2, /*reserved=*/2)) {
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
    EXPECT_NE(s.message().find("an allocation of 240 bytes while alltoallv #1 (operation"),
              std::string::npos)
        << s.ToString();
    EXPECT_NE(s.message().find("communication stream) is in flight"), std::string::npos)
        << s.ToString();
  }
}

// Reserved for all 3 rows beforehand, the same call takes no memory and runs.
TEST(CheckedDevice, ReservedExpertsTakeNoMemoryUnderAnExchange) {
  for (const Status& s : ExpertCallUnderExchange(2, /*reserved=*/3)) {
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
}

// A free after queued work of the same stream is ordered after it (cudaFreeAsync's semantics).
TEST(CheckedDevice, FreeIsOrderedOnTheComputeStream) {
  CheckedDevice device;
  Workspace ws(device.memory());
  void* p = *ws.Get(1024);
  ASSERT_TRUE(device.Zero(p, 1024).ok());  // queued, not waited for
  ASSERT_TRUE(ws.Get(4096).ok());          // the free runs after it
  EXPECT_TRUE(device.Synchronize().ok());
}

// Work runs only when the host waits: a host read without a wait sees the poison (NaN), and the
// waited-for download the data; freed memory is ordered by the host's wait.
TEST(CheckedDevice, DeferredWorkAndPoison) {
  CheckedDevice device;
  Workspace ws(device.memory());
  float* p = static_cast<float*>(*ws.Get(4 * sizeof(float)));
  const float data[4] = {1, 2, 3, 4};
  ASSERT_TRUE(device.Upload(p, data, sizeof(data)).ok());
  EXPECT_TRUE(std::isnan(p[0]));  // a host read without a wait: the upload has not run
  float back[4] = {};
  ASSERT_TRUE(device.Download(back, p, sizeof(back)).ok());
  EXPECT_EQ(back[3], 4.0f);
  EXPECT_EQ(p[1], 2.0f);
  ASSERT_TRUE(ws.Get(64 * sizeof(float)).ok());  // the host waited: growing is safe
  EXPECT_TRUE(device.Synchronize().ok());
}

}  // namespace
}  // namespace moe
