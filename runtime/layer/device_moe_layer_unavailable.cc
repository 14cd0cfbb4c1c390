// DeviceMoeLayer in builds without CUDA: Create is kUnimplemented.
#include "runtime/layer/device_moe_layer.h"

namespace moe {
StatusOr<std::unique_ptr<DeviceMoeLayer>> DeviceMoeLayer::Create(const config::LayerConfig&,
                                                                 const DeviceLayerOptions&) {
  return Unimplemented(
      "the device-resident MoE layer needs a CUDA build (configure with the CUDA toolkit present, "
      "MOE_WITH_CUDA=ON or AUTO)");
}
}  // namespace moe
