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
// Node-deduplicated dispatch (HierarchicalAllToAll::DedupAllToAllV, parallel.node_dedup), given
// unique[s][d]: the bytes rank s sent to its relay d = (other node, s's local index) — its unique
// rows and their index lists, as the exchange recorded them:
//   stage A (inter): s -> relay, unique[s][relay]
//   stage B (intra, at the destination node m): (m, i) -> (m, j), j != i, carries sum over nodes n
//     of bytes[(n,i)][(m,j)] (what the relay expanded for (m, j), plus its own rows for it)
//   T = T_A + T_B (serial: the relay expands what arrived).
// Expert GEMMs: t(r) = flops(r) / (gpu_tflops * 1e12 * gemm_efficiency); T = max over r.
// Gradient all-reduce (ring over all ranks): 2 (n-1) (a + bytes / (n b)) with the slowest link
//   class in the ring (inter when nodes > 1).
// Pipelined MoE layers (parallel.pipeline_degree = d, runtime/exchange/expert_parallel_executor.h): one layer's forward
// (or backward) issues its row exchanges in the order D0 D1 C0 D2 C1 ... D(d-1) C(d-2) C(d-1)
// (D = dispatch, C = combine) and runs chunk j's experts between the end of Dj and the issue of
// Cj. With a_j, b_j the all-to-all times of dispatch and combine chunk j (flat or hierarchical, as
// above) and c_j the expert time of chunk j (max over ranks of the chunk's FLOPs / rate, as above),
// a group (one layer, one direction) runs on two engines:
//   communication: the calls in issue order, one at a time; Dj starts when the previous call has
//                  ended, Cj when the previous call and compute j have ended;
//   compute:       compute j starts when Dj and compute j-1 have ended;
//   T_group = the end of C(d-1)   (d = 1: a0 + c0 + b0, the serial sum).
// overlap = sum over groups of max(0, sum_j (a_j + c_j + b_j) - T_group), at most the experts term
//   (so the step never drops below its exchanges + other); step = dispatch + combine + experts +
//   other - overlap, where dispatch, combine and experts stay the serial sums above. (The experts
//   term is the max over ranks of the whole step's FLOPs, the pipeline's c_j a max per chunk: they
//   agree when every chunk's load is spread over the ranks alike, as in the capacity exchange.)
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "proto/moe_config.pb.h"
#include "base/status.h"

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
// Reads a standalone topology text file (configs/topologies/) and validates it (ranks unchecked);
// errors name the file, and the line and column of a syntax error.
StatusOr<config::TopologyConfig> LoadTopology(const std::string& path);

// One step's inputs, per rank of the simulated job (all vectors have `ranks` entries).
struct StepTraffic {
  std::vector<TrafficMatrix> dispatch;  // one matrix per dispatch all-to-all (fwd and bwd, per layer)
  // Per dispatch: the node-deduplicated exchange's unique[s][relay] (cost model header), or an
  // empty matrix where that dispatch was not deduplicated. Empty: none was.
  std::vector<TrafficMatrix> dispatch_unique;
  std::vector<TrafficMatrix> combine;   // one per combine all-to-all
  std::vector<double> expert_flops;     // per rank, forward + backward
  std::vector<double> other_flops;      // per rank: non-expert compute (router, norms, head), fwd+bwd
  double allreduce_bytes = 0.0;         // replicated gradients all-reduced each step

  // The row exchanges and expert compute of one MoE layer in one direction (forward or backward),
  // in d = dispatch.size() pipeline chunks (d = 1: one dispatch, the experts, one combine).
  struct PipelineGroup {
    std::vector<size_t> dispatch;  // chunk j's dispatch: an index into StepTraffic::dispatch
    std::vector<size_t> combine;   // chunk j's combine: an index into StepTraffic::combine
    std::vector<std::vector<double>> expert_flops;  // [chunk][rank]
  };
  // The groups whose exchanges may overlap their experts; empty: nothing overlaps (the serial sum).
  // Their FLOPs are also counted in expert_flops.
  std::vector<PipelineGroup> pipelines;
};

struct StepPrediction {
  double dispatch_seconds = 0.0;  // sum over the dispatch all-to-alls
  double combine_seconds = 0.0;
  double experts_seconds = 0.0;
  double other_seconds = 0.0;     // other compute + gradient all-reduce
  // What the pipelined groups hide: serial sum of their exchanges and experts minus their pipelined
  // time (0 with pipeline degree 1), at most experts_seconds.
  double overlap_seconds = 0.0;
  double total() const {
    return dispatch_seconds + combine_seconds + experts_seconds + other_seconds - overlap_seconds;
  }
};

// The two-engine pipeline of one group (header comment): the end of C(d-1) for dispatch times a,
// expert times c and combine times b of chunks 0..d-1, seconds. kInvalidArgument for empty or
// unequal lengths or a negative or non-finite time.
StatusOr<double> PipelinedGroupSeconds(const std::vector<double>& a, const std::vector<double>& c,
                                       const std::vector<double>& b);

class CostModel {
 public:
  static StatusOr<CostModel> Create(const config::TopologyConfig& topology, int ranks,
                                    const CostModelOptions& options = {});

  int ranks() const { return ranks_; }
  int node_of(int rank) const { return rank / gpus_per_node_; }
  int gpus_per_node() const { return gpus_per_node_; }
  const config::TopologyConfig& topology() const { return topology_; }

  // kInvalidArgument for a matrix that is not ranks x ranks or has negative entries.
  StatusOr<double> FlatAllToAllSeconds(const TrafficMatrix& bytes) const;
  StatusOr<double> HierarchicalAllToAllSeconds(const TrafficMatrix& bytes) const;
  // `bytes` as the flat exchange means them, `unique` what crossed to each relay (header).
  StatusOr<double> DedupAllToAllSeconds(const TrafficMatrix& bytes,
                                        const TrafficMatrix& unique) const;
  StatusOr<double> ComputeSeconds(const std::vector<double>& flops_per_rank) const;
  StatusOr<double> AllReduceSeconds(double bytes) const;
  // hierarchical = true costs every all-to-all with the two-stage algorithm, and a dispatch with
  // a unique matrix (StepTraffic::dispatch_unique) as the node-deduplicated one. kInvalidArgument
  // for a pipeline group with no chunks, unequal chunk counts or an index out of range.
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

// ---- The step on one shared-memory host (validation on the machine at hand) -------------------
//
// Predicts the step time of a run whose ranks are processes or threads of one machine with `cores`
// cores, from the traffic and load the run measured, per-call collective costs fitted from
// moe_comm_bench sweeps of the same backend and rank count, and per-rank compute calibrated on one
// rank. A training step is bulk synchronous: every collective (all-to-all or all-reduce) starts
// only when the last rank arrives, so a step is a chain of [compute phase -> collective]:
//   compute(r)   = the compute rank r does in the step outside collectives when it has a core to
//                  itself (HostStepInputs::compute_seconds, from the calibration);
//   compute      = max( max_r compute(r),                        the slowest rank is waited for,
//                       sum_r compute(r) / min(cores, ranks) )   ranks sharing a core serialise
//                  (work-conserving scheduler; the slowest rank is the same in every phase, so the
//                  sum over phases of the per-phase maximum is the maximum of the per-rank sums);
//   alltoall     = sum over the step's all-to-all calls (counts exchange included) of
//                  alpha_a2a + bytes / beta_a2a, bytes = max over ranks of max(sent, received),
//                  the self block included (moe_comm_bench's "size": a rank's whole send buffer);
//   allreduce    = sum over the step's all-reduces of alpha_ar + bytes / beta_ar;
//   step         = compute + alltoall + allreduce.
// alpha is the per-call overhead (rendezvous, progress, and on an oversubscribed machine the
// context switches a collective needs before every rank has run); it is fitted at the rank count
// being predicted, so it includes what oversubscription does to a collective.
// HostStepPrediction splits the compute into the mean rank's compute, the wait for the slowest
// rank (max - mean) and the serialisation excess (max(0, sum / cores - max)).
// Nothing overlaps here, pipelined layers (parallel.pipeline_degree > 1) included: the loopback
// backend moves an asynchronous all-to-all's data inside its Wait, on the waiting rank's thread,
// so every chunk's exchange is a serial call like any other (each chunk costs its own alpha).

// Cost of one collective call of `bytes`: alpha + bytes / beta.
struct CallCost {
  double alpha_seconds = 0.0;
  double beta_bytes_per_second = 0.0;
  double Seconds(double bytes) const { return alpha_seconds + bytes / beta_bytes_per_second; }
};

struct HostModel {
  int cores = 1;
  CallCost alltoall;   // per all-to-all(v) call
  CallCost allreduce;  // per all-reduce call
};

struct HostStepInputs {
  std::vector<TrafficMatrix> alltoalls;  // every all-to-all of the step (ranks x ranks, self included)
  std::vector<double> allreduce_bytes;   // every all-reduce of the step
  std::vector<double> compute_seconds;   // per rank
};

struct HostStepPrediction {
  double compute_mean_seconds = 0.0;   // mean over ranks of compute(r)
  double wait_seconds = 0.0;           // max_r compute(r) - mean
  double oversubscription_seconds = 0.0;  // max(0, sum_r compute(r) / min(cores, ranks) - max_r compute(r))
  double alltoall_seconds = 0.0;
  double allreduce_seconds = 0.0;
  int alltoall_calls = 0, allreduce_calls = 0;
  double compute_seconds() const { return compute_mean_seconds + wait_seconds + oversubscription_seconds; }
  double total() const { return compute_seconds() + alltoall_seconds + allreduce_seconds; }
};

// max over ranks of max(bytes sent, bytes received), diagonal included; kInvalidArgument for a
// matrix that is not square or has negative entries.
StatusOr<double> MaxRankBytes(const TrafficMatrix& bytes);
// kInvalidArgument for cores < 1, non-positive betas, negative alphas or compute seconds, matrices
// whose size differs from compute_seconds.size(), or negative all-reduce bytes.
StatusOr<HostStepPrediction> PredictHostStep(const HostModel& model, const HostStepInputs& step);

// Least-squares fit of seconds = alpha + bytes / beta over (bytes, seconds) points.
struct AlphaBetaFit {
  double alpha_seconds = 0.0;
  double beta_bytes_per_second = 0.0;
  double rms_residual_seconds = 0.0;
};
// kAbsolute minimises the sum of squared residuals (the largest sizes dominate); kRelative the sum
// of squared relative residuals ((fit - y) / y)^2, i.e. weights 1 / y^2, so that a sweep over
// several decades fits the small messages (where alpha lives) as well as the large ones.
enum class FitWeighting { kAbsolute, kRelative };
// kInvalidArgument with fewer than 2 distinct sizes, a non-positive time (kRelative) or a
// non-positive fitted slope.
StatusOr<AlphaBetaFit> FitAlphaBeta(const std::vector<std::pair<double, double>>& points,
                                    FitWeighting weighting = FitWeighting::kAbsolute);

}  // namespace moe
