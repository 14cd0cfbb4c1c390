// BuildDispatchPlan: selection, capacity, drops, gates and the packed-row layout
// (runtime/routing/dispatch_plan.h).
#include "runtime/routing/dispatch_plan.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "base/rng.h"
#include "runtime/config/config.h"
#include "runtime/routing/routing_math.h"

namespace moe {
namespace {

// Experts of one token ordered by selection score (probs + bias) descending, ties lower index:
// the first `count` of that order into `out`, among the experts of the groups in `group_mask`
// when group_size > 0 (group-limited top-k). Up to routing::kMaxRankedExperts by insertion (the
// device router's code; partial_sort's heap costs ~3x more at E = 64, k = 6), beyond that (reroute
// rankings of many experts) by partial_sort in the same strict order. `score_buf` and `idx` are
// E-sized scratch buffers owned by the caller.
void RankExperts(const float* probs, const std::vector<float>& bias, int64_t e, int64_t count,
                 int32_t group_size, uint64_t group_mask, int32_t* out, float* score_buf,
                 std::vector<int32_t>& idx) {
  if (count <= routing::kMaxRankedExperts) {
    routing::RankTopExperts(probs, bias.empty() ? nullptr : bias.data(), static_cast<int32_t>(e),
                            static_cast<int32_t>(count), out, group_size, group_mask);
    return;
  }
  for (int64_t j = 0; j < e; ++j) score_buf[j] = probs[j] + (bias.empty() ? 0.0f : bias[j]);
  auto better = [&](int32_t a, int32_t b) {
    return routing::Outranks(score_buf[a], a, score_buf[b], b);
  };
  idx.clear();
  for (int32_t j = 0; j < static_cast<int32_t>(e); ++j) {
    if (group_size == 0 || ((group_mask >> (j / group_size)) & 1u) != 0) idx.push_back(j);
  }
  std::partial_sort(idx.begin(), idx.begin() + count, idx.end(), better);
  std::copy(idx.begin(), idx.begin() + count, out);
}

// Group-limited top-k of one token: the mask of its kept expert groups (all when not limited).
uint64_t TokenGroupMask(const config::RouterConfig& cfg, const float* probs,
                        const std::vector<float>& bias, int64_t e) {
  const int32_t groups = cfg.num_expert_groups();
  if (groups <= 1) return ~uint64_t{0};
  return routing::ChooseExpertGroups(probs, bias.empty() ? nullptr : bias.data(),
                                     static_cast<int32_t>(e), groups, cfg.groups_per_token(),
                                     TopK(cfg) / cfg.groups_per_token());
}

// Fills packed-row arrays from per-(group, expert) counts and each assignment's position.
struct RowAssignment {
  int32_t token, expert, group, position;
  float gate;
};

void LayoutRows(DispatchPlan* p, const std::vector<RowAssignment>& assignments) {
  const int64_t e = p->num_experts, g = p->num_groups;
  p->expert_offset.assign(static_cast<size_t>(e + 1), 0);
  // prefix[g][e] = rows of expert e in groups before g.
  std::vector<int64_t> prefix(static_cast<size_t>(g * e), 0);
  for (int64_t ex = 0; ex < e; ++ex) {
    int64_t acc = 0;
    for (int64_t gr = 0; gr < g; ++gr) {
      prefix[gr * e + ex] = acc;
      acc += p->group_expert_count[gr * e + ex];
    }
    p->expert_offset[ex + 1] = p->expert_offset[ex] + acc;
  }
  const int64_t rows = p->expert_offset[e];
  p->row_token.assign(static_cast<size_t>(rows), -1);
  p->row_expert.assign(static_cast<size_t>(rows), -1);
  p->row_gate.assign(static_cast<size_t>(rows), 0.0f);
  std::vector<int32_t> row_of(assignments.size());
  for (size_t i = 0; i < assignments.size(); ++i) {
    const RowAssignment& a = assignments[i];
    const int64_t row = p->expert_offset[a.expert] + prefix[a.group * e + a.expert] + a.position;
    p->row_token[row] = a.token;
    p->row_expert[row] = a.expert;
    p->row_gate[row] = a.gate;
    row_of[i] = static_cast<int32_t>(row);
  }
  // Per-token CSR in assignment order (assignments are emitted token-major by the callers).
  p->token_row_offset.assign(static_cast<size_t>(p->num_tokens + 1), 0);
  for (const RowAssignment& a : assignments) ++p->token_row_offset[a.token + 1];
  for (int64_t t = 0; t < p->num_tokens; ++t) p->token_row_offset[t + 1] += p->token_row_offset[t];
  p->token_rows.assign(assignments.size(), -1);
  std::vector<int64_t> fill(p->token_row_offset.begin(), p->token_row_offset.end() - 1);
  for (size_t i = 0; i < assignments.size(); ++i) p->token_rows[fill[assignments[i].token]++] = row_of[i];
}

// Capacity of one token-choice plan, slot-major (POSITION, PROBABILITY): in each group every
// slot 0 is placed before any slot 1, tokens within a slot in position order or by their top-1
// gate (PROBABILITY); a slot whose expert is full is rerouted (reroute_overflow) or dropped.
// Fills `position` (per slot, -1 when dropped), clears `alive` for drops, counts rows per
// (group, expert).
void PlaceSlotMajor(const config::RouterConfig& cfg, const Tensor& probs,
                    const std::vector<int32_t>& ranking, int64_t rank_len, DispatchPlan* p,
                    std::vector<uint8_t>* alive, std::vector<int32_t>* position) {
  const int64_t e = p->num_experts, k = p->top_k, g = p->num_groups, cap = p->capacity;
  const bool reroute = cfg.reroute_overflow();
  std::vector<int64_t> order;
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = p->group_begin[gr], n = p->group_size(gr);
    order.resize(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), b);
    if (cfg.drop_policy() == config::PROBABILITY) {
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) {
        return probs(a, p->selected[a * k]) > probs(c, p->selected[c * k]);
      });
    }
    int32_t* count = &p->group_expert_count[gr * e];
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t t : order) {
        const int64_t slot = t * k + j;
        if (!(*alive)[slot]) continue;
        int32_t ex = p->slot_final[slot];
        if (cap > 0 && count[ex] >= cap) {
          int32_t target = -1;
          if (reroute) {
            for (int64_t q = k; q < e && target < 0; ++q) {
              const int32_t cand = ranking[t * rank_len + q];
              bool used = false;
              for (int64_t jj = 0; jj < k; ++jj) used = used || p->slot_final[t * k + jj] == cand;
              if (!used && count[cand] < cap) target = cand;
            }
          }
          if (target < 0) {
            (*alive)[slot] = 0;
            continue;
          }
          ex = target;
          p->slot_final[slot] = ex;
        }
        (*position)[slot] = count[ex]++;
      }
    }
  }

}

// Capacity per (group, expert), whatever the slot index: EXPERT_SCORE keeps the C live slots with
// the largest raw score probs[t, e] (ties: lower token), TOKEN_ORDER the first C in token order;
// kept slots take positions in token order. Same outputs as PlaceSlotMajor.
void PlacePerExpert(config::DropPolicy policy, const Tensor& probs, DispatchPlan* p,
                    std::vector<uint8_t>* alive, std::vector<int32_t>* position) {
  const int64_t e = p->num_experts, k = p->top_k, g = p->num_groups, cap = p->capacity;
  std::vector<std::vector<int64_t>> claims(static_cast<size_t>(e));  // slots, token order
  for (int64_t gr = 0; gr < g; ++gr) {
    for (auto& c : claims) c.clear();
    for (int64_t t = p->group_begin[gr]; t < p->group_begin[gr + 1]; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        if ((*alive)[t * k + j]) claims[p->selected[t * k + j]].push_back(t * k + j);
      }
    }
    for (int64_t ex = 0; ex < e; ++ex) {
      std::vector<int64_t>& c = claims[ex];
      const auto n = static_cast<int64_t>(c.size());
      if (cap > 0 && n > cap) {
        if (policy == config::EXPERT_SCORE) {
          // The C best by raw score (stable: ties keep token order), back to token order.
          std::stable_sort(c.begin(), c.end(), [&](int64_t a, int64_t b) {
            return probs(a / k, ex) > probs(b / k, ex);
          });
        }
        for (int64_t i = cap; i < n; ++i) (*alive)[c[i]] = 0;
        c.resize(static_cast<size_t>(cap));
        std::sort(c.begin(), c.end());
      }
      for (size_t i = 0; i < c.size(); ++i) (*position)[c[i]] = static_cast<int32_t>(i);
      p->group_expert_count[gr * e + ex] = static_cast<int32_t>(c.size());
    }
  }
}

StatusOr<DispatchPlan> BuildTokenChoice(const config::RouterConfig& cfg, const Tensor& probs,
                                        const std::vector<float>& bias, const RouteContext& ctx,
                                        DispatchPlan p) {
  const int64_t s = p.num_tokens, e = p.num_experts, k = p.top_k, g = p.num_groups;
  const int64_t rank_len = cfg.reroute_overflow() ? e : k;
  std::vector<int32_t> ranking(static_cast<size_t>(s * rank_len));
  std::vector<float> score_buf(static_cast<size_t>(e));
  std::vector<int32_t> idx_buf;
  idx_buf.reserve(static_cast<size_t>(e));
  const int32_t group_size =
      cfg.num_expert_groups() > 1 ? static_cast<int32_t>(e / cfg.num_expert_groups()) : 0;
  p.selected.resize(static_cast<size_t>(s * k));
  if (ctx.replay_selected != nullptr) {
    // Router replay: the recorded selection, checked (reroute, which ranks beyond k, is refused
    // with replay by the config rules).
    if (rank_len != k) return InvalidArgument("router replay cannot reroute overflow");
    for (int64_t t = 0; t < s; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int32_t ex = ctx.replay_selected[t * k + j];
        bool repeated = false;
        for (int64_t jj = 0; jj < j; ++jj) repeated = repeated || ctx.replay_selected[t * k + jj] == ex;
        if (ex < 0 || ex >= e || repeated) {
          return InvalidArgument("router replay: token " + std::to_string(t) + " slot " +
                                 std::to_string(j) + " selects expert " + std::to_string(ex) +
                                 ", must be a distinct expert in [0, " + std::to_string(e) + ")");
        }
        ranking[t * rank_len + j] = ex;
        p.selected[t * k + j] = ex;
      }
    }
  } else {
    for (int64_t t = 0; t < s; ++t) {
      const uint64_t mask = TokenGroupMask(cfg, probs.row(t), bias, e);
      RankExperts(probs.row(t), bias, e, rank_len, group_size, mask, &ranking[t * rank_len],
                  score_buf.data(), idx_buf);
      for (int64_t j = 0; j < k; ++j) p.selected[t * k + j] = ranking[t * rank_len + j];
    }
  }
  p.slot_final = p.selected;
  p.slot_expert.assign(static_cast<size_t>(s * k), -1);
  p.slot_row.assign(static_cast<size_t>(s * k), -1);
  p.slot_raw.assign(static_cast<size_t>(s * k), 0.0f);
  p.slot_gate.assign(static_cast<size_t>(s * k), 0.0f);
  p.load_per_expert.assign(static_cast<size_t>(e), 0);
  p.kept_per_expert.assign(static_cast<size_t>(e), 0);
  p.dropped_per_expert.assign(static_cast<size_t>(e), 0);
  p.group_expert_count.assign(static_cast<size_t>(g * e), 0);
  for (int32_t ex : p.selected) ++p.load_per_expert[ex];

  // GShard random routing of the 2nd slot: decided before capacity, takes no capacity.
  std::vector<uint8_t> alive(static_cast<size_t>(s * k), 1);
  if (cfg.random_routing()) {
    for (int64_t t = 0; t < s; ++t) {
      const double u = CounterUniform(ctx.seed, ctx.step, static_cast<uint64_t>(ctx.token_offset + t),
                                      RngStream::kRoutingUniform);
      if (!routing::KeepsSecondSlot(probs(t, p.selected[t * k]), probs(t, p.selected[t * k + 1]), u)) {
        alive[t * k + 1] = 0;
      }
    }
  }

  std::vector<int32_t> position(static_cast<size_t>(s * k), -1);
  if (cfg.drop_policy() == config::EXPERT_SCORE || cfg.drop_policy() == config::TOKEN_ORDER) {
    PlacePerExpert(cfg.drop_policy(), probs, &p, &alive, &position);
  } else {
    PlaceSlotMajor(cfg, probs, ranking, rank_len, &p, &alive, &position);
  }

  // Gates.
  for (int64_t t = 0; t < s; ++t) {
    const int64_t first = t * k;
    routing::TokenGates(cfg.normalization(), static_cast<float>(cfg.scaling_factor()),
                        static_cast<int32_t>(k), probs.row(t), &p.slot_final[first],
                        &alive[first], &p.slot_raw[first], &p.slot_gate[first], &p.slot_expert[first]);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t slot = first + j;
      if (!alive[slot]) {
        ++p.dropped_per_expert[p.selected[slot]];
        ++p.dropped_slots;
      } else {
        ++p.kept_per_expert[p.slot_final[slot]];
      }
    }
  }

  std::vector<RowAssignment> assignments;
  assignments.reserve(static_cast<size_t>(s * k));
  for (int64_t gr = 0; gr < g; ++gr) {
    for (int64_t t = p.group_begin[gr]; t < p.group_begin[gr + 1]; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = t * k + j;
        if (p.slot_expert[slot] < 0) continue;
        assignments.push_back({static_cast<int32_t>(t), p.slot_expert[slot], static_cast<int32_t>(gr),
                               position[slot], p.slot_gate[slot]});
      }
    }
  }
  LayoutRows(&p, assignments);
  // token_rows are in slot order; map slots to rows through the same walk.
  for (int64_t t = 0; t < s; ++t) {
    int64_t next = p.token_row_offset[t];
    for (int64_t j = 0; j < k; ++j) {
      if (p.slot_expert[t * k + j] >= 0) p.slot_row[t * k + j] = p.token_rows[next++];
    }
  }
  return p;
}

StatusOr<DispatchPlan> BuildExpertChoice(const Tensor& probs, DispatchPlan p) {
  const int64_t e = p.num_experts, g = p.num_groups, cap = p.capacity;
  p.kept_per_expert.assign(static_cast<size_t>(e), 0);
  p.dropped_per_expert.assign(static_cast<size_t>(e), 0);
  p.load_per_expert.assign(static_cast<size_t>(e), 0);
  p.group_expert_count.assign(static_cast<size_t>(g * e), 0);
  p.ec_token.assign(static_cast<size_t>(g * e * cap), -1);
  std::vector<RowAssignment> assignments;
  std::vector<int64_t> order;
  for (int64_t gr = 0; gr < g; ++gr) {
    const int64_t b = p.group_begin[gr], n = p.group_size(gr);
    const int64_t take = std::min(cap, n);
    for (int64_t ex = 0; ex < e; ++ex) {
      order.resize(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), b);
      std::partial_sort(order.begin(), order.begin() + take, order.end(), [&](int64_t a, int64_t c) {
        return probs(a, ex) > probs(c, ex) || (probs(a, ex) == probs(c, ex) && a < c);
      });
      for (int64_t pos = 0; pos < take; ++pos) {
        const int64_t t = order[pos];
        p.ec_token[(gr * e + ex) * cap + pos] = static_cast<int32_t>(t);
        assignments.push_back({static_cast<int32_t>(t), static_cast<int32_t>(ex),
                               static_cast<int32_t>(gr), static_cast<int32_t>(pos), probs(t, ex)});
      }
      p.group_expert_count[gr * e + ex] = static_cast<int32_t>(take);
      p.kept_per_expert[ex] += take;
      p.load_per_expert[ex] += take;
    }
  }
  // Token-major, expert order within a token, for the per-token CSR.
  std::stable_sort(assignments.begin(), assignments.end(),
                   [](const RowAssignment& a, const RowAssignment& c) {
                     return a.token < c.token || (a.token == c.token && a.expert < c.expert);
                   });
  LayoutRows(&p, assignments);
  return p;
}

}  // namespace

std::vector<int64_t> GroupBounds(int64_t s, int64_t g) {
  std::vector<int64_t> begin(static_cast<size_t>(g + 1));
  const int64_t q = s / g, r = s % g;
  begin[0] = 0;
  for (int64_t i = 0; i < g; ++i) begin[i + 1] = begin[i] + q + (i < r ? 1 : 0);
  return begin;
}

DispatchPlan SoftSlotPlan(int64_t e, int64_t p_slots, int64_t g) {
  DispatchPlan p;
  const int64_t per_group = e * p_slots, s = g * per_group;
  p.num_tokens = s;
  p.num_experts = e;
  p.top_k = 1;
  p.num_groups = g;
  p.capacity = p_slots;
  p.group_begin = GroupBounds(s, g);
  p.group_expert_count.assign(static_cast<size_t>(g * e), static_cast<int32_t>(p_slots));
  std::vector<RowAssignment> assignments;
  assignments.reserve(static_cast<size_t>(s));
  p.selected.resize(static_cast<size_t>(s));
  for (int64_t gr = 0; gr < g; ++gr) {
    for (int64_t ex = 0; ex < e; ++ex) {
      for (int64_t j = 0; j < p_slots; ++j) {
        const int64_t t = gr * per_group + ex * p_slots + j;
        p.selected[t] = static_cast<int32_t>(ex);
        assignments.push_back({static_cast<int32_t>(t), static_cast<int32_t>(ex),
                               static_cast<int32_t>(gr), static_cast<int32_t>(j), 1.0f});
      }
    }
  }
  p.slot_expert = p.selected;
  p.slot_final = p.selected;
  p.slot_raw.assign(static_cast<size_t>(s), 1.0f);
  p.slot_gate.assign(static_cast<size_t>(s), 1.0f);
  LayoutRows(&p, assignments);
  p.slot_row = p.token_rows;
  p.kept_per_expert.assign(static_cast<size_t>(e), g * p_slots);
  p.load_per_expert = p.kept_per_expert;
  p.dropped_per_expert.assign(static_cast<size_t>(e), 0);
  return p;
}

StatusOr<DispatchPlan> BuildDispatchPlan(const config::RouterConfig& cfg, const Tensor& probs,
                                         const std::vector<float>& bias, const RouteContext& ctx) {
  DispatchPlan p;
  p.num_tokens = probs.rows();
  p.num_experts = probs.cols();
  p.num_groups = cfg.num_local_groups();
  p.expert_choice = cfg.gate() == config::EXPERT_CHOICE;
  p.top_k = p.expert_choice ? 0 : TopK(cfg);
  p.normalization = cfg.normalization();
  if (p.num_tokens < p.num_groups) {
    return InvalidArgument("the input has S=" + std::to_string(p.num_tokens) +
                           " tokens, fewer than moe.router.num_local_groups=" +
                           std::to_string(p.num_groups));
  }
  // Soft MoE: no selection (the bias does not apply).
  if (cfg.gate() == config::SOFT) {
    const int64_t slots = cfg.slots_per_expert();
    if (slots < 1 || p.num_experts % slots != 0) {
      return InvalidArgument("gate SOFT: the router has " + std::to_string(p.num_experts) +
                             " columns, not a multiple of moe.router.slots_per_expert=" +
                             std::to_string(slots));
    }
    return SoftSlotPlan(p.num_experts / slots, slots, p.num_groups);
  }
  if (!bias.empty() && static_cast<int64_t>(bias.size()) != p.num_experts) {
    return InvalidArgument("router bias has " + std::to_string(bias.size()) + " entries, must have " +
                           std::to_string(p.num_experts) + " (moe.num_experts)");
  }
  p.group_begin = GroupBounds(p.num_tokens, p.num_groups);
  p.capacity = ComputeCapacity(cfg, p.num_experts, p.num_tokens, p.num_groups, ctx.train);
  if (p.expert_choice) return BuildExpertChoice(probs, std::move(p));
  return BuildTokenChoice(cfg, probs, bias, ctx, std::move(p));
}

}  // namespace moe
