// Whole-expert exchanges of redundant experts (runtime/exchange/expert_moves.h).
#include "runtime/exchange/expert_moves.h"

#include <algorithm>
#include <utility>

namespace moe {
namespace {

// The tensors of one expert, in a fixed order (empty ones hold nothing).
std::vector<Tensor*> ExpertTensors(experts::FfnParams& p) {
  return {&p.w1, &p.b1, &p.w2, &p.b2, &p.w3};
}

int64_t ExpertFloats(experts::FfnParams& p) {
  int64_t n = 0;
  for (Tensor* t : ExpertTensors(p)) n += t->size();
  return n;
}

// The slot of this rank holding logical expert e under p, or -1.
int SlotOf(const ExpertPlacement& p, int rank, int e) {
  for (int s = 0; s < p.per_rank; ++s) {
    if (p.logical_at(rank, s) == e) return s;
  }
  return -1;
}

// One all-to-all-v of whole experts (`per` floats each): for each destination d, this rank's slots
// `pick(d, s)` selects (filled by `fill`), in slot order — and what each source sends here, by
// `expect(src, s)` over the source's slots, in slot order. recv_displs: where each source's
// experts start in *recv.
Status ExchangeExperts(comm::Communicator& ep, int per_rank, int64_t per,
                       const std::function<bool(int, int)>& pick,
                       const std::function<bool(int, int)>& expect,
                       const std::function<void(int, float*)>& fill, std::vector<float>* recv,
                       std::vector<int64_t>* recv_displs) {
  const int w = ep.size(), me = ep.rank();
  std::vector<int64_t> sc(static_cast<size_t>(w), 0), sd(static_cast<size_t>(w), 0),
      rc(static_cast<size_t>(w), 0), rd(static_cast<size_t>(w), 0);
  std::vector<float> send;
  for (int d = 0; d < w; ++d) {
    sd[static_cast<size_t>(d)] = static_cast<int64_t>(send.size());
    for (int s = 0; s < per_rank; ++s) {
      if (d == me || !pick(d, s)) continue;
      send.resize(send.size() + static_cast<size_t>(per));
      fill(s, send.data() + send.size() - per);
      sc[static_cast<size_t>(d)] += per;
    }
  }
  int64_t total = 0;
  for (int src = 0; src < w; ++src) {
    rd[static_cast<size_t>(src)] = total;
    for (int s = 0; s < per_rank; ++s) {
      if (src != me && expect(src, s)) rc[static_cast<size_t>(src)] += per;
    }
    total += rc[static_cast<size_t>(src)];
  }
  recv->assign(static_cast<size_t>(total), 0.0f);
  *recv_displs = rd;
  return ep.AllToAllV(send.data(), sc, sd, recv->data(), rc, rd, comm::DataType::kFloat32);
}

}  // namespace

Status SumReplicaGradients(comm::Communicator& ep, const ExpertPlacement& p,
                           std::span<experts::FfnParams> grads) {
  const int w = ep.size(), me = ep.rank();
  if (static_cast<int>(grads.size()) != p.per_rank || p.num_ranks != w) {
    return InvalidArgument("SumReplicaGradients: " + std::to_string(grads.size()) +
                           " gradients on " + std::to_string(w) + " ranks, the placement has " +
                           std::to_string(p.per_rank) + " slots on " + std::to_string(p.num_ranks));
  }
  const auto replicated = [&](int e) { return p.replica_count(e) > 1; };
  const auto primary = [&](int e) { return p.rank_of(p.replicas[static_cast<size_t>(e)][0]); };
  const int64_t per = ExpertFloats(grads[0]);
  const auto copy_out = [&](int slot, float* to) {
    for (Tensor* t : ExpertTensors(grads[static_cast<size_t>(slot)])) {
      to = std::copy(t->data(), t->data() + t->size(), to);
    }
  };
  const auto copy_in = [&](const float* from, int slot) {
    for (Tensor* t : ExpertTensors(grads[static_cast<size_t>(slot)])) {
      std::copy(from, from + t->size(), t->data());
      from += t->size();
    }
  };
  // 1. Every replica's gradient to its expert's first replica (the primary).
  std::vector<float> in;
  std::vector<int64_t> at;
  MOE_RETURN_IF_ERROR(ExchangeExperts(
      ep, p.per_rank, per,
      [&](int d, int s) {
        const int e = p.logical_at(me, s);
        return replicated(e) && primary(e) == d;
      },
      [&](int src, int s) {
        const int e = p.logical_at(src, s);
        return replicated(e) && primary(e) == me;
      },
      copy_out, &in, &at));
  // 2. The primary sums them (float64: its own first, then by source rank).
  std::vector<double> acc(static_cast<size_t>(per));
  std::vector<float> sum(static_cast<size_t>(per));
  for (int s = 0; s < p.per_rank; ++s) {
    const int e = p.logical_at(me, s);
    if (!replicated(e) || primary(e) != me) continue;
    copy_out(s, sum.data());
    std::copy(sum.begin(), sum.end(), acc.begin());
    for (int src = 0; src < w; ++src) {
      if (src == me) continue;
      int64_t off = at[static_cast<size_t>(src)];
      for (int t = 0; t < p.per_rank; ++t) {
        const int f = p.logical_at(src, t);
        if (!replicated(f) || primary(f) != me) continue;
        if (f == e) {
          for (int64_t i = 0; i < per; ++i) acc[static_cast<size_t>(i)] += in[static_cast<size_t>(off + i)];
        }
        off += per;
      }
    }
    for (int64_t i = 0; i < per; ++i) sum[static_cast<size_t>(i)] = static_cast<float>(acc[static_cast<size_t>(i)]);
    copy_in(sum.data(), s);
  }
  // 3. The sum back to every other replica.
  MOE_RETURN_IF_ERROR(ExchangeExperts(
      ep, p.per_rank, per,
      [&](int d, int s) {
        const int e = p.logical_at(me, s);
        return replicated(e) && primary(e) == me && SlotOf(p, d, e) >= 0;
      },
      [&](int src, int t) {
        const int e = p.logical_at(src, t);
        return replicated(e) && primary(e) == src && SlotOf(p, me, e) >= 0;
      },
      copy_out, &in, &at));
  for (int src = 0; src < w; ++src) {
    if (src == me) continue;
    int64_t off = at[static_cast<size_t>(src)];
    for (int t = 0; t < p.per_rank; ++t) {
      const int e = p.logical_at(src, t);
      if (!replicated(e) || primary(e) != src || SlotOf(p, me, e) < 0) continue;
      copy_in(in.data() + off, SlotOf(p, me, e));
      off += per;
    }
  }
  return Status::Ok();
}

StatusOr<MovedExperts> MoveExperts(comm::Communicator& ep, const ExpertPlacement& now,
                                   const ExpertPlacement& next, int64_t floats,
                                   const std::function<void(int, float*)>& pack) {
  const int w = ep.size(), me = ep.rank(), per_rank = now.per_rank;
  if (now.num_ranks != w || next.num_ranks != w || next.per_rank != per_rank) {
    return InvalidArgument("MoveExperts: placements of " + std::to_string(now.per_rank) + " and " +
                           std::to_string(next.per_rank) + " slots on " +
                           std::to_string(now.num_ranks) + " and " +
                           std::to_string(next.num_ranks) + " ranks, the group has " +
                           std::to_string(w));
  }
  MovedExperts out;
  out.kept_from.assign(static_cast<size_t>(per_rank), -1);
  out.payload.assign(static_cast<size_t>(per_rank), nullptr);
  for (int s = 0; s < per_rank; ++s) out.kept_from[static_cast<size_t>(s)] = SlotOf(now, me, next.logical_at(me, s));
  if (next.physical_to_logical == now.physical_to_logical) return out;
  // Who sends logical expert e to a rank that does not hold it yet: its first replica's rank.
  const auto source = [&](int e) { return now.rank_of(now.replicas[static_cast<size_t>(e)][0]); };
  std::vector<int64_t> send_counts(static_cast<size_t>(w), 0), recv_counts(static_cast<size_t>(w), 0);
  std::vector<float> send;
  for (int d = 0; d < w; ++d) {
    for (int s = 0; s < per_rank; ++s) {
      const int e = next.logical_at(d, s);
      if (SlotOf(now, d, e) >= 0 || source(e) != me) continue;
      send.resize(send.size() + static_cast<size_t>(floats));
      pack(SlotOf(now, me, e), send.data() + send.size() - floats);
      send_counts[static_cast<size_t>(d)] += floats;
    }
  }
  for (int s = 0; s < per_rank; ++s) {
    if (out.kept_from[static_cast<size_t>(s)] < 0) {
      recv_counts[static_cast<size_t>(source(next.logical_at(me, s)))] += floats;
    }
  }
  std::vector<int64_t> send_displs(static_cast<size_t>(w), 0), recv_displs(static_cast<size_t>(w), 0);
  for (int r = 1; r < w; ++r) {
    send_displs[r] = send_displs[r - 1] + send_counts[r - 1];
    recv_displs[r] = recv_displs[r - 1] + recv_counts[r - 1];
  }
  out.received.resize(static_cast<size_t>(recv_displs[w - 1] + recv_counts[w - 1]));
  MOE_RETURN_IF_ERROR(ep.AllToAllV(send.data(), send_counts, send_displs, out.received.data(),
                                   recv_counts, recv_displs, comm::DataType::kFloat32));
  // Each source's payloads arrive in this rank's slot order.
  std::vector<int64_t> read = recv_displs;
  for (int s = 0; s < per_rank; ++s) {
    if (out.kept_from[static_cast<size_t>(s)] >= 0) continue;
    const int src = source(next.logical_at(me, s));
    out.payload[static_cast<size_t>(s)] = out.received.data() + read[static_cast<size_t>(src)];
    read[static_cast<size_t>(src)] += floats;
  }
  return out;
}

}  // namespace moe
