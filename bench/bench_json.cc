// WriteBenchJson (bench/bench_json.h): a BenchRow as one BenchResult JSON line.
#include "bench/bench_json.h"

#include <google/protobuf/util/json_util.h>

#include <string>

#include "proto/report.pb.h"

namespace moe {

Status WriteBenchJson(std::ostream& out, const comm::bench::BenchRow& row) {
  report::BenchResult r;
  r.set_op(row.op);
  r.set_backend(row.backend);
  r.set_ranks(row.ranks);
  r.set_bytes(row.bytes);
  r.set_count(row.count);
  r.set_dtype(row.dtype);
  r.set_time_us(row.time_us);
  r.set_algbw_gbps(row.algbw_gbps);
  r.set_busbw_gbps(row.busbw_gbps);
  r.set_wrong(row.wrong);
  r.set_baseline_time_us(row.baseline_time_us);
  r.set_baseline(row.baseline);
  r.set_time_median_us(row.time_median_us);
  r.set_time_min_us(row.time_min_us);
  r.set_time_max_us(row.time_max_us);
  r.set_iters(row.iters);
  std::string line;
  google::protobuf::util::JsonPrintOptions print;
  print.always_print_primitive_fields = true;  // #wrong = 0 is worth printing
  if (!google::protobuf::util::MessageToJsonString(r, &line, print).ok()) {
    return Internal("JSON conversion failed");
  }
  out << line << "\n";
  if (!out) return IoError("writing a benchmark JSON line failed");
  return Status::Ok();
}

}  // namespace moe
