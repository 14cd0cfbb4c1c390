// Benchmark rows as JSON lines: one report.proto BenchResult per comm::bench::BenchRow (the -J file
// of moe_comm_bench; moe_simulate --bench-alltoall reads it back).
#pragma once

#include <ostream>

#include "comm/bench/bench_loop.h"
#include "base/status.h"

namespace moe {

// Appends `row` to `out` as one line of protobuf JSON, every field printed (#wrong = 0 included).
Status WriteBenchJson(std::ostream& out, const comm::bench::BenchRow& row);

}  // namespace moe
