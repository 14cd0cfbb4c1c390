// The two-stage all-to-all of comm/algorithms/hierarchical_alltoall.h.
#include "comm/algorithms/hierarchical_alltoall.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "base/memory.h"
#include "comm/validate.h"

namespace moe::comm {
namespace {

const char* At(const void* base, int64_t offset) { return static_cast<const char*>(base) + offset; }
char* At(void* base, int64_t offset) { return static_cast<char*>(base) + offset; }

std::vector<int64_t> PrefixSums(const std::vector<int64_t>& counts) {
  std::vector<int64_t> displs(counts.size(), 0);
  if (!counts.empty()) std::exclusive_scan(counts.begin(), counts.end(), displs.begin(), 0LL);
  return displs;
}

int64_t Sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), 0LL); }

// An all-to-all of host int64 counts on `comm`, staged through its memory space.
Status ExchangeCounts(Communicator& comm, const std::vector<int64_t>& send,
                      std::vector<int64_t>& recv) {
  recv.assign(send.size(), 0);
  const int64_t per_peer = static_cast<int64_t>(send.size()) / comm.size();
  if (comm.memory_space() == MemorySpace::kHost) {
    return comm.AllToAll(send.data(), recv.data(), per_peer, DataType::kInt64);
  }
  const int64_t bytes = static_cast<int64_t>(send.size() * sizeof(int64_t));
  MOE_ASSIGN_OR_RETURN(Buffer dev_send, Buffer::Allocate(comm.memory_space(), bytes));
  MOE_ASSIGN_OR_RETURN(Buffer dev_recv, Buffer::Allocate(comm.memory_space(), bytes));
  MOE_RETURN_IF_ERROR(CopyFromHost(comm.memory_space(), dev_send.data(), send.data(), bytes));
  MOE_RETURN_IF_ERROR(comm.AllToAll(dev_send.data(), dev_recv.data(), per_peer, DataType::kInt64));
  return CopyToHost(comm.memory_space(), recv.data(), dev_recv.data(), bytes);
}

}  // namespace

StatusOr<HierarchicalAllToAll> HierarchicalAllToAll::Create(Communicator& comm,
                                                            int ranks_per_node,
                                                            bool direct_intra) {
  if (ranks_per_node < 1 || comm.size() % ranks_per_node != 0) {
    return InvalidArgument(
        "hierarchical alltoall: ranks_per_node=" + std::to_string(ranks_per_node) +
        " must be >= 1 and divide the communicator size " + std::to_string(comm.size()));
  }
  HierarchicalAllToAll h;
  h.comm_ = &comm;
  h.ranks_per_node_ = ranks_per_node;
  h.nodes_ = comm.size() / ranks_per_node;
  h.packed_ = Workspace(comm.memory_space());
  h.gathered_ = Workspace(comm.memory_space());
  h.arrived_ = Workspace(comm.memory_space());
  const int node = comm.rank() / ranks_per_node;
  const int local = comm.rank() % ranks_per_node;
  MOE_ASSIGN_OR_RETURN(h.intra_, comm.Split(node, local));
  MOE_ASSIGN_OR_RETURN(h.inter_, comm.Split(local, node));
  h.direct_intra_ = direct_intra && ranks_per_node > 1 &&
                    comm.memory_space() == MemorySpace::kHost &&
                    h.intra_->local_size() == h.intra_->size();
  return h;
}

StatusOr<const void*> HierarchicalAllToAll::DirectStage1(const void* send,
                                                         std::span<const int64_t> send_counts,
                                                         std::span<const int64_t> send_displs,
                                                         int64_t elem_bytes,
                                                         const std::vector<int64_t>& out1,
                                                         std::vector<int64_t>* in1) {
  const int P = ranks_per_node_, N = nodes_, me = intra_->rank();
  // A rank's header: its stage-1 counts in bytes, (local peer j, node b) order.
  const int64_t header = (static_cast<int64_t>(out1.size()) * 8 + 63) / 64 * 64;
  const auto counts = [&](int i) { return static_cast<const int64_t*>(staging_->peer(i)); };
  const auto publish = [&]() -> Status {
    auto* mine = static_cast<int64_t*>(staging_->local());
    for (size_t k = 0; k < out1.size(); ++k) mine[k] = out1[k] * elem_bytes;
    return staging_->Fence();
  };
  // The staging bytes local peer j receives: every local source's blocks for it.
  const auto staged = [&](int j) {
    int64_t bytes = 0;
    for (int i = 0; i < P; ++i) {
      for (int b = 0; b < N; ++b) bytes += counts(i)[j * N + b];
    }
    return bytes;
  };
  int64_t need = 0;
  if (staging_ != nullptr) {
    MOE_RETURN_IF_ERROR(publish());
    for (int j = 0; j < P; ++j) need = std::max(need, staged(j));
  } else {
    // The first call, no headers yet: what the node's ranks send in stage 1 altogether bounds
    // what any of them receives.
    int64_t sent = 0;
    for (const int64_t c : out1) sent += c * elem_bytes;
    MOE_RETURN_IF_ERROR(intra_->AllReduce(&sent, &need, 1, DataType::kInt64, ReduceOp::kSum));
  }
  if (staging_ == nullptr || need > staging_bytes_) {
    staging_.reset();  // collective: every local rank sees the same need
    staging_bytes_ = std::max(staging_bytes_, need + need / 4);
    MOE_ASSIGN_OR_RETURN(staging_, intra_->AllocateSymmetric(header + staging_bytes_));
    MOE_RETURN_IF_ERROR(publish());
  }
  // Where this rank's blocks start in each local peer's staging rows: after the earlier sources'.
  in1->assign(out1.size(), 0);
  for (int i = 0; i < P; ++i) {
    for (int b = 0; b < N; ++b) (*in1)[static_cast<size_t>(i * N + b)] = counts(i)[me * N + b] / elem_bytes;
  }
  for (int j = 0; j < P; ++j) {
    int64_t offset = 0;
    for (int i = 0; i < me; ++i) {
      for (int b = 0; b < N; ++b) offset += counts(i)[j * N + b];
    }
    char* const rows = static_cast<char*>(staging_->peer(j)) + header;
    for (int b = 0; b < N; ++b) {
      const int dest = b * P + j;
      const int64_t bytes = send_counts[dest] * elem_bytes;
      MOE_RETURN_IF_ERROR(CopyBytes(MemorySpace::kHost, rows + offset,
                                    At(send, send_displs[dest] * elem_bytes), bytes));
      offset += bytes;
    }
  }
  MOE_RETURN_IF_ERROR(staging_->Fence());
  return static_cast<const void*>(static_cast<const char*>(staging_->local()) + header);
}

Status HierarchicalAllToAll::AllToAll(const void* send, void* recv, int64_t count, DataType dtype) {
  const int P = ranks_per_node_;
  const int N = nodes_;
  MOE_RETURN_IF_ERROR(ValidateCount("hierarchical alltoall", "count", count));
  if (direct_intra_) {
    // The direct stage 1 writes blocks where they go whatever their sizes: the -v form.
    const std::vector<int64_t> counts(static_cast<size_t>(P * N), count);
    std::vector<int64_t> displs(counts.size());
    for (size_t i = 0; i < displs.size(); ++i) displs[i] = static_cast<int64_t>(i) * count;
    return AllToAllV(send, counts, displs, recv, counts, displs, dtype);
  }
  MOE_RETURN_IF_ERROR(ValidateBuffer("hierarchical alltoall", "send", send, count * P * N));
  MOE_RETURN_IF_ERROR(ValidateBuffer("hierarchical alltoall", "recv", recv, count * P * N));
  const MemorySpace space = comm_->memory_space();
  const int64_t block = count * DataTypeSize(dtype);
  const int64_t total = block * P * N;
  MOE_ASSIGN_OR_RETURN(void* const packed, packed_.Get(total));
  MOE_ASSIGN_OR_RETURN(void* const gathered, gathered_.Get(total));
  // Stage 1 input, ordered (local peer j, node b): block for destination b·P + j.
  for (int j = 0; j < P; ++j) {
    for (int b = 0; b < N; ++b) {
      MOE_RETURN_IF_ERROR(
          CopyBytes(space, At(packed, (j * N + b) * block), At(send, (b * P + j) * block), block));
    }
  }
  // gathered[(i, b)] = block from local rank i of this node for (node b, my local index).
  MOE_RETURN_IF_ERROR(intra_->AllToAll(packed, gathered, count * N, dtype));
  // Stage 2 input, ordered (node b, local source i).
  for (int b = 0; b < N; ++b) {
    for (int i = 0; i < P; ++i) {
      MOE_RETURN_IF_ERROR(CopyBytes(space, At(packed, (b * P + i) * block),
                                    At(gathered, (i * N + b) * block), block));
    }
  }
  // From node a arrive blocks of sources a·P + i, i = 0..P-1: the flat layout.
  return inter_->AllToAll(packed, recv, count * P, dtype);
}

StatusOr<const void*> HierarchicalAllToAll::IntraStage1(const void* send,
                                                        std::span<const int64_t> send_counts,
                                                        std::span<const int64_t> send_displs,
                                                        DataType dtype,
                                                        const std::vector<int64_t>& out1,
                                                        std::vector<int64_t>* in1) {
  const int P = ranks_per_node_, N = nodes_;
  const MemorySpace space = comm_->memory_space();
  const int64_t es = DataTypeSize(dtype);
  MOE_RETURN_IF_ERROR(ExchangeCounts(*intra_, out1, *in1));
  std::vector<int64_t> send1(static_cast<size_t>(P), 0), recv1(static_cast<size_t>(P), 0);
  for (int x = 0; x < P; ++x) {
    for (int b = 0; b < N; ++b) {
      send1[static_cast<size_t>(x)] += out1[static_cast<size_t>(x * N + b)];
      recv1[static_cast<size_t>(x)] += (*in1)[static_cast<size_t>(x * N + b)];
    }
  }
  const std::vector<int64_t> send1_displs = PrefixSums(send1);
  const std::vector<int64_t> recv1_displs = PrefixSums(recv1);
  MOE_ASSIGN_OR_RETURN(void* const packed, packed_.Get(Sum(send1) * es));
  MOE_ASSIGN_OR_RETURN(void* const gathered, gathered_.Get(Sum(recv1) * es));
  int64_t offset = 0;
  for (int j = 0; j < P; ++j) {
    for (int b = 0; b < N; ++b) {
      const int dest = b * P + j;
      MOE_RETURN_IF_ERROR(CopyBytes(space, At(packed, offset * es),
                                    At(send, send_displs[dest] * es), send_counts[dest] * es));
      offset += send_counts[dest];
    }
  }
  MOE_RETURN_IF_ERROR(
      intra_->AllToAllV(packed, send1, send1_displs, gathered, recv1, recv1_displs, dtype));
  return static_cast<const void*>(gathered);
}

Status HierarchicalAllToAll::AllToAllV(const void* send, std::span<const int64_t> send_counts,
                                       std::span<const int64_t> send_displs, void* recv,
                                       std::span<const int64_t> recv_counts,
                                       std::span<const int64_t> recv_displs, DataType dtype) {
  const int P = ranks_per_node_;
  const int N = nodes_;
  const int n = P * N;
  const char* op = "hierarchical alltoallv";
  MOE_RETURN_IF_ERROR(ValidateVector(op, "send", send, send_counts, send_displs, n));
  MOE_RETURN_IF_ERROR(ValidateVector(op, "recv", recv, recv_counts, recv_displs, n));
  const MemorySpace space = comm_->memory_space();
  const int64_t es = DataTypeSize(dtype);

  // Stage 1 counts, ordered (local peer j, node b): what goes to rank b·P + j.
  std::vector<int64_t> out1(static_cast<size_t>(n));
  for (int j = 0; j < P; ++j) {
    for (int b = 0; b < N; ++b) out1[static_cast<size_t>(j * N + b)] = send_counts[b * P + j];
  }
  // in1[(i, b)]: elements local rank i sends to (node b, my local index).
  std::vector<int64_t> in1;
  const void* gathered = nullptr;
  if (direct_intra_) {
    MOE_ASSIGN_OR_RETURN(gathered,
                         DirectStage1(send, send_counts, send_displs, es, out1, &in1));
  } else {
    MOE_ASSIGN_OR_RETURN(gathered,
                         IntraStage1(send, send_counts, send_displs, dtype, out1, &in1));
  }

  MOE_ASSIGN_OR_RETURN(void* const packed, packed_.Get(Sum(in1) * es));
  // Stage 2: reorder gathered from (i, b) to (b, i); send node b what is for it.
  const std::vector<int64_t> in1_displs = PrefixSums(in1);
  std::vector<int64_t> send2(static_cast<size_t>(N), 0), recv2(static_cast<size_t>(N), 0);
  int64_t offset = 0;
  for (int b = 0; b < N; ++b) {
    for (int i = 0; i < P; ++i) {
      const auto k = static_cast<size_t>(i * N + b);
      MOE_RETURN_IF_ERROR(
          CopyBytes(space, At(packed, offset * es), At(gathered, in1_displs[k] * es), in1[k] * es));
      offset += in1[k];
      send2[static_cast<size_t>(b)] += in1[k];
      recv2[static_cast<size_t>(b)] += recv_counts[b * P + i];
    }
  }
  const std::vector<int64_t> send2_displs = PrefixSums(send2);
  const std::vector<int64_t> recv2_displs = PrefixSums(recv2);
  MOE_ASSIGN_OR_RETURN(void* const arrived, arrived_.Get(Sum(recv2) * es));
  MOE_RETURN_IF_ERROR(
      inter_->AllToAllV(packed, send2, send2_displs, arrived, recv2, recv2_displs, dtype));
  // arrived holds the blocks in source-rank order; place them at the caller's displacements.
  offset = 0;
  for (int s = 0; s < n; ++s) {
    MOE_RETURN_IF_ERROR(CopyBytes(space, At(recv, recv_displs[s] * es), At(arrived, offset * es),
                                  recv_counts[s] * es));
    offset += recv_counts[s];
  }
  return Status::Ok();
}

}  // namespace moe::comm
