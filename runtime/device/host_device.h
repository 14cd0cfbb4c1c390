// The host Device (runtime/device/device.h): host memory, OpenBLAS GEMMs (experts/cpu), the
// routing and row loops of the CPU path; every operation runs when it is called, on the calling
// thread. It is the reference the CUDA device's operations are checked against.
#pragma once

#include <memory>
#include <string_view>
#include <vector>

#include "runtime/device/device.h"
#include "runtime/device/layer_routing.h"

namespace moe {

class HostDevice final : public Device {
 public:
  std::string_view name() const override { return "host"; }
  MemorySpace memory_space() const override { return MemorySpace::kHost; }
  MemoryResource* memory() override { return DefaultResource(MemorySpace::kHost); }
  StreamHandle stream() const override { return nullptr; }

  Status Upload(void* dst, const void* host_src, int64_t bytes) override;
  Status Download(void* host_dst, const void* src, int64_t bytes) override;
  Status Copy(void* dst, const void* src, int64_t bytes) override;
  Status Zero(void* dst, int64_t bytes) override;
  Status Synchronize() override { return Status::Ok(); }

  Status Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float* a, const float* b, float beta, float* c) override;
  Status GatherRows(const RowGather& g) override;
  Status CombineRows(const RowCombine& c) override;
  Status GateGradients(const GateGradient& g) override;
  Status Cast(CastKind kind, const void* src, void* dst, int64_t count) override;

  StatusOr<std::unique_ptr<ExpertCompute>> MakeExperts(const experts::FfnShape& shape,
                                                       int count) override;
  StatusOr<std::unique_ptr<LayerRouting>> MakeRouting(const config::LayerConfig& layer,
                                                      bool host_plan) override;

  Status BeginTiming() override;
  Status EndTiming() override;
  StatusOr<double> TakeTimedSeconds() override;

 private:
  double begin_ = 0.0, timed_ = 0.0;
};

// The host's routing steps (ComputeRouter, BuildDispatchPlan, RouterLossSums and their backward):
// also what a GPU runs, after its own GEMMs, for a config its device router does not support.
class HostRouting final : public LayerRouting {
 public:
  explicit HostRouting(const config::LayerConfig& layer);

  Status Forward(const float* x, int64_t tokens, const float* wg, const float* wnoise,
                 const std::vector<float>& bias, const RouteContext& ctx) override;
  // Forward after the router's GEMMs were done elsewhere: logits (tokens x RouterColumns) and,
  // when RouterIsNoisy, noise_in (tokens x E), host memory.
  Status ForwardFromLogits(const float* logits, const float* noise_in, int64_t tokens,
                           const std::vector<float>& bias, const RouteContext& ctx);

  const DispatchPlan& plan() const override { return plan_; }
  const PlanRows& rows() const override { return rows_; }
  bool routes_on_device() const override { return false; }
  Status Fetch() override { return Status::Ok(); }
  const RouterOutput& router_output() const override { return router_; }
  const RouterLosses& losses() const override { return losses_; }
  std::vector<double> BalanceCounts() const override;
  void SetGlobalBalanceCounts(const std::vector<double>& world_counts) override;
  const float* combine_weights() const override { return router_.probs.data(); }
  const float* dispatch_weights() const override { return router_.dispatch.data(); }
  StatusOr<Gradients> Backward(const float* dgate, LossScale scale) override;
  StatusOr<const float*> SoftBackward(const float* dcombine, const float* ddispatch) override;
  double host_seconds() const override { return host_seconds_; }

 private:
  // From router_'s logits (and noise): the scores, the plan, the losses' sums.
  Status Finish(const std::vector<float>& bias, const RouteContext& ctx);

  config::LayerConfig cfg_;
  RouterOutput router_;
  DispatchPlan plan_;
  PlanRows rows_;
  std::vector<GroupLossSums> sums_;
  RouterLosses losses_;
  double host_seconds_ = 0.0;
};

}  // namespace moe
