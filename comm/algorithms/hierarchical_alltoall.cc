// The two-stage all-to-all of comm/algorithms/hierarchical_alltoall.h.
#include "comm/algorithms/hierarchical_alltoall.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <unordered_map>
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
  h.expanded_ = Workspace(comm.memory_space());
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
  // A rank's board: its stage-1 counts in bytes, (local peer j, node b) order.
  const int64_t words = static_cast<int64_t>(out1.size());
  const auto counts = [&](int i) { return staging_->board(i); };
  const auto publish = [&]() -> Status {
    int64_t* const mine = staging_->board();
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
    // The first call, no boards yet: what the node's ranks send in stage 1 altogether bounds
    // what any of them receives.
    int64_t sent = 0;
    for (const int64_t c : out1) sent += c * elem_bytes;
    MOE_RETURN_IF_ERROR(intra_->AllReduce(&sent, &need, 1, DataType::kInt64, ReduceOp::kSum));
  }
  if (staging_ == nullptr || need > staging_bytes_) {
    staging_.reset();  // collective: every local rank sees the same need
    staging_bytes_ = std::max(staging_bytes_, need + need / 4);
    MOE_ASSIGN_OR_RETURN(staging_, intra_->AllocateSymmetric(staging_bytes_, words));
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
    char* const rows = static_cast<char*>(staging_->peer(j));
    for (int b = 0; b < N; ++b) {
      const int dest = b * P + j;
      const int64_t bytes = send_counts[dest] * elem_bytes;
      MOE_RETURN_IF_ERROR(CopyBytes(MemorySpace::kHost, rows + offset,
                                    At(send, send_displs[dest] * elem_bytes), bytes));
      offset += bytes;
    }
  }
  MOE_RETURN_IF_ERROR(staging_->Fence());
  return static_cast<const void*>(staging_->local());
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
  inter_node_bytes_ += block * P * (N - 1);
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
  for (int b = 0; b < N; ++b) {
    if (b != inter_->rank()) inter_node_bytes_ += send2[static_cast<size_t>(b)] * es;
  }
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

Status HierarchicalAllToAll::DedupAllToAllV(const void* send, std::span<const int64_t> send_counts,
                                            std::span<const int64_t> send_displs,
                                            std::span<const int64_t> row_keys, void* recv,
                                            std::span<const int64_t> recv_counts,
                                            std::span<const int64_t> recv_displs,
                                            int64_t row_bytes, std::span<const float> row_scales) {
  const int P = ranks_per_node_, N = nodes_, n = P * N;
  const int node = inter_->rank();
  const char* op = "hierarchical dedup alltoallv";
  if (comm_->memory_space() != MemorySpace::kHost) {
    return Unimplemented(std::string(op) + ": host memory only");
  }
  if (row_bytes < 1) return InvalidArgument(std::string(op) + ": row_bytes must be >= 1");
  const bool scaled = !row_scales.empty();
  if (scaled && (row_bytes % 4 != 0 || row_scales.size() != row_keys.size())) {
    return InvalidArgument(std::string(op) + ": row_scales needs float32 rows (row_bytes " +
                           std::to_string(row_bytes) + ") and one scale per key (" +
                           std::to_string(row_scales.size()) + " for " +
                           std::to_string(row_keys.size()) + ")");
  }
  MOE_RETURN_IF_ERROR(ValidateVector(op, "send", send, send_counts, send_displs, n));
  MOE_RETURN_IF_ERROR(ValidateVector(op, "recv", recv, recv_counts, recv_displs, n));
  for (int d = 0; d < n; ++d) {
    if (send_displs[d] + send_counts[d] > static_cast<int64_t>(row_keys.size())) {
      return InvalidArgument(std::string(op) + ": row_keys has " + std::to_string(row_keys.size()) +
                             " keys, destination " + std::to_string(d) + "'s rows end at " +
                             std::to_string(send_displs[d] + send_counts[d]));
    }
  }
  const auto row = [&](const void* base, int64_t r) { return At(base, r * row_bytes); };
  // `to` <- scale · `from` (one row; `scale_bits`: the float's bits), or a copy without one.
  const auto put = [&](void* to, const void* from, const void* scale_bits) {
    if (scale_bits == nullptr) {
      std::memcpy(to, from, static_cast<size_t>(row_bytes));
      return;
    }
    float scale = 0.0f;
    std::memcpy(&scale, scale_bits, sizeof(scale));
    float* t = static_cast<float*>(to);
    const float* f = static_cast<const float*>(from);
    for (int64_t c = 0; c < row_bytes / 4; ++c) t[c] = scale * f[c];
  };
  // Per other node b: its unique rows (the send row of each key's first occurrence) and, per
  // destination there, which unique row each of its rows is (-1: zeros). Message to node b: int32
  // [P counts][the lists][with scales: each listed row's scale, bit for bit], then the unique rows.
  std::vector<std::vector<int32_t>> meta(static_cast<size_t>(N));
  std::vector<std::vector<int64_t>> unique(static_cast<size_t>(N));
  for (int b = 0; b < N; ++b) {
    if (b == node) continue;
    std::vector<int32_t>& m = meta[static_cast<size_t>(b)];
    std::vector<int64_t>& u = unique[static_cast<size_t>(b)];
    std::unordered_map<int64_t, int32_t> seen;  // key -> its unique row's index
    for (int j = 0; j < P; ++j) m.push_back(static_cast<int32_t>(send_counts[b * P + j]));
    for (int j = 0; j < P; ++j) {
      const int d = b * P + j;
      for (int64_t k = 0; k < send_counts[d]; ++k) {
        const int64_t r = send_displs[d] + k, key = row_keys[static_cast<size_t>(r)];
        if (key < 0) {
          m.push_back(-1);
          continue;
        }
        const auto [it, added] = seen.try_emplace(key, static_cast<int32_t>(u.size()));
        if (added) u.push_back(r);
        m.push_back(it->second);
      }
    }
    if (scaled) {
      for (int j = 0; j < P; ++j) {
        const int d = b * P + j;
        for (int64_t k = 0; k < send_counts[d]; ++k) {
          int32_t bits = 0;
          std::memcpy(&bits, &row_scales[static_cast<size_t>(send_displs[d] + k)], sizeof(bits));
          m.push_back(bits);
        }
      }
    }
  }
  // The sizes first (ints of metadata, unique rows), then one message per node: the metadata,
  // then the unique rows, each part padded to 8 bytes (the lists and rows stay aligned).
  std::vector<int64_t> sizes_out(static_cast<size_t>(2 * N), 0), sizes_in(static_cast<size_t>(2 * N));
  for (int b = 0; b < N; ++b) {
    sizes_out[static_cast<size_t>(2 * b)] = static_cast<int64_t>(meta[static_cast<size_t>(b)].size());
    sizes_out[static_cast<size_t>(2 * b + 1)] = static_cast<int64_t>(unique[static_cast<size_t>(b)].size());
  }
  MOE_RETURN_IF_ERROR(inter_->AllToAll(sizes_out.data(), sizes_in.data(), 2, DataType::kInt64));
  const auto pad8 = [](int64_t bytes) { return (bytes + 7) / 8 * 8; };
  // Per node: the metadata's bytes (padded) and the message's.
  std::vector<int64_t> meta_out(static_cast<size_t>(N)), meta_in(static_cast<size_t>(N)),
      msg_out(static_cast<size_t>(N)), msg_in(static_cast<size_t>(N));
  for (int b = 0; b < N; ++b) {
    const size_t i = static_cast<size_t>(b);
    meta_out[i] = pad8(sizes_out[2 * i] * static_cast<int64_t>(sizeof(int32_t)));
    meta_in[i] = pad8(sizes_in[2 * i] * static_cast<int64_t>(sizeof(int32_t)));
    msg_out[i] = meta_out[i] + pad8(sizes_out[2 * i + 1] * row_bytes);
    msg_in[i] = meta_in[i] + pad8(sizes_in[2 * i + 1] * row_bytes);
  }
  MOE_ASSIGN_OR_RETURN(void* const packed, packed_.Get(std::max<int64_t>(Sum(msg_out), 1)));
  MOE_ASSIGN_OR_RETURN(void* const arrived, arrived_.Get(std::max<int64_t>(Sum(msg_in), 1)));
  int64_t offset = 0;
  for (int b = 0; b < N; ++b) {
    const std::vector<int32_t>& m = meta[static_cast<size_t>(b)];
    if (!m.empty()) std::memcpy(At(packed, offset), m.data(), m.size() * sizeof(int32_t));
    int64_t at = offset + meta_out[static_cast<size_t>(b)];
    for (const int64_t r : unique[static_cast<size_t>(b)]) {
      std::memcpy(At(packed, at), row(send, r), static_cast<size_t>(row_bytes));
      at += row_bytes;
    }
    offset += msg_out[static_cast<size_t>(b)];
    inter_node_bytes_ += msg_out[static_cast<size_t>(b)];
  }
  MOE_RETURN_IF_ERROR(inter_->AllToAllV(packed, msg_out, PrefixSums(msg_out), arrived, msg_in,
                                        PrefixSums(msg_in), DataType::kUint8));
  // The relay's node stage: to each local rank j, the rows of every source with this rank's local
  // index (node by node, this rank's own straight from `send`), expanded from the unique rows.
  std::vector<int64_t> to_local(static_cast<size_t>(P), 0);  // bytes to each local rank
  std::vector<std::vector<std::pair<const int32_t*, int64_t>>> lists(
      static_cast<size_t>(N), std::vector<std::pair<const int32_t*, int64_t>>(static_cast<size_t>(P)));
  std::vector<std::vector<const int32_t*>> scales(
      static_cast<size_t>(N), std::vector<const int32_t*>(static_cast<size_t>(P)));
  const std::vector<int64_t> msg_at = PrefixSums(msg_in);
  for (int a = 0; a < N; ++a) {
    if (a == node) continue;
    const int32_t* m = reinterpret_cast<const int32_t*>(At(arrived, msg_at[static_cast<size_t>(a)]));
    const int32_t* list = m + P;
    for (int j = 0; j < P; ++j) {
      lists[static_cast<size_t>(a)][static_cast<size_t>(j)] = {list, m[j]};
      list += m[j];
      to_local[static_cast<size_t>(j)] += m[j] * row_bytes;
    }
    // The scales follow all P lists, in the same order.
    const int32_t* scale = list;
    for (int j = 0; j < P && scaled; ++j) {
      scales[static_cast<size_t>(a)][static_cast<size_t>(j)] = scale;
      scale += m[j];
    }
  }
  for (int j = 0; j < P; ++j) {
    to_local[static_cast<size_t>(j)] += send_counts[node * P + j] * row_bytes;
  }
  MOE_ASSIGN_OR_RETURN(void* const expanded,
                       expanded_.Get(std::max<int64_t>(Sum(to_local), 1)));
  offset = 0;
  for (int j = 0; j < P; ++j) {
    for (int a = 0; a < N; ++a) {
      if (a == node) {
        const int d = node * P + j;
        const int64_t bytes = send_counts[d] * row_bytes;
        if (!scaled && bytes > 0) {
          std::memcpy(At(expanded, offset), row(send, send_displs[d]), static_cast<size_t>(bytes));
        }
        for (int64_t k = 0; scaled && k < send_counts[d]; ++k) {
          const int64_t r = send_displs[d] + k;
          void* to = At(expanded, offset + k * row_bytes);
          if (row_keys[static_cast<size_t>(r)] < 0) {
            std::memset(to, 0, static_cast<size_t>(row_bytes));
          } else {
            put(to, row(send, r), &row_scales[static_cast<size_t>(r)]);
          }
        }
        offset += bytes;
        continue;
      }
      const auto& [list, count] = lists[static_cast<size_t>(a)][static_cast<size_t>(j)];
      const int32_t* scale = scales[static_cast<size_t>(a)][static_cast<size_t>(j)];
      const char* rows = At(arrived, msg_at[static_cast<size_t>(a)] + meta_in[static_cast<size_t>(a)]);
      for (int64_t k = 0; k < count; ++k) {
        if (list[k] < 0) {
          std::memset(At(expanded, offset), 0, static_cast<size_t>(row_bytes));
        } else {
          put(At(expanded, offset), rows + list[k] * row_bytes, scaled ? scale + k : nullptr);
        }
        offset += row_bytes;
      }
    }
  }
  // From local rank i: the rows of sources a·P + i, node by node; into their displacements.
  std::vector<int64_t> from_local(static_cast<size_t>(P), 0);  // bytes from each local rank
  for (int i = 0; i < P; ++i) {
    for (int a = 0; a < N; ++a) from_local[static_cast<size_t>(i)] += recv_counts[a * P + i] * row_bytes;
  }
  MOE_ASSIGN_OR_RETURN(void* const gathered,
                       gathered_.Get(std::max<int64_t>(Sum(from_local), 1)));
  MOE_RETURN_IF_ERROR(intra_->AllToAllV(expanded, to_local, PrefixSums(to_local), gathered,
                                        from_local, PrefixSums(from_local), DataType::kUint8));
  offset = 0;
  for (int i = 0; i < P; ++i) {
    for (int a = 0; a < N; ++a) {
      const int src = a * P + i;
      const int64_t bytes = recv_counts[src] * row_bytes;
      if (bytes > 0) {
        std::memcpy(At(recv, recv_displs[src] * row_bytes), At(gathered, offset),
                    static_cast<size_t>(bytes));
      }
      offset += bytes;
    }
  }
  return Status::Ok();
}

}  // namespace moe::comm
