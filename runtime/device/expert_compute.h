// ExpertCompute: a device's experts — L experts of one FFN shape run on contiguous row blocks,
// rows [offsets[i], offsets[i+1]) through expert i, keeping what their backward needs. The
// executors (runtime/exchange/expert_executor.h) hand it the rows that reached this rank's experts;
// the layer runs each shared expert as one of its own on all tokens. Made by Device::MakeExperts:
// on the host the CPU FFN (runtime/device/cpu_expert_compute.h, OpenBLAS), on a GPU the grouped
// FFN (experts/cuda/grouped_ffn.h); the staged GPU baseline of the layer benchmark
// (bench/staged_gpu_experts.h) is another.
//
// Rows and outputs live in the device's memory; weights and gradients are host fp32 FfnParams
// (one per expert, the layer's parameters).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/status.h"
#include "base/tensor.h"
#include "experts/expert_ffn.h"
#include "runtime/config/limits.h"

namespace moe {

class ExpertCompute {
 public:
  // Parts: the pipelined executor runs its rows in chunks (parallel.pipeline_degree); chunk j is
  // part j. Each part keeps its own saved state from its Forward to its Backward, so the parts'
  // forwards may all run before their backwards. part is in [0, kMaxParts).
  static constexpr int kMaxParts = limits::kMaxPipelineDegree;

  virtual ~ExpertCompute() = default;

  // The experts' weights (host, params[i] for expert i). The host reads them in place at every
  // call (they must stay alive until the last Backward); a GPU copies them (complete on return).
  virtual Status SetWeights(std::span<const experts::FfnParams> params) = 0;
  // Sizes what Forward(part) and Backward(part) of up to `rows` rows take from the device's
  // memory, so that neither allocates: the pipelined executor reserves every chunk before a
  // call's first exchange (no allocation while exchanges are in flight, docs/ARCHITECTURE.md
  // "The checked host device"). The host's experts take none.
  virtual Status Reserve(int part, int64_t rows) {
    (void)rows;
    return CheckPart(part);
  }
  // y = expert_i(x) for each block (accumulate: y += ...). x and y are rows x M in the device's
  // memory; x must stay unchanged until Backward(part).
  virtual Status Forward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> x,
                         MatrixView<float> y, bool accumulate = false) = 0;
  // dx = d/dx of the blocks given dy, for the rows of the part's last Forward (accumulate_dx:
  // dx += ...). The weight gradients: the host adds them into grads (host, same order as the
  // weights); a GPU keeps them until AddGradients.
  virtual Status Backward(int part, const std::vector<int64_t>& offsets,
                          MatrixView<const float> dy, MatrixView<float> dx,
                          std::span<experts::FfnParams> grads, bool accumulate_dx = false) = 0;
  // Adds the gradients kept on a GPU into grads and zeroes them there (the host keeps none).
  virtual Status AddGradients(std::span<experts::FfnParams> grads) = 0;

 protected:
  // kInvalidArgument unless 0 <= part < kMaxParts.
  static Status CheckPart(int part);
};

}  // namespace moe
