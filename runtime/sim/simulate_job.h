// What moe_simulate does once its flags are parsed and its config loaded: simulate the run on
// thread ranks, write the measurements, and predict the step time on a target cluster and/or this
// host (runtime/sim/simulate.h, runtime/sim/cost_model.h); or, with `validate`, compare this host's
// predictions with loopback runs at 1, 2 and 4 ranks. The flags are documented in
// launch/moe_simulate.cc.
#pragma once

#include <string>

#include "comm/world.h"
#include "proto/moe_config.pb.h"
#include "base/status.h"

namespace moe {

struct SimulateJobOptions {
  std::string out;                 // output directory (created)
  int ranks = 1;                   // simulated ranks
  std::string topology;            // a TopologyConfig text file: predict that cluster
  int gpus_per_node = 0;           // ranks per node on the target (0: min(gpus_per_node, ranks))
  double efficiency = 0.6;         // expert GEMM efficiency on the target, (0, 1]
  std::string bench_alltoall;      // moe_comm_bench -J sweeps of this host: predict it
  std::string bench_allreduce;
  int cores = 1;                   // cores of this host the ranks share
  int warmup = 5;                  // steps left out of host predictions and calibration
  int calibration_steps = 25;      // measured steps of each calibration run (after the warm-up)
  bool validate = false;           // loopback at 1, 2, 4 ranks against this host's model
  std::string comm_bench;          // the moe_comm_bench binary --validate runs
  bool verbose = false;            // the trainer's progress lines
  int64_t max_memory = 0;          // bytes the simulated ranks may take together (0: available)
  // Capacity-mode padding: "materialize" (moved and computed, as on the cluster), "account"
  // (recorded as padded, moved and computed without it: ExchangeOptions::account_padding), or
  // "auto" (account above 64 ranks, where E = W experts' padding dominates; CPU layers only).
  std::string padding = "auto";
};

// Whether a simulation of `ranks` ranks of `cfg` accounts for the padding instead of moving it.
StatusOr<bool> AccountPadding(const config::MoeConfig& cfg, const SimulateJobOptions& options,
                              int ranks);

// Prints its tables to stdout and writes its files into options.out. kInvalidArgument for bad
// options (a topology the ranks do not fit, an efficiency outside (0, 1], one sweep without the
// other) or a config the trainer rejects.
Status RunSimulateJob(const config::MoeConfig& cfg, const SimulateJobOptions& options,
                      const comm::WorldFactory& make_world);

}  // namespace moe
