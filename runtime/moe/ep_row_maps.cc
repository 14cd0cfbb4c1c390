// The device exchange's regroup maps and chunked layout (runtime/moe/ep_row_maps.h).
#include "runtime/moe/ep_row_maps.h"

#include <string>

namespace moe {

namespace {

// The total of a ranks x local experts count vector, or an error naming `what`.
StatusOr<int64_t> CheckedTotal(const std::string& what, int64_t w, int64_t l,
                               const std::vector<int64_t>& counts) {
  if (w < 1 || l < 1 || static_cast<int64_t>(counts.size()) != w * l) {
    return InvalidArgument(what + ": " + std::to_string(counts.size()) +
                           " counts, must be ranks x local experts = " + std::to_string(w) + " x " +
                           std::to_string(l) + " (both >= 1)");
  }
  int64_t total = 0;
  for (int64_t c : counts) {
    if (c < 0) return InvalidArgument(what + ": negative row count " + std::to_string(c));
    total += c;
  }
  if (total > (int64_t{1} << 31) - 1) {
    return InvalidArgument(what + ": " + std::to_string(total) + " rows, must be < 2^31");
  }
  return total;
}

}  // namespace

StatusOr<EpRowMaps> MakeEpRowMaps(int ranks, int local_experts,
                                  const std::vector<int64_t>& recv_counts) {
  const int64_t w = ranks, l = local_experts;
  MOE_ASSIGN_OR_RETURN(const int64_t total, CheckedTotal("MakeEpRowMaps", w, l, recv_counts));
  EpRowMaps maps;
  maps.source_rows.assign(static_cast<size_t>(w), 0);
  // Offset of block (s, l) among the received rows (source-major).
  std::vector<int64_t> block_begin(static_cast<size_t>(w * l));
  int64_t at = 0;
  for (int64_t s = 0; s < w; ++s) {
    for (int64_t e = 0; e < l; ++e) {
      block_begin[static_cast<size_t>(s * l + e)] = at;
      at += recv_counts[static_cast<size_t>(s * l + e)];
      maps.source_rows[static_cast<size_t>(s)] += recv_counts[static_cast<size_t>(s * l + e)];
    }
  }
  maps.to_expert_major.resize(static_cast<size_t>(total));
  maps.to_source_major.resize(static_cast<size_t>(total));
  maps.expert_offsets.assign(static_cast<size_t>(l + 1), 0);
  int64_t j = 0;
  for (int64_t e = 0; e < l; ++e) {
    for (int64_t s = 0; s < w; ++s) {
      const int64_t begin = block_begin[static_cast<size_t>(s * l + e)];
      for (int64_t r = 0; r < recv_counts[static_cast<size_t>(s * l + e)]; ++r, ++j) {
        maps.to_expert_major[static_cast<size_t>(j)] = static_cast<int32_t>(begin + r);
        maps.to_source_major[static_cast<size_t>(begin + r)] = static_cast<int32_t>(j);
      }
    }
    maps.expert_offsets[static_cast<size_t>(e + 1)] = j;
  }
  return maps;
}

StatusOr<EpExchangeLayout> MakeEpExchangeLayout(int ranks, int local_experts, int chunks,
                                                const std::vector<int64_t>& send_counts,
                                                const std::vector<int64_t>& recv_counts) {
  const int64_t w = ranks, l = local_experts, d = chunks;
  if (d < 1 || d > 16) {
    return InvalidArgument("MakeEpExchangeLayout: chunks=" + std::to_string(d) +
                           " must be in [1, 16]");
  }
  EpExchangeLayout out;
  MOE_ASSIGN_OR_RETURN(out.send_rows,
                       CheckedTotal("MakeEpExchangeLayout (send)", w, l, send_counts));
  MOE_ASSIGN_OR_RETURN(out.recv_rows,
                       CheckedTotal("MakeEpExchangeLayout (receive)", w, l, recv_counts));
  // Rows [Begin(n, j), Begin(n, j + 1)) of a block of n rows are chunk j's.
  const auto begin = [d](int64_t n, int64_t j) { return n * j / d; };
  std::vector<int64_t> plan_begin(static_cast<size_t>(w * l + 1), 0);
  for (int64_t b = 0; b < w * l; ++b) {
    plan_begin[static_cast<size_t>(b + 1)] =
        plan_begin[static_cast<size_t>(b)] + send_counts[static_cast<size_t>(b)];
  }
  if (d > 1) {
    out.send_gather.reserve(static_cast<size_t>(out.send_rows));
    out.plan_gather.resize(static_cast<size_t>(out.send_rows));
  }
  out.to_expert_major.reserve(static_cast<size_t>(out.recv_rows));
  out.to_source_major.reserve(static_cast<size_t>(out.recv_rows));
  int64_t send_at = 0, recv_at = 0;
  std::vector<int64_t> chunk_recv(static_cast<size_t>(w * l));
  for (int64_t j = 0; j < d; ++j) {
    EpChunk c;
    c.send_counts.assign(static_cast<size_t>(w), 0);
    c.send_displs.assign(static_cast<size_t>(w), 0);
    for (int64_t p = 0; p < w; ++p) {
      c.send_displs[static_cast<size_t>(p)] = send_at;
      for (int64_t e = 0; e < l; ++e) {
        const size_t b = static_cast<size_t>(p * l + e);
        const int64_t n = send_counts[b], lo = begin(n, j), hi = begin(n, j + 1);
        for (int64_t r = lo; r < hi && d > 1; ++r) {
          const int64_t plan_row = plan_begin[b] + r;
          out.plan_gather[static_cast<size_t>(plan_row)] =
              static_cast<int32_t>(out.send_gather.size());
          out.send_gather.push_back(static_cast<int32_t>(plan_row));
        }
        c.send_counts[static_cast<size_t>(p)] += hi - lo;
        send_at += hi - lo;
      }
    }
    for (size_t b = 0; b < chunk_recv.size(); ++b) {
      chunk_recv[b] = begin(recv_counts[b], j + 1) - begin(recv_counts[b], j);
    }
    MOE_ASSIGN_OR_RETURN(EpRowMaps maps,
                         MakeEpRowMaps(static_cast<int>(w), static_cast<int>(l), chunk_recv));
    c.recv_begin = recv_at;
    c.recv_rows = maps.expert_offsets.back();
    c.recv_counts = maps.source_rows;
    c.recv_displs.assign(static_cast<size_t>(w), 0);
    for (int64_t s = 0, at = recv_at; s < w; ++s) {
      c.recv_displs[static_cast<size_t>(s)] = at;
      at += c.recv_counts[static_cast<size_t>(s)];
    }
    for (int32_t i : maps.to_expert_major) {
      out.to_expert_major.push_back(static_cast<int32_t>(recv_at + i));
    }
    for (int32_t i : maps.to_source_major) {
      out.to_source_major.push_back(static_cast<int32_t>(recv_at + i));
    }
    c.expert_offsets = std::move(maps.expert_offsets);
    recv_at += c.recv_rows;
    out.chunks.push_back(std::move(c));
  }
  return out;
}

}  // namespace moe
