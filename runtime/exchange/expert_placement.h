// Placement of redundant experts (in the style of DeepSeek's EPLB): which logical expert every
// physical expert slot holds, chosen from measured per-expert load so that the ranks of the
// expert-parallel group receive about the same number of rows.
//
// Model. E logical experts (moe.num_experts), R >= 0 redundant physical experts
// (parallel.num_redundant_experts), W ranks (parallel.ep_size). The E + R physical experts sit on
// the ranks in contiguous blocks of P = (E + R) / W, rank-major: physical expert q is slot q % P of
// rank q / P. A placement maps every physical expert to a logical one such that
//   - every logical expert has at least one replica (physical expert holding it), and
//   - no rank holds two replicas of one logical expert,
// so a logical expert has between 1 and W replicas and R <= E·(W - 1).
//
// Load model. A logical expert e with n_e replicas has its rows split evenly over them, so each
// replica carries load_e / n_e and a rank receives the sum of that over its physical experts
// (RankLoads). How rows are actually assigned to replicas is the dispatcher's business.
//
// Everything here is pure and deterministic (no randomness, ties broken by index), so every rank
// computes the same placement from the same (all-reduced) load without another exchange.
#pragma once

#include <string>
#include <vector>

#include "base/status.h"

namespace moe {

// A validated placement; build one with MakePlacement (or the policies below), which also fills
// the derived `replicas`. Fields are public for reading; changing them breaks the invariants.
struct ExpertPlacement {
  int num_logical = 0;  // E
  int num_ranks = 0;    // W
  int per_rank = 0;     // P = (E + R) / W physical experts per rank
  // E + R entries: physical expert q holds logical expert physical_to_logical[q].
  std::vector<int> physical_to_logical;
  // Derived, E entries: replicas[e] lists the physical experts holding e, ascending (>= 1 each).
  std::vector<std::vector<int>> replicas;

  int num_physical() const { return static_cast<int>(physical_to_logical.size()); }  // E + R
  int num_redundant() const { return num_physical() - num_logical; }                 // R
  int rank_of(int physical) const { return physical / per_rank; }
  int slot_of(int physical) const { return physical % per_rank; }
  // The logical expert in slot `slot` (< P) of rank `rank`.
  int logical_at(int rank, int slot) const { return physical_to_logical[rank * per_rank + slot]; }
  int replica_count(int logical) const { return static_cast<int>(replicas[logical].size()); }
  // True when R == 0 and physical expert q holds logical expert q (the layout without a policy).
  bool identity() const;
};

// Validates `physical_to_logical` as a placement of num_logical experts on num_ranks ranks and
// fills the derived fields. kInvalidArgument naming the broken rule and the numbers: fewer physical
// than logical experts, E + R not divisible by W ("parallel.num_redundant_experts: 8 experts + 3
// redundant = 11 physical experts must be divisible by the expert-parallel size 4"), more than one
// replica per rank on average (R > E·(W - 1)), an id outside [0, E), a logical expert without a
// replica, or a rank holding one logical expert twice.
StatusOr<ExpertPlacement> MakePlacement(int num_logical, int num_ranks,
                                        std::vector<int> physical_to_logical);

// The placement before any load is known. R == 0: physical expert q holds logical expert q.
// R > 0: the R extra replicas go round-robin to logical experts 0, 1, 2, ... (replica counts differ
// by at most one, the lower ids having the extra one), packed onto the ranks by PackReplicas with
// a uniform load and no node preference; the result equals BalancedPlacement with ranks_per_node 0
// on a load of 1 per logical expert. kInvalidArgument naming moe.num_experts (E < 1),
// parallel.ep_size (W < 1) or parallel.num_redundant_experts (R < 0, E + R not divisible by W,
// R > E·(W - 1): an expert can have at most one replica per rank).
StatusOr<ExpertPlacement> IdentityPlacement(int num_logical, int num_redundant, int num_ranks);

// Step 1 of BalancedPlacement: replica counts n_e (E = logical_load.size()), summing to E + R.
// Starts from n_e = 1 and R times gives one more replica to the expert with the largest
// load_e / n_e among those with n_e < W; ties go to the expert with fewer replicas, then to the
// lower id (so a uniform or all-zero load gives the round-robin counts of IdentityPlacement).
// Errors as IdentityPlacement, plus a negative or non-finite load. O(R·E).
StatusOr<std::vector<int>> ReplicaCounts(const std::vector<double>& logical_load, int num_redundant,
                                         int num_ranks);

// Steps 2 and 3 of BalancedPlacement: places replica_counts[e] replicas of every logical expert e
// (E = replica_counts.size(), each count in [1, W], the total divisible by W) on num_ranks ranks
// of P = total / W slots, each replica weighing logical_load[e] / replica_counts[e].
//
// Order. Items (e, j), j < n_e, are placed one at a time: first the experts with n_e == W (their
// placement is forced — one replica on every rank — and adds the same weight to every rank, so
// placing them first changes no later choice except by using up one slot everywhere), then the
// rest heaviest first; ties: lower e, then lower j. All replicas of an expert weigh the same, so
// they are placed consecutively.
//
// Choice. Item (e, j) goes to the rank with the least total weight so far among the eligible ranks
// — a free slot (fewer than P items) and not already holding e; ties: lower rank. With
// ranks_per_node > 0 (comm.ranks_per_node; it must divide W, the nodes being runs of
// ranks_per_node consecutive ranks) the choice is node-aware: node_traffic (E x nodes row-major,
// the rows each node sends to e) orders e's nodes by traffic descending (ties: lower node), and
// replica j prefers node order[j % nodes]: the least-loaded eligible rank of that node, or when it
// has none, the least-loaded eligible rank anywhere. With ranks_per_node == 0 node_traffic must
// be empty.
//
// Stuck items. An item (e, j) can find no eligible rank at all: all free slots on ranks that
// already hold e. (Example: W = 3, P = 3, one expert of weight 100 alone on rank 0 while six
// experts of weight 1 fill ranks 1 and 2, then an expert with 2 light replicas: the first takes
// rank 0, the second has nowhere to go.) A single move then always frees a place:
//   - some rank r has a free slot (free slots = items left > 0), and r holds e (we are stuck);
//   - e has j < n_e <= W replicas placed, so some rank s does not hold e, and s is full (else it
//     would be eligible): s holds P distinct experts, none of them e;
//   - r holds at most P - 1 items, one of them e, so at most P - 2 of s's P experts: at least two
//     experts f on s are not on r (in particular P >= 2, so P == 1 never gets stuck).
// Moving such an f from s to r and placing (e, j) on s keeps every rule (r gains f, which it
// lacked, into its free slot; s trades f for e, which it lacked). Among all such (r, s, f) the
// repair takes the one with the smallest resulting max(weight of r, weight of s), ties: lower r,
// s, f. Since the argument holds in every state, packing succeeds for any valid replica counts;
// kInternal would mean a broken invariant. `repairs`, when not null, receives the number of moves.
// Ordering alone cannot rule this out (the example's replica counts are valid input); with
// BalancedPlacement's counts it shows up when light experts hold several replicas, typically
// zero-load experts that received extras after the loaded ones reached W replicas.
//
// Layout. A rank's slots hold its experts sorted by logical id, physical id = rank·P + slot.
StatusOr<ExpertPlacement> PackReplicas(const std::vector<int>& replica_counts,
                                       const std::vector<double>& logical_load, int num_ranks,
                                       int ranks_per_node, const std::vector<double>& node_traffic,
                                       int* repairs = nullptr);

// The load-balancing policy: load_by_rank_expert (W x E row-major) holds the rows source rank r
// sent to logical expert e over the measurement window. load_e = sum over source ranks; replica
// counts by ReplicaCounts; packing by PackReplicas, node-aware when ranks_per_node > 0 (node
// traffic of e = its load summed over the node's source ranks). kInvalidArgument as
// IdentityPlacement, plus comm.ranks_per_node (negative or not dividing W), a load of the wrong
// size, or a negative or non-finite load value.
StatusOr<ExpertPlacement> BalancedPlacement(const std::vector<double>& load_by_rank_expert,
                                            int num_logical, int num_redundant, int num_ranks,
                                            int ranks_per_node);

// Expected rows per rank when every logical expert's rows (logical_load, E entries) are split
// evenly over its replicas: rank r gets the sum over its physical experts of load_e / n_e.
// logical_load must have E entries (a programmer error otherwise).
std::vector<double> RankLoads(const ExpertPlacement& placement,
                              const std::vector<double>& logical_load);

// max / mean of `loads` (the imbalance factor, >= 1); 1.0 when empty or all zero.
double MaxOverMean(const std::vector<double>& loads);

// One line per rank for logs, lines separated by '\n' (no trailing newline): "rank 1: 0*2 2 3*2",
// the rank's logical experts in slot order, "*n" marking an expert with n > 1 replicas.
std::string DescribePlacement(const ExpertPlacement& placement);

}  // namespace moe
