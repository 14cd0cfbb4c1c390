// The exchange layout, once for host and device (runtime/exchange/exchange_layout.h).
#include "runtime/exchange/exchange_layout.h"

#include <algorithm>
#include <string>

namespace moe {

namespace {

constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1;

// The total of a W·L·G count vector, or an error naming `what`.
StatusOr<int64_t> CheckedTotal(const std::string& what, int64_t blocks,
                               const std::vector<int64_t>& counts) {
  if (static_cast<int64_t>(counts.size()) != blocks) {
    return InvalidArgument("MakeExchangeLayout: " + what + " has " +
                           std::to_string(counts.size()) +
                           " counts, must be ranks x local experts x groups = " +
                           std::to_string(blocks));
  }
  int64_t total = 0;
  for (int64_t c : counts) {
    if (c < 0) {
      return InvalidArgument("MakeExchangeLayout: " + what + " has a negative row count " +
                             std::to_string(c));
    }
    total += c;
  }
  if (total > kMaxRows) {
    return InvalidArgument("MakeExchangeLayout: " + what + " sum to " + std::to_string(total) +
                           " rows, must be < 2^31");
  }
  return total;
}

}  // namespace

StatusOr<ExchangeLayout> MakeExchangeLayout(const ExchangeShape& shape,
                                            const std::vector<int64_t>& send_counts,
                                            const std::vector<int64_t>& recv_counts) {
  const int64_t w = shape.ranks, l = shape.local_experts, g = shape.groups, d = shape.chunks,
                cap = shape.capacity;
  if (w < 1 || l < 1 || g < 1) {
    return InvalidArgument("MakeExchangeLayout: ranks=" + std::to_string(w) + ", local_experts=" +
                           std::to_string(l) + ", groups=" + std::to_string(g) +
                           " must all be >= 1");
  }
  if (d < 1 || d > 16) {
    return InvalidArgument("MakeExchangeLayout: chunks=" + std::to_string(d) +
                           " must be in [1, 16]");
  }
  if (shape.self < -1 || shape.self >= w) {
    return InvalidArgument("MakeExchangeLayout: self=" + std::to_string(shape.self) +
                           " must be -1 or a rank in [0, " + std::to_string(w) + ")");
  }
  if (cap < 0) {
    return InvalidArgument("MakeExchangeLayout: capacity=" + std::to_string(cap) +
                           " must be >= 0");
  }
  const int64_t blocks = w * l * g;
  ExchangeLayout out;
  out.shape = shape;
  MOE_ASSIGN_OR_RETURN(out.plan_rows, CheckedTotal("send_counts", blocks, send_counts));
  MOE_ASSIGN_OR_RETURN(out.recv_rows, CheckedTotal("recv_counts", blocks, recv_counts));
  const bool per_expert = cap > 0 && !shape.expert_capacity.empty();
  if (per_expert && static_cast<int64_t>(shape.expert_capacity.size()) != w * l) {
    return InvalidArgument("MakeExchangeLayout: expert_capacity has " +
                           std::to_string(shape.expert_capacity.size()) +
                           " values, must be ranks x local experts = " + std::to_string(w * l));
  }
  // Padded rows of send block b.
  const auto block_cap = [&](int64_t b) {
    return per_expert ? shape.expert_capacity[static_cast<size_t>(b / g)] : cap;
  };
  if (per_expert) {
    for (int64_t b = 0; b < blocks; ++b) {
      if (send_counts[b] > block_cap(b) || block_cap(b) < 0) {
        return InvalidArgument("MakeExchangeLayout: block " + std::to_string(b) + " sends " +
                               std::to_string(send_counts[b]) + " rows, above its capacity " +
                               std::to_string(block_cap(b)));
      }
    }
  } else if (cap > 0) {
    for (int64_t b = 0; b < blocks; ++b) {
      if (send_counts[b] > cap || recv_counts[b] != cap) {
        return InvalidArgument("MakeExchangeLayout: with capacity " + std::to_string(cap) +
                               " every block sends at most and receives exactly that many rows "
                               "(block " + std::to_string(b) + ": sends " +
                               std::to_string(send_counts[b]) + ", receives " +
                               std::to_string(recv_counts[b]) + ")");
      }
    }
  }
  if (per_expert) {
    out.send_rows = 0;
    for (int64_t b = 0; b < blocks; ++b) out.send_rows += block_cap(b);
  } else {
    out.send_rows = cap > 0 ? blocks * cap : out.plan_rows;
  }
  if (out.send_rows > kMaxRows) {
    return InvalidArgument("MakeExchangeLayout: " + std::to_string(out.send_rows) +
                           " padded send rows, must be < 2^31");
  }
  out.send_is_plan = d == 1 && cap == 0;
  out.recv_is_expert_major = l == 1 || w == 1;
  // Chunk j's rows of a block of n: [Begin(n, j), Begin(n, j + 1)).
  const auto begin = [d](int64_t n, int64_t j) { return n * j / d; };
  std::vector<int64_t> plan_begin(static_cast<size_t>(blocks), 0);
  for (int64_t b = 1; b < blocks; ++b) plan_begin[b] = plan_begin[b - 1] + send_counts[b - 1];
  out.plan_to_send.assign(static_cast<size_t>(out.plan_rows), 0);
  if (shape.self >= 0) out.plan_to_recv.assign(static_cast<size_t>(out.plan_rows), -1);
  int64_t send_at = 0, recv_at = 0;
  for (int64_t j = 0; j < d; ++j) {
    ExchangeChunk c;
    c.send_begin = send_at;
    c.recv_begin = recv_at;
    c.send_counts.assign(static_cast<size_t>(w), 0);
    c.send_displs.assign(static_cast<size_t>(w), 0);
    c.recv_counts.assign(static_cast<size_t>(w), 0);
    c.recv_displs.assign(static_cast<size_t>(w), 0);
    // Receive side: [source][local expert][group] rows of this chunk.
    std::vector<int64_t> seg_row(static_cast<size_t>(blocks)), seg_rows(static_cast<size_t>(blocks));
    for (int64_t s = 0; s < w; ++s) {
      c.recv_displs[s] = recv_at;
      for (int64_t i = 0; i < l * g; ++i) {
        const int64_t b = s * l * g + i, n = recv_counts[b];
        seg_row[b] = recv_at;
        seg_rows[b] = begin(n, j + 1) - begin(n, j);
        c.recv_counts[s] += seg_rows[b];
        recv_at += seg_rows[b];
      }
    }
    for (int64_t p = 0; p < w; ++p) {
      c.send_displs[p] = send_at;
      for (int64_t i = 0; i < l * g; ++i) {
        const int64_t b = p * l * g + i, real = send_counts[b], n = cap > 0 ? block_cap(b) : real;
        const int64_t lo = begin(n, j), rows = begin(n, j + 1) - lo;
        if (rows == 0) continue;
        SendPiece piece{send_at, plan_begin[b] + lo, std::clamp<int64_t>(real - lo, 0, rows), rows};
        for (int64_t r = 0; r < piece.real; ++r) out.plan_to_send[piece.plan_row + r] = send_at + r;
        if (p == shape.self) {
          // Block (self, l, g) arrives as receive block (source self, l, g): same index.
          piece.recv_row = seg_row[b];
          for (int64_t r = 0; r < piece.real; ++r) {
            out.plan_to_recv[piece.plan_row + r] = piece.recv_row + r;
          }
        }
        c.pieces.push_back(piece);
        c.send_counts[p] += rows;
        send_at += rows;
      }
    }
    c.recv_rows = recv_at - c.recv_begin;
    c.send_rows = send_at - c.send_begin;
    c.expert_offsets.assign(static_cast<size_t>(l + 1), 0);
    for (int64_t le = 0; le < l; ++le) {
      for (int64_t s = 0; s < w; ++s) {
        for (int64_t gr = 0; gr < g; ++gr) {
          const int64_t b = (s * l + le) * g + gr;
          c.expert_offsets[le + 1] += seg_rows[b];
          if (seg_rows[b] == 0) continue;
          c.segments.push_back({static_cast<int>(le), static_cast<int>(s), static_cast<int>(gr),
                                seg_row[b], seg_rows[b]});
        }
      }
      c.expert_offsets[le + 1] += c.expert_offsets[le];
    }
    out.chunks.push_back(std::move(c));
  }
  return out;
}

ExchangeMaps MakeExchangeMaps(const ExchangeLayout& layout, bool bf16_wire) {
  ExchangeMaps maps;
  const auto i32 = [](int64_t v) { return static_cast<int32_t>(v); };
  maps.self_back_begin.push_back(0);
  for (const ExchangeChunk& c : layout.chunks) {
    for (const SendPiece& p : c.pieces) {
      const bool self = p.recv_row >= 0;
      std::vector<int32_t>& dst = self ? maps.self_dst : maps.send_dst;
      std::vector<int32_t>& src = self ? maps.self_src : maps.send_src;
      const int64_t to = self ? p.recv_row : p.send_row;
      for (int64_t r = 0; r < p.rows; ++r) {
        dst.push_back(i32(to + r));
        src.push_back(r < p.real ? i32(p.plan_row + r) : -1);
        if (self) {
          maps.self_back_dst.push_back(i32(p.send_row + r));
          maps.self_back_src.push_back(i32(p.recv_row + r));
        }
      }
    }
    maps.self_back_begin.push_back(static_cast<int64_t>(maps.self_back_dst.size()));
  }
  maps.return_row.resize(static_cast<size_t>(layout.plan_rows));
  for (int64_t r = 0; r < layout.plan_rows; ++r) {
    const int64_t self = layout.plan_to_recv.empty() ? -1 : layout.plan_to_recv[r];
    maps.return_row[r] = self >= 0 && !bf16_wire ? i32(-1 - self) : i32(layout.plan_to_send[r]);
  }
  maps.to_expert_major.reserve(static_cast<size_t>(layout.recv_rows));
  maps.to_source_major.assign(static_cast<size_t>(layout.recv_rows), 0);
  for (const ExchangeChunk& c : layout.chunks) {
    for (const Segment& s : c.segments) {
      for (int64_t r = 0; r < s.rows; ++r) {
        const int64_t expert_major = static_cast<int64_t>(maps.to_expert_major.size());
        maps.to_source_major[s.row + r] = i32(expert_major - c.recv_begin);
        maps.to_expert_major.push_back(i32(s.row + r - c.recv_begin));
      }
    }
  }
  return maps;
}

}  // namespace moe
