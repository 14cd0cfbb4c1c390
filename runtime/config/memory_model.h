// What a run will hold in memory, from its config, before anything is allocated: parameters,
// gradients, optimizer state, the activations a layer call saves at its configured capacity (the
// dropless worst case when there is none), the exchange buffers, and the per-tensor bookkeeping of
// many small tensors. The tools check it against a limit (--max-memory, default the machine's
// available memory) and refuse a config that does not fit with the estimate, its largest terms and
// the field that drives each (exit 2), instead of running out of memory.
//
// The formulas are upper estimates of the host (CPU layer) path; docs/ARCHITECTURE.md "Memory
// model" lists them term by term.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "proto/moe_config.pb.h"
#include "base/status.h"

namespace moe {

struct MemoryTerm {
  std::string what;   // "routed experts' parameters"
  int64_t bytes = 0;
  std::string field;  // the config field or flag that drives it ("moe.num_experts")
};

struct MemoryEstimate {
  std::vector<MemoryTerm> terms;
  int64_t total() const;
  // "2.3 GiB: routed experts' parameters 1.5 GiB (moe.num_experts), ..." with the `largest` terms.
  std::string Summary(int largest = 3) const;
  void Add(std::string what, int64_t bytes, std::string field);
  // Every term of `other`, each `times` times (e.g. W ranks in one process).
  void AddAll(const MemoryEstimate& other, int64_t times = 1);
};

// Bytes a tensor costs besides its floats: the object and its heap block's bookkeeping.
constexpr int64_t kTensorOverheadBytes = 64;

// One moe_layer call on `tokens` tokens (forward, and backward when `backward`), all experts in
// this process.
MemoryEstimate LayerCallMemory(const config::LayerConfig& layer, int64_t tokens, bool backward);

// One rank of moe_train on `world` ranks (parallel.ep_size of them expert-parallel): the model's
// parameters on this rank (replicated parts, its E/ep_size experts per layer), their gradients and
// AdamW moments, the activations of a training step, the exchange buffers. Assumes a valid config.
// account_padding: the capacity exchange accounted, not materialized (ExchangeOptions::
// account_padding): expert rows at most the real slots instead of every block at C.
MemoryEstimate TrainRankMemory(const config::MoeConfig& cfg, int world,
                               bool account_padding = false);

// moe_simulate's own memory beyond its `ranks` trainers (TrainRankMemory each): the exchange
// records of every step (a W-long byte vector per rank and exchange) and measured.json's traffic
// matrices (W x W per step, and per exchange up to 64 ranks) as text.
MemoryEstimate SimulatorMemory(const config::MoeConfig& cfg, int ranks);

// The bytes of the weight files moe_layer --init-seed writes (one .npy per tensor, 128-byte
// headers), and how many files.
int64_t LayerWeightFileBytes(const config::LayerConfig& layer, int64_t* files);

// kInvalidArgument when `estimate` is above `limit_bytes` (> 0): "<what> needs an estimated X
// (largest: ...), above <limit_name> Y; lower the fields in brackets or raise <flag>". Ok
// otherwise.
Status CheckMemory(const MemoryEstimate& estimate, int64_t limit_bytes, const std::string& what,
                   const std::string& limit_name, const std::string& flag);

// MemAvailable of /proc/meminfo in bytes, or 0 when it cannot be read.
int64_t AvailableMemoryBytes();
// This process's resident memory now (VmRSS of /proc/self/status) in bytes, or 0.
int64_t ResidentBytes();
// Free bytes for an unprivileged writer on the file system holding `path` (or its nearest existing
// parent), or -1 when unknown.
int64_t FreeDiskBytes(const std::string& path);
// Parses "512M", "8G", "1.5G", "1048576" (binary multiples, optional trailing B) into bytes.
StatusOr<int64_t> ParseByteSize(const std::string& flag, const std::string& text);
// "1.50 GiB", "12.0 MiB", "512 B".
std::string FormatBytes(double bytes);

}  // namespace moe
