// moe_comm_bench: communicator microbenchmark in the manner of nccl-tests.
//
//   moe_comm_bench --backend loopback --ranks 4 --op alltoall -b 1K -e 64M -f 2 -n 20 -w 5 -c 1
//   mpiexec -n 4 moe_comm_bench --backend mpi --op alltoallv -b 1M -e 16M -J results.jsonl
//
// Size is the bytes of each rank's send buffer (allgather: of its receive buffer), rounded down to
// whole elements per peer; count is that in elements. time is the slowest rank's mean over -n
// iterations after -w warm-up ones; algbw = size / time; busbw = algbw · (n-1)/n for all-to-all and
// all-gather, · 2(n-1)/n for all-reduce. Each size also times a baseline moving the same bytes in
// the same loop: raw MPI (MPI_Alltoallv, MPI_Allreduce, MPI_Allgather) on the MPI backend, plain
// memcpy (cudaMemcpy on device memory) otherwise; "ratio" is wrapper time / baseline time.
// With -c 1 the result of the last timed iteration is checked (#wrong = wrong elements, all ranks).
// -J writes one JSON line (report.proto BenchResult) per size. Bad flags exit with code 2.
#include <google/protobuf/util/json_util.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "comm/algorithms/hierarchical_alltoall.h"
#include "comm/communicator.h"
#include "comm/loopback/loopback_world.h"
#include "comm/memory.h"
#include "proto/report.pb.h"
#include "runtime/base/status.h"

#if MOE_COMM_HAVE_MPI
#include <mpi.h>

#include "comm/mpi/mpi_communicator.h"
#endif
#if MOE_COMM_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "comm/nccl/nccl_communicator.h"
#endif

namespace {

using moe::Status;
using moe::StatusOr;
using moe::comm::Buffer;
using moe::comm::Communicator;
using moe::comm::DataType;

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
  double deadline = 120;
};

struct Settings {
  Flags flags;
  int64_t min_bytes = 0;
  int64_t max_bytes = 0;
  DataType dtype = DataType::kFloat32;
};

// ---- one table of cases ------------------------------------------------------------------------

// Everything an operation needs on one rank, for the current size.
struct RankState {
  Communicator* comm = nullptr;
  std::optional<moe::comm::HierarchicalAllToAll> hierarchical;
  DataType dtype = DataType::kFloat32;
  int64_t count = 0;                              // elements of the op's buffer (see BenchCase)
  Buffer send, recv;                              // allocated for the largest size
  std::vector<int64_t> peer_counts, peer_displs;  // alltoallv: equal blocks
#if MOE_COMM_HAVE_MPI
  MPI_Comm raw = MPI_COMM_NULL;  // MPI backend: the communicator for baselines
#endif
};

int64_t ElemSize(const RankState& s) { return moe::comm::DataTypeSize(s.dtype); }

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
  // Baseline moving the same bytes; `raw_mpi` says whether it is raw MPI (MPI backend).
  Status (*baseline)(RankState&, bool raw_mpi);
  const char* mpi_baseline_name;
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
  return s.comm->AllReduce(s.send.data(), s.recv.data(), s.count, s.dtype,
                           moe::comm::ReduceOp::kSum);
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
  const int64_t recv_bytes = s.count * ElemSize(s);
  const int64_t send_bytes = std::min(recv_bytes, s.send.bytes());
  if (send_bytes == 0) return Status::Ok();
  for (int64_t off = 0; off < recv_bytes; off += send_bytes) {
    MOE_RETURN_IF_ERROR(moe::comm::CopyBytes(s.comm->memory_space(),
                                             static_cast<char*>(s.recv.data()) + off, s.send.data(),
                                             std::min(send_bytes, recv_bytes - off)));
  }
  return Status::Ok();
}

#if MOE_COMM_HAVE_MPI
Status MpiResult(int rc, const char* what) {
  return rc == MPI_SUCCESS ? Status::Ok() : moe::Internal(std::string(what) + " failed");
}
#endif

Status AllToAllBaseline(RankState& s, bool raw_mpi) {
#if MOE_COMM_HAVE_MPI
  if (raw_mpi) {
    const int n = s.comm->size();
    std::vector<int> counts(static_cast<size_t>(n), static_cast<int>(s.count / n)),
        displs(counts.size());
    for (int p = 0; p < n; ++p) displs[static_cast<size_t>(p)] = p * static_cast<int>(s.count / n);
    return MpiResult(
        MPI_Alltoallv(s.send.data(), counts.data(), displs.data(), moe::comm::MpiDatatype(s.dtype), s.recv.data(),
                      counts.data(), displs.data(), moe::comm::MpiDatatype(s.dtype), s.raw),
        "MPI_Alltoallv");
  }
#endif
  (void)raw_mpi;
  return CopyBaseline(s);
}

Status AllReduceBaseline(RankState& s, bool raw_mpi) {
#if MOE_COMM_HAVE_MPI
  if (raw_mpi) {
    return MpiResult(MPI_Allreduce(s.send.data(), s.recv.data(), static_cast<int>(s.count),
                                   moe::comm::MpiDatatype(s.dtype), MPI_SUM, s.raw),
                     "MPI_Allreduce");
  }
#endif
  (void)raw_mpi;
  return CopyBaseline(s);
}

Status AllGatherBaseline(RankState& s, bool raw_mpi) {
#if MOE_COMM_HAVE_MPI
  if (raw_mpi) {
    const int per_rank = static_cast<int>(s.count / s.comm->size());
    return MpiResult(MPI_Allgather(s.send.data(), per_rank, moe::comm::MpiDatatype(s.dtype), s.recv.data(), per_rank,
                                   moe::comm::MpiDatatype(s.dtype), s.raw),
                     "MPI_Allgather");
  }
#endif
  (void)raw_mpi;
  return CopyBaseline(s);
}

int64_t SameCount(int64_t count, int) { return count; }
int64_t PerRankCount(int64_t count, int n) { return count / n; }
double AllToAllFactor(int n) { return static_cast<double>(n - 1) / n; }
double AllReduceFactor(int n) { return 2.0 * (n - 1) / n; }

const BenchCase kCases[] = {
    {"alltoall", 1, SameCount, AllToAllFactor, RunAllToAll, FillAllToAll, AllToAllBaseline,
     "MPI_Alltoallv"},
    {"alltoallv", 1, SameCount, AllToAllFactor, RunAllToAllV, FillAllToAll, AllToAllBaseline,
     "MPI_Alltoallv"},
    {"allreduce", 0, SameCount, AllReduceFactor, RunAllReduce, FillAllReduce, AllReduceBaseline,
     "MPI_Allreduce"},
    {"allgather", 1, PerRankCount, AllToAllFactor, RunAllGather, FillAllGather, AllGatherBaseline,
     "MPI_Allgather"},
};

const BenchCase* FindCase(const std::string& op) {
  for (const BenchCase& c : kCases) {
    if (op == c.op) return &c;
  }
  return nullptr;
}

// ---- one timing loop ---------------------------------------------------------------------------

// A scalar reduced over ranks, staged through the communicator's memory space.
StatusOr<double> ReduceScalar(Communicator& comm, double value, moe::comm::ReduceOp op) {
  MOE_ASSIGN_OR_RETURN(Buffer buf, Buffer::Allocate(comm.memory_space(), sizeof(double)));
  MOE_RETURN_IF_ERROR(
      moe::comm::CopyFromHost(comm.memory_space(), buf.data(), &value, sizeof(double)));
  MOE_RETURN_IF_ERROR(comm.AllReduce(buf.data(), buf.data(), 1, DataType::kFloat64, op));
  MOE_RETURN_IF_ERROR(
      moe::comm::CopyToHost(comm.memory_space(), &value, buf.data(), sizeof(double)));
  return value;
}

// Mean microseconds per call of the slowest rank.
StatusOr<double> TimeLoop(Communicator& comm, int warmup, int iters,
                          const std::function<Status()>& call) {
  for (int i = 0; i < warmup; ++i) MOE_RETURN_IF_ERROR(call());
  MOE_RETURN_IF_ERROR(comm.Barrier());
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) MOE_RETURN_IF_ERROR(call());
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() /
      iters;
  return ReduceScalar(comm, us, moe::comm::ReduceOp::kMax);
}

int64_t CountWrong(DataType dtype, const HostBytes& expected, const HostBytes& actual,
                   int64_t count) {
  const int64_t es = moe::comm::DataTypeSize(dtype);
  int64_t wrong = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (std::memcmp(expected.data() + i * es, actual.data() + i * es, static_cast<size_t>(es)) != 0)
      ++wrong;
  }
  return wrong;
}

std::vector<int64_t> Sizes(const Settings& s) {
  std::vector<int64_t> sizes;
  for (int64_t b = s.min_bytes; b <= s.max_bytes; b *= s.flags.factor) {
    sizes.push_back(b);
    if (b == 0) break;
  }
  return sizes;
}

void PrintHeader(const Settings& s, const Communicator& comm, const char* baseline) {
  std::printf(
      "# moe_comm_bench: op %s, backend %s, %d ranks, memory %s, dtype %s, iters %d, warmup %d, "
      "check %d, hierarchical %d\n",
      s.flags.op.c_str(), std::string(comm.backend()).c_str(), comm.size(),
      moe::comm::MemorySpaceName(comm.memory_space()), moe::comm::DataTypeName(s.dtype),
      s.flags.iters, s.flags.warmup, s.flags.check, s.flags.hierarchical);
  std::printf("# ratio = time / baseline time; baseline = %s of the same bytes, same loop\n",
              baseline);
  std::printf("#%11s %12s %8s %10s %8s %8s %7s %12s %7s\n", "size", "count", "type", "time",
              "algbw", "busbw", "#wrong", "baseline", "ratio");
  std::printf("#%11s %12s %8s %10s %8s %8s %7s %12s %7s\n", "(B)", "(elements)", "", "(us)",
              "(GB/s)", "(GB/s)", "", "(us)", "");
}

// Runs every size on one rank; rank 0 prints and writes JSON.
Status BenchRank(Communicator& comm, const Settings& s) {
  const BenchCase& bc = *FindCase(s.flags.op);
  const int n = comm.size();
  const bool raw_mpi = comm.backend() == "mpi";
  const char* baseline_name = raw_mpi ? bc.mpi_baseline_name
                              : comm.memory_space() == moe::comm::MemorySpace::kDevice
                                  ? "cudaMemcpy"
                                  : "memcpy";
  RankState st;
  st.comm = &comm;
  st.dtype = s.dtype;
#if MOE_COMM_HAVE_MPI
  if (raw_mpi) st.raw = static_cast<moe::comm::MpiCommunicator&>(comm).mpi_comm();
#endif
  if (s.flags.hierarchical > 0) {
    MOE_ASSIGN_OR_RETURN(st.hierarchical,
                         moe::comm::HierarchicalAllToAll::Create(comm, s.flags.hierarchical));
  }
  const int64_t es = ElemSize(st);
  MOE_ASSIGN_OR_RETURN(st.send, Buffer::Allocate(comm.memory_space(), s.max_bytes));
  MOE_ASSIGN_OR_RETURN(st.recv, Buffer::Allocate(comm.memory_space(), s.max_bytes));
  std::ofstream json;
  if (comm.rank() == 0 && !s.flags.json.empty()) {
    json.open(s.flags.json, std::ios::out | std::ios::trunc);
    if (!json) return moe::IoError("-J " + s.flags.json + ": cannot open for writing");
  }
  if (comm.rank() == 0) PrintHeader(s, comm, baseline_name);
  double busbw_sum = 0;
  int rows = 0;
  for (const int64_t bytes : Sizes(s)) {
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
    MOE_RETURN_IF_ERROR(moe::comm::CopyFromHost(comm.memory_space(), st.send.data(), send.data(),
                                                static_cast<int64_t>(send.size())));

    MOE_ASSIGN_OR_RETURN(const double base_us, TimeLoop(comm, s.flags.warmup, s.flags.iters,
                                                        [&] { return bc.baseline(st, raw_mpi); }));
    MOE_ASSIGN_OR_RETURN(const double time_us,
                         TimeLoop(comm, s.flags.warmup, s.flags.iters, [&] { return bc.run(st); }));
    double wrong = 0;
    if (s.flags.check) {
      HostBytes actual(expected.size());
      MOE_RETURN_IF_ERROR(
          moe::comm::CopyToHost(comm.memory_space(), actual.data(), st.recv.data(), size_bytes));
      MOE_ASSIGN_OR_RETURN(
          wrong,
          ReduceScalar(comm, static_cast<double>(CountWrong(s.dtype, expected, actual, st.count)),
                       moe::comm::ReduceOp::kSum));
    }
    const double algbw = time_us > 0 ? static_cast<double>(size_bytes) / time_us / 1e3 : 0;  // GB/s
    const double busbw = algbw * bc.bus_factor(n);
    busbw_sum += busbw;
    ++rows;
    if (comm.rank() != 0) continue;
    std::printf(" %11lld %12lld %8s %10.1f %8.2f %8.2f %7lld %12.1f %7.2f\n",
                static_cast<long long>(size_bytes), static_cast<long long>(st.count),
                moe::comm::DataTypeName(s.dtype), time_us, algbw, busbw,
                s.flags.check ? static_cast<long long>(wrong) : -1LL, base_us,
                base_us > 0 ? time_us / base_us : 0);
    std::fflush(stdout);
    if (json.is_open()) {
      moe::report::BenchResult r;
      r.set_op(s.flags.op + (s.flags.hierarchical > 0
                                 ? "/hierarchical" + std::to_string(s.flags.hierarchical)
                                 : ""));
      r.set_backend(std::string(comm.backend()));
      r.set_ranks(n);
      r.set_bytes(size_bytes);
      r.set_count(st.count);
      r.set_dtype(moe::comm::DataTypeName(s.dtype));
      r.set_time_us(time_us);
      r.set_algbw_gbps(algbw);
      r.set_busbw_gbps(busbw);
      r.set_wrong(s.flags.check ? static_cast<int64_t>(wrong) : -1);
      r.set_baseline_time_us(base_us);
      r.set_baseline(baseline_name);
      std::string line;
      google::protobuf::util::JsonPrintOptions print;
      print.always_print_primitive_fields = true;  // #wrong = 0 is worth printing
      if (!google::protobuf::util::MessageToJsonString(r, &line, print).ok()) {
        return moe::Internal("JSON conversion failed");
      }
      json << line << "\n";
    }
  }
  if (comm.rank() == 0) {
    std::printf("# Avg bus bandwidth    : %g\n", rows > 0 ? busbw_sum / rows : 0.0);
  }
  return Status::Ok();
}

// ---- flags and backends ------------------------------------------------------------------------

// "64", "1K", "16M", "1G" (binary multiples; an optional trailing B).
StatusOr<int64_t> ParseBytes(const std::string& flag, const std::string& text) {
  std::string t = text;
  if (!t.empty() && (t.back() == 'B' || t.back() == 'b')) t.pop_back();
  int64_t scale = 1;
  if (!t.empty()) {
    switch (t.back()) {
      case 'K':
      case 'k':
        scale = 1LL << 10;
        break;
      case 'M':
      case 'm':
        scale = 1LL << 20;
        break;
      case 'G':
      case 'g':
        scale = 1LL << 30;
        break;
      default:
        break;
    }
    if (scale != 1) t.pop_back();
  }
  if (t.empty() || t.find_first_not_of("0123456789") != std::string::npos || t.size() > 12) {
    return moe::InvalidArgument(flag + "='" + text +
                                "' is not a size (digits with an optional K, M or G suffix)");
  }
  return std::stoll(t) * scale;
}

StatusOr<Settings> Validate(const Flags& f) {
  Settings s;
  s.flags = f;
  MOE_ASSIGN_OR_RETURN(s.min_bytes, ParseBytes("-b/--minbytes", f.min_bytes));
  MOE_ASSIGN_OR_RETURN(s.max_bytes, ParseBytes("-e/--maxbytes", f.max_bytes));
  if (s.min_bytes > s.max_bytes) {
    return moe::InvalidArgument("-b/--minbytes=" + f.min_bytes +
                                " must be <= -e/--maxbytes=" + f.max_bytes);
  }
  MOE_ASSIGN_OR_RETURN(s.dtype, moe::comm::ParseDataType(f.dtype));
  if (f.hierarchical > 0 && f.op != "alltoall" && f.op != "alltoallv") {
    return moe::InvalidArgument("--hierarchical applies to --op alltoall or alltoallv, not " +
                                f.op);
  }
  if (f.op == "allreduce" && s.max_bytes / moe::comm::DataTypeSize(s.dtype) > (1LL << 31) - 1) {
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

int RunLoopback(const Settings& s) {
  moe::comm::LoopbackOptions options;
  options.options.deadline_seconds = s.flags.deadline;
  auto world = moe::comm::LoopbackWorld::Create(s.flags.ranks, options);
  if (!world.ok()) return Report(world.status().WithContext("--ranks"));
  std::vector<Status> results(static_cast<size_t>(s.flags.ranks));
  world->RunPerRank(
      [&](Communicator& comm) { results[static_cast<size_t>(comm.rank())] = BenchRank(comm, s); });
  for (const Status& r : results) {
    if (!r.ok()) return Report(r);
  }
  return 0;
}

#if MOE_COMM_HAVE_MPI
int RunMpi(const Settings& s) {
  MPI_Init(nullptr, nullptr);
  int code = 0;
  {
    moe::comm::Options options;
    options.deadline_seconds = s.flags.deadline;
    auto comm = moe::comm::MpiCommunicator::Create(MPI_COMM_WORLD, options);
    code = comm.ok() ? Report(BenchRank(**comm, s)) : Report(comm.status());
    if (code != 0) MPI_Abort(MPI_COMM_WORLD, code);
  }
  MPI_Finalize();
  return code;
}
#endif

#if MOE_COMM_HAVE_CUDA
int RunNccl(const Settings& s) {
  const int gpus = moe::comm::CudaDeviceCount();
  if (gpus < s.flags.ranks) {
    return Report(moe::FailedPrecondition(
        "--backend nccl --ranks " + std::to_string(s.flags.ranks) + " needs " +
        std::to_string(s.flags.ranks) + " GPUs; found " + std::to_string(gpus)));
  }
  moe::comm::LoopbackOptions bootstrap_options;
  bootstrap_options.options.deadline_seconds = s.flags.deadline;
  auto world = moe::comm::LoopbackWorld::Create(s.flags.ranks, bootstrap_options);
  if (!world.ok()) return Report(world.status());
  std::vector<Status> results(static_cast<size_t>(s.flags.ranks));
  world->RunPerRank([&](Communicator& host) {
    moe::comm::NcclOptions options;
    options.device = host.rank();
    options.options.deadline_seconds = s.flags.deadline;
    (void)cudaSetDevice(host.rank());
    auto comm = moe::comm::NcclCommunicator::Create(host, options);
    results[static_cast<size_t>(host.rank())] = comm.ok() ? BenchRank(**comm, s) : comm.status();
  });
  for (const Status& r : results) {
    if (!r.ok()) return Report(r);
  }
  return 0;
}
#endif

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
  app.add_option("--op", f.op, "alltoall, alltoallv, allreduce, allgather")
      ->check(CLI::IsMember({"alltoall", "alltoallv", "allreduce", "allgather"}));
  app.add_option("--hierarchical", f.hierarchical,
                 "ranks per node for the two-stage all-to-all (0: flat)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--deadline", f.deadline, "deadline of every operation, seconds")
      ->check(CLI::PositiveNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "moe_comm_bench: %s\nRun with --help for the flags.\n", e.what());
    return kUsageError;
  }
  const StatusOr<Settings> settings = Validate(f);
  if (!settings.ok()) return Report(settings.status());
  if (f.backend == "loopback") return RunLoopback(*settings);
  if (f.backend == "mpi") {
#if MOE_COMM_HAVE_MPI
    return RunMpi(*settings);
#else
    return Report(moe::InvalidArgument("--backend mpi: this build has no MPI"));
#endif
  }
#if MOE_COMM_HAVE_CUDA
  return RunNccl(*settings);
#else
  return Report(moe::InvalidArgument("--backend nccl: this build has no CUDA/NCCL"));
#endif
}
