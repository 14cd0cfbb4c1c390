// The communicator conformance cases, one suite for every backend (tests/comm/conformance_cases.h).
#include "tests/comm/conformance_cases.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <numeric>

#include "comm/algorithms/hierarchical_alltoall.h"
#include "base/check.h"
#include "tests/comm/test_buffers.h"

namespace moe::comm::testing {
namespace {

// Large cases move at least this much in total per call (all ranks together).
constexpr int64_t kLargeTotalBytes = 64LL << 20;

std::string Where(const Communicator& comm, const std::string& what) {
  return "rank " + std::to_string(comm.rank()) + "/" + std::to_string(comm.size()) + " " + what;
}

// ---- all-to-all with equal counts --------------------------------------------------------------

void CheckAllToAll(Communicator& comm, DataType dtype, int64_t count) {
  const int n = comm.size();
  const int me = comm.rank();
  const int64_t block = count * DataTypeSize(dtype);
  Bytes send, expected;
  for (int p = 0; p < n; ++p) {
    const Bytes out = Pattern(dtype, count, me, p);
    send.insert(send.end(), out.begin(), out.end());
    const Bytes in = Pattern(dtype, count, p, me);
    expected.insert(expected.end(), in.begin(), in.end());
  }
  const Buffer send_buf = Upload(comm.memory_space(), send);
  const Buffer recv_buf = Poisoned(comm.memory_space(), block * n);
  const Status status = comm.AllToAll(send_buf.data(), recv_buf.data(), count, dtype);
  const std::string what =
      std::string("alltoall ") + DataTypeName(dtype) + " count=" + std::to_string(count);
  ASSERT_TRUE(status.ok()) << Where(comm, what) << ": " << status.ToString();
  EXPECT_EQ(CompareBytes(expected, Download(recv_buf)), "") << Where(comm, what);
}

void AllToAllEveryDtype(Communicator& comm) {
  for (const DataType dtype : kAllDataTypes) {
    for (const int64_t count : {0, 1, 5, 1000}) CheckAllToAll(comm, dtype, count);
  }
}

// ---- all-to-all with per-peer counts -----------------------------------------------------------

using CountFn = std::function<int64_t(int src, int dst)>;

struct VLayout {
  std::vector<int64_t> send_counts, send_displs, recv_counts, recv_displs;
  int64_t send_elems = 0, recv_elems = 0;
};

// Send blocks in peer order with a gap of `gap` elements after each; receive blocks in reverse
// peer order, also with gaps, so displacements matter.
VLayout MakeLayout(const Communicator& comm, const CountFn& counts, int64_t gap) {
  const int n = comm.size();
  const int me = comm.rank();
  VLayout v;
  v.send_counts.resize(static_cast<size_t>(n));
  v.send_displs.resize(static_cast<size_t>(n));
  v.recv_counts.resize(static_cast<size_t>(n));
  v.recv_displs.resize(static_cast<size_t>(n));
  for (int p = 0; p < n; ++p) {
    v.send_counts[static_cast<size_t>(p)] = counts(me, p);
    v.send_displs[static_cast<size_t>(p)] = v.send_elems;
    v.send_elems += counts(me, p) + gap;
  }
  for (int p = n - 1; p >= 0; --p) {
    v.recv_counts[static_cast<size_t>(p)] = counts(p, me);
    v.recv_displs[static_cast<size_t>(p)] = v.recv_elems;
    v.recv_elems += counts(p, me) + gap;
  }
  return v;
}

struct VData {
  VLayout layout;
  Buffer send, recv;
  Bytes expected;
};

VData PrepareV(const Communicator& comm, DataType dtype, const CountFn& counts, int64_t gap) {
  const int64_t es = DataTypeSize(dtype);
  VData d;
  d.layout = MakeLayout(comm, counts, gap);
  const VLayout& v = d.layout;
  Bytes send(static_cast<size_t>(v.send_elems * es), 0xAB);
  d.expected.assign(static_cast<size_t>(v.recv_elems * es), 0xEE);
  for (int p = 0; p < comm.size(); ++p) {
    const auto pi = static_cast<size_t>(p);
    FillPattern(dtype, send.data() + v.send_displs[pi] * es, v.send_counts[pi], comm.rank(), p);
    FillPattern(dtype, d.expected.data() + v.recv_displs[pi] * es, v.recv_counts[pi], p,
                comm.rank());
  }
  d.send = Upload(comm.memory_space(), send);
  d.recv = Poisoned(comm.memory_space(), v.recv_elems * es);
  return d;
}

void CheckAllToAllV(Communicator& comm, DataType dtype, const CountFn& counts, int64_t gap,
                    const std::string& what) {
  const VData d = PrepareV(comm, dtype, counts, gap);
  const VLayout& v = d.layout;
  const Status status = comm.AllToAllV(d.send.data(), v.send_counts, v.send_displs, d.recv.data(),
                                       v.recv_counts, v.recv_displs, dtype);
  const std::string label = "alltoallv " + what + " " + DataTypeName(dtype);
  ASSERT_TRUE(status.ok()) << Where(comm, label) << ": " << status.ToString();
  EXPECT_EQ(CompareBytes(d.expected, Download(d.recv)), "") << Where(comm, label);
}

int64_t VariedCount(int src, int dst) { return (src * 3 + dst * 5 + 1) % 4; }

void AllToAllVSkewed(Communicator& comm) {
  const int n = comm.size();
  for (const DataType dtype : kAllDataTypes) {
    CheckAllToAllV(comm, dtype, VariedCount, 1, "varied");
    // One peer gets everything, the others nothing.
    CheckAllToAllV(
        comm, dtype, [](int, int dst) -> int64_t { return dst == 0 ? 50 : 0; }, 0, "all-to-rank-0");
    // Only the last rank sends.
    CheckAllToAllV(
        comm, dtype, [n](int src, int dst) -> int64_t { return src == n - 1 ? 20 + dst : 0; }, 2,
        "only-last-sends");
    CheckAllToAllV(
        comm, dtype, [](int, int) -> int64_t { return 0; }, 0, "all-empty");
  }
}

void AsyncAllToAllV(Communicator& comm) {
  const DataType dtype = DataType::kFloat32;
  VData a = PrepareV(comm, dtype, VariedCount, 1);
  VData b = PrepareV(
      comm, dtype, [](int src, int dst) -> int64_t { return 3 + src + 2 * dst; }, 0);
  auto first =
      comm.StartAllToAllV(a.send.data(), a.layout.send_counts, a.layout.send_displs, a.recv.data(),
                          a.layout.recv_counts, a.layout.recv_displs, dtype);
  ASSERT_TRUE(first.ok()) << Where(comm, first.status().ToString());
  auto second =
      comm.StartAllToAllV(b.send.data(), b.layout.send_counts, b.layout.send_displs, b.recv.data(),
                          b.layout.recv_counts, b.layout.recv_displs, dtype);
  ASSERT_TRUE(second.ok()) << Where(comm, second.status().ToString());
  // "Compute" while the exchanges are in flight.
  volatile double sink = 0;
  for (int i = 0; i < 100000; ++i) sink = sink + i * 0.5;
  const Status done_first = (*first)->Wait();
  const Status done_second = (*second)->Wait();
  ASSERT_TRUE(done_first.ok()) << Where(comm, done_first.ToString());
  ASSERT_TRUE(done_second.ok()) << Where(comm, done_second.ToString());
  EXPECT_EQ(CompareBytes(a.expected, Download(a.recv)), "") << Where(comm, "first request");
  EXPECT_EQ(CompareBytes(b.expected, Download(b.recv)), "") << Where(comm, "second request");
}

// Stream ordering (comm/communicator.h, Request). Device memory: the send rows are written by a copy queued on a
// stream, the all-to-all is told to start after it, the stream waits for its completion and then
// copies the received rows out — the host synchronizes only at the end. Host memory: both hooks
// are rejected with kInvalidArgument and the plain calls keep their semantics.
void StreamOrderedAllToAllV(Communicator& comm) {
  const DataType dtype = DataType::kFloat32;
  VData d = PrepareV(comm, dtype, VariedCount, 1);
  const VLayout& v = d.layout;
  const int64_t es = DataTypeSize(dtype);
  if (comm.memory_space() == MemorySpace::kHost) {
    int fake_stream = 0;
    auto refused = comm.StartAllToAllV(d.send.data(), v.send_counts, v.send_displs, d.recv.data(),
                                       v.recv_counts, v.recv_displs, dtype, &fake_stream);
    EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument) << Where(comm, "after");
    auto request = comm.StartAllToAllV(d.send.data(), v.send_counts, v.send_displs, d.recv.data(),
                                       v.recv_counts, v.recv_displs, dtype);
    ASSERT_TRUE(request.ok()) << Where(comm, request.status().ToString());
    EXPECT_EQ((*request)->Then(nullptr).code(), StatusCode::kInvalidArgument)
        << Where(comm, "Then on host memory");
    const Status done = (*request)->Wait();
    ASSERT_TRUE(done.ok()) << Where(comm, done.ToString());
    EXPECT_EQ(CompareBytes(d.expected, Download(d.recv)), "") << Where(comm, "host alltoallv");
    return;
  }
  auto stream = Stream::Create();
  ASSERT_TRUE(stream.ok()) << Where(comm, stream.status().ToString());
  // The send rows reach the send buffer only through the stream.
  auto send = Buffer::Allocate(MemorySpace::kDevice, std::max<int64_t>(v.send_elems * es, 1));
  auto out = Buffer::Allocate(MemorySpace::kDevice, std::max<int64_t>(v.recv_elems * es, 1));
  ASSERT_TRUE(send.ok() && out.ok());
  ASSERT_TRUE(
      CopyBytesAsync(send->data(), d.send.data(), v.send_elems * es, stream->handle()).ok());
  auto request = comm.StartAllToAllV(send->data(), v.send_counts, v.send_displs, d.recv.data(),
                                     v.recv_counts, v.recv_displs, dtype, stream->handle());
  ASSERT_TRUE(request.ok()) << Where(comm, request.status().ToString());
  const Status then = (*request)->Then(stream->handle());
  ASSERT_TRUE(then.ok()) << Where(comm, then.ToString());
  ASSERT_TRUE(CopyBytesAsync(out->data(), d.recv.data(), v.recv_elems * es, stream->handle()).ok());
  ASSERT_TRUE(stream->Synchronize().ok());
  const Status done = (*request)->Wait();
  ASSERT_TRUE(done.ok()) << Where(comm, done.ToString());
  Bytes got(static_cast<size_t>(v.recv_elems * es));
  ASSERT_TRUE(CopyToHost(MemorySpace::kDevice, got.data(), out->data(), v.recv_elems * es).ok());
  EXPECT_EQ(CompareBytes(d.expected, got), "") << Where(comm, "stream-ordered alltoallv");
}

// ---- all-reduce --------------------------------------------------------------------------------

double ReduceInput(int rank, int64_t i) { return static_cast<double>((rank * 13 + i * 5) % 31); }

void CheckAllReduce(Communicator& comm, DataType dtype, ReduceOp op, int64_t count, bool in_place) {
  const int64_t es = DataTypeSize(dtype);
  Bytes input(static_cast<size_t>(count * es)), expected(static_cast<size_t>(count * es));
  for (int64_t i = 0; i < count; ++i) {
    SetElement(dtype, input.data(), i, ReduceInput(comm.rank(), i));
    double acc = ReduceInput(0, i);
    for (int r = 1; r < comm.size(); ++r) {
      const double x = ReduceInput(r, i);
      acc = op == ReduceOp::kSum   ? acc + x
            : op == ReduceOp::kMax ? std::max(acc, x)
                                   : std::min(acc, x);
    }
    SetElement(dtype, expected.data(), i, acc);
  }
  const Buffer send = Upload(comm.memory_space(), input);
  const Buffer recv = Poisoned(comm.memory_space(), count * es);
  const Buffer& out = in_place ? send : recv;
  const Status status = comm.AllReduce(send.data(), out.data(), count, dtype, op);
  const std::string what = std::string("allreduce ") + ReduceOpName(op) + " " +
                           DataTypeName(dtype) + " count=" + std::to_string(count) +
                           (in_place ? " in place" : "");
  ASSERT_TRUE(status.ok()) << Where(comm, what) << ": " << status.ToString();
  EXPECT_EQ(CompareBytes(expected, Download(out)), "") << Where(comm, what);
}

void AllReduceEveryDtypeAndOp(Communicator& comm) {
  for (const DataType dtype : kAllDataTypes) {
    for (const ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
      for (const int64_t count : {0, 1, 1000}) {
        CheckAllReduce(comm, dtype, op, count, /*in_place=*/false);
      }
      CheckAllReduce(comm, dtype, op, 257, /*in_place=*/true);
    }
  }
}

// ---- all-gather, broadcast, barrier -----------------------------------------------------------

void CheckAllGather(Communicator& comm, DataType dtype, int64_t count) {
  Bytes expected;
  for (int p = 0; p < comm.size(); ++p) {
    const Bytes block = Pattern(dtype, count, p, 0);
    expected.insert(expected.end(), block.begin(), block.end());
  }
  const Buffer send = Upload(comm.memory_space(), Pattern(dtype, count, comm.rank(), 0));
  const Buffer recv = Poisoned(comm.memory_space(), count * DataTypeSize(dtype) * comm.size());
  const Status status = comm.AllGather(send.data(), recv.data(), count, dtype);
  const std::string what =
      std::string("allgather ") + DataTypeName(dtype) + " count=" + std::to_string(count);
  ASSERT_TRUE(status.ok()) << Where(comm, what) << ": " << status.ToString();
  EXPECT_EQ(CompareBytes(expected, Download(recv)), "") << Where(comm, what);
}

void AllGatherEveryDtype(Communicator& comm) {
  for (const DataType dtype : kAllDataTypes) {
    for (const int64_t count : {0, 3, 1000}) CheckAllGather(comm, dtype, count);
  }
}

void BroadcastEveryRoot(Communicator& comm) {
  for (const DataType dtype : kAllDataTypes) {
    for (int root = 0; root < comm.size(); ++root) {
      for (const int64_t count : {0, 17}) {
        const Bytes expected = Pattern(dtype, count, root, 99);
        const Buffer buf = comm.rank() == root
                               ? Upload(comm.memory_space(), expected)
                               : Poisoned(comm.memory_space(), count * DataTypeSize(dtype));
        const Status status = comm.Broadcast(buf.data(), count, dtype, root);
        const std::string what = std::string("broadcast ") + DataTypeName(dtype) +
                                 " root=" + std::to_string(root) +
                                 " count=" + std::to_string(count);
        ASSERT_TRUE(status.ok()) << Where(comm, what) << ": " << status.ToString();
        EXPECT_EQ(CompareBytes(expected, Download(buf)), "") << Where(comm, what);
      }
    }
  }
}

void BarrierRepeated(Communicator& comm) {
  for (int i = 0; i < 20; ++i) {
    const Status status = comm.Barrier();
    ASSERT_TRUE(status.ok()) << Where(comm, "barrier " + std::to_string(i)) << ": "
                             << status.ToString();
  }
}

// ---- zero-length messages and argument validation ----------------------------------------------

void ZeroLengthWithNullBuffers(Communicator& comm) {
  const int n = comm.size();
  const std::vector<int64_t> zeros(static_cast<size_t>(n), 0);
  for (const DataType dtype : kAllDataTypes) {
    EXPECT_TRUE(comm.AllToAll(nullptr, nullptr, 0, dtype).ok()) << Where(comm, "alltoall");
    EXPECT_TRUE(comm.AllToAllV(nullptr, zeros, zeros, nullptr, zeros, zeros, dtype).ok())
        << Where(comm, "alltoallv");
    EXPECT_TRUE(comm.AllReduce(nullptr, nullptr, 0, dtype, ReduceOp::kSum).ok())
        << Where(comm, "allreduce");
    EXPECT_TRUE(comm.AllGather(nullptr, nullptr, 0, dtype).ok()) << Where(comm, "allgather");
    EXPECT_TRUE(comm.Broadcast(nullptr, 0, dtype, n - 1).ok()) << Where(comm, "broadcast");
  }
}

void ExpectInvalid(const Communicator& comm, const Status& status, const std::string& needle) {
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument) << Where(comm, status.ToString());
  EXPECT_NE(status.message().find(needle), std::string::npos)
      << Where(comm, "message '" + status.message() + "' lacks '" + needle + "'");
}

// Argument errors are detected before any communication, identically on every rank.
void InvalidArgumentsRejected(Communicator& comm) {
  const int n = comm.size();
  std::vector<int64_t> ok(static_cast<size_t>(n), 1), displs(static_cast<size_t>(n), 0);
  std::vector<int64_t> short_counts(static_cast<size_t>(n + 1), 1);
  std::vector<int64_t> negative = ok;
  negative[0] = -2;
  const Buffer buf = Poisoned(comm.memory_space(), 64 * n);
  void* p = buf.data();
  const DataType u8 = DataType::kUint8;
  ExpectInvalid(comm, comm.AllToAll(p, p, -1, u8), "alltoall: count=-1 must be >= 0");
  ExpectInvalid(comm, comm.AllToAll(nullptr, p, 4, u8), "alltoall: send buffer is null");
  ExpectInvalid(comm, comm.AllToAllV(p, short_counts, displs, p, ok, displs, u8),
                "alltoallv: send_counts has " + std::to_string(n + 1) + " entries");
  ExpectInvalid(comm, comm.AllToAllV(p, ok, displs, p, negative, displs, u8),
                "alltoallv: recv_counts[0]=-2 must be >= 0");
  ExpectInvalid(comm, comm.AllToAllV(p, ok, negative, p, ok, displs, u8),
                "alltoallv: send_displs[0]=-2 must be >= 0");
  ExpectInvalid(comm, comm.AllToAllV(p, ok, displs, nullptr, ok, displs, u8),
                "alltoallv: recv buffer is null");
  ExpectInvalid(comm, comm.AllReduce(p, nullptr, 3, u8, ReduceOp::kMax),
                "allreduce: recv buffer is null");
  ExpectInvalid(comm, comm.AllGather(p, p, -5, u8), "allgather: count=-5 must be >= 0");
  ExpectInvalid(comm, comm.Broadcast(p, 1, u8, n), "broadcast: root=" + std::to_string(n));
  ExpectInvalid(comm, comm.Split(-7, 0).status(), "split: color=-7");
  auto bad = HierarchicalAllToAll::Create(comm, n + 1);
  ExpectInvalid(comm, bad.status(), "ranks_per_node=" + std::to_string(n + 1) + " must be");
  EXPECT_FALSE(comm.aborted()) << Where(comm, "argument errors must not abort");
  // The communicator still works afterwards.
  CheckAllToAll(comm, u8, 2);
}

// ---- split -------------------------------------------------------------------------------------

void CheckSubCommunicator(Communicator& sub, const std::vector<int>& members, int parent_rank) {
  ASSERT_EQ(sub.size(), static_cast<int>(members.size())) << Where(sub, "split size");
  const auto it = std::find(members.begin(), members.end(), parent_rank);
  ASSERT_NE(it, members.end());
  EXPECT_EQ(sub.rank(), static_cast<int>(it - members.begin())) << "parent rank " << parent_rank;
  // Gather the parent ranks over the sub-communicator: they must come in the documented order.
  Bytes mine(sizeof(int64_t));
  const int64_t value = parent_rank;
  std::memcpy(mine.data(), &value, sizeof(value));
  const Buffer send = Upload(sub.memory_space(), mine);
  const Buffer recv = Poisoned(sub.memory_space(), sizeof(int64_t) * sub.size());
  const Status status = sub.AllGather(send.data(), recv.data(), 1, DataType::kInt64);
  ASSERT_TRUE(status.ok()) << Where(sub, status.ToString());
  const Bytes got = Download(recv);
  for (int i = 0; i < sub.size(); ++i) {
    int64_t v = 0;
    std::memcpy(&v, got.data() + i * sizeof(int64_t), sizeof(v));
    EXPECT_EQ(v, members[static_cast<size_t>(i)]) << Where(sub, "member " + std::to_string(i));
  }
  CheckAllToAll(sub, DataType::kInt32, 3);
  CheckAllToAllV(sub, DataType::kFloat64, VariedCount, 1, "in sub-communicator");
}

void SplitSubCommunicators(Communicator& comm) {
  const int n = comm.size();
  const int me = comm.rank();
  // Even / odd ranks, ordered by descending parent rank (key = -rank).
  {
    auto sub = comm.Split(me % 2, -me);
    ASSERT_TRUE(sub.ok()) << Where(comm, sub.status().ToString());
    ASSERT_NE(*sub, nullptr);
    std::vector<int> members;
    for (int r = n - 1; r >= 0; --r) {
      if (r % 2 == me % 2) members.push_back(r);
    }
    CheckSubCommunicator(**sub, members, me);
    // Split of a split: everyone in one group, key ties broken by rank.
    auto nested = (*sub)->Split(0, 0);
    ASSERT_TRUE(nested.ok()) << Where(comm, nested.status().ToString());
    ASSERT_NE(*nested, nullptr);
    std::vector<int> nested_members = members;  // nested ranks are sub ranks in order
    CheckSubCommunicator(**nested, nested_members, me);
  }
  // Rank 0 opts out; the rest form one group.
  {
    auto sub = comm.Split(me == 0 ? Communicator::kNoColor : 5, 0);
    ASSERT_TRUE(sub.ok()) << Where(comm, sub.status().ToString());
    if (me == 0) {
      EXPECT_EQ(*sub, nullptr);
    } else {
      ASSERT_NE(*sub, nullptr);
      std::vector<int> members(static_cast<size_t>(n - 1));
      std::iota(members.begin(), members.end(), 1);
      CheckSubCommunicator(**sub, members, me);
    }
  }
  // The parent still works after its children.
  CheckAllToAll(comm, DataType::kUint8, 4);
}

// ---- large messages and repetition -------------------------------------------------------------

void LargeAllToAll(Communicator& comm) {
  const int64_t n = comm.size();
  const int64_t count = (kLargeTotalBytes / 4 + n * n - 1) / (n * n);  // int32 per peer
  CheckAllToAll(comm, DataType::kInt32, count);
}

void LargeAllToAllVSkewed(Communicator& comm) {
  const int64_t n = comm.size();
  const int64_t per_sender = (kLargeTotalBytes + n - 1) / n;  // all of it goes to rank 0
  CheckAllToAllV(
      comm, DataType::kUint8,
      [per_sender](int, int dst) -> int64_t { return dst == 0 ? per_sender : 0; }, 0,
      "large to rank 0");
}

void LargeAllReduceAndAllGather(Communicator& comm) {
  CheckAllReduce(comm, DataType::kFloat32, ReduceOp::kSum, (16 << 20) / 4, /*in_place=*/false);
  CheckAllGather(comm, DataType::kFloat32, (16 << 20) / 4 / comm.size());
}

void RepeatedMixedCalls(Communicator& comm) {
  for (int iter = 0; iter < 30; ++iter) {
    const DataType dtype = kAllDataTypes[iter % 5];
    CheckAllToAllV(
        comm, dtype, [iter](int src, int dst) -> int64_t { return (src + 2 * dst + iter) % 5; },
        iter % 3, "iteration " + std::to_string(iter));
    CheckAllReduce(comm, DataType::kInt64, ReduceOp::kMax, iter, /*in_place=*/iter % 2 == 0);
  }
}

// ---- hierarchical == flat -----------------------------------------------------------------------

// The node-deduplicated all-to-all-v: rows keyed by a "token" (byte-equal per key, zeros for key
// -1), each destination getting a varied number of them, duplicates to one node included. The
// result is the flat all-to-all-v's byte for byte, and fewer bytes cross between nodes: the ranks
// of a node get rows of the same keys, so a node of P > 1 ranks receives each key once (its
// metadata, an int32 per row, included).
void DedupEqualsFlat(Communicator& comm, HierarchicalAllToAll& hier, const std::string& tag) {
  const int n = comm.size(), me = comm.rank();
  constexpr int64_t kRowBytes = 24, kKeys = 5;
  std::vector<int64_t> send_counts(static_cast<size_t>(n)), recv_counts(static_cast<size_t>(n));
  // Destination d gets 2 + (me + d) % 3 rows: row k has key k % kKeys of this source (so the
  // ranks of one node share keys), the first row of every other destination a zero row (-1).
  const auto count = [](int src, int dst) -> int64_t { return 2 + (src + dst) % 3; };
  const auto key = [](int src, int dst, int64_t k) -> int64_t {
    if (k == 0 && dst % 2 == 1) return -1;
    return src * 100 + k % kKeys;
  };
  std::vector<int64_t> keys;
  Bytes send;
  for (int d = 0; d < n; ++d) {
    send_counts[static_cast<size_t>(d)] = count(me, d);
    recv_counts[static_cast<size_t>(d)] = count(d, me);
    for (int64_t k = 0; k < count(me, d); ++k) {
      keys.push_back(key(me, d, k));
      for (int64_t b = 0; b < kRowBytes; ++b) {
        send.push_back(keys.back() < 0 ? 0
                                       : static_cast<unsigned char>((keys.back() * 7 + b) & 0xff));
      }
    }
  }
  std::vector<int64_t> send_displs(static_cast<size_t>(n), 0), recv_displs(static_cast<size_t>(n), 0);
  for (int d = 1; d < n; ++d) {
    send_displs[static_cast<size_t>(d)] = send_displs[static_cast<size_t>(d - 1)] + send_counts[static_cast<size_t>(d - 1)];
    recv_displs[static_cast<size_t>(d)] = recv_displs[static_cast<size_t>(d - 1)] + recv_counts[static_cast<size_t>(d - 1)];
  }
  const int64_t recv_rows = recv_displs.back() + recv_counts.back();
  std::vector<int64_t> send_bytes(send_counts), send_at(send_displs), recv_bytes(recv_counts),
      recv_at(recv_displs);
  for (auto* v : {&send_bytes, &send_at, &recv_bytes, &recv_at}) {
    for (int64_t& x : *v) x *= kRowBytes;
  }
  Bytes flat(static_cast<size_t>(recv_rows * kRowBytes)), dedup(flat.size(), 0x5a);
  ASSERT_TRUE(comm.AllToAllV(send.data(), send_bytes, send_at, flat.data(), recv_bytes, recv_at,
                             DataType::kUint8)
                  .ok());
  const int64_t before = hier.inter_node_bytes();
  const Status status = hier.DedupAllToAllV(send.data(), send_counts, send_displs, keys,
                                            dedup.data(), recv_counts, recv_displs, kRowBytes);
  ASSERT_TRUE(status.ok()) << Where(comm, tag + " dedup " + status.ToString());
  EXPECT_EQ(CompareBytes(flat, dedup), "") << Where(comm, tag + " dedup alltoallv");
  // What the flat rows to other nodes would have been, against what crossed.
  const int p = hier.ranks_per_node(), node = me / p;
  int64_t flat_inter = 0;
  for (int d = 0; d < n; ++d) {
    if (d / p != node) flat_inter += send_counts[static_cast<size_t>(d)] * kRowBytes;
  }
  const int64_t crossed = hier.inter_node_bytes() - before;
  if (p > 1 && hier.nodes() > 1) {
    EXPECT_LT(crossed, flat_inter) << Where(comm, tag + " dedup crossed " + std::to_string(crossed) +
                                                     " bytes, the flat rows " +
                                                     std::to_string(flat_inter));
  }

  // Scaled rows (the backward's gate-scaled dY): one key's rows are equal before scaling; each
  // arrives as its scale times the row, the same product as the flat exchange of scaled rows.
  constexpr int64_t kCols = kRowBytes / 4;
  std::vector<float> unscaled, scaled, scales;
  for (size_t r = 0; r < keys.size(); ++r) {
    const float scale = r % 3 == 0 ? -0.7f : 0.1f * static_cast<float>(r + me) + 0.3f;
    scales.push_back(keys[r] < 0 ? 1.0f : scale);
    for (int64_t c = 0; c < kCols; ++c) {
      const float v = keys[r] < 0 ? 0.0f : 0.37f * static_cast<float>(keys[r]) - 0.11f * static_cast<float>(c);
      unscaled.push_back(v);
      scaled.push_back(keys[r] < 0 ? 0.0f : scale * v);
    }
  }
  std::vector<float> flat_scaled(static_cast<size_t>(recv_rows * kCols)),
      dedup_scaled(flat_scaled.size(), -9.0f);
  ASSERT_TRUE(comm.AllToAllV(scaled.data(), send_bytes, send_at, flat_scaled.data(), recv_bytes,
                             recv_at, DataType::kUint8)
                  .ok());
  const Status scaled_status =
      hier.DedupAllToAllV(unscaled.data(), send_counts, send_displs, keys, dedup_scaled.data(),
                          recv_counts, recv_displs, kRowBytes, scales);
  ASSERT_TRUE(scaled_status.ok()) << Where(comm, tag + " scaled dedup " + scaled_status.ToString());
  EXPECT_EQ(std::memcmp(flat_scaled.data(), dedup_scaled.data(), flat_scaled.size() * sizeof(float)), 0)
      << Where(comm, tag + " scaled dedup alltoallv: not the flat exchange's bits");
  const std::vector<float> one_short(scales.begin(), scales.end() - 1);
  EXPECT_EQ(hier.DedupAllToAllV(unscaled.data(), send_counts, send_displs, keys,
                                dedup_scaled.data(), recv_counts, recv_displs, kRowBytes, one_short)
                .code(),
            StatusCode::kInvalidArgument)
      << Where(comm, tag + " a scale per key");
}

void HierarchicalEqualsFlat(Communicator& comm) {
  const int n = comm.size();
  for (int per_node = 1; per_node <= n; ++per_node) {
   if (n % per_node != 0) continue;
   // Stage 1 over the node communicator, and by direct writes where the node's ranks share the
   // host's memory (then the calls below also grow its staging buffer: 0, 3, varied, skewed).
   for (const bool direct : {false, true}) {
    auto hier = HierarchicalAllToAll::Create(comm, per_node, direct);
    ASSERT_TRUE(hier.ok()) << Where(comm, hier.status().ToString());
    const bool can_direct = per_node > 1 && comm.memory_space() == MemorySpace::kHost &&
                            comm.local_size() == comm.size();
    EXPECT_EQ(hier->direct_intra(), direct && can_direct) << Where(comm, "direct_intra");
    const std::string tag = "ranks_per_node=" + std::to_string(per_node) +
                            (hier->direct_intra() ? " direct" : "");
    for (const DataType dtype : {DataType::kUint8, DataType::kFloat64}) {
      // Equal counts.
      for (const int64_t count : {0, 3}) {
        Bytes send;
        for (int p = 0; p < n; ++p) {
          const Bytes block = Pattern(dtype, count, comm.rank(), p);
          send.insert(send.end(), block.begin(), block.end());
        }
        const Buffer in = Upload(comm.memory_space(), send);
        const int64_t bytes = static_cast<int64_t>(send.size());
        const Buffer flat = Poisoned(comm.memory_space(), bytes);
        const Buffer two_stage = Poisoned(comm.memory_space(), bytes);
        ASSERT_TRUE(comm.AllToAll(in.data(), flat.data(), count, dtype).ok());
        const Status status = hier->AllToAll(in.data(), two_stage.data(), count, dtype);
        ASSERT_TRUE(status.ok()) << Where(comm, tag + " " + status.ToString());
        EXPECT_EQ(CompareBytes(Download(flat), Download(two_stage)), "")
            << Where(comm, tag + " alltoall " + DataTypeName(dtype));
      }
      // Per-peer counts: varied with gaps, and skewed to one rank.
      const CountFn patterns[] = {VariedCount,
                                  [n](int, int dst) -> int64_t { return dst == n - 1 ? 40 : 0; }};
      for (const CountFn& counts : patterns) {
        VData flat = PrepareV(comm, dtype, counts, 1);
        const Buffer two_stage = Poisoned(comm.memory_space(), flat.recv.bytes());
        const VLayout& v = flat.layout;
        ASSERT_TRUE(comm.AllToAllV(flat.send.data(), v.send_counts, v.send_displs, flat.recv.data(),
                                   v.recv_counts, v.recv_displs, dtype)
                        .ok());
        const Status status =
            hier->AllToAllV(flat.send.data(), v.send_counts, v.send_displs, two_stage.data(),
                            v.recv_counts, v.recv_displs, dtype);
        ASSERT_TRUE(status.ok()) << Where(comm, tag + " " + status.ToString());
        const Bytes flat_bytes = Download(flat.recv);
        EXPECT_EQ(CompareBytes(flat_bytes, Download(two_stage)), "")
            << Where(comm, tag + " alltoallv " + DataTypeName(dtype));
        EXPECT_EQ(CompareBytes(flat.expected, flat_bytes), "") << Where(comm, tag + " flat");
      }
    }
    if (comm.memory_space() == MemorySpace::kHost) DedupEqualsFlat(comm, *hier, tag);
   }
  }
}

}  // namespace

// ---- symmetric buffers -------------------------------------------------------------------------

// Every rank writes into every rank's buffer (its own included) at the slot of its rank, and its
// own board words; after a fence each rank reads what every peer wrote and published. Three rounds
// through one buffer (a fence before each round's writes too, so a slow reader is never
// overwritten), once with Signal and Wait apart; then the argument rules. In device memory the
// writes and reads are device copies (the buffers are not host-addressable).
void SymmetricBuffersDirectWrites(Communicator& comm) {
  const int n = comm.size(), me = comm.rank();
  const MemorySpace space = comm.memory_space();
  constexpr int64_t kSlot = 3;  // int64 values per (writer) slot: the buffer is not a multiple of 64
  constexpr int64_t kBoard = 9;  // board words: not a multiple of 8 either
  const int64_t bytes = n * kSlot * static_cast<int64_t>(sizeof(int64_t));
  auto buffer = comm.AllocateSymmetric(bytes, kBoard);
  if (buffer.status().code() == StatusCode::kUnimplemented && comm.backend() == "nccl") {
    GTEST_SKIP() << buffer.status().ToString();  // an NCCL before 2.28 (no device API)
  }
  ASSERT_TRUE(buffer.ok()) << Where(comm, buffer.status().ToString());
  SymmetricBuffer& buf = **buffer;
  EXPECT_EQ(buf.size(), n);
  EXPECT_EQ(buf.rank(), me);
  EXPECT_EQ(buf.bytes(), bytes);
  EXPECT_EQ(buf.memory_space(), space);
  EXPECT_EQ(buf.board_words(), kBoard);
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buf.peer(r)) % 64, 0u) << Where(comm, "alignment");
  }
  std::vector<int64_t> own(static_cast<size_t>(n * kSlot), -1);
  ASSERT_TRUE(CopyToHost(space, own.data(), buf.local(), bytes).ok());
  EXPECT_TRUE(std::all_of(own.begin(), own.end(), [](int64_t v) { return v == 0; }))
      << Where(comm, "a fresh buffer is zero");
  EXPECT_TRUE(std::all_of(buf.board(), buf.board() + kBoard, [](int64_t v) { return v == 0; }))
      << Where(comm, "a fresh board is zero");
  auto value = [](int round, int writer, int reader, int64_t i) {
    return round * 1000000 + writer * 10000 + reader * 100 + i;
  };
  for (int round = 1; round <= 3; ++round) {
    ASSERT_TRUE(buf.Fence().ok()) << Where(comm, "fence before writing");
    for (int p = 0; p < n; ++p) {
      int64_t slot[kSlot];
      for (int64_t i = 0; i < kSlot; ++i) slot[i] = value(round, me, p, i);
      ASSERT_TRUE(CopyFromHost(space, static_cast<int64_t*>(buf.peer(p)) + me * kSlot, slot,
                               sizeof(slot)).ok());
    }
    for (int64_t i = 0; i < kBoard; ++i) buf.board()[i] = value(round, me, -1, i);
    if (round == 2) {
      ASSERT_TRUE(buf.Signal().ok()) << Where(comm, "signal");
      EXPECT_EQ(buf.Signal().code(), StatusCode::kFailedPrecondition) << Where(comm, "signal twice");
      ASSERT_TRUE(buf.Wait().ok()) << Where(comm, "wait");
    } else {
      ASSERT_TRUE(buf.Fence().ok()) << Where(comm, "fence after writing");
    }
    ASSERT_TRUE(CopyToHost(space, own.data(), buf.local(), bytes).ok());
    for (int q = 0; q < n; ++q) {
      const std::string from = "round " + std::to_string(round) + ", from rank " + std::to_string(q);
      for (int64_t i = 0; i < kSlot; ++i) {
        ASSERT_EQ(own[static_cast<size_t>(q * kSlot + i)], value(round, q, me, i)) << Where(comm, from);
      }
      for (int64_t i = 0; i < kBoard; ++i) {
        ASSERT_EQ(buf.board(q)[i], value(round, q, -1, i)) << Where(comm, from + "'s board");
      }
    }
  }
  EXPECT_EQ(buf.fences(), 6u);
  EXPECT_EQ(buf.Wait().code(), StatusCode::kFailedPrecondition) << Where(comm, "wait without signal");

  auto empty = comm.AllocateSymmetric(0);
  ASSERT_TRUE(empty.ok()) << Where(comm, empty.status().ToString());
  EXPECT_TRUE((*empty)->Fence().ok());
  const auto negative = comm.AllocateSymmetric(-1);
  ExpectInvalid(comm, negative.status(), "symmetric: bytes=-1 must be >= 0");
  const auto no_board = comm.AllocateSymmetric(64, -2);
  ExpectInvalid(comm, no_board.status(), "symmetric: board_words=-2 must be >= 0");
  if (n > 1) {
    const auto uneven = comm.AllocateSymmetric(64 + me);
    ExpectInvalid(comm, uneven.status(), "every rank must pass the same bytes");
    EXPECT_NE(uneven.status().message().find("ask for 64 to " + std::to_string(63 + n)),
              std::string::npos) << Where(comm, uneven.status().message());
    const auto uneven_board = comm.AllocateSymmetric(64, me);
    ExpectInvalid(comm, uneven_board.status(), "every rank must pass the same board_words");
  }
}

const std::vector<ConformanceCase>& ConformanceCases() {
  static const std::vector<ConformanceCase> cases = {
      {"AllToAllEveryDtype", AllToAllEveryDtype},
      {"AllToAllVSkewed", AllToAllVSkewed},
      {"AsyncAllToAllV", AsyncAllToAllV},
      {"StreamOrderedAllToAllV", StreamOrderedAllToAllV},
      {"AllReduceEveryDtypeAndOp", AllReduceEveryDtypeAndOp},
      {"AllGatherEveryDtype", AllGatherEveryDtype},
      {"BroadcastEveryRoot", BroadcastEveryRoot},
      {"BarrierRepeated", BarrierRepeated},
      {"ZeroLengthWithNullBuffers", ZeroLengthWithNullBuffers},
      {"InvalidArgumentsRejected", InvalidArgumentsRejected},
      {"SplitSubCommunicators", SplitSubCommunicators},
      {"LargeAllToAll", LargeAllToAll},
      {"LargeAllToAllVSkewed", LargeAllToAllVSkewed},
      {"LargeAllReduceAndAllGather", LargeAllReduceAndAllGather},
      {"RepeatedMixedCalls", RepeatedMixedCalls},
      {"HierarchicalEqualsFlat", HierarchicalEqualsFlat},
      {"SymmetricBuffersDirectWrites", SymmetricBuffersDirectWrites},
  };
  return cases;
}

std::vector<std::string> ConformanceCaseNames() {
  std::vector<std::string> names;
  for (const ConformanceCase& c : ConformanceCases()) names.push_back(c.name);
  return names;
}

const ConformanceCase& FindConformanceCase(const std::string& name) {
  for (const ConformanceCase& c : ConformanceCases()) {
    if (c.name == name) return c;
  }
  MOE_CHECK_MSG(false, name.c_str());
  return ConformanceCases().front();
}

}  // namespace moe::comm::testing
