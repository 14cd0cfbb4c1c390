// Redundant-expert placement (runtime/exchange/expert_placement.h): hand-computed placements for the
// identity and balanced policies (replica counts, packing, node preference, the repair of a stuck
// item), the invariants over many random loads, and the error messages.
#include "runtime/exchange/expert_placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace moe {
namespace {

// Expects a kInvalidArgument whose message contains every piece of `parts`.
void ExpectInvalid(const Status& s, std::initializer_list<std::string> parts) {
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  for (const std::string& p : parts) {
    EXPECT_NE(s.message().find(p), std::string::npos)
        << "missing '" << p << "' in: " << s.message();
  }
}

// load_by_rank_expert with all rows zero except rank `rank`, which sends `row` (E values).
std::vector<double> FromOneRank(int num_ranks, int rank, const std::vector<double>& row) {
  std::vector<double> out(static_cast<size_t>(num_ranks) * row.size(), 0.0);
  std::copy(row.begin(), row.end(), out.begin() + static_cast<long>(rank * row.size()));
  return out;
}

TEST(ExpertPlacement, IdentityWithoutRedundantExperts) {
  StatusOr<ExpertPlacement> p = IdentityPlacement(8, 0, 4);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->physical_to_logical, (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_TRUE(p->identity());
  EXPECT_EQ(p->per_rank, 2);
  EXPECT_EQ(p->num_physical(), 8);
  EXPECT_EQ(p->num_redundant(), 0);
  EXPECT_EQ(p->rank_of(5), 2);
  EXPECT_EQ(p->slot_of(5), 1);
  EXPECT_EQ(p->logical_at(3, 0), 6);
  for (int e = 0; e < 8; ++e) {
    EXPECT_EQ(p->replica_count(e), 1);
    EXPECT_EQ(p->replicas[e], std::vector<int>{e});
  }
  EXPECT_EQ(DescribePlacement(*p), "rank 0: 0 1\nrank 1: 2 3\nrank 2: 4 5\nrank 3: 6 7");
}

TEST(ExpertPlacement, IdentityWithRedundantExpertsByHand) {
  // E 4, R 2, W 2: round-robin extras to experts 0 and 1, counts {2, 2, 1, 1}, P 3. Weights
  // (uniform load 1) 1/2, 1/2, 1, 1. Experts on every rank first: 0 on ranks 0 and 1 (0.5 each),
  // 1 on ranks 0 and 1 (1.0 each); then expert 2 (1) to rank 0 (tie, lower rank), expert 3 to
  // rank 1 (rank 0 full). Rank 0 {0, 1, 2}, rank 1 {0, 1, 3}.
  StatusOr<ExpertPlacement> p = IdentityPlacement(4, 2, 2);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->physical_to_logical, (std::vector<int>{0, 1, 2, 0, 1, 3}));
  EXPECT_FALSE(p->identity());
  EXPECT_EQ(p->replicas[0], (std::vector<int>{0, 3}));
  EXPECT_EQ(p->replicas[1], (std::vector<int>{1, 4}));
  EXPECT_EQ(p->replicas[3], (std::vector<int>{5}));
  EXPECT_EQ(DescribePlacement(*p), "rank 0: 0*2 1*2 2\nrank 1: 0*2 1*2 3");

  // E 4, R 4, W 4: counts {2, 2, 2, 2}, P 2, all weights 1/2, experts in id order: 0 on ranks 0
  // and 1, 1 on ranks 2 and 3, 2 on ranks 0 and 1, 3 on ranks 2 and 3.
  StatusOr<ExpertPlacement> q = IdentityPlacement(4, 4, 4);
  ASSERT_TRUE(q.ok()) << q.status().ToString();
  EXPECT_EQ(q->physical_to_logical, (std::vector<int>{0, 2, 0, 2, 1, 3, 1, 3}));

  // Deterministic, and the balanced policy on a load of 1 per expert gives the same placement.
  for (auto [e, r, w] : {std::tuple{4, 2, 2}, std::tuple{4, 4, 4}, std::tuple{6, 6, 4},
                         std::tuple{5, 3, 4}, std::tuple{3, 6, 3}, std::tuple{7, 9, 8}}) {
    StatusOr<ExpertPlacement> a = IdentityPlacement(e, r, w);
    StatusOr<ExpertPlacement> b = IdentityPlacement(e, r, w);
    StatusOr<ExpertPlacement> c = BalancedPlacement(
        FromOneRank(w, 0, std::vector<double>(static_cast<size_t>(e), 1.0)), e, r, w, 0);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << e << " " << r << " " << w;
    EXPECT_EQ(a->physical_to_logical, b->physical_to_logical);
    EXPECT_EQ(a->physical_to_logical, c->physical_to_logical) << e << " " << r << " " << w;
    for (int x = 0; x < e; ++x) {
      EXPECT_EQ(a->replica_count(x), 1 + r / e + (x < r % e ? 1 : 0));
    }
  }
}

TEST(ExpertPlacement, BalancedByHand) {
  // E 4, W 2, R 2, rank 0 sends [10, 1, 1, 4]. Replica counts: the first extra to expert 0
  // (10 > 4 > 1); expert 0 now has 2 = W replicas (capped, though 10/2 = 5 is still the largest
  // share), so the second goes to expert 3 (4): counts {2, 1, 1, 2}, P 3.
  // Packing: experts on every rank first, heaviest first: 0 (5 each) on ranks 0 and 1 (5, 5),
  // 3 (2 each) on ranks 0 and 1 (7, 7); then 1 (1) to rank 0 (tie, 8), 2 (1) to rank 1 (rank 0
  // full, 8). Rank 0 {0, 1, 3}, rank 1 {0, 2, 3}.
  const std::vector<double> logical = {10, 1, 1, 4};
  StatusOr<std::vector<int>> counts = ReplicaCounts(logical, 2, 2);
  ASSERT_TRUE(counts.ok()) << counts.status().ToString();
  EXPECT_EQ(*counts, (std::vector<int>{2, 1, 1, 2}));
  StatusOr<ExpertPlacement> p = BalancedPlacement(FromOneRank(2, 0, logical), 4, 2, 2, 0);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->physical_to_logical, (std::vector<int>{0, 1, 3, 0, 2, 3}));
  // Rank 0: 10/2 + 1 + 4/2 = 8; rank 1: 10/2 + 1 + 4/2 = 8.
  EXPECT_EQ(RankLoads(*p, logical), (std::vector<double>{8, 8}));
  EXPECT_DOUBLE_EQ(MaxOverMean(RankLoads(*p, logical)), 1.0);
  // Before: R 0, contiguous: rank 0 {0, 1} = 11, rank 1 {2, 3} = 5; mean 8, max/mean 11/8.
  StatusOr<ExpertPlacement> before = IdentityPlacement(4, 0, 2);
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(RankLoads(*before, logical), (std::vector<double>{11, 5}));
  EXPECT_DOUBLE_EQ(MaxOverMean(RankLoads(*before, logical)), 1.375);
  // The same load from the other rank gives the same placement (no node preference).
  StatusOr<ExpertPlacement> other = BalancedPlacement(FromOneRank(2, 1, logical), 4, 2, 2, 0);
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(other->physical_to_logical, p->physical_to_logical);
}

TEST(ExpertPlacement, HotExpertIsCappedAtOneReplicaPerRank) {
  // E 3, W 3, R 3, load [100, 1, 1]: expert 0 takes the first two extras (100, then 50) and is
  // capped at 3 = W; the third goes to expert 1 (tie with 2 at share 1, lower id): counts
  // {3, 2, 1}, P 2. Packing: 0 (100/3 each) on ranks 0, 1, 2; then 2 (weight 1 > 1/2) to rank 0
  // (tie, lower rank); then 1 (1/2 each) to ranks 1 and 2.
  const std::vector<double> logical = {100, 1, 1};
  StatusOr<std::vector<int>> counts = ReplicaCounts(logical, 3, 3);
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ(*counts, (std::vector<int>{3, 2, 1}));
  StatusOr<ExpertPlacement> p = BalancedPlacement(FromOneRank(3, 2, logical), 3, 3, 3, 0);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->physical_to_logical, (std::vector<int>{0, 2, 0, 1, 0, 1}));
  EXPECT_EQ(p->replica_count(0), 3);
  const std::vector<double> loads = RankLoads(*p, logical);
  ASSERT_EQ(loads.size(), 3u);
  EXPECT_DOUBLE_EQ(loads[0], 100.0 / 3 + 1);
  EXPECT_DOUBLE_EQ(loads[1], 100.0 / 3 + 0.5);
  EXPECT_DOUBLE_EQ(loads[2], 100.0 / 3 + 0.5);
  EXPECT_DOUBLE_EQ(MaxOverMean(loads), (100.0 / 3 + 1) / 34);
  // Without redundant experts (identity, P 1) the hot rank gets 100 of a mean of 34.
  StatusOr<ExpertPlacement> before = IdentityPlacement(3, 0, 3);
  ASSERT_TRUE(before.ok());
  EXPECT_DOUBLE_EQ(MaxOverMean(RankLoads(*before, logical)), 100.0 / 34);
  // The maximum R = E·(W - 1) = 6 puts every expert on every rank.
  StatusOr<ExpertPlacement> all = BalancedPlacement(FromOneRank(3, 0, logical), 3, 6, 3, 0);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  EXPECT_EQ(all->physical_to_logical, (std::vector<int>{0, 1, 2, 0, 1, 2, 0, 1, 2}));
}

TEST(ExpertPlacement, NodeAwareByHand) {
  // W 4, 2 ranks per node (node 0: ranks 0-1, node 1: ranks 2-3), E 6, R 2, P 2. Loads (source
  // rank: rows): e0 rank 2: 8, rank 3: 8 (16, all from node 1); e1 rank 0: 4.5, rank 1: 4.5 (9,
  // node 0); e2 rank 3: 2 (node 1); e3 rank 0: 2 (node 0); e4 rank 2: 1 (node 1); e5 rank 1: 1
  // (node 0). Counts: extras to e0 (16), then e1 (9 > 16/2): {2, 2, 1, 1, 1, 1}; weights 8, 4.5,
  // 2, 2, 1, 1, placed in that order.
  //   e0 (nodes [1, 0]): replica 0 in node 1 -> rank 2 (8); replica 1 in node 0 -> rank 0 (8).
  //   e1 (nodes [0, 1]): replica 0 in node 0 -> rank 1 (4.5); replica 1 in node 1 -> rank 3 (4.5).
  //   e2 (node 1): rank 3 (6.5 < 8), full.   e3 (node 0): rank 1 (6.5), full.
  //   e4 (node 1): rank 2 (9), full.         e5 (node 0): rank 0 (9), full.
  // Rank 0 {0, 5}, rank 1 {1, 3}, rank 2 {0, 4}, rank 3 {1, 2}: every single-replica expert sits
  // in the node that sends it its rows.
  const int w = 4, e = 6;
  std::vector<double> load(static_cast<size_t>(w * e), 0.0);
  const auto at = [&](int rank, int expert) -> double& { return load[rank * e + expert]; };
  at(2, 0) = 8;
  at(3, 0) = 8;
  at(0, 1) = 4.5;
  at(1, 1) = 4.5;
  at(3, 2) = 2;
  at(0, 3) = 2;
  at(2, 4) = 1;
  at(1, 5) = 1;
  const std::vector<double> logical = {16, 9, 2, 2, 1, 1};
  StatusOr<ExpertPlacement> p = BalancedPlacement(load, e, 2, w, 2);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->physical_to_logical, (std::vector<int>{0, 5, 1, 3, 0, 4, 1, 2}));
  EXPECT_EQ(RankLoads(*p, logical), (std::vector<double>{9, 6.5, 9, 6.5}));
  // e0's first replica (physical 4) sits in node 1, where all of its traffic comes from.
  EXPECT_EQ(p->replicas[0], (std::vector<int>{0, 4}));
  EXPECT_EQ(p->rank_of(p->replicas[2][0]) / 2, 1);
  EXPECT_EQ(p->rank_of(p->replicas[4][0]) / 2, 1);
  EXPECT_EQ(p->rank_of(p->replicas[3][0]) / 2, 0);
  EXPECT_EQ(p->rank_of(p->replicas[5][0]) / 2, 0);
  // Flat (one node): e0 -> ranks 0, 1 (8, 8); e1 -> ranks 2, 3 (4.5, 4.5); e2 -> rank 2 (6.5);
  // e3 -> rank 3 (6.5); e4 -> rank 0 (tie at 8, lower rank; 9); e5 -> rank 1 (9). Same balance,
  // e2 (node 1 traffic) lands on rank 2 by chance, e4 (node 1) on rank 0.
  StatusOr<ExpertPlacement> flat = BalancedPlacement(load, e, 2, w, 0);
  ASSERT_TRUE(flat.ok());
  EXPECT_EQ(flat->physical_to_logical, (std::vector<int>{0, 4, 0, 5, 1, 2, 1, 3}));
  EXPECT_EQ(RankLoads(*flat, logical), (std::vector<double>{9, 9, 6.5, 6.5}));
  // ranks_per_node == W is one node: the same as flat.
  StatusOr<ExpertPlacement> one_node = BalancedPlacement(load, e, 2, w, 4);
  ASSERT_TRUE(one_node.ok());
  EXPECT_EQ(one_node->physical_to_logical, flat->physical_to_logical);
}

TEST(ExpertPlacement, NodePreferenceFallsBackWhenTheNodeIsFull) {
  // W 2, one rank per node, E 2, R 0, P 1; rank 1 sends 5 rows to e0 and 3 to e1. e0 (heavier)
  // takes rank 1, its node; e1 prefers node 1 too, which is full: the least-loaded eligible rank
  // anywhere, rank 0.
  const std::vector<double> load = {0, 0, 5, 3};
  StatusOr<ExpertPlacement> p = BalancedPlacement(load, 2, 0, 2, 1);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->physical_to_logical, (std::vector<int>{1, 0}));
  StatusOr<ExpertPlacement> flat = BalancedPlacement(load, 2, 0, 2, 0);
  ASSERT_TRUE(flat.ok());
  EXPECT_EQ(flat->physical_to_logical, (std::vector<int>{0, 1}));
}

TEST(ExpertPlacement, StuckItemIsRepairedByOneMove) {
  // W 3, counts {1 x 7, 2}, total 9, P 3; weights 100, 1 x 6, 0.1 (0.2 over 2 replicas).
  // e0 -> rank 0 (100). e1..e6 alternate ranks 1 and 2 (lower rank on ties), filling both:
  // rank 1 {1, 3, 5}, rank 2 {2, 4, 6}. e7 replica 0 -> rank 0, the only rank with room;
  // replica 1: rank 0 already holds e7 and ranks 1, 2 are full — stuck. Repair: r = rank 0; every
  // (s, f) costs max(100.1 + 1, 3 - 1 + 0.1) = 101.1, so the lowest s = 1 and f = 1: e1 moves to
  // rank 0 and e7's replica takes its slot on rank 1.
  const std::vector<int> counts = {1, 1, 1, 1, 1, 1, 1, 2};
  const std::vector<double> logical = {100, 1, 1, 1, 1, 1, 1, 0.2};
  int repairs = -1;
  StatusOr<ExpertPlacement> p = PackReplicas(counts, logical, 3, 0, {}, &repairs);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(repairs, 1);
  EXPECT_EQ(p->physical_to_logical, (std::vector<int>{0, 1, 7, 3, 5, 7, 2, 4, 6}));
  const std::vector<double> loads = RankLoads(*p, logical);
  ASSERT_EQ(loads.size(), 3u);
  EXPECT_DOUBLE_EQ(loads[0], 101.1);
  EXPECT_DOUBLE_EQ(loads[1], 2.1);
  EXPECT_DOUBLE_EQ(loads[2], 3);
  // BalancedPlacement would give this load's one extra replica to e0 instead; and a case that
  // needs no move reports 0.
  int none = -1;
  StatusOr<ExpertPlacement> easy = PackReplicas({1, 1, 2}, {4, 3, 2}, 2, 0, {}, &none);
  ASSERT_TRUE(easy.ok());
  EXPECT_EQ(none, 0);
}

// Checks every placement invariant of `p` for E, R, W and the replica counts it should have.
void ExpectValid(const ExpertPlacement& p, int e, int r, int w, const std::vector<int>& counts) {
  ASSERT_EQ(p.num_logical, e);
  ASSERT_EQ(p.num_ranks, w);
  ASSERT_EQ(p.num_physical(), e + r);
  ASSERT_EQ(p.per_rank, (e + r) / w);
  ASSERT_EQ(p.replicas.size(), static_cast<size_t>(e));
  for (int x = 0; x < e; ++x) {
    EXPECT_EQ(p.replica_count(x), counts[x]);
    EXPECT_GE(p.replica_count(x), 1);
    EXPECT_LE(p.replica_count(x), w);
    for (int q : p.replicas[x]) EXPECT_EQ(p.physical_to_logical[q], x);
    EXPECT_TRUE(std::is_sorted(p.replicas[x].begin(), p.replicas[x].end()));
  }
  for (int rank = 0; rank < w; ++rank) {
    std::set<int> seen;
    int previous = -1;
    for (int s = 0; s < p.per_rank; ++s) {
      const int x = p.logical_at(rank, s);
      EXPECT_TRUE(seen.insert(x).second) << "rank " << rank << " holds " << x << " twice";
      EXPECT_GT(x, previous) << "rank " << rank << " slots not ascending";
      previous = x;
    }
  }
  // And MakePlacement accepts it as it is.
  StatusOr<ExpertPlacement> again = MakePlacement(e, w, p.physical_to_logical);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->replicas, p.replicas);
}

TEST(ExpertPlacement, InvariantsOverRandomLoads) {
  struct Case {
    int e, r, w, ranks_per_node;
  };
  const std::vector<Case> cases = {
      {8, 0, 4, 0},   {8, 0, 4, 2}, {8, 8, 4, 2},   {8, 24, 4, 2},  // R = E·(W - 1)
      {16, 16, 8, 4}, {6, 6, 3, 0}, {5, 3, 4, 0},   {12, 4, 8, 2}, {3, 6, 3, 1},   {1, 0, 1, 0},
      {1, 3, 4, 2},   {7, 1, 2, 1}, {10, 6, 16, 4}, {9, 63, 8, 2}, {32, 32, 16, 8}};
  std::mt19937 rng(20240601);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (const Case& c : cases) {
    for (int trial = 0; trial < 60; ++trial) {
      // Skewed loads: a power of a uniform variable, some exact zeros, sometimes all zero.
      const double skew = 1.0 + 6.0 * unit(rng);
      std::vector<double> load(static_cast<size_t>(c.w * c.e), 0.0);
      if (trial % 10 != 9) {
        for (double& v : load) {
          v = unit(rng) < 0.2 ? 0.0 : std::floor(1000 * std::pow(unit(rng), skew));
        }
      }
      std::vector<double> logical(static_cast<size_t>(c.e), 0.0);
      for (int rank = 0; rank < c.w; ++rank) {
        for (int x = 0; x < c.e; ++x) logical[x] += load[rank * c.e + x];
      }
      SCOPED_TRACE("E " + std::to_string(c.e) + " R " + std::to_string(c.r) + " W " +
                   std::to_string(c.w) + " ranks/node " + std::to_string(c.ranks_per_node) +
                   " trial " + std::to_string(trial));
      StatusOr<std::vector<int>> counts = ReplicaCounts(logical, c.r, c.w);
      ASSERT_TRUE(counts.ok()) << counts.status().ToString();
      StatusOr<ExpertPlacement> p = BalancedPlacement(load, c.e, c.r, c.w, c.ranks_per_node);
      ASSERT_TRUE(p.ok()) << p.status().ToString();
      ExpectValid(*p, c.e, c.r, c.w, *counts);
      // Deterministic.
      StatusOr<ExpertPlacement> q = BalancedPlacement(load, c.e, c.r, c.w, c.ranks_per_node);
      ASSERT_TRUE(q.ok());
      EXPECT_EQ(p->physical_to_logical, q->physical_to_logical);
      // The rank loads add up to the total load.
      const std::vector<double> loads = RankLoads(*p, logical);
      double total = 0, spread = 0;
      for (double v : logical) total += v;
      for (double v : loads) spread += v;
      EXPECT_NEAR(spread, total, 1e-9 * (1 + total));
      EXPECT_GE(MaxOverMean(loads), 1.0 - 1e-12);
      // One node of all W ranks is the same as no node preference.
      StatusOr<ExpertPlacement> one_node = BalancedPlacement(load, c.e, c.r, c.w, c.w);
      StatusOr<ExpertPlacement> flat = BalancedPlacement(load, c.e, c.r, c.w, 0);
      ASSERT_TRUE(one_node.ok() && flat.ok());
      EXPECT_EQ(one_node->physical_to_logical, flat->physical_to_logical);
    }
    StatusOr<ExpertPlacement> id = IdentityPlacement(c.e, c.r, c.w);
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    std::vector<int> round_robin(static_cast<size_t>(c.e));
    for (int x = 0; x < c.e; ++x) round_robin[x] = 1 + c.r / c.e + (x < c.r % c.e ? 1 : 0);
    ExpectValid(*id, c.e, c.r, c.w, round_robin);
  }
}

TEST(ExpertPlacement, PackingSucceedsForArbitraryReplicaCounts) {
  // Replica counts not derived from the load (so light experts may have many replicas) and
  // adversarial weights: the repair must keep every packing valid.
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  int total_repairs = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int w = 1 + static_cast<int>(rng() % 8);
    const int e = 1 + static_cast<int>(rng() % 12);
    const int rpn_choices[] = {0, 1, w};
    const int ranks_per_node = (w % 2 == 0 && rng() % 2 == 0) ? 2 : rpn_choices[rng() % 3];
    // Random R with (E + R) % W == 0 and R <= E·(W - 1).
    std::vector<int> valid_r;
    for (int r = 0; r <= e * (w - 1); ++r) {
      if ((e + r) % w == 0) valid_r.push_back(r);
    }
    if (valid_r.empty()) continue;
    const int r = valid_r[rng() % valid_r.size()];
    std::vector<int> counts(static_cast<size_t>(e), 1);
    for (int k = 0; k < r; ++k) {
      int x = static_cast<int>(rng() % e);
      while (counts[x] == w) x = (x + 1) % e;
      ++counts[x];
    }
    std::vector<double> logical(static_cast<size_t>(e));
    for (double& v : logical) {
      v = unit(rng) < 0.3 ? std::floor(100 * unit(rng)) : 1000 * std::pow(unit(rng), 8);
    }
    const int nodes = ranks_per_node > 0 ? w / ranks_per_node : 0;
    std::vector<double> traffic(static_cast<size_t>(e * nodes));
    for (double& v : traffic) v = std::floor(10 * unit(rng));
    int repairs = 0;
    StatusOr<ExpertPlacement> p =
        PackReplicas(counts, logical, w, ranks_per_node, traffic, &repairs);
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    total_repairs += repairs;
    ExpectValid(*p, e, r, w, counts);
  }
  // The random cases do reach the repair.
  EXPECT_GT(total_repairs, 0);
}

TEST(ExpertPlacement, Errors) {
  ExpectInvalid(IdentityPlacement(4, -1, 2).status(), {"parallel.num_redundant_experts", ">= 0"});
  const Status indivisible = IdentityPlacement(8, 3, 4).status();
  ExpectInvalid(indivisible, {"parallel.num_redundant_experts"});
  EXPECT_EQ(indivisible.message(),
            "parallel.num_redundant_experts: 8 experts + 3 redundant = 11 physical experts must be "
            "divisible by the expert-parallel size 4");
  // E 4, W 2: at most 4 redundant experts.
  ExpectInvalid(IdentityPlacement(4, 6, 2).status(),
                {"parallel.num_redundant_experts=6", "4 x 1 = 4", "one replica per rank"});
  ExpectInvalid(IdentityPlacement(0, 0, 2).status(), {"moe.num_experts"});
  ExpectInvalid(IdentityPlacement(4, 0, 0).status(), {"parallel.ep_size"});

  const std::vector<double> load(16, 1.0);  // W 4 x E 4
  ExpectInvalid(BalancedPlacement(load, 4, 0, 4, 3).status(), {"comm.ranks_per_node=3", "4"});
  ExpectInvalid(BalancedPlacement(load, 4, 0, 4, -2).status(), {"comm.ranks_per_node=-2"});
  ExpectInvalid(BalancedPlacement(load, 4, -1, 4, 0).status(), {"parallel.num_redundant_experts"});
  ExpectInvalid(BalancedPlacement(load, 4, 16, 4, 0).status(),
                {"parallel.num_redundant_experts=16", "<= "});
  ExpectInvalid(BalancedPlacement(load, 4, 2, 4, 0).status(),
                {"parallel.num_redundant_experts", "divisible"});
  ExpectInvalid(BalancedPlacement(std::vector<double>(15, 1.0), 4, 0, 4, 0).status(),
                {"load_by_rank_expert", "15", "4 x 4 = 16"});
  std::vector<double> negative = load;
  negative[6] = -1;
  ExpectInvalid(BalancedPlacement(negative, 4, 0, 4, 0).status(),
                {"load_by_rank_expert[6]", "rank 1, expert 2", ">= 0"});
  std::vector<double> nan = load;
  nan[3] = std::nan("");
  ExpectInvalid(BalancedPlacement(nan, 4, 0, 4, 0).status(), {"load_by_rank_expert[3]", "finite"});
  ExpectInvalid(ReplicaCounts({1, -2}, 0, 2).status(), {"logical_load[1]"});

  ExpectInvalid(PackReplicas({1, 3}, {1, 1}, 2, 0, {}).status(), {"logical expert 1", "[1, 2]"});
  ExpectInvalid(PackReplicas({1, 1}, {1}, 2, 0, {}).status(), {"logical_load"});
  ExpectInvalid(PackReplicas({1, 1}, {1, 1}, 2, 1, {}).status(), {"node_traffic", "2 x 2"});
  ExpectInvalid(PackReplicas({1, 1}, {1, 1}, 2, 0, {1, 2}).status(), {"node_traffic", "2 x 0"});

  ExpectInvalid(MakePlacement(4, 2, {0, 1, 2, 3, 0}).status(),
                {"parallel.num_redundant_experts", "divisible"});
  ExpectInvalid(MakePlacement(4, 2, {0, 1, 2}).status(), {"3 physical experts"});
  ExpectInvalid(MakePlacement(4, 2, {0, 1, 4, 3}).status(), {"logical expert 4", "[0, 4)"});
  ExpectInvalid(MakePlacement(4, 2, {0, 1, 1, 3}).status(), {"logical expert 2", "no replica"});
  ExpectInvalid(MakePlacement(4, 2, {0, 1, 2, 3, 2, 2}).status(),
                {"rank 1 holds logical expert 2 twice", "physical experts 4 and 5"});
  ExpectInvalid(MakePlacement(2, 2, {0, 1, 0, 1, 0, 1}).status(),
                {"parallel.num_redundant_experts=4", "<= "});
  EXPECT_TRUE(MakePlacement(2, 2, {0, 1, 0, 1}).ok());
}

}  // namespace
}  // namespace moe
