// The collective sweeps of moe_comm_bench (comm/bench/collective_bench.h).
#include "comm/bench/collective_bench.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "comm/algorithms/hierarchical_alltoall.h"
#include "base/memory.h"

namespace moe::comm::bench {
namespace {

// Everything an operation needs on one rank, for the current size.
struct RankState {
  Communicator* comm = nullptr;
  std::optional<HierarchicalAllToAll> hierarchical;
  DataType dtype = DataType::kFloat32;
  int64_t count = 0;                              // elements of the op's buffer (see BenchCase)
  Buffer send, recv;                              // allocated for the largest size
  std::vector<int64_t> peer_counts, peer_displs;  // alltoall(v): equal blocks
};

// Small integers, exact in every dtype: element i from rank src to rank dst.
double Value(int src, int dst, int64_t i) {
  return static_cast<double>((src * 37 + dst * 11 + i * 7) % 101);
}
double ReduceInput(int rank, int64_t i) { return static_cast<double>((rank + i) % 3); }

void SetElement(DataType dtype, unsigned char* data, int64_t i, double v) {
  switch (dtype) {
    case DataType::kFloat32: {
      const float x = static_cast<float>(v);
      std::memcpy(data + 4 * i, &x, 4);
      return;
    }
    case DataType::kFloat64:
      std::memcpy(data + 8 * i, &v, 8);
      return;
    case DataType::kInt32: {
      const int32_t x = static_cast<int32_t>(v);
      std::memcpy(data + 4 * i, &x, 4);
      return;
    }
    case DataType::kInt64: {
      const int64_t x = static_cast<int64_t>(v);
      std::memcpy(data + 8 * i, &x, 8);
      return;
    }
    case DataType::kUint8:
      data[i] = static_cast<unsigned char>(v);
      return;
  }
}

using HostBytes = std::vector<unsigned char>;
// Fills the send side (host bytes) and returns the expected receive side.
using FillFn = void (*)(const RankState&, HostBytes& send, HostBytes& expected);

struct BenchCase {
  const char* op;
  int64_t elems_multiple;  // count is rounded down to a multiple of this · n
  int64_t (*send_elems)(int64_t count, int n);
  double (*bus_factor)(int n);
  Status (*run)(RankState&);
  FillFn fill;
  RawCollectives::Op raw_op;  // the raw collective moving the same bytes
};

Status RunAllToAll(RankState& s) {
  const int n = s.comm->size();
  if (s.hierarchical)
    return s.hierarchical->AllToAll(s.send.data(), s.recv.data(), s.count / n, s.dtype);
  return s.comm->AllToAll(s.send.data(), s.recv.data(), s.count / n, s.dtype);
}

Status RunAllToAllV(RankState& s) {
  if (s.hierarchical) {
    return s.hierarchical->AllToAllV(s.send.data(), s.peer_counts, s.peer_displs, s.recv.data(),
                                     s.peer_counts, s.peer_displs, s.dtype);
  }
  return s.comm->AllToAllV(s.send.data(), s.peer_counts, s.peer_displs, s.recv.data(),
                           s.peer_counts, s.peer_displs, s.dtype);
}

Status RunAllReduce(RankState& s) {
  return s.comm->AllReduce(s.send.data(), s.recv.data(), s.count, s.dtype, ReduceOp::kSum);
}

Status RunAllGather(RankState& s) {
  return s.comm->AllGather(s.send.data(), s.recv.data(), s.count / s.comm->size(), s.dtype);
}

void FillAllToAll(const RankState& s, HostBytes& send, HostBytes& expected) {
  const int n = s.comm->size();
  const int me = s.comm->rank();
  const int64_t per_peer = s.count / n;
  for (int p = 0; p < n; ++p) {
    for (int64_t i = 0; i < per_peer; ++i) {
      SetElement(s.dtype, send.data(), p * per_peer + i, Value(me, p, i));
      SetElement(s.dtype, expected.data(), p * per_peer + i, Value(p, me, i));
    }
  }
}

void FillAllReduce(const RankState& s, HostBytes& send, HostBytes& expected) {
  for (int64_t i = 0; i < s.count; ++i) {
    SetElement(s.dtype, send.data(), i, ReduceInput(s.comm->rank(), i));
    double sum = 0;
    for (int r = 0; r < s.comm->size(); ++r) sum += ReduceInput(r, i);
    SetElement(s.dtype, expected.data(), i, sum);
  }
}

void FillAllGather(const RankState& s, HostBytes& send, HostBytes& expected) {
  const int n = s.comm->size();
  const int64_t per_rank = s.count / n;
  for (int64_t i = 0; i < per_rank; ++i)
    SetElement(s.dtype, send.data(), i, Value(s.comm->rank(), 0, i));
  for (int p = 0; p < n; ++p) {
    for (int64_t i = 0; i < per_rank; ++i)
      SetElement(s.dtype, expected.data(), p * per_rank + i, Value(p, 0, i));
  }
}

// Copies the receive buffer's worth of bytes from the send buffer (repeated when smaller).
Status CopyBaseline(RankState& s) {
  const int64_t recv_bytes = s.count * DataTypeSize(s.dtype);
  const int64_t send_bytes = std::min(recv_bytes, s.send.bytes());
  if (send_bytes == 0) return Status::Ok();
  for (int64_t off = 0; off < recv_bytes; off += send_bytes) {
    MOE_RETURN_IF_ERROR(CopyBytes(s.comm->memory_space(), static_cast<char*>(s.recv.data()) + off,
                                  s.send.data(), std::min(send_bytes, recv_bytes - off)));
  }
  return Status::Ok();
}

// The case's raw collective on the same buffers.
Status RawBaseline(RankState& s, RawCollectives::Op op, RawCollectives& raw) {
  switch (op) {
    case RawCollectives::Op::kAllToAllV:
      return raw.AllToAllV(s.send.data(), s.peer_counts, s.peer_displs, s.recv.data(),
                           s.peer_counts, s.peer_displs, s.dtype);
    case RawCollectives::Op::kAllReduce:
      return raw.AllReduceSum(s.send.data(), s.recv.data(), s.count, s.dtype);
    case RawCollectives::Op::kAllGather:
      return raw.AllGather(s.send.data(), s.recv.data(), s.count / s.comm->size(), s.dtype);
  }
  return Internal("unknown raw collective");
}

int64_t SameCount(int64_t count, int) { return count; }
int64_t PerRankCount(int64_t count, int n) { return count / n; }
double AllReduceFactor(int n) { return 2.0 * (n - 1) / n; }

const BenchCase kCases[] = {
    {"alltoall", 1, SameCount, AllToAllBusFactor, RunAllToAll, FillAllToAll,
     RawCollectives::Op::kAllToAllV},
    {"alltoallv", 1, SameCount, AllToAllBusFactor, RunAllToAllV, FillAllToAll,
     RawCollectives::Op::kAllToAllV},
    {"allreduce", 0, SameCount, AllReduceFactor, RunAllReduce, FillAllReduce,
     RawCollectives::Op::kAllReduce},
    {"allgather", 1, PerRankCount, AllToAllBusFactor, RunAllGather, FillAllGather,
     RawCollectives::Op::kAllGather},
};

const BenchCase* FindCase(const std::string& op) {
  for (const BenchCase& c : kCases) {
    if (op == c.op) return &c;
  }
  return nullptr;
}

int64_t CountWrong(DataType dtype, const HostBytes& expected, const HostBytes& actual,
                   int64_t count) {
  const int64_t es = DataTypeSize(dtype);
  int64_t wrong = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (std::memcmp(expected.data() + i * es, actual.data() + i * es, static_cast<size_t>(es)) != 0)
      ++wrong;
  }
  return wrong;
}

void PrintHeader(std::FILE* out, const CollectiveBenchOptions& o, const Communicator& comm,
                 const char* baseline) {
  std::fprintf(
      out,
      "# moe_comm_bench: op %s, backend %s, %d ranks, memory %s, dtype %s, iters %d, warmup %d, "
      "check %d, hierarchical %d\n",
      o.op.c_str(), std::string(comm.backend()).c_str(), comm.size(),
      MemorySpaceName(comm.memory_space()), DataTypeName(o.dtype), o.iters, o.warmup,
      o.check ? 1 : 0, o.hierarchical);
  std::fprintf(out, "# ratio = time / baseline time; baseline = %s of the same bytes, same loop\n",
               baseline);
  std::fprintf(out, "#%11s %12s %8s %10s %8s %8s %7s %12s %7s\n", "size", "count", "type", "time",
               "algbw", "busbw", "#wrong", "baseline", "ratio");
  std::fprintf(out, "#%11s %12s %8s %10s %8s %8s %7s %12s %7s\n", "(B)", "(elements)", "", "(us)",
               "(GB/s)", "(GB/s)", "", "(us)", "");
}

void PrintRow(std::FILE* out, const BenchRow& r) {
  std::fprintf(out, " %11lld %12lld %8s %10.1f %8.2f %8.2f %7lld %12.1f %7.2f\n",
               static_cast<long long>(r.bytes), static_cast<long long>(r.count), r.dtype.c_str(),
               r.time_us, r.algbw_gbps, r.busbw_gbps, static_cast<long long>(r.wrong),
               r.baseline_time_us, r.baseline_time_us > 0 ? r.time_us / r.baseline_time_us : 0);
  std::fflush(out);
}

}  // namespace

Status RunCollectiveBench(Communicator& comm, const CollectiveBenchOptions& o, RawCollectives* raw,
                          std::FILE* out, const RowSink& sink) {
  const BenchCase* found = FindCase(o.op);
  if (found == nullptr) return InvalidArgument("unknown collective '" + o.op + "'");
  const BenchCase& bc = *found;
  const int n = comm.size();
  const bool rank0 = comm.rank() == 0;
  const char* baseline_name = raw != nullptr                                ? raw->Name(bc.raw_op)
                              : comm.memory_space() == MemorySpace::kDevice ? "cudaMemcpy"
                                                                            : "memcpy";
  RankState st;
  st.comm = &comm;
  st.dtype = o.dtype;
  if (o.hierarchical > 0) {
    MOE_ASSIGN_OR_RETURN(st.hierarchical, HierarchicalAllToAll::Create(comm, o.hierarchical));
  }
  const int64_t es = DataTypeSize(o.dtype);
  MOE_ASSIGN_OR_RETURN(st.send, Buffer::Allocate(comm.memory_space(), o.max_bytes));
  MOE_ASSIGN_OR_RETURN(st.recv, Buffer::Allocate(comm.memory_space(), o.max_bytes));
  if (rank0) PrintHeader(out, o, comm, baseline_name);
  SweepSummary summary;
  for (const int64_t bytes : SizeSweep(o.min_bytes, o.max_bytes, o.factor)) {
    const int64_t multiple = bc.elems_multiple == 0 ? 1 : bc.elems_multiple * n;
    st.count = bytes / es / multiple * multiple;
    const int64_t per_peer = st.count / n;
    st.peer_counts.assign(static_cast<size_t>(n), per_peer);
    st.peer_displs.resize(static_cast<size_t>(n));
    for (int p = 0; p < n; ++p) st.peer_displs[static_cast<size_t>(p)] = p * per_peer;
    const int64_t size_bytes = st.count * es;
    HostBytes send(static_cast<size_t>(bc.send_elems(st.count, n) * es)),
        expected(static_cast<size_t>(size_bytes));
    bc.fill(st, send, expected);
    MOE_RETURN_IF_ERROR(CopyFromHost(comm.memory_space(), st.send.data(), send.data(),
                                     static_cast<int64_t>(send.size())));

    MOE_ASSIGN_OR_RETURN(const Timing base, TimeLoop(comm, o.warmup, o.iters, [&] {
                           return raw != nullptr ? RawBaseline(st, bc.raw_op, *raw)
                                                 : CopyBaseline(st);
                         }));
    MOE_ASSIGN_OR_RETURN(const Timing timing,
                         TimeLoop(comm, o.warmup, o.iters, [&] { return bc.run(st); }));
    const double time_us = timing.mean_us;
    double wrong = 0;
    if (o.check) {
      HostBytes actual(expected.size());
      MOE_RETURN_IF_ERROR(
          CopyToHost(comm.memory_space(), actual.data(), st.recv.data(), size_bytes));
      MOE_ASSIGN_OR_RETURN(
          wrong,
          ReduceScalar(comm, static_cast<double>(CountWrong(o.dtype, expected, actual, st.count)),
                       ReduceOp::kSum));
    }
    BenchRow row;
    row.op = o.op + (o.hierarchical > 0 ? "/hierarchical" + std::to_string(o.hierarchical) : "");
    row.backend = std::string(comm.backend());
    row.ranks = n;
    row.bytes = size_bytes;
    row.count = st.count;
    row.dtype = DataTypeName(o.dtype);
    SetTiming(&row, timing);
    row.algbw_gbps = time_us > 0 ? static_cast<double>(size_bytes) / time_us / 1e3 : 0;
    row.busbw_gbps = row.algbw_gbps * bc.bus_factor(n);
    row.wrong = o.check ? static_cast<int64_t>(wrong) : -1;
    row.baseline_time_us = base.mean_us;
    row.baseline = baseline_name;
    summary.Add(row.busbw_gbps, wrong);
    if (!rank0) continue;
    PrintRow(out, row);
    if (sink) MOE_RETURN_IF_ERROR(sink(row));
  }
  return summary.Finish(rank0 ? out : nullptr, o.op);
}

}  // namespace moe::comm::bench
