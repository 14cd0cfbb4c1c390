// The logic behind moe_simulate: run an N-rank expert-parallel training job as N loopback threads
// with the same Trainer, model and config as moe_train, record what it measured, and feed it to
// the cost models of runtime/sim/cost_model.h (a target cluster, or this host for validation).
//
// Measurement: TrainOptions::on_step runs on every rank after each step and copies the rank's
// StepMetrics and the ExchangeStats::calls of every MoE layer (Trainer::LayerExchangeStats()):
// per exchange its kind (counts / dispatch / combine), direction, bytes to and from each peer and
// seconds. Every rank issues the same exchanges in the same order (they are collectives), so call
// c of every rank's list forms the traffic matrix of one exchange. Evaluation is switched off
// (train.eval_every = 0) so that every step has the same exchanges; it does not change the
// training loss.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/world.h"
#include "proto/moe_config.pb.h"
#include "proto/report.pb.h"
#include "base/status.h"
#include "runtime/config/config.h"
#include "runtime/sim/cost_model.h"
#include "runtime/exchange/expert_parallel_executor.h"

namespace moe {

// What one rank measured in one step.
struct RankStepRecord {
  report::StepMetrics metrics;     // the rank's own timings (loss and load are the same on every rank)
  // Every exchange of the step: layer by layer, each in issue order; bytes_from_rank left empty
  // (it is the traffic matrix's column: the other ranks' bytes_to_rank).
  std::vector<ExchangeCall> calls;
  // Per call: the bytes sent to every rank when they are all equal (a capacity exchange; the
  // call's bytes_to_rank is then left empty), or -1.
  std::vector<int64_t> uniform_bytes;
  // Bytes call c sent to rank dst.
  int64_t bytes_to(size_t c, size_t dst) const {
    return c < uniform_bytes.size() && uniform_bytes[c] >= 0 ? uniform_bytes[c]
                                                          : calls[c].bytes_to_rank[dst];
  }
};

struct SimulationResult {
  int ranks = 0;
  std::vector<std::vector<RankStepRecord>> steps;  // [step][rank]
  std::vector<int64_t> allreduce_bytes;             // the all-reduces of one step (Trainer::StepAllReduceBytes)
  int64_t tokens_per_rank = 0;
  double model_dim = 0;  // floats per row
  int num_steps() const { return static_cast<int>(steps.size()); }
  size_t calls(int step) const { return steps[static_cast<size_t>(step)][0].calls.size(); }
  const ExchangeCall& call(int step, size_t c) const { return steps[static_cast<size_t>(step)][0].calls[c]; }
  // bytes[src][dst] of exchange c of step s.
  TrafficMatrix Matrix(int step, size_t c) const;
  // Rows of expert input each rank received in the step's dispatches (forward and backward; in the
  // capacity exchange the padding rows too: the experts compute them).
  std::vector<double> ExpertRows(int step) const;
  const report::StepMetrics& metrics(int step, int rank) const {
    return steps[static_cast<size_t>(step)][static_cast<size_t>(rank)].metrics;
  }
};

// Runs `cfg` (train.eval_every, metrics_path and checkpoints are switched off here) on the `ranks`
// thread ranks of a world from `make_world` (moe_simulate's: loopback, with a device-memory twin
// for compute.device=CUDA). kInvalidArgument for a config the trainer rejects; a rank's failure
// comes back with its rank named. account_padding: TrainOptions::account_padding (capacity
// exchanges recorded as padded, run without the padding).
StatusOr<SimulationResult> RunSimulation(const MoeConfig& cfg, int ranks, bool quiet,
                                         const comm::WorldFactory& make_world,
                                         bool account_padding = false);

// ---- A target cluster ---------------------------------------------------------------------------

// Cost-model inputs of step s: dispatch / combine matrices, expert FLOPs from the rows each rank
// received (forward x1, backward x2), other FLOPs (router, head; an estimate), replicated-gradient
// all-reduce bytes (fp32 on a cluster), and one pipeline group per MoE layer and direction (its
// chunks' dispatches, combines and expert FLOPs, from ExchangeCall::chunk; one chunk when
// parallel.pipeline_degree = 1).
StepTraffic ClusterStepTraffic(const SimulationResult& run, const MoeConfig& cfg, int step);
// The dispatch and combine rows of a step, mean over steps and ranks, in bytes per rank and step:
// what each rank sends to ranks of its own node (gpus_per_node consecutive ranks; itself
// excluded) and to other nodes. Group-limited routing with groups = nodes bounds the second.
struct NodeTraffic {
  double intra_bytes = 0.0, inter_bytes = 0.0;
};
NodeTraffic MeanNodeTraffic(const SimulationResult& run, int gpus_per_node);

// Mean over steps of CostModel::PredictStep (pipelined layers overlap on the cluster).
StatusOr<StepPrediction> PredictCluster(const SimulationResult& run, const MoeConfig& cfg, const CostModel& model,
                                        bool hierarchical);

// ---- This host ----------------------------------------------------------------------------------

// Compute of one rank in one step, outside collectives, with a core to itself:
//   seconds = fixed + per_token * tokens on the rank + per_row * expert rows the rank processed.
// per_row comes from the executors' measured expert time per row; fixed and per_token from a
// least-squares line through 1-rank runs at several batch sizes (compute = step - all-to-all).
struct ComputeCalibration {
  double fixed_seconds = 0.0;
  double per_token_seconds = 0.0;
  double per_row_seconds = 0.0;
  std::vector<int64_t> tokens;   // the calibration runs' batch sizes
  std::vector<double> seconds;   // their median compute seconds per step
};
// 1-rank runs (worlds from make_world) of `cfg` with train.global_batch_tokens = each of `batch_tokens`, `steps`
// steps each (the quietest of 3 runs per size); the first `warmup` steps are not used.
StatusOr<ComputeCalibration> CalibrateCompute(const MoeConfig& cfg, const std::vector<int64_t>& batch_tokens,
                                              int steps, int warmup, const comm::WorldFactory& make_world);

// A call-cost fit from moe_comm_bench JSON lines (report.proto BenchResult; "bytes" and "time_us").
StatusOr<CallCost> FitBenchFile(const std::string& path);

struct HostValidation {
  int ranks = 0;
  HostStepPrediction predicted;       // per step
  double measured_step_seconds = 0;   // median over the run's steps after warm-up (slowest rank)
};
// Predicts the median step of `run` on this host (steps >= warmup) from its measured traffic and
// load, the calibration and the call costs; measured = the run's own median step.
StatusOr<HostValidation> PredictHost(const SimulationResult& run, const HostModel& host,
                                     const ComputeCalibration& calibration, int warmup);

// ---- Outputs --------------------------------------------------------------------------------------

std::string MeasuredJson(const SimulationResult& run, const MoeConfig& cfg);
std::string ExpertLoadSvg(const SimulationResult& run);
std::string RankTimeSvg(const SimulationResult& run);
std::string PredictedJson(const config::TopologyConfig& target, int ranks, double gemm_efficiency,
                          int pipeline_degree, const StepPrediction& flat,
                          const StepPrediction& hierarchical);
std::string HostPredictionJson(const HostValidation& v, const HostModel& host, const ComputeCalibration& c);

double Median(std::vector<double> v);

}  // namespace moe
