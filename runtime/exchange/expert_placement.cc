// Redundant-expert placement policies (runtime/exchange/expert_placement.h).
#include "runtime/exchange/expert_placement.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <utility>

#include "base/check.h"

namespace moe {

namespace {

std::string Str(int64_t v) { return std::to_string(v); }

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

Status CheckCounts(int num_logical, int num_ranks) {
  if (num_logical < 1) {
    return InvalidArgument("moe.num_experts=" + Str(num_logical) + " must be >= 1");
  }
  if (num_ranks < 1) {
    return InvalidArgument("parallel.ep_size: the expert-parallel size " + Str(num_ranks) +
                           " must be >= 1");
  }
  return Status::Ok();
}

// The rules on (E, R, W) every placement obeys.
Status CheckShape(int num_logical, int64_t num_redundant, int num_ranks) {
  MOE_RETURN_IF_ERROR(CheckCounts(num_logical, num_ranks));
  if (num_redundant < 0) {
    return InvalidArgument("parallel.num_redundant_experts=" + Str(num_redundant) +
                           " must be >= 0");
  }
  const int64_t physical = num_logical + num_redundant;
  if (physical % num_ranks != 0) {
    return InvalidArgument("parallel.num_redundant_experts: " + Str(num_logical) + " experts + " +
                           Str(num_redundant) + " redundant = " + Str(physical) +
                           " physical experts must be divisible by the expert-parallel size " +
                           Str(num_ranks));
  }
  const int64_t most = int64_t{num_logical} * (num_ranks - 1);
  if (num_redundant > most) {
    return InvalidArgument(
        "parallel.num_redundant_experts=" + Str(num_redundant) +
        " must be <= experts x (expert-parallel size - 1) = " + Str(num_logical) + " x " +
        Str(num_ranks - 1) + " = " + Str(most) + ": an expert has at most one replica per rank");
  }
  return Status::Ok();
}

// kInvalidArgument unless every value of `values` is finite and >= 0.
Status CheckLoads(const std::string& what, const std::vector<double>& values) {
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i]) || values[i] < 0) {
      return InvalidArgument(what + "[" + Str(static_cast<int64_t>(i)) + "] = " + Num(values[i]) +
                             " must be finite and >= 0");
    }
  }
  return Status::Ok();
}

Status CheckRanksPerNode(int ranks_per_node, int num_ranks) {
  if (ranks_per_node < 0 || (ranks_per_node > 0 && num_ranks % ranks_per_node != 0)) {
    return InvalidArgument("comm.ranks_per_node=" + Str(ranks_per_node) +
                           " must be 0 (one node) or divide the expert-parallel size " +
                           Str(num_ranks));
  }
  return Status::Ok();
}

// The packer's state: items per rank, weight per rank, and which rank holds which expert.
class Packer {
 public:
  Packer(int num_logical, int num_ranks, int per_rank, std::vector<double> weight)
      : e_(num_logical),
        w_(num_ranks),
        p_(per_rank),
        weight_(std::move(weight)),
        load_(static_cast<size_t>(num_ranks), 0.0),
        items_(static_cast<size_t>(num_ranks)),
        holds_(static_cast<size_t>(num_ranks) * static_cast<size_t>(num_logical), 0) {}

  bool Eligible(int rank, int expert) const {
    return static_cast<int>(items_[rank].size()) < p_ && !Holds(rank, expert);
  }

  // The least-loaded eligible rank in [begin, end) for `expert` (ties: lower rank), or -1.
  int LeastLoaded(int expert, int begin, int end) const {
    int best = -1;
    for (int r = begin; r < end; ++r) {
      if (Eligible(r, expert) && (best < 0 || load_[r] < load_[best])) best = r;
    }
    return best;
  }

  void Place(int rank, int expert) {
    items_[rank].push_back(expert);
    load_[rank] += weight_[expert];
    holds_[Index(rank, expert)] = 1;
  }

  // Places `expert` when no rank is eligible, by the single move of the header's argument.
  Status Repair(int expert) {
    int best_r = -1, best_s = -1, best_f = -1;
    double best_cost = 0.0;
    for (int r = 0; r < w_; ++r) {
      if (static_cast<int>(items_[r].size()) >= p_) continue;
      if (!Holds(r, expert)) {
        return Internal("PackReplicas: rank " + Str(r) + " is eligible for expert " + Str(expert) +
                        " in a repair");
      }
      for (int s = 0; s < w_; ++s) {
        if (Holds(s, expert)) continue;
        for (int f : items_[s]) {
          if (Holds(r, f)) continue;
          const double cost =
              std::max(load_[r] + weight_[f], load_[s] - weight_[f] + weight_[expert]);
          // Scanning r, then s ascending; f compared explicitly (a rank's items are unsorted).
          const bool better = best_r < 0 || cost < best_cost ||
                              (cost == best_cost && r == best_r && s == best_s && f < best_f);
          if (better) {
            best_r = r;
            best_s = s;
            best_f = f;
            best_cost = cost;
          }
        }
      }
    }
    if (best_r < 0) {
      return Internal("PackReplicas: no rank can take a replica of expert " + Str(expert) +
                      " even after a move (a broken invariant)");
    }
    std::vector<int>& from = items_[best_s];
    from.erase(std::find(from.begin(), from.end(), best_f));
    load_[best_s] -= weight_[best_f];
    holds_[Index(best_s, best_f)] = 0;
    Place(best_r, best_f);
    Place(best_s, expert);
    return Status::Ok();
  }

  // physical_to_logical: each rank's experts sorted by id, rank-major.
  std::vector<int> Layout() const {
    std::vector<int> out;
    out.reserve(static_cast<size_t>(w_) * static_cast<size_t>(p_));
    for (int r = 0; r < w_; ++r) {
      std::vector<int> experts = items_[r];
      std::sort(experts.begin(), experts.end());
      out.insert(out.end(), experts.begin(), experts.end());
    }
    return out;
  }

 private:
  size_t Index(int rank, int expert) const {
    return static_cast<size_t>(rank) * static_cast<size_t>(e_) + static_cast<size_t>(expert);
  }
  bool Holds(int rank, int expert) const { return holds_[Index(rank, expert)] != 0; }

  int e_, w_, p_;
  std::vector<double> weight_;           // per logical expert: load / replicas
  std::vector<double> load_;             // per rank
  std::vector<std::vector<int>> items_;  // per rank, placement order
  std::vector<unsigned char> holds_;     // rank x expert
};

}  // namespace

bool ExpertPlacement::identity() const {
  if (num_physical() != num_logical) return false;
  for (int q = 0; q < num_physical(); ++q) {
    if (physical_to_logical[q] != q) return false;
  }
  return true;
}

StatusOr<ExpertPlacement> MakePlacement(int num_logical, int num_ranks,
                                        std::vector<int> physical_to_logical) {
  MOE_RETURN_IF_ERROR(CheckCounts(num_logical, num_ranks));
  const int64_t physical = static_cast<int64_t>(physical_to_logical.size());
  if (physical < num_logical) {
    return InvalidArgument("expert placement: " + Str(physical) +
                           " physical experts, fewer than the " + Str(num_logical) +
                           " logical experts (every logical expert needs a replica)");
  }
  MOE_RETURN_IF_ERROR(CheckShape(num_logical, physical - num_logical, num_ranks));
  ExpertPlacement out;
  out.num_logical = num_logical;
  out.num_ranks = num_ranks;
  out.per_rank = static_cast<int>(physical / num_ranks);
  out.replicas.assign(static_cast<size_t>(num_logical), {});
  // seen_on[e]: 1 + the last rank found holding e (0: none yet); ranks are scanned in order.
  std::vector<int> seen_on(static_cast<size_t>(num_logical), 0);
  for (int q = 0; q < static_cast<int>(physical); ++q) {
    const int e = physical_to_logical[q];
    if (e < 0 || e >= num_logical) {
      return InvalidArgument("expert placement: physical expert " + Str(q) +
                             " holds logical expert " + Str(e) + ", must be in [0, " +
                             Str(num_logical) + ")");
    }
    const int rank = q / out.per_rank;
    if (seen_on[e] == rank + 1) {
      return InvalidArgument("expert placement: rank " + Str(rank) + " holds logical expert " +
                             Str(e) + " twice (physical experts " + Str(out.replicas[e].back()) +
                             " and " + Str(q) + "); a rank holds at most one replica of an expert");
    }
    seen_on[e] = rank + 1;
    out.replicas[e].push_back(q);
  }
  for (int e = 0; e < num_logical; ++e) {
    if (out.replicas[e].empty()) {
      return InvalidArgument("expert placement: logical expert " + Str(e) +
                             " has no replica; every logical expert needs at least one");
    }
  }
  out.physical_to_logical = std::move(physical_to_logical);
  return out;
}

StatusOr<ExpertPlacement> IdentityPlacement(int num_logical, int num_redundant, int num_ranks) {
  MOE_RETURN_IF_ERROR(CheckShape(num_logical, num_redundant, num_ranks));
  if (num_redundant == 0) {
    std::vector<int> physical_to_logical(static_cast<size_t>(num_logical));
    std::iota(physical_to_logical.begin(), physical_to_logical.end(), 0);
    return MakePlacement(num_logical, num_ranks, std::move(physical_to_logical));
  }
  std::vector<int> counts(static_cast<size_t>(num_logical), 1 + num_redundant / num_logical);
  for (int e = 0; e < num_redundant % num_logical; ++e) ++counts[e];
  const std::vector<double> uniform(static_cast<size_t>(num_logical), 1.0);
  return PackReplicas(counts, uniform, num_ranks, 0, {});
}

StatusOr<std::vector<int>> ReplicaCounts(const std::vector<double>& logical_load, int num_redundant,
                                         int num_ranks) {
  const int num_logical = static_cast<int>(logical_load.size());
  MOE_RETURN_IF_ERROR(CheckShape(num_logical, num_redundant, num_ranks));
  MOE_RETURN_IF_ERROR(CheckLoads("logical_load", logical_load));
  std::vector<int> counts(static_cast<size_t>(num_logical), 1);
  for (int k = 0; k < num_redundant; ++k) {
    int best = -1;
    double best_share = 0.0;
    for (int e = 0; e < num_logical; ++e) {
      if (counts[e] >= num_ranks) continue;
      const double share = logical_load[e] / counts[e];
      if (best < 0 || share > best_share || (share == best_share && counts[e] < counts[best])) {
        best = e;
        best_share = share;
      }
    }
    // CheckShape guarantees R <= E·(W - 1), so an expert below W replicas remains.
    MOE_CHECK(best >= 0);
    ++counts[best];
  }
  return counts;
}

StatusOr<ExpertPlacement> PackReplicas(const std::vector<int>& replica_counts,
                                       const std::vector<double>& logical_load, int num_ranks,
                                       int ranks_per_node, const std::vector<double>& node_traffic,
                                       int* repairs) {
  const int num_logical = static_cast<int>(replica_counts.size());
  MOE_RETURN_IF_ERROR(CheckCounts(num_logical, num_ranks));
  if (logical_load.size() != replica_counts.size()) {
    return InvalidArgument("PackReplicas: logical_load has " + Str(logical_load.size()) +
                           " values, must be one per logical expert (" + Str(num_logical) + ")");
  }
  MOE_RETURN_IF_ERROR(CheckLoads("logical_load", logical_load));
  int64_t total = 0;
  for (int e = 0; e < num_logical; ++e) {
    if (replica_counts[e] < 1 || replica_counts[e] > num_ranks) {
      return InvalidArgument("PackReplicas: logical expert " + Str(e) + " has " +
                             Str(replica_counts[e]) + " replicas, must be in [1, " +
                             Str(num_ranks) + "] (at most one per rank)");
    }
    total += replica_counts[e];
  }
  MOE_RETURN_IF_ERROR(CheckShape(num_logical, total - num_logical, num_ranks));
  MOE_RETURN_IF_ERROR(CheckRanksPerNode(ranks_per_node, num_ranks));
  const int nodes = ranks_per_node > 0 ? num_ranks / ranks_per_node : 0;
  if (node_traffic.size() != static_cast<size_t>(num_logical) * static_cast<size_t>(nodes)) {
    return InvalidArgument("PackReplicas: node_traffic has " + Str(node_traffic.size()) +
                           " values, must be experts x nodes = " + Str(num_logical) + " x " +
                           Str(nodes));
  }
  MOE_RETURN_IF_ERROR(CheckLoads("node_traffic", node_traffic));
  const int per_rank = static_cast<int>(total / num_ranks);

  std::vector<double> weight(static_cast<size_t>(num_logical));
  for (int e = 0; e < num_logical; ++e) weight[e] = logical_load[e] / replica_counts[e];
  // Experts in placement order: those on every rank first, then heaviest replicas first, then id.
  std::vector<int> order(static_cast<size_t>(num_logical));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    const bool full_a = replica_counts[a] == num_ranks, full_b = replica_counts[b] == num_ranks;
    if (full_a != full_b) return full_a;
    return weight[a] > weight[b];
  });

  Packer packer(num_logical, num_ranks, per_rank, weight);
  int moves = 0;
  std::vector<int> node_order(static_cast<size_t>(nodes));
  for (int e : order) {
    if (nodes > 0) {
      const double* traffic = node_traffic.data() + static_cast<size_t>(e) * nodes;
      std::iota(node_order.begin(), node_order.end(), 0);
      std::stable_sort(node_order.begin(), node_order.end(),
                       [traffic](int a, int b) { return traffic[a] > traffic[b]; });
    }
    for (int j = 0; j < replica_counts[e]; ++j) {
      int rank = -1;
      if (nodes > 0) {
        const int node = node_order[j % nodes];
        rank = packer.LeastLoaded(e, node * ranks_per_node, (node + 1) * ranks_per_node);
      }
      if (rank < 0) rank = packer.LeastLoaded(e, 0, num_ranks);
      if (rank >= 0) {
        packer.Place(rank, e);
      } else {
        MOE_RETURN_IF_ERROR(packer.Repair(e));
        ++moves;
      }
    }
  }
  if (repairs != nullptr) *repairs = moves;
  StatusOr<ExpertPlacement> placement = MakePlacement(num_logical, num_ranks, packer.Layout());
  if (!placement.ok()) {
    return Internal("PackReplicas produced an invalid placement: " + placement.status().message());
  }
  return placement;
}

StatusOr<ExpertPlacement> BalancedPlacement(const std::vector<double>& load_by_rank_expert,
                                            int num_logical, int num_redundant, int num_ranks,
                                            int ranks_per_node) {
  MOE_RETURN_IF_ERROR(CheckShape(num_logical, num_redundant, num_ranks));
  MOE_RETURN_IF_ERROR(CheckRanksPerNode(ranks_per_node, num_ranks));
  const size_t e_count = static_cast<size_t>(num_logical);
  const size_t want = static_cast<size_t>(num_ranks) * e_count;
  if (load_by_rank_expert.size() != want) {
    return InvalidArgument("BalancedPlacement: load_by_rank_expert has " +
                           Str(load_by_rank_expert.size()) +
                           " values, must be expert-parallel size x experts = " + Str(num_ranks) +
                           " x " + Str(num_logical) + " = " + Str(want));
  }
  for (size_t i = 0; i < want; ++i) {
    const double v = load_by_rank_expert[i];
    if (!std::isfinite(v) || v < 0) {
      return InvalidArgument("BalancedPlacement: load_by_rank_expert[" + Str(i) + "] (rank " +
                             Str(i / e_count) + ", expert " + Str(i % e_count) + ") = " + Num(v) +
                             " must be finite and >= 0");
    }
  }
  std::vector<double> logical_load(e_count, 0.0);
  const int nodes = ranks_per_node > 0 ? num_ranks / ranks_per_node : 0;
  std::vector<double> node_traffic(e_count * static_cast<size_t>(nodes), 0.0);
  for (int r = 0; r < num_ranks; ++r) {
    for (size_t e = 0; e < e_count; ++e) {
      const double v = load_by_rank_expert[static_cast<size_t>(r) * e_count + e];
      logical_load[e] += v;
      if (nodes > 0) node_traffic[e * nodes + static_cast<size_t>(r / ranks_per_node)] += v;
    }
  }
  MOE_ASSIGN_OR_RETURN(const std::vector<int> counts,
                       ReplicaCounts(logical_load, num_redundant, num_ranks));
  return PackReplicas(counts, logical_load, num_ranks, ranks_per_node, node_traffic);
}

std::vector<double> RankLoads(const ExpertPlacement& placement,
                              const std::vector<double>& logical_load) {
  MOE_CHECK(static_cast<int>(logical_load.size()) == placement.num_logical);
  std::vector<double> out(static_cast<size_t>(placement.num_ranks), 0.0);
  for (int q = 0; q < placement.num_physical(); ++q) {
    const int e = placement.physical_to_logical[q];
    out[placement.rank_of(q)] += logical_load[e] / placement.replica_count(e);
  }
  return out;
}

double MaxOverMean(const std::vector<double>& loads) {
  if (loads.empty()) return 1.0;
  double sum = 0.0, most = loads[0];
  for (double v : loads) {
    sum += v;
    most = std::max(most, v);
  }
  if (sum <= 0.0) return 1.0;
  return most / (sum / static_cast<double>(loads.size()));
}

std::string DescribePlacement(const ExpertPlacement& placement) {
  std::string out;
  for (int r = 0; r < placement.num_ranks; ++r) {
    if (r > 0) out += '\n';
    out.append("rank ").append(Str(r)).append(":");
    for (int s = 0; s < placement.per_rank; ++s) {
      const int e = placement.logical_at(r, s);
      out.append(" ").append(Str(e));
      if (placement.replica_count(e) > 1) out.append("*").append(Str(placement.replica_count(e)));
    }
  }
  return out;
}

}  // namespace moe
