// The layout of one expert-parallel exchange, computed once per layer call and shared by the host
// and the device engines (runtime/exchange/expert_exchange.h, runtime/layer/device_moe_layer.cc), which
// differ only in how they move rows (memcpy loops here, gather kernels there).
//
// Blocks. Experts sit on the W ranks in contiguous blocks of L; a plan's rows are ordered (expert,
// group, position), which is (destination rank, local expert, group, position). Block
// b = (p, l, g) holds send_counts[b] real rows for local expert l of rank p from group g; in
// capacity mode (ExchangeShape::capacity = C > 0) every block travels as C rows, the real ones
// first and zero padding after, so every peer exchanges the same L·G·C rows (GShard's fixed
// shape; the receiver learns nothing it needs from the counts).
//
// Chunks (pipeline degree d). Every block of n exchanged rows is split by position, chunk j
// holding rows [n·j/d, n·(j+1)/d); both ends know n, so they agree without another message.
// Chunk j is one all-to-all-v of its own. Layouts of rows:
//   plan:          [destination][local expert][group][position], real rows only
//   send:          [chunk][destination][local expert][group] (padding included)
//   receive:       [chunk][source][local expert][group], what the dispatch delivers
//   expert-major:  [chunk][local expert][source][group], one contiguous block per local expert —
//                  the order a 1-rank layer with G = W·groups would use.
// A receive segment is one (local expert, source, group) run of rows; within a chunk the segments
// are listed in expert-major order, each pointing into the receive layout, so a consumer can read
// them in place or copy them into the expert-major layout (one copy per (source, local expert)).
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"

namespace moe {

struct ExchangeShape {
  int ranks = 1;          // W
  int local_experts = 1;  // L
  int groups = 1;         // G (local groups of the plan)
  int chunks = 1;         // d, 1..16
  int64_t capacity = 0;   // C > 0: every block padded to C rows; 0: real rows only
  // With C > 0: W·L values, block (p, l, g) padded to expert_capacity[p·L + l] rows instead of C
  // (redundant experts' replicas); the receive counts are then the caller's (not checked against
  // C). Empty: C for every block.
  std::vector<int64_t> expert_capacity;
  // This rank, >= 0: its rows for its own experts bypass the all-to-all — the gather writes them
  // straight to their receive rows and the combine reads them where the experts left them
  // (SendPiece::recv_row, plan_to_recv); the self block still has its place in the send layout
  // and counts in the chunks' per-peer counts (what the exchange means), the engine sends 0 there.
  // -1: every block travels.
  int self = -1;
};

// Chunk j of one send block: `rows` exchanged rows at send row `send_row`, of which the first
// `real` are plan rows plan_row .. plan_row + real - 1 (the rest: capacity padding).
struct SendPiece {
  int64_t send_row = 0, plan_row = 0, real = 0, rows = 0;
  int64_t recv_row = -1;  // >= 0: a self piece, written to this receive row instead
};

// A (local expert, source rank, group) run of received rows of one chunk, at receive row `row`.
struct Segment {
  int local_expert = 0, source = 0, group = 0;
  int64_t row = 0, rows = 0;
};

struct ExchangeChunk {
  std::vector<int64_t> send_counts, send_displs;  // W: rows to each rank, absolute displacements
  std::vector<int64_t> recv_counts, recv_displs;  // W: rows from each rank
  int64_t send_begin = 0, send_rows = 0;
  int64_t recv_begin = 0, recv_rows = 0;  // the chunk's first row (receive and expert-major)
  std::vector<SendPiece> pieces;          // send order
  std::vector<Segment> segments;          // expert-major order
  std::vector<int64_t> expert_offsets;    // L + 1: the chunk's expert-major blocks, from 0
};

struct ExchangeLayout {
  ExchangeShape shape;
  int64_t plan_rows = 0, send_rows = 0, recv_rows = 0;
  std::vector<ExchangeChunk> chunks;
  // Send row of every plan row (the combine finds a row's result there).
  std::vector<int64_t> plan_to_send;
  // With shape.self >= 0: receive row of every plan row for this rank's own experts, -1 for the
  // rows that travel (empty otherwise).
  std::vector<int64_t> plan_to_recv;
  // True when the send layout is the plan layout (one chunk, no padding).
  bool send_is_plan = false;
  // True when the receive layout is the expert-major layout (one local expert, or one source).
  bool recv_is_expert_major = false;
};

// send_counts[(p·L + l)·G + g]: real rows of this rank for block (p, l, g); recv_counts[(s·L +
// l)·G + g]: rows source s sends for this rank's local expert l from its group g (the exchanged
// rows: C each in capacity mode). Fails naming the argument on bad shapes, negative counts, real
// rows above the capacity, or >= 2^31 rows.
StatusOr<ExchangeLayout> MakeExchangeLayout(const ExchangeShape& shape,
                                            const std::vector<int64_t>& send_counts,
                                            const std::vector<int64_t>& recv_counts);

// The layout as the index maps the engine's row operations take (Device::GatherRows,
// ReturnedRows), computed once per layout on the host.
struct ExchangeMaps {
  // The dispatch's gathers, as (destination row, plan row) pairs; plan row -1 is a padding row
  // (zeros). send: every row of a piece that travels (every piece of a one-rank layout) into the
  // send layout; self: every row of a self piece (ExchangeShape::self) into the receive layout.
  std::vector<int32_t> send_dst, send_src, self_dst, self_src;
  // The bf16 wire's combine: the self pieces' rows, rounded from the receive layout (src) into
  // the send layout (dst); chunk j's pairs are [self_back_begin[j], self_back_begin[j + 1]).
  std::vector<int32_t> self_back_dst, self_back_src;
  std::vector<int64_t> self_back_begin;
  // Where plan row r's combined row is (ReturnedRows::return_row): send row plan_to_send[r] of
  // the returned rows, or, for a self row on the fp32 wire, receive row plan_to_recv[r] of the
  // rows the experts wrote (-1 - that row).
  std::vector<int32_t> return_row;
  // Expert-major row i is receive row to_expert_major[i]; receive row r is expert-major row
  // to_source_major[r]. Chunk j's entries [recv_begin, recv_begin + recv_rows) hold rows relative
  // to its first row, so a chunk's regroup reads and writes that chunk's rows only.
  std::vector<int32_t> to_expert_major, to_source_major;
};
// `bf16_wire`: every returned row is read from the returned (send-layout) rows, the self rows
// included (ExchangeOptions::bf16_wire).
ExchangeMaps MakeExchangeMaps(const ExchangeLayout& layout, bool bf16_wire = false);

}  // namespace moe
