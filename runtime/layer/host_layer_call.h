// HostLayerCall: Forward and Backward of any MoeLayer (runtime/layer/moe_layer.h) on host tensors,
// with their shapes checked. A host layer reads and writes them in place; for a device layer x
// and dy go up through device buffers kept here, and y and dx come down (the call waits for them).
// The trainer (the model around the MoE layers stays on the host) and the moe_layer tool run their
// layers through it.
#pragma once

#include "base/memory.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/layer/moe_layer.h"

namespace moe {

class HostLayerCall {
 public:
  // `layer` must outlive this object.
  explicit HostLayerCall(MoeLayer* layer);

  // y (resized to S x M) = layer(x) for the S rows of x (S x M).
  Status Forward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y);
  // dx (resized to S x M) from dy (S x M) for the last Forward; the parameter gradients are added
  // into grads (MoeLayer::Backward).
  Status Backward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads);

 private:
  MoeLayer* layer_;
  // A device's layers: x and y, dy and dx in its memory (dy goes up through y's buffer).
  Workspace x_, y_, dx_;
};

}  // namespace moe
