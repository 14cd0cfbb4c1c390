// Hierarchical (two-stage) all-to-all, built only on the Communicator interface.
//
// The communicator's ranks are grouped into nodes of `ranks_per_node` consecutive ranks: rank r is
// local rank r % P on node r / P. Stage 1 (intra-node) sends, to each local peer j, everything this
// rank has for local index j on any node; stage 2 (inter-node) sends, to the rank with the same
// local index on each node b, everything gathered for that rank. Each rank thus sends N-1
// inter-node messages of P blocks instead of n-P messages of one block.
// The result equals the flat AllToAll / AllToAllV byte for byte.
//
// Direct writes inside a node (`direct_intra`, where the node's ranks share memory on the host):
// stage 1 runs over a symmetric buffer of the node (comm/symmetric.h) instead of the node
// communicator's all-to-all. Each rank publishes its stage-1 counts on its board and fences; then
// every rank knows where its blocks go in each local peer's staging rows and writes them there
// straight from `send` (no packing copy, no count exchange); a second fence, and stage 2 reads its
// staging rows in place. Why two fences per call suffice: a rank rewrites its board or a peer's
// staging rows of the next call only after that call's first fence, which every local peer
// signals after it read this call's boards and sent its staging rows on. The buffer grows (by a
// quarter more than the largest need, collectively) when a call needs more.
//
// Buffers live in the parent communicator's memory space; staging buffers are workspaces there
// (base/memory.h), kept between calls. Deadlines and abort come from the sub-communicators (same
// options as the parent); a deadline in either stage returns its error and aborts that
// sub-communicator.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "comm/communicator.h"
#include "comm/symmetric.h"
#include "base/memory.h"
#include "base/status.h"

namespace moe::comm {

class HierarchicalAllToAll {
 public:
  // Collective over `comm` (two Splits). kInvalidArgument unless ranks_per_node >= 1 divides
  // comm.size(). `comm` must outlive the result. `direct_intra`: stage 1 by direct writes where
  // the node has more than one rank, all sharing this host's memory (direct_intra() says whether).
  static StatusOr<HierarchicalAllToAll> Create(Communicator& comm, int ranks_per_node,
                                               bool direct_intra = true);

  int ranks_per_node() const { return ranks_per_node_; }
  int nodes() const { return nodes_; }
  bool direct_intra() const { return direct_intra_; }

  // Same contract as Communicator::AllToAll / AllToAllV on the parent communicator.
  Status AllToAll(const void* send, void* recv, int64_t count, DataType dtype);
  Status AllToAllV(const void* send, std::span<const int64_t> send_counts,
                   std::span<const int64_t> send_displs, void* recv,
                   std::span<const int64_t> recv_counts, std::span<const int64_t> recv_displs,
                   DataType dtype);

  // Node-deduplicated all-to-all-v of rows (host memory): counts and displacements in rows of
  // `row_bytes`; row_keys[r] for every row r of `send` (the rows at send_displs[d] .. + counts[d]
  // for each destination d): rows with one key are byte-equal, key -1 marks a row of zeros.
  // Byte for byte the flat AllToAllV of the same rows, but a key crosses to each other node once
  // (zero rows not at all): the sender sends a node, in one message after an exchange of sizes,
  // per destination rank there the int32 list of which unique row each of its rows is, then its
  // unique rows; the rank of the sender's local
  // index on that node (its relay) expands them and forwards each destination its rows in the
  // node stage. Rows for the sender's own node take the node stage only. (An exchange's dispatch
  // sends a token to k experts as k equal rows: on two nodes at top-4 about half the rows.)
  // `row_scales` (empty: none; else one per row of `send`, rows of float32): row r arrives as
  // row_scales[r] · (send row r), each value one float multiplication, so rows with one key need
  // only be equal before scaling (the backward's gate-scaled rows of one token); the scale travels
  // with its row's list entry (4 bytes more per row) and the relay multiplies as it expands.
  Status DedupAllToAllV(const void* send, std::span<const int64_t> send_counts,
                        std::span<const int64_t> send_displs, std::span<const int64_t> row_keys,
                        void* recv, std::span<const int64_t> recv_counts,
                        std::span<const int64_t> recv_displs, int64_t row_bytes,
                        std::span<const float> row_scales = {});

  // Bytes this rank sent to other nodes (its inter-node stage), since creation.
  int64_t inter_node_bytes() const { return inter_node_bytes_; }

 private:
  HierarchicalAllToAll() = default;
  // Stage 1 by direct writes: `out1` (per local peer j, node b: the elements for rank b·P + j)
  // published, the blocks written from `send` into the peers' staging rows. Returns this rank's
  // staging rows; `in1` gets what each (local source i, node b) put there.
  // Stage 1 over the node communicator: counts exchanged, blocks packed, all-to-all-v.
  StatusOr<const void*> IntraStage1(const void* send, std::span<const int64_t> send_counts,
                                    std::span<const int64_t> send_displs, DataType dtype,
                                    const std::vector<int64_t>& out1, std::vector<int64_t>* in1);
  StatusOr<const void*> DirectStage1(const void* send, std::span<const int64_t> send_counts,
                                     std::span<const int64_t> send_displs, int64_t elem_bytes,
                                     const std::vector<int64_t>& out1, std::vector<int64_t>* in1);

  Communicator* comm_ = nullptr;
  std::unique_ptr<Communicator> intra_;  // the P ranks of this node, by local index
  std::unique_ptr<Communicator> inter_;  // the N ranks with this local index, by node
  int ranks_per_node_ = 1;
  int nodes_ = 1;
  Workspace packed_, gathered_, arrived_;  // staging between the stages
  bool direct_intra_ = false;
  std::unique_ptr<SymmetricBuffer> staging_;  // direct_intra_: the node's staging rows
  int64_t staging_bytes_ = 0;
  int64_t inter_node_bytes_ = 0;
  Workspace expanded_;  // DedupAllToAllV: the relay's rows for the node stage
};

}  // namespace moe::comm
