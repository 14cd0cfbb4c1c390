#include "runtime/moe/layer_io.h"

#include <cstring>

#include "runtime/base/file.h"
#include "runtime/base/npy.h"

namespace moe {

bool IsVectorParam(const std::string& name) {
  return name.size() > 3 && (name.compare(name.size() - 3, 3, "_b1") == 0 ||
                             name.compare(name.size() - 3, 3, "_b2") == 0);
}

Status ReadLayerParams(const std::string& dir, MoeLayerParams* params) {
  Status status;
  params->ForEach([&](const std::string& name, Tensor& t) {
    if (!status.ok()) return;
    const std::string path = dir + "/" + name + ".npy";
    StatusOr<Tensor> read = IsVectorParam(name) ? ReadNpyFloatShaped(path, -1, t.size())
                                                : ReadNpyFloatShaped(path, t.rows(), t.cols());
    if (!read.ok()) {
      status = read.status();
      return;
    }
    std::memcpy(t.data(), read->data(), sizeof(float) * static_cast<size_t>(t.size()));
  });
  return status;
}

Status WriteLayerParams(const std::string& dir, const MoeLayerParams& params, const std::string& prefix) {
  MOE_RETURN_IF_ERROR(MakeDirs(dir));
  Status status;
  params.ForEach([&](const std::string& name, const Tensor& t) {
    if (!status.ok()) return;
    const std::string path = dir + "/" + prefix + name + ".npy";
    status = IsVectorParam(name) ? WriteNpyVector(path, t) : WriteNpy(path, t);
  });
  return status;
}

}  // namespace moe
