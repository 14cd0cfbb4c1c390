#include "runtime/cost_model.h"

#include <algorithm>
#include <cmath>
#include <string>

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
  if (!(t.intra_bandwidth_gbps() > 0)) return bad("intra_bandwidth_gbps", t.intra_bandwidth_gbps(), "must be > 0");
  if (!(t.inter_bandwidth_gbps() > 0)) return bad("inter_bandwidth_gbps", t.inter_bandwidth_gbps(), "must be > 0");
  if (!(t.intra_latency_us() >= 0)) return bad("intra_latency_us", t.intra_latency_us(), "must be >= 0");
  if (!(t.inter_latency_us() >= 0)) return bad("inter_latency_us", t.inter_latency_us(), "must be >= 0");
  if (!(t.gpu_tflops() > 0)) return bad("gpu_tflops", t.gpu_tflops(), "must be > 0");
  if (ranks > 0 && static_cast<int64_t>(t.nodes()) * t.gpus_per_node() != ranks) {
    return InvalidArgument(name + ": nodes * gpus_per_node = " + std::to_string(t.nodes()) + " * " +
                           std::to_string(t.gpus_per_node()) + " must equal the number of ranks (" +
                           std::to_string(ranks) + ")");
  }
  return Status::Ok();
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

StatusOr<StepPrediction> CostModel::PredictStep(const StepTraffic& step, bool hierarchical) const {
  StepPrediction out;
  auto a2a = [&](const TrafficMatrix& m) {
    return hierarchical ? HierarchicalAllToAllSeconds(m) : FlatAllToAllSeconds(m);
  };
  for (const TrafficMatrix& m : step.dispatch) {
    MOE_ASSIGN_OR_RETURN(const double t, a2a(m));
    out.dispatch_seconds += t;
  }
  for (const TrafficMatrix& m : step.combine) {
    MOE_ASSIGN_OR_RETURN(const double t, a2a(m));
    out.combine_seconds += t;
  }
  MOE_ASSIGN_OR_RETURN(out.experts_seconds, ComputeSeconds(step.expert_flops));
  if (!step.other_flops.empty()) {
    MOE_ASSIGN_OR_RETURN(out.other_seconds, ComputeSeconds(step.other_flops));
  }
  MOE_ASSIGN_OR_RETURN(const double ar, AllReduceSeconds(step.allreduce_bytes));
  out.other_seconds += ar;
  return out;
}

StatusOr<AlphaBetaFit> FitAlphaBeta(const std::vector<std::pair<double, double>>& points) {
  const double n = static_cast<double>(points.size());
  double sx = 0, sy = 0;
  for (const auto& [x, y] : points) {
    sx += x;
    sy += y;
  }
  if (points.size() < 2) return InvalidArgument("alpha-beta fit needs at least 2 points");
  const double mx = sx / n, my = sy / n;
  double sxx = 0, sxy = 0;
  for (const auto& [x, y] : points) {
    sxx += (x - mx) * (x - mx);
    sxy += (x - mx) * (y - my);
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
  fit.rms_residual_seconds = std::sqrt(ss / n);
  return fit;
}

}  // namespace moe
