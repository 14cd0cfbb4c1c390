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
// -J writes one JSON line (report.proto BenchResult) per size. Bad flags exit with code 2; any
// #wrong > 0 exits with code 1 after the table.
//
// --op dispatch_combine runs the real expert-parallel path (runtime/ep_executor.h): per rank, a
// probs matrix (S x E, rows sum to 1) is drawn from a seeded RNG with --skew (uniform, zipf:S,
// hot:F), BuildDispatchPlan makes the plan (gate TOPK, --topk, --capacity-factor, min capacity 1),
// and ExpertParallelExecutor::Forward is timed with tiny experts (H = 1). Forward runs through a
// TimedComm that forwards to the benchmarked communicator and stamps the start and end of its two
// float32 row exchanges. Per call: dispatch = Forward start -> end of the first exchange (layout,
// count all-to-all in dropless mode, pack, exchange) + half of the regroup/ungroup time; combine =
// start of the second exchange -> Forward end (exchange, unpack) + the other half. The regroup /
// ungroup time is what lies between the two exchanges minus stats().expert_seconds; the two are
// the same row copies in reverse, hence the even split (the only estimated part). time = dispatch +
// combine (slowest rank of each). baseline = the raw exchange with the executor's own per-peer
// counts (MPI_Alltoallv on MPI, the plain communicator's AllToAll/AllToAllV otherwise), timed in
// both directions and halved; ratio = time / (2 x baseline). Rows: one at --tokens, or with -b/-e
// one per size with tokens = bytes / (k·M·4); size = bytes a rank sends in the dispatch (mean over
// ranks, padding included). -c 1 reruns the plan through identity experts (H = M, W1 = W2 = I,
// ReLU, positive inputs) and counts elements of kept rows that differ from their token's input.
//   moe_comm_bench --backend loopback --ranks 4 --op dispatch_combine --skew hot:0.5 -c 1
#include <google/protobuf/util/json_util.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "comm/algorithms/hierarchical_alltoall.h"
#include "comm/communicator.h"
#include "comm/loopback/loopback_world.h"
#include "comm/memory.h"
#include "proto/report.pb.h"
#include "runtime/base/clock.h"
#include "runtime/base/malloc_tuning.h"
#include "runtime/base/status.h"
#include "runtime/base/tensor.h"
#include "runtime/dispatch_plan.h"
#include "runtime/ep_executor.h"

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
  // --op dispatch_combine
  int64_t tokens = 1024;
  int64_t hidden = 1024;
  int experts = 0;  // 0: 2 per rank
  int top_k = 2;
  double capacity_factor = 1.25;
  bool dropless_exchange = false;
  std::string skew = "uniform";
  uint64_t seed = 1;
  bool tokens_given = false;  // --tokens on the command line
  bool sizes_given = false;   // -b or -e on the command line
};

// --skew, parsed.
struct Skew {
  enum Kind { kUniform, kZipf, kHot } kind = kUniform;
  double param = 0;  // Zipf exponent S, or the hot expert's fraction F of first choices
};

struct Settings {
  Flags flags;
  int64_t min_bytes = 0;
  int64_t max_bytes = 0;
  DataType dtype = DataType::kFloat32;
  Skew skew;
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

Status BenchDispatchCombine(Communicator& comm, const Settings& s);
Status WriteJson(std::ofstream& json, const moe::report::BenchResult& r);

// Runs every size on one rank; rank 0 prints and writes JSON. Fails (exit code 1) after the table
// when -c 1 found wrong elements at any size.
Status BenchRank(Communicator& comm, const Settings& s) {
  if (s.flags.op == "dispatch_combine") return BenchDispatchCombine(comm, s);
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
  int rows = 0, bad_rows = 0;
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
      if (wrong > 0) ++bad_rows;
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
      MOE_RETURN_IF_ERROR(WriteJson(json, r));
    }
  }
  if (comm.rank() == 0) {
    std::printf("# Avg bus bandwidth    : %g\n", rows > 0 ? busbw_sum / rows : 0.0);
  }
  if (bad_rows > 0) {
    return moe::DataLoss(s.flags.op + ": " + std::to_string(bad_rows) +
                         " size(s) with wrong elements");
  }
  return Status::Ok();
}

// ---- --op dispatch_combine ---------------------------------------------------------------------

// A communicator that forwards every call to `inner` and records when each float32 all-to-all(v)
// (the executor's row exchanges; its int64 count exchange is skipped) starts and ends, and its
// per-peer counts, so Forward can be cut into dispatch and combine and the raw exchange replayed.
class TimedComm : public Communicator {
 public:
  struct Exchange {
    double start = 0, end = 0;
    bool equal = false;  // AllToAll (capacity mode): counts all equal to send_counts[0]
    std::vector<int64_t> send_counts, send_displs, recv_counts, recv_displs;  // elements
  };

  explicit TimedComm(Communicator* inner) : Communicator(inner->options()), inner_(inner) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  moe::comm::MemorySpace memory_space() const override { return inner_->memory_space(); }
  std::string_view backend() const override { return inner_->backend(); }

  std::vector<Exchange>& exchanges() { return exchanges_; }

 protected:
  Status DoAllToAll(uint64_t, const void* send, void* recv, int64_t count,
                    DataType dtype) override {
    if (dtype != DataType::kFloat32) return inner_->AllToAll(send, recv, count, dtype);
    Exchange e;
    e.equal = true;
    const int n = size();
    e.send_counts.assign(static_cast<size_t>(n), count);
    e.send_displs.resize(static_cast<size_t>(n));
    for (int p = 0; p < n; ++p) e.send_displs[static_cast<size_t>(p)] = p * count;
    e.recv_counts = e.send_counts;
    e.recv_displs = e.send_displs;
    e.start = moe::WallSeconds();
    const Status st = inner_->AllToAll(send, recv, count, dtype);
    e.end = moe::WallSeconds();
    exchanges_.push_back(std::move(e));
    return st;
  }
  StatusOr<std::unique_ptr<moe::comm::Request>> DoStartAllToAllV(
      uint64_t, const AllToAllVArgs& a) override {
    const bool record = a.dtype == DataType::kFloat32;
    const double start = moe::WallSeconds();
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<moe::comm::Request> inner,
                         inner_->StartAllToAllV(a.send, a.send_counts, a.send_displs, a.recv,
                                                a.recv_counts, a.recv_displs, a.dtype));
    if (!record) return inner;
    Exchange e;
    e.start = start;
    e.send_counts.assign(a.send_counts.begin(), a.send_counts.end());
    e.send_displs.assign(a.send_displs.begin(), a.send_displs.end());
    e.recv_counts.assign(a.recv_counts.begin(), a.recv_counts.end());
    e.recv_displs.assign(a.recv_displs.begin(), a.recv_displs.end());
    exchanges_.push_back(std::move(e));
    return std::unique_ptr<moe::comm::Request>(
        new TimedRequest(std::move(inner), &exchanges_, exchanges_.size() - 1));
  }
  Status DoAllReduce(uint64_t, const void* send, void* recv, int64_t count, DataType dtype,
                     moe::comm::ReduceOp op) override {
    return inner_->AllReduce(send, recv, count, dtype, op);
  }
  Status DoAllGather(uint64_t, const void* send, void* recv, int64_t count,
                     DataType dtype) override {
    return inner_->AllGather(send, recv, count, dtype);
  }
  Status DoBroadcast(uint64_t, void* buffer, int64_t count, DataType dtype, int root) override {
    return inner_->Broadcast(buffer, count, dtype, root);
  }
  Status DoBarrier(uint64_t) override { return inner_->Barrier(); }
  StatusOr<std::unique_ptr<Communicator>> DoSplit(uint64_t, int color, int key) override {
    return inner_->Split(color, key);
  }

 private:
  class TimedRequest : public moe::comm::Request {
   public:
    TimedRequest(std::unique_ptr<moe::comm::Request> inner, std::vector<Exchange>* log,
                 size_t index)
        : inner_(std::move(inner)), log_(log), index_(index) {}
    Status Wait() override {
      const Status st = inner_->Wait();
      (*log_)[index_].end = moe::WallSeconds();
      return st;
    }

   private:
    std::unique_ptr<moe::comm::Request> inner_;
    std::vector<Exchange>* log_;
    size_t index_;
  };

  Communicator* inner_;
  std::vector<Exchange> exchanges_;
};

int NumExperts(const Flags& f, int ranks) { return f.experts > 0 ? f.experts : 2 * ranks; }

// One rank's router probs (S x E, rows sum to 1) with the requested skew, from (seed, rank). The
// k largest entries of a row are its top-k choices, in order: choice j gets weight (k - j) + 1/2
// plus U(0, 1/4), every other expert U(0, 1/4), then the row is normalized.
//   uniform: choices drawn uniformly without replacement;
//   zipf:S:  choices drawn without replacement with P(e) ∝ 1 / (e + 1)^S;
//   hot:F:   first choice is expert 0 with probability F, else uniform over experts 1..E-1; later
//            choices uniform over the experts not yet chosen other than expert 0 (expert 0 only when
//            nothing else is left), so expert 0 gets exactly the fraction F of first choices.
moe::Tensor MakeProbs(const Settings& s, int rank, int64_t tokens, int e, int k) {
  std::mt19937_64 rng(s.flags.seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(rank) * 7919 + 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<double> zipf(static_cast<size_t>(e), 1.0);
  if (s.skew.kind == Skew::kZipf) {
    for (int i = 0; i < e; ++i) zipf[static_cast<size_t>(i)] = std::pow(i + 1.0, -s.skew.param);
  }
  // Draws one expert from `weights` (zeroed for experts already chosen).
  const auto draw = [&](const std::vector<double>& weights) {
    double total = 0;
    for (double w : weights) total += w;
    double u = unit(rng) * total;
    int last = -1;
    for (int i = 0; i < e; ++i) {
      if (weights[static_cast<size_t>(i)] <= 0) continue;
      last = i;
      if (u < weights[static_cast<size_t>(i)]) return i;
      u -= weights[static_cast<size_t>(i)];
    }
    return last;
  };
  moe::Tensor probs(tokens, e);
  std::vector<double> row(static_cast<size_t>(e)), weights(static_cast<size_t>(e));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int i = 0; i < e; ++i) row[static_cast<size_t>(i)] = 0.25 * unit(rng);
    std::vector<bool> taken(static_cast<size_t>(e), false);
    for (int j = 0; j < k; ++j) {
      int pick;
      if (s.skew.kind == Skew::kHot && j == 0) {
        pick = (e == 1 || unit(rng) < s.skew.param) ? 0 : 1 + static_cast<int>(unit(rng) * (e - 1));
        pick = std::min(pick, e - 1);
      } else {
        bool any_other = false;
        for (int i = 0; i < e; ++i) {
          const bool hot_excluded = s.skew.kind == Skew::kHot && i == 0;
          weights[static_cast<size_t>(i)] =
              taken[static_cast<size_t>(i)] || hot_excluded ? 0.0 : zipf[static_cast<size_t>(i)];
          any_other = any_other || weights[static_cast<size_t>(i)] > 0;
        }
        if (!any_other) weights[0] = 1.0;  // hot: only expert 0 is left
        pick = draw(weights);
      }
      taken[static_cast<size_t>(pick)] = true;
      row[static_cast<size_t>(pick)] += (k - j) + 0.5;
    }
    double sum = 0;
    for (double v : row) sum += v;
    for (int i = 0; i < e; ++i) probs(t, i) = static_cast<float>(row[static_cast<size_t>(i)] / sum);
  }
  return probs;
}

StatusOr<moe::DispatchPlan> MakePlan(const Settings& s, int rank, int64_t tokens, int e) {
  moe::config::RouterConfig cfg;
  cfg.set_gate(moe::config::TOPK);
  cfg.set_top_k(s.flags.top_k);
  cfg.set_capacity_factor_train(s.flags.capacity_factor);
  cfg.set_capacity_factor_eval(s.flags.capacity_factor);
  cfg.set_min_capacity(1);
  moe::RouteContext ctx;
  ctx.train = true;
  ctx.seed = s.flags.seed;
  const moe::Tensor probs = MakeProbs(s, rank, tokens, e, s.flags.top_k);
  return moe::BuildDispatchPlan(cfg, probs, {}, ctx);
}

// Positive, exact (small integer) input of token t, column c on `rank`.
float TokenValue(int rank, int64_t t, int64_t c) {
  return static_cast<float>(1 + (rank * 131 + t * 17 + c * 7) % 97);
}

// combine(dispatch(x)) through identity experts (H = M, W1 = W2 = I, no bias, ReLU on positive
// inputs): returns the elements of the kept rows that differ from their token's row of x.
StatusOr<int64_t> CheckDispatchCombine(Communicator& comm, const Settings& s,
                                       const moe::DispatchPlan& plan, int e) {
  const int64_t m = s.flags.hidden;
  moe::experts::FfnShape shape;
  shape.model_dim = m;
  shape.hidden_dim = m;
  shape.activation = moe::experts::Activation::kRelu;
  shape.bias = false;
  moe::ExpertParallelExecutor exec(&comm, shape, e, s.flags.dropless_exchange);
  std::vector<moe::experts::FfnParams> experts;
  for (int i = 0; i < e / comm.size(); ++i) {
    moe::experts::FfnParams p = moe::experts::FfnParams::Zeros(shape);
    for (int64_t j = 0; j < m; ++j) {
      p.w1(j, j) = 1.0f;
      p.w2(j, j) = 1.0f;
    }
    experts.push_back(std::move(p));
  }
  moe::Tensor packed_x(plan.num_rows(), m), packed_y;
  for (int64_t r = 0; r < plan.num_rows(); ++r) {
    for (int64_t c = 0; c < m; ++c) packed_x(r, c) = TokenValue(comm.rank(), plan.row_token[r], c);
  }
  MOE_RETURN_IF_ERROR(exec.Forward(plan, packed_x.view(), experts, &packed_y));
  if (packed_y.rows() != plan.num_rows() || packed_y.cols() != m) {
    return plan.num_rows() * m;
  }
  int64_t wrong = 0;
  for (int64_t r = 0; r < plan.num_rows(); ++r) {
    for (int64_t c = 0; c < m; ++c) {
      if (packed_y(r, c) != TokenValue(comm.rank(), plan.row_token[r], c)) ++wrong;
    }
  }
  return wrong;
}

// The raw exchange with the executor's per-peer counts: MPI_Alltoallv on MPI, otherwise the plain
// communicator's AllToAll (capacity mode) or AllToAllV (dropless), as the executor calls it.
Status RawExchange(Communicator& comm, bool raw_mpi, [[maybe_unused]] const RankState& st,
                   const TimedComm::Exchange& x, const float* send, float* recv) {
#if MOE_COMM_HAVE_MPI
  if (raw_mpi) {
    const auto ints = [](const std::vector<int64_t>& v, std::vector<int>& out) {
      out.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        if (v[i] > std::numeric_limits<int>::max()) return false;
        out[i] = static_cast<int>(v[i]);
      }
      return true;
    };
    std::vector<int> sc, sd, rc, rd;
    if (!ints(x.send_counts, sc) || !ints(x.send_displs, sd) || !ints(x.recv_counts, rc) ||
        !ints(x.recv_displs, rd)) {
      return moe::InvalidArgument("dispatch_combine: exchange too large for MPI_Alltoallv");
    }
    return MpiResult(MPI_Alltoallv(send, sc.data(), sd.data(), MPI_FLOAT, recv, rc.data(), rd.data(),
                                   MPI_FLOAT, st.raw),
                     "MPI_Alltoallv");
  }
#endif
  (void)raw_mpi;
  if (x.equal) return comm.AllToAll(send, recv, x.send_counts.empty() ? 0 : x.send_counts[0],
                                    DataType::kFloat32);
  return comm.AllToAllV(send, x.send_counts, x.send_displs, recv, x.recv_counts, x.recv_displs,
                        DataType::kFloat32);
}

int64_t SumCounts(const std::vector<int64_t>& v) {
  int64_t total = 0;
  for (int64_t x : v) total += x;
  return total;
}

// Token counts of the rows: -b..-e given -> tokens = bytes / (k · M · 4) (at least 1) per size,
// else the one --tokens.
std::vector<int64_t> TokenSizes(const Settings& s) {
  if (!s.flags.sizes_given) return {s.flags.tokens};
  std::vector<int64_t> out;
  const int64_t per_token = static_cast<int64_t>(s.flags.top_k) * s.flags.hidden * 4;
  for (const int64_t b : Sizes(s)) {
    const int64_t t = std::max<int64_t>(1, b / per_token);
    if (out.empty() || out.back() != t) out.push_back(t);
  }
  return out;
}

Status WriteJson(std::ofstream& json, const moe::report::BenchResult& r) {
  std::string line;
  google::protobuf::util::JsonPrintOptions print;
  print.always_print_primitive_fields = true;  // #wrong = 0 is worth printing
  if (!google::protobuf::util::MessageToJsonString(r, &line, print).ok()) {
    return moe::Internal("JSON conversion failed");
  }
  json << line << "\n";
  return Status::Ok();
}

Status BenchDispatchCombine(Communicator& comm, const Settings& s) {
  const int n = comm.size();
  const int e = NumExperts(s.flags, n);
  const bool raw_mpi = comm.backend() == "mpi";
  const char* baseline_name = raw_mpi ? "MPI_Alltoallv" : "raw_alltoallv";
  RankState st;
  st.comm = &comm;
#if MOE_COMM_HAVE_MPI
  if (raw_mpi) st.raw = static_cast<moe::comm::MpiCommunicator&>(comm).mpi_comm();
#endif
  std::ofstream json;
  if (comm.rank() == 0 && !s.flags.json.empty()) {
    json.open(s.flags.json, std::ios::out | std::ios::trunc);
    if (!json) return moe::IoError("-J " + s.flags.json + ": cannot open for writing");
  }
  const bool dropless_routing = s.flags.capacity_factor <= 0;
  if (comm.rank() == 0) {
    std::printf(
        "# moe_comm_bench: op dispatch_combine, backend %s, %d ranks, memory %s, dtype float32, "
        "iters %d, warmup %d, check %d\n",
        std::string(comm.backend()).c_str(), n, moe::comm::MemorySpaceName(comm.memory_space()),
        s.flags.iters, s.flags.warmup, s.flags.check);
    std::printf(
        "# hidden M %lld, experts E %d (%d per rank), top-k %d, capacity factor %g (%s), exchange "
        "%s, skew %s, seed %llu\n",
        static_cast<long long>(s.flags.hidden), e, e / n, s.flags.top_k, s.flags.capacity_factor,
        dropless_routing ? "dropless" : "capacity",
        s.flags.dropless_exchange || dropless_routing ? "dropless (counts + alltoallv)"
                                                      : "padded (alltoall)",
        s.flags.skew.c_str(), static_cast<unsigned long long>(s.flags.seed));
    std::printf(
        "# size = bytes sent per rank in the dispatch (mean over ranks); count = its float32 "
        "elements; time = dispatch + combine;\n# baseline = %s of the same per-peer counts (mean of "
        "the dispatch and combine directions); ratio = time / (2 x baseline)\n",
        baseline_name);
    std::printf("#%11s %12s %8s %7s %10s %10s %10s %8s %8s %7s %12s %7s\n", "size", "count",
                "type", "tokens", "dispatch", "combine", "time", "algbw", "busbw", "#wrong",
                "baseline", "ratio");
    std::printf("#%11s %12s %8s %7s %10s %10s %10s %8s %8s %7s %12s %7s\n", "(B)", "(elements)", "",
                "(/rank)", "(us)", "(us)", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "");
  }
  // The timed executor runs tiny experts (H = 1, no bias); their time, from stats(), is removed.
  moe::experts::FfnShape tiny;
  tiny.model_dim = s.flags.hidden;
  tiny.hidden_dim = 1;
  tiny.activation = moe::experts::Activation::kRelu;
  tiny.bias = false;
  std::vector<moe::experts::FfnParams> tiny_experts(static_cast<size_t>(e / n),
                                                    moe::experts::FfnParams::Zeros(tiny));
  double busbw_sum = 0;
  int rows = 0, bad_rows = 0;
  for (const int64_t tokens : TokenSizes(s)) {
    MOE_ASSIGN_OR_RETURN(const moe::DispatchPlan plan, MakePlan(s, comm.rank(), tokens, e));
    TimedComm timed(&comm);
    moe::ExpertParallelExecutor exec(&timed, tiny, e, s.flags.dropless_exchange);
    moe::Tensor packed_x(plan.num_rows(), s.flags.hidden), packed_y;
    for (int64_t r = 0; r < plan.num_rows(); ++r) {
      for (int64_t c = 0; c < s.flags.hidden; ++c)
        packed_x(r, c) = TokenValue(comm.rank(), plan.row_token[r], c);
    }
    double dispatch_s = 0, combine_s = 0;
    const auto forward = [&](bool timed_iter) -> Status {
      timed.exchanges().clear();
      const double expert0 = exec.stats().expert_seconds;
      const double t0 = moe::WallSeconds();
      MOE_RETURN_IF_ERROR(exec.Forward(plan, packed_x.view(), tiny_experts, &packed_y));
      const double t3 = moe::WallSeconds();
      const auto& x = timed.exchanges();
      if (x.size() != 2) return moe::Internal("dispatch_combine: expected 2 row exchanges per Forward");
      const double expert = exec.stats().expert_seconds - expert0;
      // Between the two exchanges: regroup (dispatch), experts, ungroup (combine). Regroup and
      // ungroup are the same row copies in reverse, so each gets half of what the experts leave.
      const double half = std::max(0.0, x[1].start - x[0].end - expert) / 2;
      if (timed_iter) {
        dispatch_s += x[0].end - t0 + half;
        combine_s += t3 - x[1].start + half;
      }
      return Status::Ok();
    };
    for (int i = 0; i < s.flags.warmup; ++i) MOE_RETURN_IF_ERROR(forward(false));
    MOE_RETURN_IF_ERROR(comm.Barrier());
    for (int i = 0; i < s.flags.iters; ++i) MOE_RETURN_IF_ERROR(forward(true));
    if (s.flags.warmup + s.flags.iters == 0 || timed.exchanges().size() != 2) {
      return moe::Internal("dispatch_combine: no exchange recorded");
    }
    MOE_ASSIGN_OR_RETURN(const double dispatch_us,
                         ReduceScalar(comm, dispatch_s * 1e6 / s.flags.iters, moe::comm::ReduceOp::kMax));
    MOE_ASSIGN_OR_RETURN(const double combine_us,
                         ReduceScalar(comm, combine_s * 1e6 / s.flags.iters, moe::comm::ReduceOp::kMax));
    // The raw baseline: the same two exchanges (dispatch direction, then combine direction).
    const TimedComm::Exchange fwd = timed.exchanges()[0], back = timed.exchanges()[1];
    const int64_t send_elems = SumCounts(fwd.send_counts), recv_elems = SumCounts(fwd.recv_counts);
    std::vector<float> raw_send(static_cast<size_t>(std::max<int64_t>(send_elems, 1)), 1.0f),
        raw_recv(static_cast<size_t>(std::max<int64_t>(recv_elems, 1)));
    MOE_ASSIGN_OR_RETURN(const double raw_pair_us,
                         TimeLoop(comm, s.flags.warmup, s.flags.iters, [&]() -> Status {
                           MOE_RETURN_IF_ERROR(RawExchange(comm, raw_mpi, st, fwd, raw_send.data(),
                                                           raw_recv.data()));
                           return RawExchange(comm, raw_mpi, st, back, raw_recv.data(),
                                              raw_send.data());
                         }));
    const double base_us = raw_pair_us / 2;
    double wrong = 0;
    if (s.flags.check) {
      MOE_ASSIGN_OR_RETURN(const int64_t mine, CheckDispatchCombine(comm, s, plan, e));
      MOE_ASSIGN_OR_RETURN(wrong, ReduceScalar(comm, static_cast<double>(mine),
                                               moe::comm::ReduceOp::kSum));
      if (wrong > 0) ++bad_rows;
    }
    MOE_ASSIGN_OR_RETURN(const double sent_sum,
                         ReduceScalar(comm, static_cast<double>(send_elems * 4), moe::comm::ReduceOp::kSum));
    const auto size_bytes = static_cast<int64_t>(sent_sum / n + 0.5);
    const double time_us = dispatch_us + combine_us;
    const double algbw = time_us > 0 ? 2.0 * static_cast<double>(size_bytes) / time_us / 1e3 : 0;
    const double busbw = algbw * AllToAllFactor(n);
    const double ratio = base_us > 0 ? time_us / (2 * base_us) : 0;
    busbw_sum += busbw;
    ++rows;
    if (comm.rank() != 0) continue;
    std::printf(" %11lld %12lld %8s %7lld %10.1f %10.1f %10.1f %8.2f %8.2f %7lld %12.1f %7.2f\n",
                static_cast<long long>(size_bytes), static_cast<long long>(size_bytes / 4),
                "float32", static_cast<long long>(tokens), dispatch_us, combine_us, time_us, algbw,
                busbw, s.flags.check ? static_cast<long long>(wrong) : -1LL, base_us, ratio);
    std::fflush(stdout);
    if (json.is_open()) {
      moe::report::BenchResult r;
      r.set_op("dispatch_combine");
      r.set_backend(std::string(comm.backend()));
      r.set_ranks(n);
      r.set_bytes(size_bytes);
      r.set_count(size_bytes / 4);
      r.set_dtype("float32");
      r.set_time_us(time_us);
      r.set_algbw_gbps(algbw);
      r.set_busbw_gbps(busbw);
      r.set_wrong(s.flags.check ? static_cast<int64_t>(wrong) : -1);
      r.set_baseline_time_us(base_us);
      r.set_baseline("raw_alltoallv");
      MOE_RETURN_IF_ERROR(WriteJson(json, r));
    }
  }
  if (comm.rank() == 0) {
    std::printf("# Avg bus bandwidth    : %g\n", rows > 0 ? busbw_sum / rows : 0.0);
  }
  if (bad_rows > 0) {
    return moe::DataLoss("dispatch_combine: " + std::to_string(bad_rows) +
                         " size(s) with wrong elements");
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

StatusOr<Skew> ParseSkew(const std::string& text) {
  Skew skew;
  if (text == "uniform") return skew;
  const auto colon = text.find(':');
  const std::string kind = text.substr(0, colon);
  if (colon != std::string::npos && (kind == "zipf" || kind == "hot")) {
    const std::string value = text.substr(colon + 1);
    char* end = nullptr;
    const double v = std::strtod(value.c_str(), &end);
    if (!value.empty() && end == value.c_str() + value.size() && std::isfinite(v)) {
      if (kind == "zipf" && v > 0) return Skew{Skew::kZipf, v};
      if (kind == "hot" && v >= 0 && v <= 1) return Skew{Skew::kHot, v};
    }
  }
  return moe::InvalidArgument("--skew='" + text +
                              "' must be uniform, zipf:S (S > 0) or hot:F (0 <= F <= 1)");
}

// E divisible by the ranks, k <= E.
Status CheckExperts(const Flags& f, int ranks) {
  const int e = NumExperts(f, ranks);
  if (e % ranks != 0) {
    return moe::InvalidArgument("--experts=" + std::to_string(e) + " must be divisible by the " +
                                std::to_string(ranks) + " ranks");
  }
  if (f.top_k > e) {
    return moe::InvalidArgument("--topk=" + std::to_string(f.top_k) + " must be <= the " +
                                std::to_string(e) + " experts");
  }
  return Status::Ok();
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
  if (f.op == "dispatch_combine") {
    MOE_ASSIGN_OR_RETURN(s.skew, ParseSkew(f.skew));
    if (s.dtype != DataType::kFloat32) {
      return moe::InvalidArgument("--op dispatch_combine moves float32 rows; -d must be float32");
    }
    if (f.backend == "nccl") {
      return moe::InvalidArgument("--op dispatch_combine runs the host executor: use --backend "
                                  "mpi or loopback");
    }
    if (f.tokens_given && f.sizes_given) {
      return moe::InvalidArgument("--op dispatch_combine: give either --tokens or -b/-e, not both");
    }
    const int ranks = f.backend == "loopback" ? f.ranks : 0;  // MPI: checked once the size is known
    if (f.experts < 0) return moe::InvalidArgument("--experts must be >= 0 (0: 2 per rank)");
    if (f.top_k < 1) return moe::InvalidArgument("--topk must be >= 1");
    if (ranks > 0) {
      MOE_RETURN_IF_ERROR(CheckExperts(f, ranks));
    }
  } else if (f.tokens_given || f.hidden != Flags().hidden || f.experts != 0 ||
             f.top_k != Flags().top_k || f.capacity_factor != Flags().capacity_factor ||
             f.dropless_exchange || f.skew != "uniform") {
    return moe::InvalidArgument("--tokens, --hidden, --experts, --topk, --capacity-factor, "
                                "--dropless-exchange and --skew apply to --op dispatch_combine");
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
  moe::KeepStepBuffersOnHeap();  // one rank per process (see malloc_tuning.h)
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
  app.add_option("--op", f.op, "alltoall, alltoallv, allreduce, allgather, dispatch_combine")
      ->check(CLI::IsMember({"alltoall", "alltoallv", "allreduce", "allgather", "dispatch_combine"}));
  app.add_option("--tokens", f.tokens, "dispatch_combine: tokens per rank (one row; default 1024)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  app.add_option("--hidden", f.hidden, "dispatch_combine: model dim M (floats per token row)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--experts", f.experts, "dispatch_combine: experts E (0: 2 per rank)");
  app.add_option("--topk", f.top_k, "dispatch_combine: experts per token k");
  app.add_option("--capacity-factor", f.capacity_factor,
                 "dispatch_combine: capacity factor (<= 0: dropless routing)");
  app.add_flag("--dropless-exchange", f.dropless_exchange,
               "dispatch_combine: counts + alltoallv instead of the padded alltoall");
  app.add_option("--skew", f.skew, "dispatch_combine: uniform, zipf:S or hot:F");
  app.add_option("--seed", f.seed, "dispatch_combine: routing seed");
  app.add_option("--hierarchical", f.hierarchical,
                 "ranks per node for the two-stage all-to-all (0: flat)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--deadline", f.deadline, "deadline of every operation, seconds")
      ->check(CLI::PositiveNumber);
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
