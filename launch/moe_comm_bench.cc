// moe_comm_bench: communicator microbenchmark in the manner of nccl-tests.
//
//   moe_comm_bench --backend loopback --ranks 4 --op alltoall -b 1K -e 64M -f 2 -n 20 -w 5 -c 1
//   mpiexec -n 4 moe_comm_bench --backend mpi --op alltoallv -b 1M -e 16M -J results.jsonl
//   moe_comm_bench --backend loopback --ranks 4 --op dispatch_combine --skew hot:0.5 -c 1
//
// --op alltoall, alltoallv, allreduce, allgather: one row per size from -b to -e (factor -f), each
// beside a baseline moving the same bytes in the same loop (raw MPI on the MPI backend, memcpy
// otherwise); the table, its columns and the timing are defined in comm/bench/collective_bench.h.
// --op dispatch_combine: the exchange engine's Dispatch and Combine calls, timed apart, beside the
// raw exchange of the same per-peer bytes, one row per wire dtype (float32, bfloat16); one token
// count at --tokens, or with -b/-e one per size with tokens = bytes / (k·M·4); --hierarchical P
// sends the rows with the two-stage all-to-all; defined in bench/dispatch_combine_bench.h.
// -c 1 checks the results (#wrong = wrong elements, all ranks). -J writes one JSON line
// (report.proto BenchResult) per row. Bad flags exit with code 2; any #wrong > 0 exits with code 1
// after the table.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_json.h"
#include "bench/dispatch_combine_bench.h"
#include "comm/bench/collective_bench.h"
#include "comm/communicator.h"
#include "comm/world.h"
#include "base/status.h"

namespace {

using moe::Status;
using moe::StatusOr;
using moe::comm::Communicator;
using moe::comm::DataType;
using moe::comm::bench::RawCollectives;

constexpr int kUsageError = 2;

struct Flags {
  std::string min_bytes = "32M";
  std::string max_bytes = "32M";
  int factor = 2;
  int iters = 20;
  int warmup = 5;
  int check = 1;
  std::string dtype = "float32";
  std::string json;
  std::string backend = "loopback";
  int ranks = 2;
  std::string op = "alltoall";
  int hierarchical = 0;
  bool node_dedup = false;
  double deadline = 120;
  // --op dispatch_combine
  int64_t tokens = 1024;
  int64_t hidden = 1024;
  int experts = 0;  // 0: 2 per rank
  int top_k = 2;
  int groups_per_token = 0;
  double capacity_factor = 1.25;
  bool dropless_exchange = false;
  std::string skew = "uniform";
  int redundant_experts = 0;
  uint64_t seed = 1;
  std::vector<int> pipeline_degrees;  // non-empty: the pipelined table
  int64_t expert_hidden = 0;
  bool tokens_given = false;  // --tokens on the command line
  bool sizes_given = false;   // -b or -e on the command line
};

struct Settings {
  Flags flags;
  moe::comm::bench::CollectiveBenchOptions collective;
  moe::DispatchCombineBenchOptions dispatch_combine;
};

// "64", "1K", "16M", "1G" (binary multiples; an optional trailing B).
StatusOr<int64_t> ParseBytes(const std::string& flag, const std::string& text) {
  std::string t = text;
  if (!t.empty() && (t.back() == 'B' || t.back() == 'b')) t.pop_back();
  int64_t scale = 1;
  if (!t.empty()) {
    const char suffix = t.back();
    if (suffix == 'K' || suffix == 'k') scale = 1LL << 10;
    if (suffix == 'M' || suffix == 'm') scale = 1LL << 20;
    if (suffix == 'G' || suffix == 'g') scale = 1LL << 30;
    if (scale != 1) t.pop_back();
  }
  if (t.empty() || t.find_first_not_of("0123456789") != std::string::npos || t.size() > 12) {
    return moe::InvalidArgument(flag + "='" + text +
                                "' is not a size (digits with an optional K, M or G suffix)");
  }
  return std::stoll(t) * scale;
}

StatusOr<moe::ProbsSkew> ParseSkew(const std::string& text) {
  moe::ProbsSkew skew;
  if (text == "uniform") return skew;
  const auto colon = text.find(':');
  const std::string kind = text.substr(0, colon);
  if (colon != std::string::npos && (kind == "zipf" || kind == "hot")) {
    const std::string value = text.substr(colon + 1);
    char* end = nullptr;
    const double v = std::strtod(value.c_str(), &end);
    if (!value.empty() && end == value.c_str() + value.size() && std::isfinite(v)) {
      if (kind == "zipf" && v > 0) return moe::ProbsSkew{moe::ProbsSkew::kZipf, v};
      if (kind == "hot" && v >= 0 && v <= 1) return moe::ProbsSkew{moe::ProbsSkew::kHot, v};
    }
  }
  return moe::InvalidArgument("--skew='" + text +
                              "' must be uniform, zipf:S (S > 0) or hot:F (0 <= F <= 1)");
}

// Checks the flags together and fills both benchmarks' options.
StatusOr<Settings> Validate(const Flags& f) {
  Settings s;
  s.flags = f;
  moe::comm::bench::CollectiveBenchOptions& c = s.collective;
  moe::DispatchCombineBenchOptions& dc = s.dispatch_combine;
  c.op = f.op;
  c.factor = f.factor;
  c.iters = dc.iters = f.iters;
  c.warmup = dc.warmup = f.warmup;
  c.check = dc.check = f.check != 0;
  c.hierarchical = f.hierarchical;
  MOE_ASSIGN_OR_RETURN(c.min_bytes, ParseBytes("-b/--minbytes", f.min_bytes));
  MOE_ASSIGN_OR_RETURN(c.max_bytes, ParseBytes("-e/--maxbytes", f.max_bytes));
  if (c.min_bytes > c.max_bytes) {
    return moe::InvalidArgument("-b/--minbytes=" + f.min_bytes +
                                " must be <= -e/--maxbytes=" + f.max_bytes);
  }
  MOE_ASSIGN_OR_RETURN(c.dtype, moe::comm::ParseDataType(f.dtype));
  if (f.hierarchical > 0 && f.op != "alltoall" && f.op != "alltoallv" &&
      f.op != "dispatch_combine") {
    return moe::InvalidArgument(
        "--hierarchical applies to --op alltoall, alltoallv or dispatch_combine, not " + f.op);
  }
  if (f.op == "dispatch_combine") {
    MOE_ASSIGN_OR_RETURN(dc.skew, ParseSkew(f.skew));
    if (c.dtype != DataType::kFloat32) {
      return moe::InvalidArgument("--op dispatch_combine moves float32 rows; -d must be float32");
    }
    if (f.backend == "nccl") {
      return moe::InvalidArgument(
          "--op dispatch_combine runs the host executor: use --backend "
          "mpi or loopback");
    }
    if (f.tokens_given && f.sizes_given) {
      return moe::InvalidArgument("--op dispatch_combine: give either --tokens or -b/-e, not both");
    }
    if (f.experts < 0) return moe::InvalidArgument("--experts must be >= 0 (0: 2 per rank)");
    if (f.top_k < 1) return moe::InvalidArgument("--topk must be >= 1");
    dc.hidden = f.hidden;
    dc.experts = f.experts;
    dc.top_k = f.top_k;
    dc.groups_per_token = f.groups_per_token;
    dc.capacity_factor = f.capacity_factor;
    dc.dropless_exchange = f.dropless_exchange;
    dc.skew_name = f.skew;
    dc.seed = f.seed;
    dc.pipeline_degrees = f.pipeline_degrees;
    dc.expert_hidden = f.expert_hidden;
    dc.ranks_per_node = f.hierarchical;
    dc.node_dedup = f.node_dedup;
    if (f.node_dedup && f.hierarchical == 0) {
      return moe::InvalidArgument("--node-dedup needs --hierarchical P (the two-stage exchange)");
    }
    if (f.redundant_experts < 0) {
      return moe::InvalidArgument("--redundant-experts=" + std::to_string(f.redundant_experts) +
                                  " must be >= 0");
    }
    if (f.redundant_experts > 0 && !f.pipeline_degrees.empty()) {
      return moe::InvalidArgument("--redundant-experts and --pipeline-degree are separate tables");
    }
    dc.redundant_experts = f.redundant_experts;
    if (f.expert_hidden > 0 && f.pipeline_degrees.empty() && f.redundant_experts == 0) {
      return moe::InvalidArgument(
          "--expert-hidden applies with --pipeline-degree or --redundant-experts");
    }
    dc.tokens = f.sizes_given ? moe::DispatchCombineTokens(
                                    moe::comm::bench::SizeSweep(c.min_bytes, c.max_bytes, f.factor),
                                    f.top_k, f.hidden)
                              : std::vector<int64_t>{f.tokens};
    // MPI: checked by the benchmark once the size is known.
    if (f.backend == "loopback") MOE_RETURN_IF_ERROR(moe::CheckDispatchCombineShape(dc, f.ranks));
  } else if (f.tokens_given || f.hidden != Flags().hidden || f.experts != 0 ||
             f.top_k != Flags().top_k || f.capacity_factor != Flags().capacity_factor ||
             f.dropless_exchange || f.skew != "uniform" || !f.pipeline_degrees.empty() ||
             f.expert_hidden != 0 || f.groups_per_token != 0 || f.redundant_experts != 0) {
    return moe::InvalidArgument(
        "--tokens, --hidden, --experts, --topk, --groups-per-token, --capacity-factor, "
        "--dropless-exchange, --skew, --pipeline-degree, --expert-hidden and "
        "--redundant-experts apply to --op dispatch_combine");
  }
  if (f.op == "allreduce" && c.max_bytes / moe::comm::DataTypeSize(c.dtype) > (1LL << 31) - 1) {
    return moe::InvalidArgument("-e/--maxbytes=" + f.max_bytes +
                                " is too large for one allreduce call");
  }
  return s;
}

int Report(const Status& status) {
  if (status.ok()) return 0;
  std::fprintf(stderr, "moe_comm_bench: %s\n", status.ToString().c_str());
  return status.code() == moe::StatusCode::kInvalidArgument ? kUsageError : 1;
}

// -J, opened (truncated) by the process that hosts rank 0.
Status OpenJson(const Settings& s, std::ofstream& json) {
  if (s.flags.json.empty()) return Status::Ok();
  json.open(s.flags.json, std::ios::out | std::ios::trunc);
  if (!json) return moe::IoError("-J " + s.flags.json + ": cannot open for writing");
  return Status::Ok();
}

// One rank's benchmark; rank 0 prints to stdout and writes `json` (when open).
Status BenchRank(Communicator& comm, const Settings& s, RawCollectives* raw, std::ofstream& json) {
  moe::comm::bench::RowSink sink;
  if (json.is_open()) sink = [&json](const auto& row) { return moe::WriteBenchJson(json, row); };
  if (s.flags.op == "dispatch_combine") {
    return moe::RunDispatchCombineBench(comm, s.dispatch_combine, raw, stdout, sink);
  }
  return moe::comm::bench::RunCollectiveBench(comm, s.collective, raw, stdout, sink);
}

// Runs the benchmark on every rank of a world of the chosen backend; the process hosting rank 0
// prints the table and writes -J.
int Run(const Settings& s) {
  moe::comm::WorldOptions w;
  w.backend = s.flags.backend;
  w.ranks = s.flags.ranks;
  w.options.deadline_seconds = s.flags.deadline;
  w.tool = "moe_comm_bench";
  auto world = moe::comm::MakeWorld(w);
  if (!world.ok()) return Report(world.status().WithContext("--backend " + s.flags.backend));
  std::ofstream json;
  if ((*world)->hosts_rank0()) {
    if (const Status opened = OpenJson(s, json); !opened.ok()) {
      const int code = Report(opened);
      (*world)->Abort(code);
      return code;
    }
  }
  moe::comm::bench::RawCollectives* raw = (*world)->raw_collectives();
  const Status status = (*world)->Run([&](moe::comm::RankContext& rank) {
    std::ofstream none;
    return BenchRank(rank.comm, s, raw, rank.comm.rank() == 0 ? json : none);
  });
  return status.ok() ? 0 : moe::comm::ExitCodeOf(status);
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  CLI::App app{"moe_comm_bench: communicator microbenchmark (nccl-tests style)"};
  app.add_option("-b,--minbytes", f.min_bytes, "smallest size in bytes (K/M/G suffixes)");
  app.add_option("-e,--maxbytes", f.max_bytes, "largest size in bytes (K/M/G suffixes)");
  app.add_option("-f,--stepfactor", f.factor, "multiplication factor between sizes")
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("-n,--iters", f.iters, "timed iterations per size")->check(CLI::Range(1, 1 << 30));
  app.add_option("-w,--warmup_iters", f.warmup, "warm-up iterations per size")
      ->check(CLI::Range(0, 1 << 30));
  app.add_option("-c,--check", f.check, "check the result after timing (0/1)")
      ->check(CLI::Range(0, 1));
  app.add_option("-d,--datatype", f.dtype, "float32, float64, int32, int64, uint8")
      ->check(CLI::IsMember(
          {"float32", "float64", "int32", "int64", "uint8", "bytes", "float", "double"}));
  app.add_option("-J,--json", f.json, "write one JSON line (BenchResult) per size to this file");
  app.add_option("--backend", f.backend, "mpi, nccl or loopback")
      ->check(CLI::IsMember({"mpi", "nccl", "loopback"}));
  app.add_option("--ranks", f.ranks, "ranks (threads) for loopback and nccl")
      ->check(CLI::Range(1, 1024));
  app.add_option("--op", f.op, "alltoall, alltoallv, allreduce, allgather, dispatch_combine")
      ->check(
          CLI::IsMember({"alltoall", "alltoallv", "allreduce", "allgather", "dispatch_combine"}));
  app.add_option("--tokens", f.tokens, "dispatch_combine: tokens per rank (one row; default 1024)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--hidden", f.hidden, "dispatch_combine: model dim M (floats per token row)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--experts", f.experts, "dispatch_combine: experts E (0: 2 per rank)");
  app.add_option("--topk", f.top_k, "dispatch_combine: experts per token k");
  app.add_option("--groups-per-token", f.groups_per_token,
                 "dispatch_combine: group-limited routing, one expert group per rank: a token's "
                 "experts on at most this many ranks (0: not limited)")
      ->check(CLI::Range(0, 64));
  app.add_option("--capacity-factor", f.capacity_factor,
                 "dispatch_combine: capacity factor (<= 0: dropless routing)");
  app.add_flag("--dropless-exchange", f.dropless_exchange,
               "dispatch_combine: counts + alltoallv instead of the padded alltoall");
  app.add_option("--skew", f.skew, "dispatch_combine: uniform, zipf:S or hot:F");
  app.add_option("--redundant-experts", f.redundant_experts,
                 "dispatch_combine: R > 0 compares the experts' time and per-rank rows with R "
                 "redundant experts (placed from the measured load) against R = 0");
  app.add_option("--seed", f.seed, "dispatch_combine: routing seed");
  app.add_option("--pipeline-degree", f.pipeline_degrees,
                 "dispatch_combine: instead, time forward + backward with real experts at these "
                 "pipeline degrees (e.g. 1,2,4; degree 1 is the baseline)")
      ->delimiter(',')
      ->check(CLI::Range(1, 16));
  app.add_option("--expert-hidden", f.expert_hidden,
                 "dispatch_combine --pipeline-degree: expert hidden size H (default 4 x --hidden)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--hierarchical", f.hierarchical,
                 "ranks per node for the two-stage all-to-all (0: flat)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_flag("--node-dedup", f.node_dedup,
               "dispatch_combine --hierarchical: send each token's row to each other node once");
  app.add_option("--deadline", f.deadline, "deadline of every operation, seconds")
      ->check(CLI::PositiveNumber);
  // Not flags::ParseFlags: this tool's parse errors keep their own two-line message.
  try {
    app.parse(argc, argv);
    f.tokens_given = app.count("--tokens") > 0;
    f.sizes_given = app.count("-b") > 0 || app.count("-e") > 0;
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "moe_comm_bench: %s\nRun with --help for the flags.\n", e.what());
    return kUsageError;
  }
  const StatusOr<Settings> settings = Validate(f);
  if (!settings.ok()) return Report(settings.status());
  return Run(*settings);
}
