// Hierarchical (two-stage) all-to-all, built only on the Communicator interface.
//
// The communicator's ranks are grouped into nodes of `ranks_per_node` consecutive ranks: rank r is
// local rank r % P on node r / P. Stage 1 (intra-node) sends, to each local peer j, everything this
// rank has for local index j on any node; stage 2 (inter-node) sends, to the rank with the same
// local index on each node b, everything gathered for that rank. Each rank thus sends N-1
// inter-node messages of P blocks instead of n-P messages of one block.
// The result equals the flat AllToAll / AllToAllV byte for byte.
//
// Buffers live in the parent communicator's memory space; staging buffers are workspaces there
// (base/memory.h), kept between calls. Deadlines and abort come from the sub-communicators (same
// options as the parent); a deadline in either stage returns its error and aborts that
// sub-communicator.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "comm/communicator.h"
#include "base/memory.h"
#include "base/status.h"

namespace moe::comm {

class HierarchicalAllToAll {
 public:
  // Collective over `comm` (two Splits). kInvalidArgument unless ranks_per_node >= 1 divides
  // comm.size(). `comm` must outlive the result.
  static StatusOr<HierarchicalAllToAll> Create(Communicator& comm, int ranks_per_node);

  int ranks_per_node() const { return ranks_per_node_; }
  int nodes() const { return nodes_; }

  // Same contract as Communicator::AllToAll / AllToAllV on the parent communicator.
  Status AllToAll(const void* send, void* recv, int64_t count, DataType dtype);
  Status AllToAllV(const void* send, std::span<const int64_t> send_counts,
                   std::span<const int64_t> send_displs, void* recv,
                   std::span<const int64_t> recv_counts, std::span<const int64_t> recv_displs,
                   DataType dtype);

 private:
  HierarchicalAllToAll() = default;

  Communicator* comm_ = nullptr;
  std::unique_ptr<Communicator> intra_;  // the P ranks of this node, by local index
  std::unique_ptr<Communicator> inter_;  // the N ranks with this local index, by node
  int ranks_per_node_ = 1;
  int nodes_ = 1;
  Workspace packed_, gathered_, arrived_;  // staging between the stages
};

}  // namespace moe::comm
