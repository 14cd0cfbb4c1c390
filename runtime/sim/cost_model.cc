// The cost models of a target cluster and of this host (runtime/sim/cost_model.h).
#include "runtime/sim/cost_model.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "base/file.h"
#include "runtime/config/config.h"

namespace moe {
namespace {

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

}  // namespace

Status ValidateTopology(const config::TopologyConfig& t, int ranks) {
  const std::string name = t.name().empty() ? "topology" : "topology " + t.name();
  auto bad = [&](const std::string& field, double v, const std::string& rule) {
    return InvalidArgument(name + ": " + field + "=" + Num(v) + " " + rule);
  };
  if (!t.has_nodes() || t.nodes() < 1) return bad("nodes", t.nodes(), "must be >= 1");
  if (!t.has_gpus_per_node() || t.gpus_per_node() < 1) return bad("gpus_per_node", t.gpus_per_node(), "must be >= 1");
  if (t.nodes() > (1 << 20)) return bad("nodes", t.nodes(), "must be <= 1048576");
  if (t.gpus_per_node() > 4096) return bad("gpus_per_node", t.gpus_per_node(), "must be <= 4096");
  const std::pair<const char*, double> positive[] = {{"intra_bandwidth_gbps", t.intra_bandwidth_gbps()},
                                                     {"inter_bandwidth_gbps", t.inter_bandwidth_gbps()},
                                                     {"gpu_tflops", t.gpu_tflops()}};
  for (const auto& [field, v] : positive) {
    if (!(v > 0 && std::isfinite(v))) return bad(field, v, "must be a finite number > 0");
  }
  const std::pair<const char*, double> non_negative[] = {{"intra_latency_us", t.intra_latency_us()},
                                                         {"inter_latency_us", t.inter_latency_us()}};
  for (const auto& [field, v] : non_negative) {
    if (!(v >= 0 && std::isfinite(v))) return bad(field, v, "must be a finite number >= 0");
  }
  if (ranks > 0 && static_cast<int64_t>(t.nodes()) * t.gpus_per_node() != ranks) {
    return InvalidArgument(name + ": nodes * gpus_per_node = " + std::to_string(t.nodes()) + " * " +
                           std::to_string(t.gpus_per_node()) + " must equal the number of ranks (" +
                           std::to_string(ranks) + ")");
  }
  return Status::Ok();
}

StatusOr<config::TopologyConfig> LoadTopology(const std::string& path) {
  MOE_ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
  config::TopologyConfig t;
  MOE_RETURN_IF_ERROR(ParseTextProto(text, "topology file " + path, &t));
  MOE_RETURN_IF_ERROR(ValidateTopology(t, 0).WithContext("topology file " + path));
  return t;
}

StatusOr<CostModel> CostModel::Create(const config::TopologyConfig& topology, int ranks,
                                      const CostModelOptions& options) {
  if (ranks < 1) return InvalidArgument("cost model: ranks=" + std::to_string(ranks) + " must be >= 1");
  MOE_RETURN_IF_ERROR(ValidateTopology(topology, ranks));
  if (!(options.gemm_efficiency > 0 && options.gemm_efficiency <= 1)) {
    return InvalidArgument("cost model: gemm_efficiency=" + Num(options.gemm_efficiency) + " must be in (0, 1]");
  }
  CostModel m;
  m.topology_ = topology;
  m.options_ = options;
  m.ranks_ = ranks;
  m.nodes_ = topology.nodes();
  m.gpus_per_node_ = topology.gpus_per_node();
  m.a_intra_ = topology.intra_latency_us() * 1e-6;
  m.b_intra_ = topology.intra_bandwidth_gbps() * 1e9;
  m.a_inter_ = topology.inter_latency_us() * 1e-6;
  m.b_inter_ = topology.inter_bandwidth_gbps() * 1e9;
  return m;
}

Status CostModel::CheckMatrix(const TrafficMatrix& bytes) const {
  if (static_cast<int>(bytes.size()) != ranks_) {
    return InvalidArgument("traffic matrix has " + std::to_string(bytes.size()) + " rows, expected " +
                           std::to_string(ranks_) + " (one per rank)");
  }
  for (int s = 0; s < ranks_; ++s) {
    if (static_cast<int>(bytes[static_cast<size_t>(s)].size()) != ranks_) {
      return InvalidArgument("traffic matrix row " + std::to_string(s) + " has " +
                             std::to_string(bytes[static_cast<size_t>(s)].size()) + " entries, expected " +
                             std::to_string(ranks_));
    }
    for (double v : bytes[static_cast<size_t>(s)]) {
      if (!(v >= 0)) return InvalidArgument("traffic matrix row " + std::to_string(s) + " has a negative entry");
    }
  }
  return Status::Ok();
}

double CostModel::Exchange(const TrafficMatrix& m, bool diagonal) const {
  const size_t n = m.size();
  auto cost = [&](size_t s, size_t d, double* intra, double* inter) {
    const double b = m[s][d];
    if (b <= 0 || (s == d && !diagonal)) return;
    if (node_of(static_cast<int>(s)) == node_of(static_cast<int>(d))) *intra += a_intra_ + b / b_intra_;
    else *inter += a_inter_ + b / b_inter_;
  };
  auto combine = [&](double intra, double inter) {
    return options_.overlap_link_classes ? std::max(intra, inter) : intra + inter;
  };
  double worst = 0.0;
  for (size_t r = 0; r < n; ++r) {
    double si = 0, se = 0, ri = 0, re = 0;
    for (size_t p = 0; p < n; ++p) {
      cost(r, p, &si, &se);
      cost(p, r, &ri, &re);
    }
    worst = std::max(worst, std::max(combine(si, se), combine(ri, re)));
  }
  return worst;
}

StatusOr<double> CostModel::FlatAllToAllSeconds(const TrafficMatrix& bytes) const {
  MOE_RETURN_IF_ERROR(CheckMatrix(bytes));
  return Exchange(bytes, options_.count_self);
}

StatusOr<double> CostModel::HierarchicalAllToAllSeconds(const TrafficMatrix& bytes) const {
  MOE_RETURN_IF_ERROR(CheckMatrix(bytes));
  const int p = gpus_per_node_;
  const size_t n = static_cast<size_t>(ranks_);
  TrafficMatrix stage1(n, std::vector<double>(n, 0.0)), stage2(n, std::vector<double>(n, 0.0));
  for (int s = 0; s < ranks_; ++s) {
    const int sn = s / p;
    for (int d = 0; d < ranks_; ++d) {
      const int dj = d % p;
      const double b = bytes[static_cast<size_t>(s)][static_cast<size_t>(d)];
      // Stage 1: s -> (sn, dj) (intra, possibly itself); stage 2: (sn, dj) -> d (inter, or itself).
      stage1[static_cast<size_t>(s)][static_cast<size_t>(sn * p + dj)] += b;
      stage2[static_cast<size_t>(sn * p + dj)][static_cast<size_t>(d)] += b;
    }
  }
  return Exchange(stage1, options_.count_self) + Exchange(stage2, false);
}

StatusOr<double> CostModel::DedupAllToAllSeconds(const TrafficMatrix& bytes,
                                                  const TrafficMatrix& unique) const {
  MOE_RETURN_IF_ERROR(CheckMatrix(bytes));
  MOE_RETURN_IF_ERROR(CheckMatrix(unique));
  const int p = gpus_per_node_;
  const size_t n = static_cast<size_t>(ranks_);
  // Stage A: only what crosses nodes (a rank's own node takes stage B alone).
  TrafficMatrix stage_a(n, std::vector<double>(n, 0.0)), stage_b(n, std::vector<double>(n, 0.0));
  for (int s = 0; s < ranks_; ++s) {
    for (int d = 0; d < ranks_; ++d) {
      if (node_of(s) != node_of(d)) {
        stage_a[static_cast<size_t>(s)][static_cast<size_t>(d)] =
            unique[static_cast<size_t>(s)][static_cast<size_t>(d)];
      }
      // Stage B: the relay of s on d's node, (node of d, local index of s), forwards to d.
      const int relay = node_of(d) * p + s % p;
      stage_b[static_cast<size_t>(relay)][static_cast<size_t>(d)] +=
          bytes[static_cast<size_t>(s)][static_cast<size_t>(d)];
    }
  }
  return Exchange(stage_a, false) + Exchange(stage_b, options_.count_self);
}

StatusOr<double> CostModel::ComputeSeconds(const std::vector<double>& flops) const {
  if (static_cast<int>(flops.size()) != ranks_) {
    return InvalidArgument("flops per rank has " + std::to_string(flops.size()) + " entries, expected " +
                           std::to_string(ranks_));
  }
  double worst = 0.0;
  for (double f : flops) worst = std::max(worst, f);
  return worst / (topology_.gpu_tflops() * 1e12 * options_.gemm_efficiency);
}

StatusOr<double> CostModel::AllReduceSeconds(double bytes) const {
  if (!(bytes >= 0)) return InvalidArgument("all-reduce bytes=" + Num(bytes) + " must be >= 0");
  if (ranks_ == 1 || bytes == 0) return 0.0;
  const double a = nodes_ > 1 ? a_inter_ : a_intra_;
  const double b = nodes_ > 1 ? b_inter_ : b_intra_;
  const double n = ranks_;
  return 2.0 * (n - 1.0) * (a + bytes / (n * b));
}

StatusOr<double> PipelinedGroupSeconds(const std::vector<double>& a, const std::vector<double>& c,
                                       const std::vector<double>& b) {
  const size_t d = a.size();
  if (d == 0 || c.size() != d || b.size() != d) {
    return InvalidArgument("pipeline: " + std::to_string(a.size()) + " dispatch, " +
                           std::to_string(c.size()) + " expert and " + std::to_string(b.size()) +
                           " combine times; expected the same number >= 1 of each");
  }
  for (const std::vector<double>* v : {&a, &c, &b}) {
    for (double t : *v) {
      if (!(t >= 0 && std::isfinite(t))) {
        return InvalidArgument("pipeline: time " + Num(t) + " s must be a finite number >= 0");
      }
    }
  }
  double comm = 0.0;     // when the communication engine is free (its last call's end)
  double compute = 0.0;  // when the compute engine is free (the last chunk's experts' end)
  std::vector<double> dispatched(d, 0.0);
  auto dispatch = [&](size_t j) {
    comm += a[j];
    dispatched[j] = comm;
  };
  auto combine = [&](size_t j) {  // compute j, then Cj
    compute = std::max(compute, dispatched[j]) + c[j];
    comm = std::max(comm, compute) + b[j];
  };
  // Issue order: D0 D1 C0 D2 C1 ... D(d-1) C(d-2) C(d-1).
  dispatch(0);
  for (size_t j = 1; j < d; ++j) {
    dispatch(j);
    combine(j - 1);
  }
  combine(d - 1);
  return comm;
}

StatusOr<StepPrediction> CostModel::PredictStep(const StepTraffic& step, bool hierarchical) const {
  StepPrediction out;
  auto a2a = [&](const TrafficMatrix& m) {
    return hierarchical ? HierarchicalAllToAllSeconds(m) : FlatAllToAllSeconds(m);
  };
  if (!step.dispatch_unique.empty() && step.dispatch_unique.size() != step.dispatch.size()) {
    return InvalidArgument("step: " + std::to_string(step.dispatch_unique.size()) +
                           " deduplicated dispatch matrices for " +
                           std::to_string(step.dispatch.size()) + " dispatches");
  }
  std::vector<double> dispatch_t, combine_t;  // per all-to-all, for the pipeline groups
  for (size_t i = 0; i < step.dispatch.size(); ++i) {
    const TrafficMatrix& m = step.dispatch[i];
    const bool dedup = hierarchical && !step.dispatch_unique.empty() && !step.dispatch_unique[i].empty();
    MOE_ASSIGN_OR_RETURN(const double t, dedup ? DedupAllToAllSeconds(m, step.dispatch_unique[i]) : a2a(m));
    out.dispatch_seconds += t;
    dispatch_t.push_back(t);
  }
  for (const TrafficMatrix& m : step.combine) {
    MOE_ASSIGN_OR_RETURN(const double t, a2a(m));
    out.combine_seconds += t;
    combine_t.push_back(t);
  }
  MOE_ASSIGN_OR_RETURN(out.experts_seconds, ComputeSeconds(step.expert_flops));
  if (!step.other_flops.empty()) {
    MOE_ASSIGN_OR_RETURN(out.other_seconds, ComputeSeconds(step.other_flops));
  }
  MOE_ASSIGN_OR_RETURN(const double ar, AllReduceSeconds(step.allreduce_bytes));
  out.other_seconds += ar;

  double overlap = 0.0;
  for (size_t g = 0; g < step.pipelines.size(); ++g) {
    const StepTraffic::PipelineGroup& group = step.pipelines[g];
    const std::string where = "pipeline group " + std::to_string(g);
    const size_t d = group.dispatch.size();
    if (d == 0 || group.combine.size() != d || group.expert_flops.size() != d) {
      return InvalidArgument(where + ": " + std::to_string(d) + " dispatches, " +
                             std::to_string(group.combine.size()) + " combines and " +
                             std::to_string(group.expert_flops.size()) +
                             " expert FLOP vectors; expected the same number >= 1 of each");
    }
    std::vector<double> a(d), c(d), b(d);
    double serial = 0.0;
    for (size_t j = 0; j < d; ++j) {
      if (group.dispatch[j] >= dispatch_t.size() || group.combine[j] >= combine_t.size()) {
        return InvalidArgument(where + " chunk " + std::to_string(j) +
                               ": dispatch or combine index out of range");
      }
      a[j] = dispatch_t[group.dispatch[j]];
      b[j] = combine_t[group.combine[j]];
      StatusOr<double> cj = ComputeSeconds(group.expert_flops[j]);
      if (!cj.ok()) return cj.status().WithContext(where + " chunk " + std::to_string(j));
      c[j] = *cj;
      // In the pipeline's own order of additions, so that d = 1 gives exactly T_group.
      serial += a[j];
      serial += c[j];
      serial += b[j];
    }
    MOE_ASSIGN_OR_RETURN(const double pipelined, PipelinedGroupSeconds(a, c, b));
    overlap += std::max(0.0, serial - pipelined);
  }
  out.overlap_seconds = std::min(overlap, out.experts_seconds);
  return out;
}

StatusOr<double> MaxRankBytes(const TrafficMatrix& bytes) {
  const size_t n = bytes.size();
  double worst = 0.0;
  for (size_t r = 0; r < n; ++r) {
    if (bytes[r].size() != n) {
      return InvalidArgument("traffic matrix row " + std::to_string(r) + " has " + std::to_string(bytes[r].size()) +
                             " entries, expected " + std::to_string(n));
    }
  }
  for (size_t r = 0; r < n; ++r) {
    double sent = 0.0, received = 0.0;
    for (size_t p = 0; p < n; ++p) {
      if (!(bytes[r][p] >= 0)) return InvalidArgument("traffic matrix row " + std::to_string(r) + " has a negative entry");
      sent += bytes[r][p];
      received += bytes[p][r];
    }
    worst = std::max(worst, std::max(sent, received));
  }
  return worst;
}

StatusOr<HostStepPrediction> PredictHostStep(const HostModel& model, const HostStepInputs& step) {
  if (model.cores < 1) return InvalidArgument("host model: cores=" + std::to_string(model.cores) + " must be >= 1");
  for (const auto& [name, c] : {std::pair<const char*, CallCost>{"alltoall", model.alltoall}, {"allreduce", model.allreduce}}) {
    if (!(c.beta_bytes_per_second > 0)) {
      return InvalidArgument(std::string("host model: ") + name + " beta=" + Num(c.beta_bytes_per_second) + " must be > 0");
    }
    if (!(c.alpha_seconds >= 0)) {
      return InvalidArgument(std::string("host model: ") + name + " alpha=" + Num(c.alpha_seconds) + " must be >= 0");
    }
  }
  const size_t ranks = step.compute_seconds.size();
  if (ranks == 0) return InvalidArgument("host step: compute_seconds is empty (one entry per rank)");
  HostStepPrediction out;
  double worst = 0.0, sum = 0.0;
  for (double c : step.compute_seconds) {
    if (!(c >= 0)) return InvalidArgument("host step: compute seconds " + Num(c) + " must be >= 0");
    worst = std::max(worst, c);
    sum += c;
  }
  const double lanes = static_cast<double>(std::min<size_t>(static_cast<size_t>(model.cores), ranks));
  out.compute_mean_seconds = sum / static_cast<double>(ranks);
  out.wait_seconds = worst - out.compute_mean_seconds;
  out.oversubscription_seconds = std::max(0.0, sum / lanes - worst);
  for (const TrafficMatrix& m : step.alltoalls) {
    if (m.size() != ranks) {
      return InvalidArgument("host step: traffic matrix has " + std::to_string(m.size()) + " rows, expected " +
                             std::to_string(ranks) + " (one per rank)");
    }
    MOE_ASSIGN_OR_RETURN(const double bytes, MaxRankBytes(m));
    out.alltoall_seconds += model.alltoall.Seconds(bytes);
    ++out.alltoall_calls;
  }
  for (double b : step.allreduce_bytes) {
    if (!(b >= 0)) return InvalidArgument("host step: all-reduce bytes " + Num(b) + " must be >= 0");
    out.allreduce_seconds += model.allreduce.Seconds(b);
    ++out.allreduce_calls;
  }
  return out;
}

StatusOr<AlphaBetaFit> FitAlphaBeta(const std::vector<std::pair<double, double>>& points, FitWeighting weighting) {
  if (points.size() < 2) return InvalidArgument("alpha-beta fit needs at least 2 points");
  std::vector<double> w;
  for (const auto& [x, y] : points) {
    if (weighting == FitWeighting::kRelative && !(y > 0)) {
      return InvalidArgument("alpha-beta fit (relative): time " + Num(y) + " s at " + Num(x) + " bytes must be > 0");
    }
    w.push_back(weighting == FitWeighting::kRelative ? 1.0 / (y * y) : 1.0);
  }
  double sw = 0, sx = 0, sy = 0;
  for (size_t i = 0; i < points.size(); ++i) {
    sw += w[i];
    sx += w[i] * points[i].first;
    sy += w[i] * points[i].second;
  }
  const double mx = sx / sw, my = sy / sw;
  double sxx = 0, sxy = 0;
  for (size_t i = 0; i < points.size(); ++i) {
    const auto& [x, y] = points[i];
    sxx += w[i] * (x - mx) * (x - mx);
    sxy += w[i] * (x - mx) * (y - my);
  }
  if (!(sxx > 0)) return InvalidArgument("alpha-beta fit needs at least 2 distinct message sizes");
  const double slope = sxy / sxx;
  if (!(slope > 0)) {
    return InvalidArgument("alpha-beta fit: time does not grow with size (slope " + Num(slope) +
                           " s/byte); use larger messages");
  }
  AlphaBetaFit fit;
  fit.alpha_seconds = my - slope * mx;
  fit.beta_bytes_per_second = 1.0 / slope;
  double ss = 0;
  for (const auto& [x, y] : points) {
    const double r = y - (fit.alpha_seconds + x * slope);
    ss += r * r;
  }
  fit.rms_residual_seconds = std::sqrt(ss / static_cast<double>(points.size()));
  return fit;
}

}  // namespace moe
