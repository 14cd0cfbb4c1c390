// The training job behind moe_train: a byte-level MoE language model trained with expert
// parallelism over a world communicator (MPI processes or loopback threads).
//
// World layout: world = R expert-data-parallel replicas x W expert-parallel ranks; rank =
// replica * W + ep_rank. The EP communicator groups the W ranks of one replica (dispatch /
// combine); the replica communicator groups the ranks that hold the same experts. Every rank is
// a data-parallel rank with its own tokens (global_batch_tokens / world, in G local groups, each
// reading its own shard of the text).
// Gradients: replicated tensors are summed over the world (the loss is already divided by the
// global token count), expert tensors over the replicas of the same experts.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "proto/moe_config.pb.h"
#include "proto/report.pb.h"
#include "runtime/config/memory_model.h"
#include "base/status.h"
#include "runtime/train/byte_lm.h"
#include "runtime/exchange/expert_parallel_executor.h"
#include "runtime/exchange/expert_placement.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/train/optimizer.h"
#include "runtime/train/text_data.h"

namespace moe {

class Trainer;

struct TrainOptions {
  bool resume = false;     // continue from the newest complete checkpoint in train.checkpoint_dir
  bool quiet = false;      // no progress lines
  int log_every = 1;       // a progress line every N steps (and the last)
  std::string run_label;   // shown in the start report
  // Called on every rank after each completed step (the metrics are identical on all ranks); a
  // non-OK status ends Run() with it. moe_simulate records its measurements here.
  std::function<Status(const Trainer&, const report::StepMetrics&)> on_step;
  // Fault injection for tests: called on every rank after the backward pass of each step, before
  // the gradients are reduced (a test poisons a gradient or stops a rank here).
  std::function<Status(Trainer&)> after_backward;
  // compute.device=CUDA with expert parallelism over a backend in host memory: makes this rank's
  // device-memory communicator over the ranks of its expert-parallel group (NCCL over the group, or
  // a split of a device-memory loopback world; comm/world.h hands one to every rank). Unset: such a
  // run is refused.
  comm::DeviceCommunicatorFactory device_communicators;
  // Memory (runtime/config/memory_model.h): the ranks that share this machine's memory split
  // max_memory (0: the machine's available memory); a rank whose estimate is above its share is
  // refused before anything is allocated.
  int64_t max_memory = 0;
  int ranks_sharing_memory = 1;
  // ExchangeOptions::account_padding for the layers' exchanges (moe_simulate's many-rank
  // worlds): capacity exchanges recorded as padded, moved and computed without the padding.
  bool account_padding = false;
};

class Trainer {
 public:
  // Collective over `world`.
  static StatusOr<std::unique_ptr<Trainer>> Create(const config::MoeConfig& cfg, comm::Communicator* world,
                                                   const TrainOptions& options);

  // Runs until train.steps; returns the per-step metrics (identical on every rank).
  Status Run();
  const std::vector<report::StepMetrics>& history() const { return history_; }
  ByteLm& model() { return *model_; }
  int64_t step() const { return step_; }
  int world_rank() const { return world_->rank(); }
  // Saves a checkpoint of the current step (collective).
  Status SaveCheckpoint();
  // Global gradient norm of the last step (after the reductions).
  double last_grad_norm() const { return last_grad_norm_; }
  // Steps skipped because of a non-finite loss or gradient (train.nan_policy=SKIP_STEP).
  int64_t skipped_steps() const { return skipped_steps_; }
  // The exchange statistics of every MoE layer (MoeLayer::exchange_stats), describing the last
  // step.
  std::vector<ExchangeStats*> LayerExchangeStats() const;
  // Bytes of each all-reduce the last step issued, in order (replicated gradients, expert gradients
  // over replicas, gradient norm, step statistics, router biases), as recorded when issued.
  const std::vector<int64_t>& StepAllReduceBytes() const { return step_allreduce_bytes_; }

 private:
  Trainer(const config::MoeConfig& cfg, comm::Communicator* world, const TrainOptions& options);
  Status Init();
  // compute.device=CUDA: the device-memory communicator of this rank's EP group the layers on the
  // GPU exchange over; null when the group is this rank alone.
  StatusOr<comm::Communicator*> DeviceEpCommunicator(int replica);
  // One training step, as the list of its named steps: the batch forward and backward, the
  // gradient reductions and norm, the step's statistics summed over the world, the update
  // (optimizer, router bias, the non-finite policy), the load, exchange and throughput records,
  // the rebalance of redundant experts and the evaluation when due.
  Status Step(report::StepMetrics* metrics);
  // The step's statistics summed over the world (one all-reduce of float64).
  struct WorldStats {
    double ce_sum = 0.0, aux = 0.0, z = 0.0, dropped_slots = 0.0, total_slots = 0.0;
    double inter_node_bytes = 0.0, forward_dispatch_inter_node_bytes = 0.0;  // this step's
    std::vector<double> tokens_per_expert;         // E: kept slots per expert
    std::vector<std::vector<double>> layer_loads;  // redundant experts: per layer, W x E selected
    std::vector<double> Flatten() const;
    void Unflatten(const std::vector<double>& flat);
  };
  Status ForwardBackward(LmStepStats* stats);
  StatusOr<WorldStats> SumStepStats(const LmStepStats& local);
  Status Update(const WorldStats& world, double grad_norm, report::StepMetrics* metrics);
  void RecordLoads(const WorldStats& world, report::StepMetrics* metrics);
  void RecordExchangeTimes(report::StepMetrics* metrics);
  // Every rebalance_every steps (and not after a skipped step).
  Status Rebalance(report::StepMetrics* metrics);
  Status MaybeEvaluate(report::StepMetrics* metrics);
  void RecordThroughput(double seconds, report::StepMetrics* metrics);
  // Router replay: this step's recorded selections (num_layers x tokens per rank x k), and the
  // recording of this step's (train.router_replay_dir / router_record_dir).
  Status ReadRouterReplay(std::vector<int32_t>* out) const;
  Status RecordRouterSelections();
  Status ReduceGradients();
  // Redundant experts: every replica gets the sum of its logical expert's replicas' gradients.
  Status ReduceReplicaGradients();
  // Whether this rank's copy of an expert tensor is the one that counts (the first replica).
  bool IsPrimary(const ParamRef& p) const;
  // Recomputes layer l's placement from its loads since the last rebalance and moves the experts'
  // weights and AdamW moments to their new ranks (collective over the EP group).
  Status Rebalance(size_t layer);
  Status MoveExperts(size_t layer, const ExpertPlacement& next);
  StatusOr<double> GlobalGradNorm();
  Status Evaluate(double* loss);
  Status LoadCheckpoint(const std::string& dir);
  // All-reduces "did this rank fail": returns `local` where it failed, IoError(remote_failure)
  // where only another rank did, Ok where none did.
  Status AgreeOk(const Status& local, const std::string& remote_failure);
  // An in-place all-reduce of the training step over `comm`, recorded in step_allreduce_bytes_.
  Status StepAllReduce(comm::Communicator* comm, void* data, int64_t count, comm::DataType dtype,
                       comm::ReduceOp op);
  std::vector<bool> Trainable(const std::vector<ParamRef>& params) const;
  void PrintStart();
  void PrintProgress(const report::StepMetrics& m, double elapsed);

  config::MoeConfig cfg_;
  comm::Communicator* world_;
  TrainOptions options_;
  MemoryEstimate memory_;  // this rank's, from the config (Init)
  double peak_tflops_ = 0.0;  // per rank, for the utilization (0: unknown)
  std::string peak_source_;
  std::unique_ptr<comm::Communicator> ep_, replicas_;
  std::unique_ptr<comm::Communicator> device_ep_;  // compute.device=CUDA, W > 1
  int ep_size_ = 1, ep_rank_ = 0, replicas_count_ = 1;
  int groups_ = 1;
  int64_t tokens_per_rank_ = 0;
  std::unique_ptr<ByteLm> model_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<TextData> data_;
  std::vector<report::StepMetrics> history_;
  int64_t step_ = 0;
  int64_t skipped_steps_ = 0;
  double last_grad_norm_ = 0.0;
  std::vector<int64_t> step_allreduce_bytes_;
  int64_t kept_rows_ = 0;  // the last step's kept expert rows over the world
  // parallel.num_redundant_experts > 0: per MoE layer its placement and the loads (EP ranks x E
  // selected slots, summed over the world) since the last rebalance.
  std::vector<ExpertPlacement> placements_;
  std::vector<std::vector<double>> rebalance_load_;
  int ep_ranks_per_node_ = 0;
};

}  // namespace moe
