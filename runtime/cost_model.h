// An alpha-beta (latency-bandwidth) cost model of expert-parallel MoE steps on a target cluster.
//
// Placement: ranks are node-major, rank r lives on node r / gpus_per_node, local index
// r % gpus_per_node. A message of b bytes over a link class costs alpha + b / beta, with
// (alpha, beta) = (intra_latency_us, intra_bandwidth_gbps) between GPUs of one node and
// (inter_latency_us, inter_bandwidth_gbps) between nodes (both per GPU, unidirectional).
// Empty messages are not sent and cost nothing; the block a rank keeps for itself is a local copy
// and costs nothing unless CostModelOptions::count_self (used to describe the loopback backend,
// where the self block is a memcpy like any other).
//
// Flat all-to-all, per rank r:
//   send_intra(r) = sum over peers p on r's node (p != r, bytes[r][p] > 0) of a_i + bytes[r][p]/b_i
//   send_inter(r) = the same over peers on other nodes with a_e, b_e
//   send(r) = max(send_intra, send_inter)   (overlap: NVLink and the NIC are separate engines;
//             CostModelOptions::overlap_link_classes = false makes it send_intra + send_inter)
//   recv(r) = the same over column r (incast); t(r) = max(send(r), recv(r)); T = max over r.
// Hierarchical all-to-all (comm/algorithms/hierarchical_alltoall.h, Tutel-style 2D), P = gpus
// per node, rank (n, i):
//   stage 1 (intra): (n, i) -> (n, j), j != i, carries sum over nodes m of bytes[(n,i)][(m,j)]
//   stage 2 (inter): (n, j) -> (m, j), m != n, carries sum over i of bytes[(n,i)][(m,j)]
//   each stage is costed like a flat all-to-all of one link class; T = T1 + T2 (serial). The
//   stage-2 message already lands on its destination rank, so no third redistribution stage.
// Expert GEMMs: t(r) = flops(r) / (gpu_tflops * 1e12 * gemm_efficiency); T = max over r.
// Gradient all-reduce (ring over all ranks): 2 (n-1) (a + bytes / (n b)) with the slowest link
//   class in the ring (inter when nodes > 1).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "proto/moe_config.pb.h"
#include "runtime/base/status.h"

namespace moe {

// bytes[src][dst], ranks x ranks.
using TrafficMatrix = std::vector<std::vector<double>>;

struct CostModelOptions {
  // Fraction of gpu_tflops that the expert GEMMs reach (0.6: typical for mid-size grouped GEMMs).
  double gemm_efficiency = 0.6;
  // true: a rank's intra-node and inter-node messages proceed concurrently (max); false: serial (sum).
  bool overlap_link_classes = true;
  // true: the self block costs alpha + bytes / beta_intra (loopback backend description).
  bool count_self = false;
};

// kInvalidArgument naming the field: nodes, gpus_per_node >= 1, bandwidths > 0, latencies >= 0,
// gpu_tflops > 0; ranks > 0 must equal nodes * gpus_per_node (ranks <= 0: not checked).
Status ValidateTopology(const config::TopologyConfig& topology, int ranks);

// One step's inputs, per rank of the simulated job (all vectors have `ranks` entries).
struct StepTraffic {
  std::vector<TrafficMatrix> dispatch;  // one matrix per dispatch all-to-all (fwd and bwd, per layer)
  std::vector<TrafficMatrix> combine;   // one per combine all-to-all
  std::vector<double> expert_flops;     // per rank, forward + backward
  std::vector<double> other_flops;      // per rank: non-expert compute (router, norms, head), fwd+bwd
  double allreduce_bytes = 0.0;         // replicated gradients all-reduced each step
};

struct StepPrediction {
  double dispatch_seconds = 0.0;  // sum over the dispatch all-to-alls
  double combine_seconds = 0.0;
  double experts_seconds = 0.0;
  double other_seconds = 0.0;     // other compute + gradient all-reduce
  double total() const { return dispatch_seconds + combine_seconds + experts_seconds + other_seconds; }
};

class CostModel {
 public:
  static StatusOr<CostModel> Create(const config::TopologyConfig& topology, int ranks,
                                    const CostModelOptions& options = {});

  int ranks() const { return ranks_; }
  int node_of(int rank) const { return rank / gpus_per_node_; }
  const config::TopologyConfig& topology() const { return topology_; }

  // kInvalidArgument for a matrix that is not ranks x ranks or has negative entries.
  StatusOr<double> FlatAllToAllSeconds(const TrafficMatrix& bytes) const;
  StatusOr<double> HierarchicalAllToAllSeconds(const TrafficMatrix& bytes) const;
  StatusOr<double> ComputeSeconds(const std::vector<double>& flops_per_rank) const;
  StatusOr<double> AllReduceSeconds(double bytes) const;
  // hierarchical = true costs every all-to-all with the two-stage algorithm.
  StatusOr<StepPrediction> PredictStep(const StepTraffic& step, bool hierarchical) const;

 private:
  CostModel() = default;
  Status CheckMatrix(const TrafficMatrix& bytes) const;
  // max over ranks of max(send, recv) for messages m[src][dst], each costed by its pair's link
  // class; diagonal: whether the self block counts.
  double Exchange(const TrafficMatrix& m, bool diagonal) const;

  config::TopologyConfig topology_;
  CostModelOptions options_;
  int ranks_ = 0, nodes_ = 0, gpus_per_node_ = 0;
  double a_intra_ = 0, b_intra_ = 0, a_inter_ = 0, b_inter_ = 0;  // seconds, bytes/second
};

// Least-squares fit of seconds = alpha + bytes / beta over (bytes, seconds) points.
struct AlphaBetaFit {
  double alpha_seconds = 0.0;
  double beta_bytes_per_second = 0.0;
  double rms_residual_seconds = 0.0;
};
// kInvalidArgument with fewer than 2 distinct sizes or a non-positive fitted slope.
StatusOr<AlphaBetaFit> FitAlphaBeta(const std::vector<std::pair<double, double>>& points);

}  // namespace moe
