// HostDevice (runtime/device/host_device.h) and the host's routing steps.
#include "runtime/device/host_device.h"

#include <cstring>
#include <string>
#include <utility>

#include "base/bf16.h"
#include "base/clock.h"
#include "experts/cpu/blas.h"
#include "runtime/config/config.h"
#include "runtime/device/cpu_expert_compute.h"
#include "runtime/device/layer_routing.h"
#include "runtime/device/row_steps.h"

namespace moe {
namespace {

// The router's backward scratch (dlogits, dprobs, dscores, dnoise: S x E each) lives only inside
// one Backward, so each thread keeps one set instead of each layer: a model of L layers holds one,
// not L (moe_simulate's 1024 rank threads with E = 1024 held 0.75 GiB of them for tiny_lm).
RouterGradients& RouterScratch() {
  thread_local RouterGradients scratch;
  return scratch;
}

}  // namespace

HostRouting::HostRouting(const config::LayerConfig& layer) : cfg_(ResolvedLayerConfig(layer)) {}

Status HostRouting::Forward(const float* x, int64_t tokens, const float* wg, const float* wnoise,
                            const std::vector<float>& bias, const RouteContext& ctx) {
  const double t0 = WallSeconds();
  const int64_t m = cfg_.model_dim(), e = cfg_.num_experts();
  ComputeRouter(cfg_.router(), {x, tokens, m}, {wg, m, RouterColumns(cfg_)},
                {wnoise, wnoise == nullptr ? 0 : m, wnoise == nullptr ? 0 : e}, ctx, &router_);
  MOE_RETURN_IF_ERROR(Finish(bias, ctx));
  host_seconds_ = WallSeconds() - t0;
  return Status::Ok();
}

Status HostRouting::ForwardFromLogits(const float* logits, const float* noise_in, int64_t tokens,
                                      const std::vector<float>& bias, const RouteContext& ctx) {
  const double t0 = WallSeconds();
  const int64_t cols = RouterColumns(cfg_), e = cfg_.num_experts();
  ResizeTensor(&router_.logits, tokens, cols);
  std::memcpy(router_.logits.data(), logits, static_cast<size_t>(tokens * cols) * sizeof(float));
  if (RouterIsNoisy(cfg_.router(), ctx)) {
    ResizeTensor(&router_.noise_in, tokens, e);
    std::memcpy(router_.noise_in.data(), noise_in, static_cast<size_t>(tokens * e) * sizeof(float));
  }
  FinishRouter(cfg_.router(), ctx, &router_);
  MOE_RETURN_IF_ERROR(Finish(bias, ctx));
  host_seconds_ = WallSeconds() - t0;
  return Status::Ok();
}

Status HostRouting::Finish(const std::vector<float>& bias, const RouteContext& ctx) {
  MOE_ASSIGN_OR_RETURN(plan_, BuildDispatchPlan(cfg_.router(), router_.probs, bias, ctx));
  // SOFT has no router losses (its plan's "tokens" are the slot rows).
  sums_ = cfg_.router().gate() == config::SOFT
              ? std::vector<GroupLossSums>()
              : RouterLossSums(cfg_.router(), plan_, router_.probs, router_.logits);
  losses_ = LossesFromSums(sums_);
  rows_ = PlanRows{.rows = plan_.num_rows(),
                   .tokens = plan_.num_tokens,
                   .row_token = plan_.row_token.data(),
                   .row_gate = plan_.row_gate.data(),
                   .token_row_offset = plan_.token_row_offset.data(),
                   .token_rows = plan_.token_rows.data()};
  return Status::Ok();
}

std::vector<double> HostRouting::BalanceCounts() const { return moe::BalanceCounts(sums_); }

void HostRouting::SetGlobalBalanceCounts(const std::vector<double>& world_counts) {
  moe::SetGlobalBalanceCounts(world_counts, &sums_);
  losses_ = LossesFromSums(sums_);
}

StatusOr<LayerRouting::Gradients> HostRouting::Backward(const float* dgate, LossScale scale) {
  const double t0 = WallSeconds();
  RouterGradients& scratch = RouterScratch();
  RouterScoreGradients(cfg_.router(), plan_, router_, dgate, scale, &scratch, &sums_);
  host_seconds_ += WallSeconds() - t0;
  return Gradients{scratch.dlogits.data(), router_.noisy ? scratch.dnoise.data() : nullptr};
}

StatusOr<const float*> HostRouting::SoftBackward(const float* dcombine, const float* ddispatch) {
  const int64_t s = router_.probs.rows(), cols = router_.probs.cols();
  Tensor& dlogits = RouterScratch().dlogits;
  SoftRouterGradients(router_, plan_.num_groups, {dcombine, s, cols}, {ddispatch, s, cols},
                      &dlogits);
  return static_cast<const float*>(dlogits.data());
}

Status HostDevice::Upload(void* dst, const void* host_src, int64_t bytes) {
  if (bytes > 0 && dst != host_src) std::memcpy(dst, host_src, static_cast<size_t>(bytes));
  return Status::Ok();
}

Status HostDevice::Download(void* host_dst, const void* src, int64_t bytes) {
  return Upload(host_dst, src, bytes);
}

Status HostDevice::Copy(void* dst, const void* src, int64_t bytes) {
  return Upload(dst, src, bytes);
}

Status HostDevice::Zero(void* dst, int64_t bytes) {
  if (bytes > 0) std::memset(dst, 0, static_cast<size_t>(bytes));
  return Status::Ok();
}

Status HostDevice::Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float* a, const float* b, float beta, float* c) {
  blas::Gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c);
  return Status::Ok();
}

Status HostDevice::GatherRows(const RowGather& g) {
  using row_steps::GatherDestination;
  using row_steps::GatherSource;
  const int64_t m = g.cols;
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(m);
  for (int64_t i = 0; i < g.rows; ++i) {
    const int64_t to = GatherDestination(g, i), from = GatherSource(g, i);
    if (g.format == RowFormat::kBf16) {
      uint16_t* const dst = static_cast<uint16_t*>(g.dst) + to * m;
      if (from < 0) {
        std::fill(dst, dst + m, uint16_t{0});
      } else if (g.row_gate != nullptr) {
        FloatsToBf16(g.src + from * m, row_steps::GatherScale(g, i), m, dst);
      } else {
        FloatsToBf16(g.src + from * m, m, dst);
      }
      continue;
    }
    float* const dst = static_cast<float*>(g.dst) + to * m;
    if (from < 0) {
      std::memset(dst, 0, row_bytes);
      continue;
    }
    const float* const src = g.src + from * m;
    if (g.format == RowFormat::kRoundedBf16) {
      // One pass: the (scaled) value rounded as it is written.
      if (g.row_gate != nullptr) {
        const float gate = row_steps::GatherScale(g, i);
        for (int64_t k = 0; k < m; ++k) dst[k] = RoundToBf16(gate * src[k]);
      } else {
        RoundFloatsToBf16(src, m, dst);
      }
      continue;
    }
    if (g.row_gate != nullptr) {
      const float gate = row_steps::GatherScale(g, i);
      for (int64_t k = 0; k < m; ++k) dst[k] = gate * src[k];
      continue;
    }
    // A run of rows consecutive on both sides (a regroup's segment) is one copy.
    int64_t run = 1;
    while (i + run < g.rows && GatherSource(g, i + run) == from + run &&
           GatherDestination(g, i + run) == to + run) {
      ++run;
    }
    std::memcpy(dst, src, row_bytes * static_cast<size_t>(run));
    i += run - 1;
  }
  return Status::Ok();
}

Status HostDevice::CombineRows(const RowCombine& c) {
  const int64_t m = c.cols;
  const PlanRows& p = c.plan;
  for (int64_t t = 0; t < p.tokens; ++t) {
    float* out = c.y + t * m;
    for (int64_t i = row_steps::TokenRowsBegin(p, t); i < row_steps::TokenRowsEnd(p, t); ++i) {
      const int32_t r = p.token_rows[i];
      const float* src = row_steps::ReturnedRow(c.returned, r, m);
      const float g = c.gated ? p.row_gate[r] : 1.0f;
      if (c.returned.round_bf16) {
        if (c.gated) {
          for (int64_t k = 0; k < m; ++k) out[k] += g * RoundToBf16(src[k]);
        } else {
          for (int64_t k = 0; k < m; ++k) out[k] += RoundToBf16(src[k]);
        }
      } else if (c.gated) {
        for (int64_t k = 0; k < m; ++k) out[k] += g * src[k];
      } else {
        for (int64_t k = 0; k < m; ++k) out[k] += src[k];
      }
    }
  }
  return Status::Ok();
}

Status HostDevice::GateGradients(const GateGradient& g) {
  const int64_t m = g.cols;
  for (int64_t r = 0; r < g.plan.rows; ++r) {
    const float* d = g.dy + g.plan.row_token[r] * m;
    const float* out = row_steps::ReturnedRow(g.returned, r, m);
    double dot = 0.0;
    if (g.returned.round_bf16) {
      for (int64_t c = 0; c < m; ++c) dot += static_cast<double>(d[c]) * RoundToBf16(out[c]);
    } else {
      for (int64_t c = 0; c < m; ++c) dot += static_cast<double>(d[c]) * out[c];
    }
    g.dgate[r] = static_cast<float>(dot);
  }
  return Status::Ok();
}

Status HostDevice::Cast(CastKind kind, const void* src, void* dst, int64_t count) {
  switch (kind) {
    case CastKind::kToBf16:
      FloatsToBf16(static_cast<const float*>(src), count, static_cast<uint16_t*>(dst));
      break;
    case CastKind::kFromBf16:
      Bf16sToFloats(static_cast<const uint16_t*>(src), count, static_cast<float*>(dst));
      break;
    case CastKind::kRoundBf16:
      RoundFloatsToBf16(static_cast<const float*>(src), count, static_cast<float*>(dst));
      break;
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<ExpertCompute>> HostDevice::MakeExperts(const experts::FfnShape& shape,
                                                                 int) {
  return std::unique_ptr<ExpertCompute>(std::make_unique<CpuExpertCompute>(shape));
}

StatusOr<std::unique_ptr<LayerRouting>> HostDevice::MakeRouting(const config::LayerConfig& layer,
                                                                bool) {
  return std::unique_ptr<LayerRouting>(std::make_unique<HostRouting>(layer));
}

Status HostDevice::BeginTiming() {
  begin_ = WallSeconds();
  return Status::Ok();
}

Status HostDevice::EndTiming() {
  timed_ += WallSeconds() - begin_;
  return Status::Ok();
}

StatusOr<double> HostDevice::TakeTimedSeconds() { return std::exchange(timed_, 0.0); }

}  // namespace moe
