// moe_ep_layer_bench: the expert-parallel CPU layer (router, Dispatch, local experts, Combine),
// forward + backward, on every rank of a world — the layer moe_train runs in each of its blocks.
// Each rank routes its own S tokens; E/W experts per rank; GELU-tanh FFN experts, top-k, capacity
// factor 1.25 (the shapes of moe_layer_bench). Prints, on rank 0, one line per shape with the
// median over calls of the slowest rank (forward, and forward + backward) and the layer's floor —
// its experts' GEMMs alone (per local expert the six of an FFN's forward and backward, on the rows
// the rank's experts received, every rank at once, through the same OpenBLAS) — and writes them as
// JSON with -J. bench/ep_layer_vs_torch.py runs it beside the PyTorch gloo layer of the same shapes
// (bench/torch_ep_layer_bench.py) and prints the ratios.
//
//   mpirun -n 2 build/bench/moe_ep_layer_bench --shape small -n 10
//   build/bench/moe_ep_layer_bench --backend loopback --ranks 4 --wire-dtype bf16
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/bench_json.h"
#include "bench/layer_shapes.h"
#include "comm/bench/bench_loop.h"
#include "comm/world.h"
#include "experts/cpu/blas.h"
#include "runtime/config/config.h"
#include "experts/cpu/blas.h"
#include "runtime/exchange/expert_exchange.h"
#include "runtime/layer/make_moe_layer.h"

namespace {

using Shape = moe::bench::LayerShape;

struct Flags {
  std::string backend;
  int ranks = 2;
  std::string shape = "small";
  int iters = 10;
  int warmup = 2;
  std::string wire_dtype = "fp32";
  bool dropless_exchange = false;
  int pipeline_degree = 1;
  std::string transport = "auto";
  std::string json;
};

moe::ExchangeTransport TransportOf(const std::string& name) {
  if (name == "direct") return moe::ExchangeTransport::kDirect;
  if (name == "alltoall") return moe::ExchangeTransport::kAllToAll;
  return moe::ExchangeTransport::kAuto;
}

moe::Status RunShape(moe::comm::Communicator& comm, const Flags& f, const Shape& sh,
                     std::ofstream* json) {
  moe::MoeConfig cfg;
  *cfg.mutable_moe() = moe::bench::LayerShapeConfig(sh);
  const int w = comm.size(), r = comm.rank();
  if (sh.e % w != 0) {
    return moe::InvalidArgument("--shape " + sh.name + ": " + std::to_string(sh.e) +
                                " experts are not divisible by " + std::to_string(w) + " ranks");
  }
  MOE_ASSIGN_OR_RETURN(
      std::unique_ptr<moe::MoeLayer> layer,
      moe::MakeMoeLayer(cfg.moe(), cfg.compute(),
                        {.ep = &comm,
                         .exchange = {.dropless = f.dropless_exchange,
                                      .pipeline_degree = f.pipeline_degree,
                                      .bf16_wire = f.wire_dtype == "bf16",
                                      .transport = TransportOf(f.transport)},
                         .local_rank = r}));
  moe::MoeLayerParams params =
      moe::MakeLayerParams(cfg.moe(), layer->first_expert(), layer->num_local_experts());
  moe::InitLayerParams(cfg.moe(), 1, &params);
  MOE_RETURN_IF_ERROR(layer->SetParams(params));
  moe::MoeLayerParams grads =
      moe::MakeLayerParams(cfg.moe(), layer->first_expert(), layer->num_local_experts());
  const size_t n = static_cast<size_t>(sh.s) * static_cast<size_t>(sh.m);
  std::vector<float> x(n), dy(n), y(n), dx(n);
  std::mt19937 rng(static_cast<uint32_t>(17 + r));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < n; ++i) {
    x[i] = normal(rng);
    dy[i] = normal(rng);
  }
  moe::RouteContext ctx;
  ctx.train = true;
  ctx.token_offset = static_cast<int64_t>(r) * sh.s;
  const auto forward = [&] { return layer->Forward(x.data(), sh.s, ctx, y.data()); };
  MOE_ASSIGN_OR_RETURN(const moe::comm::bench::Timing fwd,
                       moe::comm::bench::TimeLoop(comm, f.warmup, f.iters, forward));
  MOE_ASSIGN_OR_RETURN(const moe::comm::bench::Timing fwd_bwd,
                       moe::comm::bench::TimeLoop(comm, f.warmup, f.iters, [&]() -> moe::Status {
                         MOE_RETURN_IF_ERROR(forward());
                         return layer->Backward(dy.data(), dx.data(), &grads);
                       }));
  // The floor: the rows this rank's experts received in one forward (the dispatch's bytes from
  // every rank, the self block included), split evenly over its local experts (capacity mode:
  // every expert C rows per source), through the six GEMMs of an FFN's forward and backward.
  int64_t received = sh.s;  // one rank: every token's k rows
  if (moe::ExchangeStats* stats = layer->exchange_stats(); stats != nullptr) {
    stats->Reset();
    MOE_RETURN_IF_ERROR(forward());
    received = 0;
    for (const moe::ExchangeCall& c : stats->calls) {
      if (c.kind != moe::ExchangeCall::Kind::kDispatch || c.backward) continue;
      for (const int64_t b : c.bytes_from_rank) received += b;
    }
    received /= sh.m * (f.wire_dtype == "bf16" ? 2 : 4);
  } else {
    received *= sh.k;
  }
  const int64_t local = sh.e / w, rows = received / local;
  std::vector<float> a(static_cast<size_t>(rows * std::max(sh.m, sh.h))),
      b(static_cast<size_t>(sh.m * sh.h)), c(static_cast<size_t>(rows * std::max(sh.m, sh.h)));
  for (size_t i = 0; i < a.size(); ++i) a[i] = normal(rng);
  for (size_t i = 0; i < b.size(); ++i) b[i] = normal(rng);
  const auto gemms = [&]() -> moe::Status {
    using moe::blas::Gemm;
    for (int64_t e = 0; e < local; ++e) {
      Gemm(false, false, rows, sh.h, sh.m, 1.0f, a.data(), b.data(), 0.0f, c.data());  // x·W1
      Gemm(false, false, rows, sh.m, sh.h, 1.0f, a.data(), b.data(), 0.0f, c.data());  // h·W2
      Gemm(false, true, rows, sh.h, sh.m, 1.0f, a.data(), b.data(), 0.0f, c.data());   // dy·W2ᵀ
      Gemm(true, false, sh.h, sh.m, rows, 1.0f, a.data(), c.data(), 0.0f, b.data());   // hᵀ·dy
      Gemm(false, true, rows, sh.m, sh.h, 1.0f, a.data(), b.data(), 0.0f, c.data());   // dh·W1ᵀ
      Gemm(true, false, sh.m, sh.h, rows, 1.0f, a.data(), c.data(), 0.0f, b.data());   // xᵀ·dh
    }
    return moe::Status::Ok();
  };
  MOE_ASSIGN_OR_RETURN(const moe::comm::bench::Timing floor,
                       moe::comm::bench::TimeLoop(comm, 1, f.iters, gemms));
  if (r != 0) return moe::Status::Ok();
  std::printf("  %-13s %5d %4d %5d %4d %3d %2d %4d %6s | %10.2f %12.2f %10.2f\n", sh.name.c_str(),
              sh.s, sh.m, sh.h, sh.e, sh.k, w, moe::blas::GetThreads(), f.wire_dtype.c_str(),
              fwd.median_us / 1e3, fwd_bwd.median_us / 1e3, floor.median_us / 1e3);
  std::fflush(stdout);
  if (json != nullptr && json->is_open()) {
    for (const auto& [op, t] : {std::pair{std::string("ep_layer_fwd"), fwd},
                                std::pair{std::string("ep_layer_fwd_bwd"), fwd_bwd},
                                std::pair{std::string("ep_layer_gemm_floor"), floor}}) {
      moe::comm::bench::BenchRow row;
      row.op = op + "/" + sh.name;
      row.backend = std::string(comm.backend());
      row.ranks = w;
      row.count = sh.s;
      row.bytes = static_cast<int64_t>(sh.s) * sh.m * 4;
      row.dtype = f.wire_dtype == "bf16" ? "bfloat16" : "float32";
      moe::comm::bench::SetTiming(&row, t);
      MOE_RETURN_IF_ERROR(moe::WriteBenchJson(*json, row));
    }
  }
  return moe::Status::Ok();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Expert-parallel MoE layer forward+backward benchmark (CPU, one thread per rank)."};
  Flags f;
  app.add_option("--backend", f.backend, "mpi (under mpirun) or loopback; default: mpi under mpirun")
      ->check(CLI::IsMember({"mpi", "loopback"}));
  app.add_option("--ranks", f.ranks, "loopback ranks")->check(CLI::Range(1, 1024));
  app.add_option("--shape", f.shape, "small, medium, fine-grained or all")
      ->check(CLI::IsMember({"small", "medium", "fine-grained", "all"}));
  app.add_option("-n,--iters", f.iters, "timed calls (median reported)")->check(CLI::Range(1, 1000));
  app.add_option("-w,--warmup", f.warmup, "untimed calls first")->check(CLI::Range(0, 1000));
  app.add_option("--wire-dtype", f.wire_dtype, "fp32 or bf16 (parallel.wire_dtype)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_flag("--dropless-exchange", f.dropless_exchange, "counts + all-to-all-v");
  app.add_option("--pipeline-degree", f.pipeline_degree, "chunks per exchange")
      ->check(CLI::Range(1, 16));
  app.add_option("--exchange-transport", f.transport,
                 "auto (direct writes where the ranks share a node), alltoall or direct")
      ->check(CLI::IsMember({"auto", "alltoall", "direct"}));
  app.add_option("-J,--json", f.json, "write one BenchResult JSON line per measurement");
  CLI11_PARSE(app, argc, argv);
  moe::blas::SetThreads(1);  // one thread per rank: ranks share the cores
  moe::comm::WorldOptions options;
  options.backend = f.backend.empty() ? moe::comm::DefaultBackend() : f.backend;
  options.ranks = f.ranks;
  options.tool = "moe_ep_layer_bench";
  auto world = moe::comm::MakeWorld(options);
  if (!world.ok()) {
    std::fprintf(stderr, "moe_ep_layer_bench: %s\n", world.status().ToString().c_str());
    return 2;
  }
  std::ofstream json;
  if ((*world)->hosts_rank0()) {
    if (!f.json.empty()) {
      json.open(f.json, std::ios::app);
      if (!json) {
        std::fprintf(stderr, "moe_ep_layer_bench: cannot write -J %s\n", f.json.c_str());
        return 2;
      }
    }
    const char* coretype = std::getenv("OPENBLAS_CORETYPE");
    std::printf("# moe_ep_layer_bench: backend %s, %d ranks, OpenBLAS core %s "
                "(OPENBLAS_CORETYPE=%s), %d thread per rank; median of %d calls, slowest rank\n",
                std::string((*world)->backend()).c_str(), (*world)->size(), moe::blas::CoreName(),
                coretype ? coretype : "unset", moe::blas::GetThreads(), f.iters);
    std::printf("# %-13s %5s %4s %5s %4s %3s %2s %4s %6s | %10s %12s %10s\n", "shape", "S/rk", "M",
                "H", "E", "k", "W", "thr", "wire", "fwd ms", "fwd+bwd ms", "floor ms");
  }
  const moe::Status status = (*world)->Run([&](moe::comm::RankContext& rank) -> moe::Status {
    for (const Shape& sh : moe::bench::CpuLayerShapes()) {
      if (f.shape != "all" && f.shape != sh.name) continue;
      MOE_RETURN_IF_ERROR(RunShape(rank.comm, f, sh, rank.comm.rank() == 0 ? &json : nullptr));
    }
    return moe::Status::Ok();
  });
  return status.ok() ? 0 : 1;
}
