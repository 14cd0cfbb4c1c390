// The expert-parallel MoE layer over the ranks of a world: every rank routes its own tokens, holds
// E/W of the experts and exchanges rows with the others (dispatch and combine all-to-alls). Each
// rank also runs the same layer alone over every rank's tokens with W local groups — what the W
// ranks must compute — and prints one line: its tokens, its experts, what it kept, and how far its
// outputs are from that 1-rank layer's.
//   mpirun -n 2 ./expert_parallel                     (MPI: one process per rank)
//   ./expert_parallel --backend loopback --ranks 2    (ranks as threads)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "comm/world.h"
#include "runtime/config/config.h"
#include "runtime/layer/make_moe_layer.h"
#include "runtime/layer/moe_layer.h"

namespace {

constexpr const char* kConfig = R"pb(
  moe {
    model_dim: 8
    num_experts: 4
    expert { hidden_dim: 16 }
    router { gate: TOPK top_k: 2 capacity_factor_train: 1.25 }
  }
  seed: 3
)pb";
constexpr int64_t kTokensPerRank = 24;

// Token t of the whole batch (every rank makes the same values for the same global token).
void FillTokens(int64_t first, int64_t tokens, int64_t m, std::vector<float>* x) {
  x->resize(static_cast<size_t>(tokens * m));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < m; ++c) {
      (*x)[static_cast<size_t>(t * m + c)] = std::sin(0.7f * static_cast<float>((first + t) * m + c));
    }
  }
}

// y = layer(x) with parameters from `seed` (initialized by name: the same values on any rank).
moe::Status Run(moe::MoeLayer& layer, const moe::config::LayerConfig& cfg, uint64_t seed,
                const std::vector<float>& x, int64_t first_token, std::vector<float>* y) {
  moe::MoeLayerParams params =
      moe::MakeLayerParams(cfg, layer.first_expert(), layer.num_local_experts());
  moe::InitLayerParams(cfg, seed, &params);
  MOE_RETURN_IF_ERROR(layer.SetParams(params));
  moe::RouteContext ctx;
  ctx.train = true;
  ctx.token_offset = first_token;
  const int64_t tokens = static_cast<int64_t>(x.size()) / cfg.model_dim();
  y->resize(x.size());
  return layer.Forward(x.data(), tokens, ctx, y->data());
}

moe::Status RankMain(moe::comm::Communicator& comm) {
  MOE_ASSIGN_OR_RETURN(moe::MoeConfig cfg, moe::ParseConfig(kConfig, "kConfig"));
  const int w = comm.size(), r = comm.rank();
  const int64_t s = kTokensPerRank, m = cfg.moe().model_dim();

  // This rank's share: its tokens, E/W experts, dispatch and combine over `comm`.
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<moe::MoeLayer> layer,
                       moe::MakeMoeLayer(cfg.moe(), cfg.compute(), {.ep = &comm, .local_rank = comm.local_rank()}));
  std::vector<float> x, y;
  FillTokens(r * s, s, m, &x);
  MOE_RETURN_IF_ERROR(Run(*layer, cfg.moe(), cfg.seed(), x, r * s, &y));

  // The same layer alone on every rank's tokens, one local group per rank.
  moe::config::LayerConfig whole_cfg = cfg.moe();
  whole_cfg.mutable_router()->set_num_local_groups(w);
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<moe::MoeLayer> whole,
                       moe::MakeMoeLayer(whole_cfg, cfg.compute()));
  std::vector<float> all_x, all_y;
  FillTokens(0, w * s, m, &all_x);
  MOE_RETURN_IF_ERROR(Run(*whole, whole_cfg, cfg.seed(), all_x, 0, &all_y));

  double diff = 0, scale = 0;
  for (int64_t i = 0; i < s * m; ++i) {
    const float want = all_y[static_cast<size_t>(r * s * m + i)];
    diff = std::max(diff, static_cast<double>(std::abs(y[static_cast<size_t>(i)] - want)));
    scale = std::max(scale, static_cast<double>(std::abs(want)));
  }
  const moe::DispatchPlan& plan = layer->plan();
  const std::vector<int32_t> mine(plan.slot_expert.begin(), plan.slot_expert.end());
  const std::vector<int32_t> want(whole->plan().slot_expert.begin() + r * s * plan.top_k,
                                  whole->plan().slot_expert.begin() + (r + 1) * s * plan.top_k);
  const bool same = mine == want && diff <= 1e-5 * scale;
  std::printf("rank %d/%d: %lld tokens, experts [%d, %d), %lld of %lld slots kept, "
              "max |y - y_1rank| = %.2e: %s\n",
              r, w, static_cast<long long>(s), layer->first_expert(),
              layer->first_expert() + layer->num_local_experts(),
              static_cast<long long>(s * plan.top_k - plan.dropped_slots),
              static_cast<long long>(s * plan.top_k), diff,
              same ? "matches the 1-rank layer" : "DIFFERS from the 1-rank layer");
  std::fflush(stdout);
  return same ? moe::Status::Ok() : moe::Internal("rank output differs from the 1-rank layer");
}

}  // namespace

int main(int argc, char** argv) {
  moe::comm::WorldOptions options;
  options.backend = moe::comm::DefaultBackend();  // mpi under mpirun, else loopback
  options.ranks = 2;
  options.tool = "expert_parallel";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--backend") == 0) options.backend = argv[i + 1];
    else if (std::strcmp(argv[i], "--ranks") == 0) options.ranks = std::atoi(argv[i + 1]);
  }
  auto world = moe::comm::MakeWorld(options);
  if (!world.ok()) {
    std::fprintf(stderr, "expert_parallel: %s\n", world.status().ToString().c_str());
    return 2;
  }
  const moe::Status s = (*world)->Run([](moe::comm::RankContext& rank) { return RankMain(rank.comm); });
  return s.ok() ? 0 : 1;
}
