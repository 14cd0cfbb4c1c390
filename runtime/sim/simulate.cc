// moe_simulate's measurements, predictions and outputs (runtime/sim/simulate.h).
#include "runtime/sim/simulate.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <mutex>
#include <numeric>
#include <sstream>
#include <utility>

#include "runtime/train/trainer.h"

namespace moe {

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

TrafficMatrix SimulationResult::Matrix(int step, size_t c) const {
  TrafficMatrix m;
  const size_t n = static_cast<size_t>(ranks);
  for (const RankStepRecord& r : steps[static_cast<size_t>(step)]) {
    std::vector<double> row(n);
    for (size_t dst = 0; dst < n; ++dst) row[dst] = static_cast<double>(r.bytes_to(c, dst));
    m.push_back(std::move(row));
  }
  return m;
}

std::vector<double> SimulationResult::ExpertRows(int step) const {
  std::vector<double> rows(static_cast<size_t>(ranks), 0.0);
  const size_t n = calls(step);
  for (size_t r = 0; r < static_cast<size_t>(ranks); ++r) {
    const RankStepRecord& rec = steps[static_cast<size_t>(step)][r];
    // What rank r sent to each rank (its records keep bytes_to_rank only: bytes_from_rank is
    // the same matrix's column).
    for (size_t c = 0; c < n; ++c) {
      const ExchangeCall& call = rec.calls[c];
      if (call.kind != ExchangeCall::Kind::kDispatch) continue;
      for (size_t dst = 0; dst < rows.size(); ++dst) {
        rows[dst] += static_cast<double>(rec.bytes_to(c, dst)) / (4.0 * model_dim);
      }
    }
  }
  return rows;
}

StatusOr<SimulationResult> RunSimulation(const MoeConfig& base, int ranks, bool quiet,
                                         const comm::WorldFactory& make_world,
                                         bool account_padding) {
  MoeConfig cfg = base;
  cfg.mutable_train()->set_eval_every(0);
  cfg.mutable_train()->clear_metrics_path();
  cfg.mutable_train()->set_checkpoint_every(0);
  // The simulated cluster spans nodes: its rows move as all-to-alls (what the cost models price),
  // not as the direct writes the simulating process's threads could use.
  if (cfg.parallel().exchange_transport() == config::AUTO) {
    cfg.mutable_parallel()->set_exchange_transport(config::ALLTOALL);
  }
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<comm::World> world, make_world(ranks));
  SimulationResult out;
  out.ranks = ranks;
  out.steps.resize(static_cast<size_t>(cfg.train().steps()), std::vector<RankStepRecord>(static_cast<size_t>(ranks)));
  std::mutex mu;
  const Status ran = world->Run([&](comm::RankContext& rank) -> Status {
    const size_t r = static_cast<size_t>(rank.comm.rank());
    TrainOptions options;
    options.quiet = quiet;
    options.log_every = 5;
    options.run_label = "(moe_simulate)";
    options.ranks_sharing_memory = ranks;  // every simulated rank lives in this process
    options.account_padding = account_padding;
    options.device_communicators = rank.device;
    // Each rank writes only its own [step][rank] slots (sized above), so no lock is needed.
    options.on_step = [&out, r](const Trainer& t, const report::StepMetrics& m) -> Status {
      const size_t s = static_cast<size_t>(m.step());
      if (s >= out.steps.size()) return Internal("step " + std::to_string(s) + " beyond train.steps");
      RankStepRecord& rec = out.steps[s][r];
      rec.metrics = m;
      // bytes_from_rank is another rank's bytes_to_rank: not kept (W² values per exchange);
      // bytes_to_rank neither when all its values are equal (a capacity exchange).
      for (const ExchangeStats* stats : t.LayerExchangeStats()) {
        for (const ExchangeCall& call : stats->calls) {
          rec.calls.push_back(call);
          ExchangeCall& kept = rec.calls.back();
          kept.bytes_from_rank = {};
          const std::vector<int64_t>& to = call.bytes_to_rank;
          const bool uniform = !to.empty() && std::all_of(to.begin(), to.end(),
                                                          [&](int64_t b) { return b == to[0]; });
          rec.uniform_bytes.push_back(uniform ? to[0] : -1);
          if (uniform) kept.bytes_to_rank = {};
        }
      }
      return Status::Ok();
    };
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<Trainer> trainer, Trainer::Create(cfg, &rank.comm, options));
    MOE_RETURN_IF_ERROR(trainer->Run());
    if (r == 0) {
      std::lock_guard<std::mutex> lock(mu);
      out.allreduce_bytes = trainer->StepAllReduceBytes();
    }
    return Status::Ok();
  });
  MOE_RETURN_IF_ERROR(ran);
  out.tokens_per_rank = cfg.train().global_batch_tokens() / ranks;
  out.model_dim = cfg.moe().model_dim();
  for (int s = 0; s < out.num_steps(); ++s) {
    for (const RankStepRecord& rec : out.steps[static_cast<size_t>(s)]) {
      if (rec.calls.size() != out.calls(s)) {
        return Internal("step " + std::to_string(s) + ": ranks recorded different numbers of exchanges");
      }
    }
  }
  return out;
}

// ---- A target cluster -----------------------------------------------------------------------------

NodeTraffic MeanNodeTraffic(const SimulationResult& run, int gpus_per_node) {
  NodeTraffic out;
  if (run.num_steps() == 0 || run.ranks == 0 || gpus_per_node < 1) return out;
  for (int s = 0; s < run.num_steps(); ++s) {
    for (size_t c = 0; c < run.calls(s); ++c) {
      const ExchangeCall::Kind kind = run.call(s, c).kind;
      if (kind != ExchangeCall::Kind::kDispatch && kind != ExchangeCall::Kind::kCombine) continue;
      const TrafficMatrix m = run.Matrix(s, c);
      for (int src = 0; src < run.ranks; ++src) {
        for (int dst = 0; dst < run.ranks; ++dst) {
          if (src == dst) continue;
          const double b = m[static_cast<size_t>(src)][static_cast<size_t>(dst)];
          (src / gpus_per_node == dst / gpus_per_node ? out.intra_bytes : out.inter_bytes) += b;
        }
      }
    }
  }
  const double n = static_cast<double>(run.num_steps()) * run.ranks;
  out.intra_bytes /= n;
  out.inter_bytes /= n;
  return out;
}

namespace {

// unique[src][relay] of exchange c (cost_model.h): what each rank sent to other nodes as it ran
// (ExchangeCall::inter_node_bytes), to its relay on each other node (the rank of its local index
// there), split over those nodes as its rows to them are; zero where the call was not
// deduplicated (it recorded nothing), so the cost model prices those as the two-stage exchange.
TrafficMatrix UniqueMatrix(const SimulationResult& run, int s, size_t c, const TrafficMatrix& flat,
                           int per_node) {
  const int n = run.ranks, nodes = n / per_node;
  TrafficMatrix unique(static_cast<size_t>(n), std::vector<double>(static_cast<size_t>(n), 0.0));
  bool any = false;
  for (int src = 0; src < n; ++src) {
    const double crossed =
        static_cast<double>(run.steps[static_cast<size_t>(s)][static_cast<size_t>(src)].calls[c].inter_node_bytes);
    std::vector<double> to_node(static_cast<size_t>(nodes), 0.0);
    double flat_out = 0.0;
    for (int d = 0; d < n; ++d) {
      if (d / per_node == src / per_node) continue;
      to_node[static_cast<size_t>(d / per_node)] += flat[static_cast<size_t>(src)][static_cast<size_t>(d)];
      flat_out += flat[static_cast<size_t>(src)][static_cast<size_t>(d)];
    }
    if (crossed <= 0 || flat_out <= 0) continue;
    any = true;
    for (int m = 0; m < nodes; ++m) {
      if (m == src / per_node) continue;
      unique[static_cast<size_t>(src)][static_cast<size_t>(m * per_node + src % per_node)] =
          crossed * to_node[static_cast<size_t>(m)] / flat_out;
    }
  }
  return any ? unique : TrafficMatrix();
}

}  // namespace

StepTraffic ClusterStepTraffic(const SimulationResult& run, const MoeConfig& cfg, int s) {
  StepTraffic t;
  // The job ran the node-deduplicated dispatch: its calls recorded what crossed nodes.
  const int per_node = cfg.comm().ranks_per_node();
  const bool dedup = cfg.parallel().node_dedup() && per_node > 0 && run.ranks % per_node == 0;
  const double m = cfg.moe().model_dim(), h = cfg.moe().expert().hidden_dim();
  const double mats = cfg.moe().expert().kind() == config::SWIGLU ? 3 : 2;
  const double fwd_per_row = 2 * m * h * mats;
  const size_t ranks = static_cast<size_t>(run.ranks);
  t.expert_flops.assign(ranks, 0.0);
  // One pipeline group per (layer, direction): it starts at the dispatch of chunk 0 and collects
  // the dispatch, the experts' FLOPs and the combine of every chunk (issue order D0 D1 C0 D2 C1
  // ...). Indices not filled by a recorded call stay out of range, which PredictStep reports.
  constexpr size_t kMissing = static_cast<size_t>(-1);
  auto chunk_slot = [&](const ExchangeCall& call) -> StepTraffic::PipelineGroup& {
    if (call.kind == ExchangeCall::Kind::kDispatch && call.chunk == 0) t.pipelines.emplace_back();
    if (t.pipelines.empty()) t.pipelines.emplace_back();
    StepTraffic::PipelineGroup& g = t.pipelines.back();
    const size_t n = static_cast<size_t>(std::max({call.chunks, call.chunk + 1, 1}));
    if (g.dispatch.size() < n) {
      g.dispatch.resize(n, kMissing);
      g.combine.resize(n, kMissing);
      g.expert_flops.resize(n, std::vector<double>(ranks, 0.0));
    }
    return g;
  };
  for (size_t c = 0; c < run.calls(s); ++c) {
    const ExchangeCall& call = run.call(s, c);
    if (call.kind == ExchangeCall::Kind::kCounts) continue;
    TrafficMatrix mat = run.Matrix(s, c);
    StepTraffic::PipelineGroup& group = chunk_slot(call);
    const size_t j = static_cast<size_t>(std::max(call.chunk, 0));
    if (call.kind == ExchangeCall::Kind::kDispatch) {
      if (dedup) t.dispatch_unique.push_back(UniqueMatrix(run, s, c, mat, per_node));
      // Forward: one GEMM pass per row; backward: two (dX and dW).
      const double passes = call.backward ? 2.0 : 1.0;
      for (size_t d = 0; d < mat.size(); ++d) {
        double rows = 0;
        for (size_t src = 0; src < mat.size(); ++src) rows += mat[src][d] / (m * 4);
        t.expert_flops[d] += rows * fwd_per_row * passes;
        group.expert_flops[j][d] = rows * fwd_per_row * passes;
      }
      group.dispatch[j] = t.dispatch.size();
      t.dispatch.push_back(std::move(mat));
    } else {
      group.combine[j] = t.combine.size();
      t.combine.push_back(std::move(mat));
    }
  }
  const double tokens = static_cast<double>(run.tokens_per_rank);
  const double other = tokens * 3 * (2 * m * 256 + cfg.model().num_layers() * 2 * m * cfg.moe().num_experts());
  t.other_flops.assign(static_cast<size_t>(run.ranks), other);
  // The trainer reduces in float64; a cluster job would send fp32: half the first all-reduce.
  t.allreduce_bytes = run.allreduce_bytes.empty() ? 0.0 : static_cast<double>(run.allreduce_bytes[0]) / 2;
  return t;
}

StatusOr<StepPrediction> PredictCluster(const SimulationResult& run, const MoeConfig& cfg, const CostModel& model,
                                        bool hierarchical) {
  StepPrediction mean;
  const double k = 1.0 / std::max(1, run.num_steps());
  for (int s = 0; s < run.num_steps(); ++s) {
    StepTraffic traffic = ClusterStepTraffic(run, cfg, s);
    // The relays of a deduplicated dispatch are the job's nodes: on another layout of the target
    // its dispatches are priced as the two-stage exchange's.
    if (model.gpus_per_node() != cfg.comm().ranks_per_node()) traffic.dispatch_unique.clear();
    MOE_ASSIGN_OR_RETURN(const StepPrediction p, model.PredictStep(traffic, hierarchical));
    mean.dispatch_seconds += k * p.dispatch_seconds;
    mean.combine_seconds += k * p.combine_seconds;
    mean.experts_seconds += k * p.experts_seconds;
    mean.other_seconds += k * p.other_seconds;
    mean.overlap_seconds += k * p.overlap_seconds;
  }
  return mean;
}

// ---- This host --------------------------------------------------------------------------------------

StatusOr<ComputeCalibration> CalibrateCompute(const MoeConfig& cfg, const std::vector<int64_t>& batch_tokens,
                                              int steps, int warmup, const comm::WorldFactory& make_world) {
  if (steps <= warmup) return InvalidArgument("calibration: steps must exceed the warm-up steps");
  ComputeCalibration out;
  std::vector<std::pair<double, double>> line;  // (tokens, compute - per_row * rows)
  std::vector<std::pair<std::vector<double>, std::vector<double>>> samples;  // per run: rows, compute
  double expert_seconds = 0.0, expert_rows = 0.0;
  for (int64_t tokens : batch_tokens) {
    MoeConfig c = cfg;
    c.mutable_train()->set_global_batch_tokens(tokens);
    c.mutable_train()->set_steps(steps);
    // The quietest of `kRepeats` runs (lowest median step): other load on the machine only adds.
    constexpr int kRepeats = 3;
    SimulationResult run;
    double best = -1.0;
    for (int i = 0; i < kRepeats; ++i) {
      MOE_ASSIGN_OR_RETURN(SimulationResult candidate, RunSimulation(c, 1, true, make_world));
      std::vector<double> step;
      for (int s = warmup; s < candidate.num_steps(); ++s) step.push_back(candidate.metrics(s, 0).step_seconds());
      const double median = Median(step);
      if (best < 0 || median < best) {
        best = median;
        run = std::move(candidate);
      }
    }
    std::vector<double> rows, compute;
    for (int s = warmup; s < run.num_steps(); ++s) {
      const report::StepMetrics& m = run.metrics(s, 0);
      const double r = run.ExpertRows(s)[0];
      rows.push_back(r);
      compute.push_back(m.step_seconds() - m.alltoall_seconds());
      expert_seconds += m.expert_seconds();
      expert_rows += r;
    }
    samples.emplace_back(std::move(rows), std::move(compute));
    out.tokens.push_back(tokens);
  }
  out.per_row_seconds = expert_rows > 0 ? expert_seconds / expert_rows : 0.0;
  for (size_t i = 0; i < samples.size(); ++i) {
    std::vector<double> rest;
    for (size_t s = 0; s < samples[i].first.size(); ++s) {
      rest.push_back(samples[i].second[s] - out.per_row_seconds * samples[i].first[s]);
    }
    out.seconds.push_back(Median(samples[i].second));
    line.push_back({static_cast<double>(batch_tokens[i]), Median(rest)});
  }
  // Where the expert rows carry the whole per-token cost (large k·H), what is left does not grow
  // with the tokens beyond noise: a fixed cost, no per-token term (the least-squares line with its
  // slope held at 0, i.e. the mean) instead of a fit that refuses a falling line.
  double mean_x = 0.0, mean_y = 0.0;
  for (const auto& [x, y] : line) {
    mean_x += x / static_cast<double>(line.size());
    mean_y += y / static_cast<double>(line.size());
  }
  double sxy = 0.0;
  for (const auto& [x, y] : line) sxy += (x - mean_x) * (y - mean_y);
  if (!(sxy > 0)) {
    out.fixed_seconds = std::max(0.0, mean_y);
    out.per_token_seconds = 0.0;
    return out;
  }
  StatusOr<AlphaBetaFit> fit = FitAlphaBeta(line);
  if (!fit.ok()) return fit.status().WithContext("compute calibration");
  out.fixed_seconds = std::max(0.0, fit->alpha_seconds);
  out.per_token_seconds = 1.0 / fit->beta_bytes_per_second;
  return out;
}

StatusOr<CallCost> FitBenchFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFound("bench results " + path + ": cannot open");
  std::vector<std::pair<double, double>> pts;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    report::BenchResult r;
    if (!google::protobuf::util::JsonStringToMessage(line, &r).ok()) {
      return InvalidArgument("bench results " + path + ": not a BenchResult JSON line: " + line.substr(0, 80));
    }
    pts.push_back({static_cast<double>(r.bytes()), r.time_us() * 1e-6});
  }
  StatusOr<AlphaBetaFit> fit = FitAlphaBeta(pts, FitWeighting::kRelative);
  if (!fit.ok()) return fit.status().WithContext("bench results " + path);
  CallCost c;
  c.alpha_seconds = std::max(0.0, fit->alpha_seconds);
  c.beta_bytes_per_second = fit->beta_bytes_per_second;
  return c;
}

StatusOr<HostValidation> PredictHost(const SimulationResult& run, const HostModel& host,
                                     const ComputeCalibration& cal, int warmup) {
  if (run.num_steps() <= warmup) return InvalidArgument("host prediction: the run has no step after the warm-up");
  HostValidation out;
  out.ranks = run.ranks;
  std::vector<double> measured;
  const double k = 1.0 / (run.num_steps() - warmup);
  for (int s = warmup; s < run.num_steps(); ++s) {
    HostStepInputs in;
    // Every call serial, pipeline chunks included: on loopback nothing overlaps (cost_model.h).
    for (size_t c = 0; c < run.calls(s); ++c) in.alltoalls.push_back(run.Matrix(s, c));
    for (int64_t b : run.allreduce_bytes) in.allreduce_bytes.push_back(static_cast<double>(b));
    const std::vector<double> rows = run.ExpertRows(s);
    double slowest = 0.0;
    for (int r = 0; r < run.ranks; ++r) {
      in.compute_seconds.push_back(cal.fixed_seconds + cal.per_token_seconds * static_cast<double>(run.tokens_per_rank) +
                                   cal.per_row_seconds * rows[static_cast<size_t>(r)]);
      slowest = std::max(slowest, run.metrics(s, r).step_seconds());
    }
    measured.push_back(slowest);
    MOE_ASSIGN_OR_RETURN(const HostStepPrediction p, PredictHostStep(host, in));
    HostStepPrediction& m = out.predicted;
    m.compute_mean_seconds += k * p.compute_mean_seconds;
    m.wait_seconds += k * p.wait_seconds;
    m.oversubscription_seconds += k * p.oversubscription_seconds;
    m.alltoall_seconds += k * p.alltoall_seconds;
    m.allreduce_seconds += k * p.allreduce_seconds;
    m.alltoall_calls = p.alltoall_calls;
    m.allreduce_calls = p.allreduce_calls;
  }
  out.measured_step_seconds = Median(measured);
  return out;
}

// ---- Outputs ----------------------------------------------------------------------------------------

namespace {

// measured.json: the largest world whose exchanges each get their own traffic matrix.
constexpr int kExchangeMatrixRanks = 64;

std::string Color(double f) {  // white -> dark red
  f = std::clamp(f, 0.0, 1.0);
  char buf[16];
  std::snprintf(buf, sizeof(buf), "#%02x%02x%02x", 255, static_cast<int>(255 * (1 - f)), static_cast<int>(255 * (1 - f)));
  return buf;
}

template <typename T>
std::string JsonArray(const std::vector<T>& v) {
  std::ostringstream o;
  o.precision(9);
  o << "[";
  for (size_t i = 0; i < v.size(); ++i) o << (i ? "," : "") << v[i];
  o << "]";
  return o.str();
}

std::string MatrixJson(const TrafficMatrix& m) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < m.size(); ++i) o << (i ? "," : "") << JsonArray(m[i]);
  o << "]";
  return o.str();
}

const char* KindName(ExchangeCall::Kind k) {
  switch (k) {
    case ExchangeCall::Kind::kCounts: return "counts";
    case ExchangeCall::Kind::kDispatch: return "dispatch";
    case ExchangeCall::Kind::kCombine: return "combine";
  }
  return "?";
}

struct RankTimes {
  double experts = 0, a2a = 0, other = 0;
};

std::vector<RankTimes> MeanRankTimes(const SimulationResult& run) {
  std::vector<RankTimes> out(static_cast<size_t>(run.ranks));
  const double k = 1.0 / std::max(1, run.num_steps());
  for (int s = 0; s < run.num_steps(); ++s) {
    for (int r = 0; r < run.ranks; ++r) {
      const report::StepMetrics& m = run.metrics(s, r);
      RankTimes& t = out[static_cast<size_t>(r)];
      t.experts += k * m.expert_seconds();
      t.a2a += k * m.alltoall_seconds();
      t.other += k * std::max(0.0, m.step_seconds() - m.expert_seconds() - m.alltoall_seconds());
    }
  }
  return out;
}

}  // namespace

std::string ExpertLoadSvg(const SimulationResult& run) {
  const int steps = run.num_steps(), e = steps == 0 ? 0 : run.metrics(0, 0).tokens_per_expert_size();
  double mx = 1;
  for (int s = 0; s < steps; ++s) {
    for (int64_t v : run.metrics(s, 0).tokens_per_expert()) mx = std::max(mx, static_cast<double>(v));
  }
  const int cw = std::max(4, 600 / std::max(1, steps)), ch = 20, x0 = 70, y0 = 30;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << x0 + cw * steps + 120 << "\" height=\""
    << y0 + ch * e + 40 << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  o << "<text x=\"" << x0 << "\" y=\"18\">expert load (tokens routed, all ranks and layers) per step; max "
    << mx << "</text>\n";
  for (int x = 0; x < e; ++x) {
    o << "<text x=\"5\" y=\"" << y0 + ch * x + 14 << "\">expert " << x << "</text>\n";
    for (int s = 0; s < steps; ++s) {
      const double v = static_cast<double>(run.metrics(s, 0).tokens_per_expert(x));
      o << "<rect x=\"" << x0 + cw * s << "\" y=\"" << y0 + ch * x << "\" width=\"" << cw << "\" height=\"" << ch
        << "\" fill=\"" << Color(v / mx) << "\"><title>step " << s << " expert " << x << ": " << v
        << "</title></rect>\n";
    }
  }
  o << "<text x=\"" << x0 << "\" y=\"" << y0 + ch * e + 16 << "\">step 0 .. " << steps - 1 << " &#8594;</text>\n";
  o << "</svg>\n";
  return o.str();
}

std::string RankTimeSvg(const SimulationResult& run) {
  const std::vector<RankTimes> t = MeanRankTimes(run);
  double mx = 1e-9;
  for (const auto& x : t) mx = std::max(mx, x.experts + x.a2a + x.other);
  const int bw = 60, gap = 30, x0 = 60, y0 = 40, hgt = 300;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << x0 + (bw + gap) * t.size() + 160
    << "\" height=\"" << y0 + hgt + 40 << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  o << "<text x=\"" << x0 << "\" y=\"18\">mean step time per rank (ms): experts / all-to-all / other; top = "
    << mx * 1e3 << " ms</text>\n";
  const char* colors[3] = {"#4c78a8", "#f58518", "#9d9d9d"};
  const char* names[3] = {"experts", "all-to-all", "other"};
  for (size_t r = 0; r < t.size(); ++r) {
    const double v[3] = {t[r].experts, t[r].a2a, t[r].other};
    double y = y0 + hgt;
    for (int k = 0; k < 3; ++k) {
      const double hh = v[k] / mx * hgt;
      y -= hh;
      o << "<rect x=\"" << x0 + (bw + gap) * r << "\" y=\"" << y << "\" width=\"" << bw << "\" height=\"" << hh
        << "\" fill=\"" << colors[k] << "\"><title>rank " << r << " " << names[k] << ": " << v[k] * 1e3
        << " ms</title></rect>\n";
    }
    o << "<text x=\"" << x0 + (bw + gap) * r << "\" y=\"" << y0 + hgt + 16 << "\">rank " << r << "</text>\n";
  }
  for (int k = 0; k < 3; ++k) {
    const size_t lx = x0 + (bw + gap) * t.size() + 10;
    o << "<rect x=\"" << lx << "\" y=\"" << y0 + 20 * k << "\" width=\"12\" height=\"12\" fill=\"" << colors[k]
      << "\"/><text x=\"" << lx + 16 << "\" y=\"" << y0 + 20 * k + 10 << "\">" << names[k] << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

std::string MeasuredJson(const SimulationResult& run, const MoeConfig& cfg) {
  std::ostringstream o;
  o.precision(9);
  const double final_loss = run.num_steps() > 0 ? run.metrics(run.num_steps() - 1, 0).loss() : 0.0;
  o << "{\n  \"ranks\": " << run.ranks << ",\n  \"steps\": " << run.num_steps() << ",\n  \"model_dim\": "
    << cfg.moe().model_dim() << ",\n  \"num_experts\": " << cfg.moe().num_experts()
    << ",\n  \"bytes_per_element\": 4,\n  \"final_loss\": " << std::setprecision(17) << final_loss
    << std::setprecision(9) << ",\n  \"allreduce_bytes\": " << JsonArray(run.allreduce_bytes) << ",\n  \"per_step\": [\n";
  const size_t n = static_cast<size_t>(run.ranks);
  // Each exchange's own W x W matrix only up to kExchangeMatrixRanks ranks (above, 1024 ranks
  // would write 10^6 numbers per exchange); the step's total matrix always.
  const bool exchange_matrices = run.ranks <= kExchangeMatrixRanks;
  for (int s = 0; s < run.num_steps(); ++s) {
    const report::StepMetrics& m0 = run.metrics(s, 0);
    std::vector<double> a2a, expert, compute, step;
    for (int r = 0; r < run.ranks; ++r) {
      const report::StepMetrics& m = run.metrics(s, r);
      a2a.push_back(m.alltoall_seconds());
      expert.push_back(m.expert_seconds());
      compute.push_back(m.step_seconds() - m.alltoall_seconds());
      step.push_back(m.step_seconds());
    }
    TrafficMatrix total(n, std::vector<double>(n, 0.0));
    std::ostringstream calls;
    calls.precision(9);
    int float_calls = 0;
    for (size_t c = 0; c < run.calls(s); ++c) {
      const TrafficMatrix m = run.Matrix(s, c);
      const ExchangeCall& call = run.call(s, c);
      std::vector<double> secs;
      for (int r = 0; r < run.ranks; ++r) {
        secs.push_back(run.steps[static_cast<size_t>(s)][static_cast<size_t>(r)].calls[c].seconds);
      }
      calls << (c ? ",\n       " : "") << "{\"kind\": \"" << KindName(call.kind)
            << "\", \"backward\": " << (call.backward ? "true" : "false")
            << ", \"chunk\": " << call.chunk << ", \"chunks\": " << call.chunks;
      if (exchange_matrices) {
        calls << ", \"bytes_src_dst\": " << MatrixJson(m);
      } else {
        std::vector<double> sent(n, 0.0);
        for (size_t i = 0; i < n; ++i) sent[i] = std::accumulate(m[i].begin(), m[i].end(), 0.0);
        calls << ", \"bytes_sent\": " << JsonArray(sent);
      }
      calls << ", \"seconds\": " << JsonArray(secs) << "}";
      if (call.kind == ExchangeCall::Kind::kCounts) continue;
      ++float_calls;
      for (size_t i = 0; i < n; ++i)
        for (size_t j = 0; j < n; ++j) total[i][j] += m[i][j];
    }
    std::vector<int64_t> load(m0.tokens_per_expert().begin(), m0.tokens_per_expert().end());
    o << "    {\"step\": " << s << ", \"loss\": " << m0.loss() << ", \"drop_fraction\": " << m0.drop_fraction()
      << ", \"imbalance\": " << m0.imbalance() << ", \"tokens_per_expert\": " << JsonArray(load)
      << ",\n     \"step_seconds\": " << JsonArray(step) << ", \"alltoall_seconds\": " << JsonArray(a2a)
      << ", \"expert_seconds\": " << JsonArray(expert) << ", \"compute_seconds\": " << JsonArray(compute)
      << ",\n     \"alltoall_calls\": " << float_calls << ", \"bytes_src_dst\": " << MatrixJson(total)
      << ",\n     \"exchanges\": [" << calls.str() << "]}" << (s + 1 < run.num_steps() ? "," : "") << "\n";
  }
  o << "  ],\n  \"notes\": \"bytes_src_dst: float bytes each rank sent to each rank in all "
       "dispatch+combine all-to-alls of the step (forward and backward, all layers), self block "
       "included; exchanges: every all-to-all of the step from the executors (counts = the "
       "dropless count exchange), each with its pipeline chunk (0..chunks-1), traffic matrix and "
       "per-rank seconds (above " << kExchangeMatrixRanks << " ranks each exchange's bytes_sent per "
       "source instead of its matrix); compute_seconds = step - all-to-all per rank; tokens_per_expert summed "
       "over ranks and layers; allreduce_bytes: the all-reduces of one step\"\n}\n";
  return o.str();
}

std::string PredictedJson(const config::TopologyConfig& target, int ranks, double gemm_efficiency,
                          int pipeline_degree, const StepPrediction& flat,
                          const StepPrediction& hier) {
  auto pj = [](const StepPrediction& p) {
    std::ostringstream o;
    o.precision(9);
    o << "{\"dispatch_seconds\": " << p.dispatch_seconds
      << ", \"combine_seconds\": " << p.combine_seconds
      << ", \"experts_seconds\": " << p.experts_seconds
      << ", \"other_seconds\": " << p.other_seconds
      << ", \"overlap_seconds\": " << p.overlap_seconds << ", \"step_seconds\": " << p.total()
      << "}";
    return o.str();
  };
  std::ostringstream js;
  js.precision(9);
  js << "{\n  \"topology\": \"" << target.name() << "\",\n  \"ranks\": " << ranks
     << ",\n  \"nodes\": " << target.nodes() << ",\n  \"gpus_per_node\": " << target.gpus_per_node()
     << ",\n  \"gemm_efficiency\": " << gemm_efficiency
     << ",\n  \"pipeline_degree\": " << pipeline_degree << ",\n  \"flat\": " << pj(flat)
     << ",\n  \"hierarchical\": " << pj(hier)
     << ",\n  \"notes\": \"mean over steps; dispatch/combine summed over forward+backward and "
        "layers; other = router/norm/head FLOPs + ring all-reduce of the replicated gradients "
        "(fp32); overlap = what the pipeline chunks (pipeline_degree) hide of their exchanges and "
        "experts (serial sum - pipelined time, runtime/sim/cost_model.h); step = dispatch + combine + "
        "experts + other - overlap\"\n}\n";
  return js.str();
}

std::string HostPredictionJson(const HostValidation& v, const HostModel& host, const ComputeCalibration& c) {
  const HostStepPrediction& p = v.predicted;
  std::ostringstream o;
  o.precision(9);
  o << "{\n  \"ranks\": " << v.ranks << ",\n  \"cores\": " << host.cores
    << ",\n  \"alltoall\": {\"alpha_seconds\": " << host.alltoall.alpha_seconds
    << ", \"beta_bytes_per_second\": " << host.alltoall.beta_bytes_per_second << "},\n  \"allreduce\": {\"alpha_seconds\": "
    << host.allreduce.alpha_seconds << ", \"beta_bytes_per_second\": " << host.allreduce.beta_bytes_per_second
    << "},\n  \"calibration\": {\"fixed_seconds\": " << c.fixed_seconds << ", \"per_token_seconds\": "
    << c.per_token_seconds << ", \"per_row_seconds\": " << c.per_row_seconds << ", \"batch_tokens\": "
    << JsonArray(c.tokens) << ", \"median_compute_seconds\": " << JsonArray(c.seconds)
    << "},\n  \"predicted\": {\"compute_mean_seconds\": " << p.compute_mean_seconds << ", \"wait_seconds\": "
    << p.wait_seconds << ", \"oversubscription_seconds\": " << p.oversubscription_seconds
    << ", \"alltoall_seconds\": " << p.alltoall_seconds << ", \"alltoall_calls\": " << p.alltoall_calls
    << ", \"allreduce_seconds\": " << p.allreduce_seconds << ", \"allreduce_calls\": " << p.allreduce_calls
    << ", \"step_seconds\": " << p.total() << "},\n  \"measured_step_seconds\": " << v.measured_step_seconds
    << ",\n  \"notes\": \"predicted: mean over the steps after warm-up; measured: median over the same steps of "
       "the slowest rank's step time in this (loopback) run\"\n}\n";
  return o.str();
}

}  // namespace moe
