// moe_comm_bench --op dispatch_combine: times the exchange engine (runtime/exchange/expert_exchange.h)
// on a communicator and compares it with the raw exchange of the same bytes.
//
// Per rank, a probs matrix (S x E, rows sum to 1) is drawn from a seeded RNG with the requested
// skew (uniform, zipf:S, hot:F; see MakeSkewedProbs), BuildDispatchPlan makes the plan (gate TOPK,
// top_k, capacity_factor, min capacity 1), and per call Dispatch(plan, x) and Combine(handle, the
// received rows as they are, gated, y) are timed each on its own (y is zeroed outside the timed
// calls). dispatch = the Dispatch call (layout, count all-to-all in dropless mode, gather, row
// all-to-all); combine = the Combine call (row all-to-all back, gated sum into y). time = dispatch
// + combine (each the slowest rank's mean). Each token count gets two rows: wire dtype float32,
// then bfloat16 (parallel.wire_dtype BF16: half the bytes, rounded on send, widened on arrival).
// baseline = the raw exchange with the engine's own recorded per-peer bytes (the self block
// included, though the engine moves it without the communicator; the given raw all-to-all-v, e.g.
// MPI_Alltoallv on MPI; without one, the plain communicator's AllToAll in capacity mode or
// AllToAllV in dropless mode), timed in both directions and halved; ratio = time / (2 x
// baseline). size = bytes a rank sends in the dispatch (mean over ranks, padding included);
// algbw = 2 · size / time. With `check`, #wrong counts elements of y that differ from
// Σ gate · x[t] over each token's kept rows (x rounded to bf16 in the bfloat16 row) — exact.
// --hierarchical P (ranks_per_node) sends the rows with the two-stage all-to-all (its `direct` rows:
// the intra-node stage by direct writes); the baseline stays the flat one.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "comm/bench/bench_loop.h"
#include "comm/bench/raw_collectives.h"
#include "comm/communicator.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/routing/dispatch_plan.h"

namespace moe {

// How the benchmark's router probs favour experts.
struct ProbsSkew {
  enum Kind { kUniform, kZipf, kHot } kind = kUniform;
  double param = 0;  // Zipf exponent S, or the hot expert's fraction F of first choices
};

struct DispatchCombineBenchOptions {
  std::vector<int64_t> tokens = {1024};  // tokens per rank, one table row each
  int64_t hidden = 1024;                 // model dim M (floats per token row)
  int experts = 0;                       // E; 0: 2 per rank
  int top_k = 2;
  double capacity_factor = 1.25;   // <= 0: dropless routing (always the dropless exchange)
  bool dropless_exchange = false;  // counts + all-to-all-v instead of the padded all-to-all
  ProbsSkew skew;
  std::string skew_name = "uniform";  // as the table header prints it
  uint64_t seed = 1;
  int iters = 20;
  int warmup = 5;
  bool check = true;
  // Non-empty: instead of the table above, the pipelined table (RunPipelineBench below) for these
  // pipeline degrees, with experts of hidden size expert_hidden.
  std::vector<int> pipeline_degrees;
  int64_t expert_hidden = 0;  // 0: 4 x hidden
  // --hierarchical: > 0 exchanges with the two-stage all-to-all, this many ranks per node (the
  // raw baseline stays the flat all-to-all-v).
  int ranks_per_node = 0;
  // --node-dedup: the two-stage exchange's dispatch sends a token to each other node once.
  bool node_dedup = false;
  // --groups-per-token: > 0 routes group-limited with one expert group per rank (DeepSeek's
  // device-limited routing): each token's experts lie on at most this many ranks.
  int groups_per_token = 0;
  // --redundant-experts R > 0: instead of the tables above, the expert-parallel layer's experts
  // (hidden expert_hidden) run with R redundant experts placed from this plan's measured load
  // (runtime/exchange/expert_placement.h) against R = 0 in the same run (RunRedundantBench).
  int redundant_experts = 0;
};

// Destination ranks of each token's kept rows (experts in blocks of E/ranks per rank): their sum
// and maximum over the plan's tokens (the exchange's fan-out).
struct FanOut {
  int64_t sum = 0, max = 0;
};
FanOut DestinationRanks(const DispatchPlan& plan, int ranks);

// The experts E on `ranks` ranks (options.experts, or 2 per rank).
int DispatchCombineExperts(const DispatchCombineBenchOptions& options, int ranks);
// E divisible by the ranks and top_k <= E; messages name --experts and --topk.
Status CheckDispatchCombineShape(const DispatchCombineBenchOptions& options, int ranks);
// Tokens per rank for a sweep of byte sizes: bytes / (k · M · 4), at least 1, repeats dropped.
std::vector<int64_t> DispatchCombineTokens(const std::vector<int64_t>& sizes, int top_k,
                                           int64_t hidden);

// One rank's router probs (tokens x e, rows sum to 1) with `skew`, from (seed, rank). The k
// largest entries of a row are its top-k choices, in order: choice j gets weight (k - j) + 1/2
// plus U(0, 1/4), every other expert U(0, 1/4), then the row is normalized.
//   uniform: choices drawn uniformly without replacement;
//   zipf:S:  choices drawn without replacement with P(e) ∝ 1 / (e + 1)^S;
//   hot:F:   first choice is expert 0 with probability F, else uniform over experts 1..E-1; later
//            choices uniform over the experts not yet chosen other than expert 0 (expert 0 only
//            when nothing else is left), so expert 0 gets exactly the fraction F of first choices.
Tensor MakeSkewedProbs(const ProbsSkew& skew, uint64_t seed, int rank, int64_t tokens, int e,
                       int k);

// --pipeline-degree: per token count and pipeline degree d, ExpertParallelExecutor Forward +
// Backward (dispatch, experts, combine into y, and the same for dy) with real experts (M = hidden, H = expert_hidden, GELU, bias, seeded weights) through
// the chunked exchanges (runtime/exchange/expert_parallel_executor.h). time = mean per iteration of the slowest rank;
// exchange = time the slowest rank spent inside the communicator (ExchangeCall::seconds: the
// blocking calls, or start + Wait of the asynchronous ones), experts = its expert compute;
// speedup = time at degree 1 / time at degree d, degree 1 always run first in the same process.
// #wrong = elements of y and dx (all ranks) further than 1e-5 x max|value| from degree 1's.
// The rows are fp32 (parallel.wire_dtype FP32).
// What overlaps depends on the backend: the loopback backend moves the rows inside Wait (no
// overlap); MPI progresses mostly inside MPI calls; NCCL runs on its own stream.
Status RunPipelineBench(comm::Communicator& comm, const DispatchCombineBenchOptions& options,
                        std::FILE* out, const comm::bench::RowSink& sink);

// Runs every row on this rank; collective over `comm` (host memory). `raw` (may be null: the
// communicator itself) is the baseline exchange. Rank 0 prints the table to `out` and hands each
// row to `sink` (when set). After the table, kDataLoss when `check` found wrong elements.
// Rows each rank's experts receive (max / mean over ranks, real rows and padded), and the
// forward + backward time (exchange, experts) of the expert-parallel executor without and with
// options.redundant_experts redundant experts (BalancedPlacement of the all-reduced load of the
// plan), y and dX checked against R = 0.
Status RunRedundantBench(comm::Communicator& comm, const DispatchCombineBenchOptions& options,
                         std::FILE* out, const comm::bench::RowSink& sink);

Status RunDispatchCombineBench(comm::Communicator& comm, const DispatchCombineBenchOptions& options,
                               comm::bench::RawCollectives* raw, std::FILE* out,
                               const comm::bench::RowSink& sink);

}  // namespace moe
