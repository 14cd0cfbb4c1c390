#include "runtime/ep_row_maps.h"

#include <string>

namespace moe {

StatusOr<EpRowMaps> MakeEpRowMaps(int ranks, int local_experts,
                                  const std::vector<int64_t>& recv_counts) {
  const int64_t w = ranks, l = local_experts;
  if (w < 1 || l < 1 || static_cast<int64_t>(recv_counts.size()) != w * l) {
    return InvalidArgument("MakeEpRowMaps: " + std::to_string(recv_counts.size()) +
                           " counts, must be ranks x local experts = " + std::to_string(w) + " x " +
                           std::to_string(l) + " (both >= 1)");
  }
  int64_t total = 0;
  for (int64_t c : recv_counts) {
    if (c < 0) return InvalidArgument("MakeEpRowMaps: negative row count " + std::to_string(c));
    total += c;
  }
  if (total > (int64_t{1} << 31) - 1) {
    return InvalidArgument("MakeEpRowMaps: " + std::to_string(total) + " rows, must be < 2^31");
  }
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

}  // namespace moe
