// HostLayerCall (runtime/layer/host_layer_call.h).
#include "runtime/layer/host_layer_call.h"

#include <string>

namespace moe {

HostLayerCall::HostLayerCall(MoeLayer* layer)
    : layer_(layer),
      x_(layer->device().memory()),
      y_(layer->device().memory()),
      dx_(layer->device().memory()) {}

Status HostLayerCall::Forward(MatrixView<const float> x, const RouteContext& ctx, Tensor* y) {
  const int64_t s = x.rows(), m = layer_->config().model_dim();
  if (x.cols() != m) {
    return InvalidArgument("input has " + std::to_string(x.cols()) +
                           " columns, must equal moe.model_dim=" + std::to_string(m));
  }
  if (s < 1) return InvalidArgument("input has no tokens (S=0)");
  ResizeTensor(y, s, m);
  if (layer_->memory_space() == MemorySpace::kHost) {
    return layer_->Forward(x.data(), s, ctx, y->data());
  }
  const int64_t bytes = s * m * static_cast<int64_t>(sizeof(float));
  Device& device = layer_->device();
  MOE_ASSIGN_OR_RETURN(void* x_dev, x_.Get(bytes));
  MOE_ASSIGN_OR_RETURN(void* y_dev, y_.Get(bytes));
  MOE_RETURN_IF_ERROR(device.Upload(x_dev, x.data(), bytes));
  MOE_RETURN_IF_ERROR(
      layer_->Forward(static_cast<const float*>(x_dev), s, ctx, static_cast<float*>(y_dev)));
  return device.Download(y->data(), y_dev, bytes);
}

Status HostLayerCall::Backward(MatrixView<const float> dy, Tensor* dx, MoeLayerParams* grads) {
  const int64_t s = layer_->forward_tokens(), m = layer_->config().model_dim();
  if (s == 0) return layer_->Backward(nullptr, nullptr, grads);  // no Forward yet: its error
  if (dy.rows() != s || dy.cols() != m) {
    return InvalidArgument("grad output is " + std::to_string(dy.rows()) + "x" +
                           std::to_string(dy.cols()) + ", must be " + std::to_string(s) + "x" +
                           std::to_string(m) + " like the layer output");
  }
  ResizeTensor(dx, s, m);
  if (layer_->memory_space() == MemorySpace::kHost) {
    return layer_->Backward(dy.data(), dx->data(), grads);
  }
  const int64_t bytes = s * m * static_cast<int64_t>(sizeof(float));
  Device& device = layer_->device();
  MOE_ASSIGN_OR_RETURN(void* dy_dev, y_.Get(bytes));
  MOE_ASSIGN_OR_RETURN(void* dx_dev, dx_.Get(bytes));
  MOE_RETURN_IF_ERROR(device.Upload(dy_dev, dy.data(), bytes));
  MOE_RETURN_IF_ERROR(
      layer_->Backward(static_cast<const float*>(dy_dev), static_cast<float*>(dx_dev), grads));
  return device.Download(dx->data(), dx_dev, bytes);
}

}  // namespace moe
