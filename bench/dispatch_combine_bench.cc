// moe_comm_bench --op dispatch_combine and --pipeline-degree (bench/dispatch_combine_bench.h).
#include "bench/dispatch_combine_bench.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <utility>

#include "base/bf16.h"
#include "base/clock.h"
#include "runtime/device/host_device.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/exchange/expert_exchange.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/exchange/expert_placement.h"
#include "runtime/exchange/redundant_experts.h"

namespace moe {
namespace {

using comm::DataType;
using comm::bench::ReduceScalar;

StatusOr<DispatchPlan> MakePlan(const DispatchCombineBenchOptions& o, int rank, int ranks,
                                int64_t tokens, int e) {
  config::RouterConfig cfg;
  cfg.set_gate(config::TOPK);
  cfg.set_top_k(o.top_k);
  cfg.set_capacity_factor_train(o.capacity_factor);
  cfg.set_capacity_factor_eval(o.capacity_factor);
  cfg.set_min_capacity(1);
  if (o.groups_per_token > 0) {
    cfg.set_num_expert_groups(ranks);  // one expert group per rank
    cfg.set_groups_per_token(o.groups_per_token);
  }
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = o.seed;
  const Tensor probs = MakeSkewedProbs(o.skew, o.seed, rank, tokens, e, o.top_k);
  return BuildDispatchPlan(cfg, probs, {}, ctx);
}

// Positive, exact (small integer) input of token t, column c on `rank`.
float TokenValue(int rank, int64_t t, int64_t c) {
  return static_cast<float>(1 + (rank * 131 + t * 17 + c * 7) % 97);
}

// Every token's input row on `rank` (tokens x m).
Tensor TokenInput(int rank, int64_t tokens, int64_t m) {
  Tensor x(tokens, m);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < m; ++c) x(t, c) = TokenValue(rank, t, c);
  }
  return x;
}

// The combined result of identity experts: y[t] = Σ over t's kept rows of gate · x[t] (x[t]
// rounded to bf16 with `bf16`), summed in the plan's token_rows order (the exchange's order, so
// equality is exact). Returns the elements of `y` that differ.
int64_t WrongIdentityCombine(const DispatchPlan& plan, const Tensor& x, const Tensor& y,
                             bool bf16) {
  const int64_t m = x.cols();
  int64_t wrong = 0;
  std::vector<float> want(static_cast<size_t>(m));
  for (int64_t t = 0; t < plan.num_tokens; ++t) {
    std::fill(want.begin(), want.end(), 0.0f);
    for (int64_t i = plan.token_row_offset[t]; i < plan.token_row_offset[t + 1]; ++i) {
      const float g = plan.row_gate[plan.token_rows[i]];
      for (int64_t c = 0; c < m; ++c) want[c] += g * (bf16 ? RoundToBf16(x(t, c)) : x(t, c));
    }
    for (int64_t c = 0; c < m; ++c) wrong += y(t, c) != want[c] ? 1 : 0;
  }
  return wrong;
}

// One float32 row exchange of Forward, as the raw baseline replays it (counts in elements).
struct RowExchange {
  bool equal = false;  // capacity mode: the executor's AllToAll, every count send_counts[0]
  std::vector<int64_t> send_counts, send_displs, recv_counts, recv_displs;
};

std::vector<int64_t> Floats(const std::vector<int64_t>& bytes) {
  std::vector<int64_t> out(bytes.size());
  for (size_t i = 0; i < bytes.size(); ++i) out[i] = bytes[i] / static_cast<int64_t>(sizeof(float));
  return out;
}

// Displacements of blocks packed back to back.
std::vector<int64_t> Displacements(const std::vector<int64_t>& counts) {
  std::vector<int64_t> out(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) out[i] = out[i - 1] + counts[i - 1];
  return out;
}

RowExchange FromCall(const ExchangeCall& call, bool equal) {
  RowExchange x;
  x.equal = equal;
  x.send_counts = Floats(call.bytes_to_rank);
  x.recv_counts = Floats(call.bytes_from_rank);
  x.send_displs = Displacements(x.send_counts);
  x.recv_displs = Displacements(x.recv_counts);
  return x;
}

// The raw exchange with the executor's per-peer counts: `raw`'s all-to-all-v when given, else the
// plain communicator's AllToAll (capacity mode) or AllToAllV (dropless), as the executor calls it.
Status ReplayExchange(comm::Communicator& comm, comm::bench::RawCollectives* raw,
                      const RowExchange& x, const float* send, float* recv) {
  if (raw != nullptr) {
    return raw->AllToAllV(send, x.send_counts, x.send_displs, recv, x.recv_counts, x.recv_displs,
                          DataType::kFloat32);
  }
  if (x.equal) {
    return comm.AllToAll(send, recv, x.send_counts.empty() ? 0 : x.send_counts[0],
                         DataType::kFloat32);
  }
  return comm.AllToAllV(send, x.send_counts, x.send_displs, recv, x.recv_counts, x.recv_displs,
                        DataType::kFloat32);
}

// The forward (not backward) exchange call of `kind` in `stats`, or null.
const ExchangeCall* FindCall(const ExchangeStats& stats, ExchangeCall::Kind kind) {
  for (const ExchangeCall& c : stats.calls) {
    if (c.kind == kind && !c.backward) return &c;
  }
  return nullptr;
}

int64_t Sum(const std::vector<int64_t>& v) {
  int64_t total = 0;
  for (int64_t x : v) total += x;
  return total;
}

// A table row of float32 row exchanges: `sent_sum` = bytes the dispatch sent, summed over ranks
// (size = the mean per rank).
comm::bench::BenchRow RowExchangeRow(std::string op, const comm::Communicator& comm,
                                     double sent_sum) {
  comm::bench::BenchRow row;
  row.op = std::move(op);
  row.backend = std::string(comm.backend());
  row.ranks = comm.size();
  row.bytes = static_cast<int64_t>(sent_sum / comm.size() + 0.5);
  row.count = row.bytes / 4;
  row.dtype = "float32";
  return row;
}

void PrintHeader(std::FILE* out, const comm::Communicator& comm,
                 const DispatchCombineBenchOptions& o, int e, const char* baseline) {
  const int n = comm.size();
  const bool dropless_routing = o.capacity_factor <= 0;
  std::fprintf(
      out,
      "# moe_comm_bench: op dispatch_combine, backend %s, %d ranks, memory %s, rows float32 and "
      "bfloat16, "
      "iters %d, warmup %d, check %d\n",
      std::string(comm.backend()).c_str(), n, MemorySpaceName(comm.memory_space()), o.iters,
      o.warmup, o.check ? 1 : 0);
  std::fprintf(
      out,
      "# hidden M %lld, experts E %d (%d per rank), top-k %d, capacity factor %g (%s), exchange "
      "%s%s, skew %s, seed %llu\n",
      static_cast<long long>(o.hidden), e, e / n, o.top_k, o.capacity_factor,
      dropless_routing ? "dropless" : "capacity",
      o.dropless_exchange || dropless_routing ? "dropless (counts + alltoallv)"
                                              : "padded (C rows per block)",
      o.ranks_per_node > 0
          ? (", two-stage with " + std::to_string(o.ranks_per_node) + " ranks per node").c_str()
          : "",
      o.skew_name.c_str(), static_cast<unsigned long long>(o.seed));
  std::fprintf(
      out,
      "# size = bytes sent per rank in the dispatch (mean over ranks); count = its elements of "
      "the row's type; time = dispatch + combine;\n# baseline = %s of the same per-peer counts (mean of "
      "the dispatch and combine directions); ratio = time / (2 x baseline)\n",
      baseline);
  std::fprintf(out, "# transport = how the rows move: alltoall (the communicator's all-to-all) or "
               "direct (written straight into the peers' shared buffers, a fence per exchange)\n");
  std::fprintf(out, "#%11s %12s %8s %9s %7s %10s %10s %10s %8s %8s %7s %12s %7s\n", "size",
               "count", "type", "transport", "tokens", "dispatch", "combine", "time", "algbw",
               "busbw", "#wrong", "baseline", "ratio");
  std::fprintf(out, "#%11s %12s %8s %9s %7s %10s %10s %10s %8s %8s %7s %12s %7s\n", "(B)",
               "(elements)", "", "", "(/rank)", "(us)", "(us)", "(us)", "(GB/s)", "(GB/s)", "",
               "(us)", "");
}

void PrintRow(std::FILE* out, const comm::bench::BenchRow& r, const char* transport,
              int64_t tokens, double dispatch_us, double combine_us) {
  std::fprintf(out,
               " %11lld %12lld %8s %9s %7lld %10.1f %10.1f %10.1f %8.2f %8.2f %7lld %12.1f %7.2f\n",
               static_cast<long long>(r.bytes), static_cast<long long>(r.count), r.dtype.c_str(),
               transport, static_cast<long long>(tokens), dispatch_us, combine_us, r.time_us, r.algbw_gbps,
               r.busbw_gbps, static_cast<long long>(r.wrong), r.baseline_time_us,
               r.baseline_time_us > 0 ? r.time_us / (2 * r.baseline_time_us) : 0);
  std::fflush(out);
}

}  // namespace

int DispatchCombineExperts(const DispatchCombineBenchOptions& o, int ranks) {
  return o.experts > 0 ? o.experts : 2 * ranks;
}

Status CheckDispatchCombineShape(const DispatchCombineBenchOptions& o, int ranks) {
  const int e = DispatchCombineExperts(o, ranks);
  if (e % ranks != 0) {
    return InvalidArgument("--experts=" + std::to_string(e) + " must be divisible by the " +
                           std::to_string(ranks) + " ranks");
  }
  if (o.top_k > e) {
    return InvalidArgument("--topk=" + std::to_string(o.top_k) + " must be <= the " +
                           std::to_string(e) + " experts");
  }
  if (o.groups_per_token > 0) {
    const int g = o.groups_per_token;
    if (g > ranks || o.top_k % g != 0 || o.top_k / g > e / ranks || ranks > 64) {
      return InvalidArgument("--groups-per-token=" + std::to_string(g) +
                             " must be <= the " + std::to_string(ranks) +
                             " ranks (at most 64), divide --topk=" + std::to_string(o.top_k) +
                             " and leave --topk / it <= the " + std::to_string(e / ranks) +
                             " experts per rank");
    }
  }
  return Status::Ok();
}

FanOut DestinationRanks(const DispatchPlan& plan, int ranks) {
  FanOut f;
  const int64_t k = plan.top_k, per_rank = plan.num_experts / ranks;
  std::vector<int64_t> seen(static_cast<size_t>(ranks), -1);
  for (int64_t t = 0; t < plan.num_tokens; ++t) {
    int64_t n = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t ex = plan.slot_expert[t * k + j];
      if (ex < 0) continue;
      const int64_t r = ex / per_rank;
      if (seen[r] != t) {
        seen[r] = t;
        ++n;
      }
    }
    f.sum += n;
    f.max = std::max(f.max, n);
  }
  return f;
}

std::vector<int64_t> DispatchCombineTokens(const std::vector<int64_t>& sizes, int top_k,
                                           int64_t hidden) {
  std::vector<int64_t> out;
  const int64_t per_token = static_cast<int64_t>(top_k) * hidden * 4;
  for (const int64_t b : sizes) {
    const int64_t t = std::max<int64_t>(1, b / per_token);
    if (out.empty() || out.back() != t) out.push_back(t);
  }
  return out;
}

Tensor MakeSkewedProbs(const ProbsSkew& skew, uint64_t seed, int rank, int64_t tokens, int e,
                       int k) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(rank) * 7919 + 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<double> zipf(static_cast<size_t>(e), 1.0);
  if (skew.kind == ProbsSkew::kZipf) {
    for (int i = 0; i < e; ++i) zipf[static_cast<size_t>(i)] = std::pow(i + 1.0, -skew.param);
  }
  // Draws one expert from `weights` (zeroed for experts already chosen).
  const auto draw = [&](const std::vector<double>& weights) {
    double total = 0;
    for (double w : weights) total += w;
    double u = unit(rng) * total;
    int last = -1;
    for (int i = 0; i < e; ++i) {
      if (weights[static_cast<size_t>(i)] <= 0) continue;
      last = i;
      if (u < weights[static_cast<size_t>(i)]) return i;
      u -= weights[static_cast<size_t>(i)];
    }
    return last;
  };
  Tensor probs(tokens, e);
  std::vector<double> row(static_cast<size_t>(e)), weights(static_cast<size_t>(e));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int i = 0; i < e; ++i) row[static_cast<size_t>(i)] = 0.25 * unit(rng);
    std::vector<bool> taken(static_cast<size_t>(e), false);
    for (int j = 0; j < k; ++j) {
      int pick;
      if (skew.kind == ProbsSkew::kHot && j == 0) {
        pick = (e == 1 || unit(rng) < skew.param) ? 0 : 1 + static_cast<int>(unit(rng) * (e - 1));
        pick = std::min(pick, e - 1);
      } else {
        bool any_other = false;
        for (int i = 0; i < e; ++i) {
          const bool hot_excluded = skew.kind == ProbsSkew::kHot && i == 0;
          weights[static_cast<size_t>(i)] =
              taken[static_cast<size_t>(i)] || hot_excluded ? 0.0 : zipf[static_cast<size_t>(i)];
          any_other = any_other || weights[static_cast<size_t>(i)] > 0;
        }
        if (!any_other) weights[0] = 1.0;  // hot: only expert 0 is left
        pick = draw(weights);
      }
      taken[static_cast<size_t>(pick)] = true;
      row[static_cast<size_t>(pick)] += (k - j) + 0.5;
    }
    double sum = 0;
    for (double v : row) sum += v;
    for (int i = 0; i < e; ++i) probs(t, i) = static_cast<float>(row[static_cast<size_t>(i)] / sum);
  }
  return probs;
}

namespace {

// The experts of the tables that run them: GELU FFNs of hidden expert_hidden (default 4 M).
experts::FfnShape BenchExpertShape(const DispatchCombineBenchOptions& o) {
  experts::FfnShape shape;
  shape.model_dim = o.hidden;
  shape.hidden_dim = o.expert_hidden > 0 ? o.expert_hidden : 4 * o.hidden;
  shape.activation = experts::Activation::kGeluTanh;
  shape.bias = true;
  return shape;
}

// Weights and biases N(0, 1) / sqrt(rows), drawn from `rng`.
void RandomExpert(std::mt19937_64* rng, experts::FfnParams* p) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Tensor* t : {&p->w1, &p->b1, &p->w2, &p->b2}) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(std::max<int64_t>(t->rows(), 1)));
    for (int64_t i = 0; i < t->size(); ++i) (*t)[i] = scale * normal(*rng);
  }
}

}  // namespace

Status RunPipelineBench(comm::Communicator& comm, const DispatchCombineBenchOptions& o,
                        std::FILE* out, const comm::bench::RowSink& sink) {
  const int n = comm.size();
  MOE_RETURN_IF_ERROR(CheckDispatchCombineShape(o, n));
  const int e = DispatchCombineExperts(o, n), local = e / n;
  const bool rank0 = comm.rank() == 0;
  std::vector<int> degrees = {1};
  for (int d : o.pipeline_degrees) {
    if (d < 1 || d > ExpertCompute::kMaxParts) {
      return InvalidArgument("--pipeline-degree " + std::to_string(d) + " must be in [1, " +
                             std::to_string(ExpertCompute::kMaxParts) + "]");
    }
    if (std::find(degrees.begin(), degrees.end(), d) == degrees.end()) degrees.push_back(d);
  }
  const experts::FfnShape shape = BenchExpertShape(o);
  std::vector<experts::FfnParams> params(static_cast<size_t>(local),
                                         experts::FfnParams::Zeros(shape));
  std::mt19937_64 rng(o.seed * 1000003 + static_cast<uint64_t>(comm.rank()));
  for (experts::FfnParams& p : params) RandomExpert(&rng, &p);
  if (rank0) {
    std::fprintf(out,
                 "# moe_comm_bench: op dispatch_combine --pipeline-degree, backend %s, %d ranks, "
                 "iters %d, warmup %d\n# hidden M %lld, expert hidden H %lld (GELU, bias), "
                 "experts E %d (%d per rank), top-k %d, capacity factor %g, exchange %s, skew %s\n",
                 std::string(comm.backend()).c_str(), n, o.iters, o.warmup,
                 static_cast<long long>(shape.model_dim), static_cast<long long>(shape.hidden_dim),
                 e, local, o.top_k, o.capacity_factor,
                 o.dropless_exchange || o.capacity_factor <= 0 ? "dropless" : "padded",
                 o.skew_name.c_str());
    std::fprintf(
        out,
        "# time = forward + backward of the expert-parallel executor; exchange / experts = "
        "inside the communicator / the experts (slowest rank); speedup = time(degree 1) / "
        "time\n");
    std::fprintf(out, "#%11s %7s %6s %10s %10s %10s %8s %7s\n", "size", "tokens", "degree", "time",
                 "exchange", "experts", "speedup", "#wrong");
    std::fprintf(out, "#%11s %7s %6s %10s %10s %10s %8s %7s\n", "(B)", "(/rank)", "", "(us)",
                 "(us)", "(us)", "", "");
  }
  comm::bench::SweepSummary summary;
  for (const int64_t tokens : o.tokens) {
    MOE_ASSIGN_OR_RETURN(const DispatchPlan plan, MakePlan(o, comm.rank(), comm.size(), tokens, e));
    const Tensor x = TokenInput(comm.rank(), tokens, o.hidden);
    const Tensor dy = TokenInput(comm.rank() + 7919, tokens, o.hidden);
    Tensor ref_y, ref_dx;
    double ref_time_us = 0;
    for (const int d : degrees) {
      HostDevice device;
      ExpertParallelExecutor exec(&device, &comm, shape, e,
                                  {.dropless = o.dropless_exchange,
                                   .pipeline_degree = d,
                                   .ranks_per_node = o.ranks_per_node});
      MOE_RETURN_IF_ERROR(exec.EnableHierarchical());
      MOE_RETURN_IF_ERROR(exec.SetWeights(params));
      MOE_ASSIGN_OR_RETURN(const PlanRows rows, PlanRowsOn(device, plan, nullptr));
      std::vector<experts::FfnParams> grads(static_cast<size_t>(local),
                                            experts::FfnParams::Zeros(shape));
      Tensor packed_y(tokens, o.hidden), packed_dx(tokens, o.hidden);
      const auto step = [&]() -> Status {
        packed_y.Fill(0.0f);
        packed_dx.Fill(0.0f);
        MOE_RETURN_IF_ERROR(exec.Forward(plan, rows, x.view(), packed_y.view()));
        return exec.Backward(plan, dy.view(), grads, packed_dx.view());
      };
      for (int i = 0; i < o.warmup; ++i) MOE_RETURN_IF_ERROR(step());
      exec.stats().Reset();
      MOE_ASSIGN_OR_RETURN(const comm::bench::Timing timing,
                           comm::bench::TimeLoop(comm, 0, o.iters, step));
      const double time_us = timing.mean_us;
      MOE_ASSIGN_OR_RETURN(
          const double exchange_us,
          ReduceScalar(comm, exec.stats().AllToAllSeconds() * 1e6 / o.iters, comm::ReduceOp::kMax));
      MOE_ASSIGN_OR_RETURN(
          const double experts_us,
          ReduceScalar(comm, exec.stats().expert_seconds * 1e6 / o.iters, comm::ReduceOp::kMax));
      int64_t sent = 0;
      for (const ExchangeCall& c : exec.stats().calls) {
        if (c.kind == ExchangeCall::Kind::kDispatch && !c.backward) sent += Sum(c.bytes_to_rank);
      }
      if (d == 1) {
        ref_y = packed_y;
        ref_dx = packed_dx;
        ref_time_us = time_us;
      }
      int64_t mine = 0;
      for (const auto& [got, want] :
           {std::pair{&packed_y, &ref_y}, std::pair{&packed_dx, &ref_dx}}) {
        float scale = 0.0f;
        for (int64_t i = 0; i < want->size(); ++i) scale = std::max(scale, std::abs((*want)[i]));
        if (got->size() != want->size()) {
          mine += want->size();
          continue;
        }
        for (int64_t i = 0; i < want->size(); ++i) {
          if (!(std::abs((*got)[i] - (*want)[i]) <= 1e-5f * scale)) ++mine;
        }
      }
      MOE_ASSIGN_OR_RETURN(const double wrong,
                           ReduceScalar(comm, static_cast<double>(mine), comm::ReduceOp::kSum));
      MOE_ASSIGN_OR_RETURN(
          const double sent_sum,
          ReduceScalar(comm, static_cast<double>(sent) / o.iters, comm::ReduceOp::kSum));
      comm::bench::BenchRow row =
          RowExchangeRow("ep_pipeline_d" + std::to_string(d), comm, sent_sum);
      comm::bench::SetTiming(&row, timing);
      row.wrong = static_cast<int64_t>(wrong);
      row.baseline_time_us = ref_time_us;
      row.baseline = "ep_pipeline_d1";
      summary.Add(0, wrong);
      if (!rank0) continue;
      std::fprintf(out, " %11lld %7lld %6d %10.1f %10.1f %10.1f %8.2f %7lld\n",
                   static_cast<long long>(row.bytes), static_cast<long long>(tokens), d, time_us,
                   exchange_us, experts_us, time_us > 0 ? ref_time_us / time_us : 0,
                   static_cast<long long>(row.wrong));
      std::fflush(out);
      if (sink) MOE_RETURN_IF_ERROR(sink(row));
    }
  }
  return summary.Finish(nullptr, "dispatch_combine --pipeline-degree");
}

Status RunRedundantBench(comm::Communicator& comm, const DispatchCombineBenchOptions& o,
                         std::FILE* out, const comm::bench::RowSink& sink) {
  const int n = comm.size(), me = comm.rank();
  MOE_RETURN_IF_ERROR(CheckDispatchCombineShape(o, n));
  const int e = DispatchCombineExperts(o, n);
  const bool rank0 = me == 0;
  const experts::FfnShape shape = BenchExpertShape(o);
  // The logical experts' weights, the same on every rank (seeded by expert id).
  std::vector<experts::FfnParams> logical(static_cast<size_t>(e), experts::FfnParams::Zeros(shape));
  for (int q = 0; q < e; ++q) {
    std::mt19937_64 rng(o.seed * 1000003 + static_cast<uint64_t>(q));
    RandomExpert(&rng, &logical[static_cast<size_t>(q)]);
  }
  if (rank0) {
    std::fprintf(out,
                 "# moe_comm_bench: op dispatch_combine --redundant-experts %d, backend %s, %d "
                 "ranks, iters %d, warmup %d\n# hidden M %lld, expert hidden H %lld, experts E %d, "
                 "top-k %d, capacity factor %g, exchange %s, skew %s; placement from the step's "
                 "all-reduced load\n",
                 o.redundant_experts, std::string(comm.backend()).c_str(), n, o.iters, o.warmup,
                 static_cast<long long>(shape.model_dim), static_cast<long long>(shape.hidden_dim),
                 e, o.top_k, o.capacity_factor,
                 o.dropless_exchange || o.capacity_factor <= 0 ? "dropless" : "padded",
                 o.skew_name.c_str());
    std::fprintf(out,
                 "# rows = expert rows a rank receives per forward (real / with padding), max/mean "
                 "over ranks; time = forward + backward (slowest rank); speedup = time(R=0) / "
                 "time; size = a rank's token rows (B)\n#%11s %7s %3s %10s %10s %10s %10s %10s "
                 "%8s %7s\n",
                 "size", "tokens", "R", "real", "padded", "time(us)", "exchange", "experts",
                 "speedup", "#wrong");
  }
  comm::bench::SweepSummary summary;
  for (const int64_t tokens : o.tokens) {
    MOE_ASSIGN_OR_RETURN(const DispatchPlan plan, MakePlan(o, me, n, tokens, e));
    // The load of every (source rank, logical expert): kept rows, all-reduced.
    std::vector<double> load(static_cast<size_t>(n * e), 0.0);
    for (int q = 0; q < e; ++q) {
      int64_t kept = 0;
      for (int64_t g = 0; g < plan.num_groups; ++g) kept += plan.group_expert_count[g * e + q];
      load[static_cast<size_t>(me * e + q)] = static_cast<double>(kept);
    }
    MOE_RETURN_IF_ERROR(comm.AllReduce(load.data(), load.data(), n * e, comm::DataType::kFloat64,
                                       comm::ReduceOp::kSum));
    const Tensor x = TokenInput(me, tokens, o.hidden);
    const Tensor dy = TokenInput(me + 7919, tokens, o.hidden);
    Tensor ref_y, ref_dx;
    double ref_time_us = 0;
    for (const int r : {0, o.redundant_experts}) {
      MOE_ASSIGN_OR_RETURN(const ExpertPlacement placement,
                           r == 0 ? IdentityPlacement(e, 0, n)
                                  : BalancedPlacement(load, e, r, n, o.ranks_per_node));
      const ExchangeOptions options{.dropless = o.dropless_exchange};
      HostDevice device;
      auto inner = std::make_unique<ExpertParallelExecutor>(&device, &comm, shape,
                                                            placement.num_physical(), options);
      ExpertParallelExecutor* stats_of = inner.get();
      RedundantExpertExecutor exec(std::move(inner), placement);
      std::vector<experts::FfnParams> params, grads;
      for (int s = 0; s < placement.per_rank; ++s) {
        params.push_back(logical[static_cast<size_t>(placement.logical_at(me, s))]);
        grads.push_back(experts::FfnParams::Zeros(shape));
      }
      MOE_RETURN_IF_ERROR(exec.SetWeights(params));
      Tensor y(tokens, o.hidden), dx(tokens, o.hidden);
      const auto step = [&]() -> Status {
        y.Fill(0.0f);
        dx.Fill(0.0f);
        MOE_RETURN_IF_ERROR(exec.Forward(plan, PlanRows{}, x.view(), y.view()));
        return exec.Backward(plan, dy.view(), grads, dx.view());
      };
      for (int i = 0; i < o.warmup; ++i) MOE_RETURN_IF_ERROR(step());
      stats_of->stats().Reset();
      MOE_ASSIGN_OR_RETURN(const comm::bench::Timing timing,
                           comm::bench::TimeLoop(comm, 0, o.iters, step));
      MOE_ASSIGN_OR_RETURN(const double exchange_us,
                           ReduceScalar(comm, stats_of->stats().AllToAllSeconds() * 1e6 / o.iters,
                                        comm::ReduceOp::kMax));
      MOE_ASSIGN_OR_RETURN(const double experts_us,
                           ReduceScalar(comm, stats_of->stats().expert_seconds * 1e6 / o.iters,
                                        comm::ReduceOp::kMax));
      // Rows this rank received in one forward dispatch: real (its physical experts' kept rows,
      // from the load and the replica split) and as exchanged (padding included).
      double real = 0.0;
      for (int s = 0; s < placement.per_rank; ++s) {
        const int q = placement.logical_at(me, s);
        double total = 0.0;
        for (int src = 0; src < n; ++src) total += load[static_cast<size_t>(src * e + q)];
        real += total / placement.replica_count(q);
      }
      double padded = 0.0;
      for (const ExchangeCall& c : stats_of->stats().calls) {
        if (c.kind != ExchangeCall::Kind::kDispatch || c.backward) continue;
        for (int64_t b : c.bytes_from_rank) padded += static_cast<double>(b);
      }
      padded /= 4.0 * static_cast<double>(o.hidden) * std::max(1, o.iters);
      double stats[4] = {real, padded, real, padded};
      MOE_RETURN_IF_ERROR(comm.AllReduce(stats, stats, 2, comm::DataType::kFloat64,
                                         comm::ReduceOp::kMax));
      MOE_RETURN_IF_ERROR(comm.AllReduce(stats + 2, stats + 2, 2, comm::DataType::kFloat64,
                                         comm::ReduceOp::kSum));
      const auto ratio = [n](double most, double sum) {
        return sum > 0 ? most / (sum / n) : 1.0;
      };
      if (r == 0) {
        ref_y = y;
        ref_dx = dx;
        ref_time_us = timing.mean_us;
      }
      int64_t mine = 0;
      for (const auto& [got, want] : {std::pair{&y, &ref_y}, std::pair{&dx, &ref_dx}}) {
        float scale = 0.0f;
        for (int64_t i = 0; i < want->size(); ++i) scale = std::max(scale, std::abs((*want)[i]));
        for (int64_t i = 0; i < want->size(); ++i) {
          if (!(std::abs((*got)[i] - (*want)[i]) <= 1e-5f * scale)) ++mine;
        }
      }
      MOE_ASSIGN_OR_RETURN(const double wrong,
                           ReduceScalar(comm, static_cast<double>(mine), comm::ReduceOp::kSum));
      comm::bench::BenchRow row = RowExchangeRow("redundant_r" + std::to_string(r), comm,
                                                 stats[3] * 4.0 * static_cast<double>(o.hidden));
      comm::bench::SetTiming(&row, timing);
      row.wrong = static_cast<int64_t>(wrong);
      row.baseline_time_us = ref_time_us;
      row.baseline = "redundant_r0";
      summary.Add(0, wrong);
      if (!rank0) continue;
      std::fprintf(out, " %11lld %7lld %3d %10.3f %10.3f %10.1f %10.1f %10.1f %8.2f %7lld\n",
                   static_cast<long long>(tokens * o.hidden * 4), static_cast<long long>(tokens),
                   r, ratio(stats[0], stats[2]),
                   ratio(stats[1], stats[3]), timing.mean_us, exchange_us, experts_us,
                   timing.mean_us > 0 ? ref_time_us / timing.mean_us : 0.0,
                   static_cast<long long>(row.wrong));
      std::fflush(out);
      if (sink) MOE_RETURN_IF_ERROR(sink(row));
    }
  }
  return summary.Finish(nullptr, "dispatch_combine --redundant-experts");
}

Status RunDispatchCombineBench(comm::Communicator& comm, const DispatchCombineBenchOptions& o,
                               comm::bench::RawCollectives* raw, std::FILE* out,
                               const comm::bench::RowSink& sink) {
  if (o.redundant_experts > 0) return RunRedundantBench(comm, o, out, sink);
  if (!o.pipeline_degrees.empty()) return RunPipelineBench(comm, o, out, sink);
  const int n = comm.size();
  MOE_RETURN_IF_ERROR(CheckDispatchCombineShape(o, n));
  const int e = DispatchCombineExperts(o, n);
  const bool rank0 = comm.rank() == 0;
  const char* baseline_name =
      raw != nullptr ? raw->Name(comm::bench::RawCollectives::Op::kAllToAllV) : "raw_alltoallv";
  if (rank0) PrintHeader(out, comm, o, e, baseline_name);
  comm::bench::SweepSummary summary;
  for (const int64_t tokens : o.tokens) {
   MOE_ASSIGN_OR_RETURN(const DispatchPlan plan, MakePlan(o, comm.rank(), comm.size(), tokens, e));
   {
     const FanOut fan = DestinationRanks(plan, n);
     MOE_ASSIGN_OR_RETURN(const double fan_sum, ReduceScalar(comm, static_cast<double>(fan.sum),
                                                            comm::ReduceOp::kSum));
     MOE_ASSIGN_OR_RETURN(const double fan_max, ReduceScalar(comm, static_cast<double>(fan.max),
                                                            comm::ReduceOp::kMax));
     if (rank0) {
       std::fprintf(out,
                    "# %lld tokens/rank: destination ranks per token (kept rows) mean %.3f, max "
                    "%.0f%s\n",
                    static_cast<long long>(tokens), fan_sum / static_cast<double>(tokens * n),
                    fan_max,
                    o.groups_per_token > 0
                        ? (" (group-limited: " + std::to_string(o.groups_per_token) +
                           " of " + std::to_string(n) + " rank groups per token)")
                              .c_str()
                        : " (not group-limited)");
     }
   }
   // Both wire dtypes, fp32 rows then bf16 rows (half the bytes), each over both transports
   // where the direct one runs (a flat exchange of ranks that share a node): the all-to-all, then
   // direct writes.
   for (const bool bf16 : {false, true}) {
   for (const ExchangeTransport transport :
        {ExchangeTransport::kAllToAll, ExchangeTransport::kDirect}) {
    HostDevice device;
    ExpertExchange exchange(&device, &comm, e, o.hidden,
                            {.dropless = o.dropless_exchange,
                             .ranks_per_node = o.ranks_per_node,
                             .bf16_wire = bf16,
                             .node_dedup = o.node_dedup,
                             .transport = transport == ExchangeTransport::kDirect
                                              ? ExchangeTransport::kAuto
                                              : ExchangeTransport::kAllToAll});
    MOE_RETURN_IF_ERROR(exchange.EnableHierarchical());
    // Direct writes cannot run here: neither flat, nor in the two-stage exchange's node stage.
    if (transport == ExchangeTransport::kDirect &&
        exchange.transport() != ExchangeTransport::kDirect && !exchange.intra_node_direct()) {
      continue;
    }
    ExchangeHandle handle;
    const Tensor x = TokenInput(comm.rank(), tokens, o.hidden);
    Tensor y(tokens, o.hidden);
    double dispatch_s = 0, combine_s = 0;
    int64_t dispatch_inter_bytes = 0;  // the two-stage exchange's, over the timed calls
    // Dispatch, then Combine of the received rows as they are (identity experts, read in place),
    // each timed on its own; y is zeroed outside the timed calls. Returns the microseconds that
    // count (the two calls).
    const auto round_trip = [&](bool timed_iter) -> StatusOr<double> {
      exchange.stats().Reset();
      y.Fill(0.0f);
      const double t0 = WallSeconds();
      const int64_t inter_before = exchange.inter_node_bytes();
      MOE_RETURN_IF_ERROR(exchange.Dispatch(plan, x.view(), Pass::kForward, &handle));
      const double t1 = WallSeconds();
      if (timed_iter) dispatch_inter_bytes += exchange.inter_node_bytes() - inter_before;
      // The identity experts' outputs: the received rows themselves, or, where the transport
      // reads outputs in place (direct: its output rows), written there as an expert would
      // write its outputs (not timed: an expert writes its outputs on either transport).
      MatrixView<const float> outputs = handle.received(Pass::kForward);
      if (float* const shared = exchange.OutputRows(Pass::kForward); shared != nullptr) {
        std::copy(outputs.data(), outputs.data() + outputs.rows() * outputs.cols(), shared);
        outputs = MatrixView<const float>(shared, outputs.rows(), outputs.cols());
      }
      const double t2 = WallSeconds();
      MOE_RETURN_IF_ERROR(exchange.Combine(&handle, Pass::kForward, outputs, /*gated=*/true,
                                           y.view()));
      const double t3 = WallSeconds();
      if (timed_iter) {
        dispatch_s += t1 - t0;
        combine_s += t3 - t2;
      }
      return (t1 - t0 + t3 - t2) * 1e6;
    };
    for (int i = 0; i < o.warmup; ++i) MOE_RETURN_IF_ERROR(round_trip(false).status());
    // Dispatch + Combine, call by call (its median, min and max go into the row).
    MOE_ASSIGN_OR_RETURN(const comm::bench::Timing timing,
                         comm::bench::TimeLoopCounted(comm, 0, o.iters,
                                                      [&] { return round_trip(true); }));
    const ExchangeCall* dispatch = FindCall(exchange.stats(), ExchangeCall::Kind::kDispatch);
    const ExchangeCall* combine = FindCall(exchange.stats(), ExchangeCall::Kind::kCombine);
    if (o.warmup + o.iters == 0 || dispatch == nullptr || combine == nullptr) {
      return Internal("dispatch_combine: no exchange recorded");
    }
    MOE_ASSIGN_OR_RETURN(const double dispatch_us,
                         ReduceScalar(comm, dispatch_s * 1e6 / o.iters, comm::ReduceOp::kMax));
    MOE_ASSIGN_OR_RETURN(const double combine_us,
                         ReduceScalar(comm, combine_s * 1e6 / o.iters, comm::ReduceOp::kMax));
    // The raw baseline: the same two exchanges (dispatch direction, then combine direction). The
    // executor's capacity mode (no count exchange) moves equal blocks with a plain all-to-all.
    const bool equal = FindCall(exchange.stats(), ExchangeCall::Kind::kCounts) == nullptr;
    const RowExchange fwd = FromCall(*dispatch, equal), back = FromCall(*combine, equal);
    const int64_t send_elems = Sum(fwd.send_counts), recv_elems = Sum(fwd.recv_counts);
    std::vector<float> raw_send(static_cast<size_t>(std::max<int64_t>(send_elems, 1)), 1.0f),
        raw_recv(static_cast<size_t>(std::max<int64_t>(recv_elems, 1)));
    MOE_ASSIGN_OR_RETURN(
        const comm::bench::Timing raw_pair,
        comm::bench::TimeLoop(comm, o.warmup, o.iters, [&]() -> Status {
          MOE_RETURN_IF_ERROR(ReplayExchange(comm, raw, fwd, raw_send.data(), raw_recv.data()));
          return ReplayExchange(comm, raw, back, raw_recv.data(), raw_send.data());
        }));
    const double raw_pair_us = raw_pair.mean_us;
    double wrong = 0;
    if (o.check) {
      const int64_t mine = WrongIdentityCombine(plan, x, y, bf16);
      MOE_ASSIGN_OR_RETURN(wrong,
                           ReduceScalar(comm, static_cast<double>(mine), comm::ReduceOp::kSum));
    }
    MOE_ASSIGN_OR_RETURN(
        const double sent_sum,
        ReduceScalar(comm, static_cast<double>(send_elems * 4), comm::ReduceOp::kSum));
    const bool direct = transport == ExchangeTransport::kDirect;
    comm::bench::BenchRow row =
        RowExchangeRow(direct ? "dispatch_combine_direct" : "dispatch_combine", comm, sent_sum);
    if (bf16) {
      row.dtype = "bfloat16";
      row.count = row.bytes / 2;
    }
    comm::bench::SetTiming(&row, timing);  // the round trip's spread; time is the two parts'
    row.time_us = dispatch_us + combine_us;
    row.algbw_gbps = row.time_us > 0 ? 2.0 * static_cast<double>(row.bytes) / row.time_us / 1e3 : 0;
    row.busbw_gbps = row.algbw_gbps * comm::bench::AllToAllBusFactor(n);
    row.wrong = o.check ? static_cast<int64_t>(wrong) : -1;
    row.baseline_time_us = raw_pair_us / 2;
    row.baseline = "raw_alltoallv";
    summary.Add(row.busbw_gbps, wrong);
    // Where the ranks span nodes (the launch's layout, or --hierarchical's): the bytes a token's
    // rows take across nodes in the dispatch — what crossed in the two-stage exchange, the rows to
    // other nodes' ranks in the flat one.
    const int per_node = o.ranks_per_node > 0 ? o.ranks_per_node : comm.local_size();
    double inter = static_cast<double>(dispatch_inter_bytes) / std::max(1, o.iters);
    if (o.ranks_per_node == 0) {
      inter = 0;
      for (int d = 0; d < n; ++d) {
        if (d / per_node != comm.rank() / per_node) {
          inter += static_cast<double>(dispatch->bytes_to_rank[static_cast<size_t>(d)]);
        }
      }
    }
    MOE_ASSIGN_OR_RETURN(const double inter_sum, ReduceScalar(comm, inter, comm::ReduceOp::kSum));
    if (!rank0) continue;
    PrintRow(out, row, direct ? "direct" : "alltoall", tokens, dispatch_us, combine_us);
    if (per_node < n) {
      std::fprintf(out, "#   inter-node bytes per token in the dispatch: %.1f (%s)\n",
                   inter_sum / static_cast<double>(tokens * n),
                   o.ranks_per_node == 0 ? "flat: rows to other nodes' ranks"
                   : o.node_dedup        ? "two-stage, node-deduplicated"
                                         : "two-stage");
    }
    if (sink) MOE_RETURN_IF_ERROR(sink(row));
   }
   }
  }
  return summary.Finish(rank0 ? out : nullptr, "dispatch_combine");
}

}  // namespace moe
