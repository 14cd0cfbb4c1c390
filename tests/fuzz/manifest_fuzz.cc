// libFuzzer target: checkpoint manifests (step_<N>/manifest.textproto, read by --resume and
// FindLatestCheckpoint). moe::ParseCheckpointManifest checks everything that does not need the
// tensor files; what it accepts must be safe to act on.
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/train/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::StatusOr<moe::checkpoint::Manifest> m = moe::ParseCheckpointManifest(text, "fuzz/step_00000001");
  if (!m.ok()) return 0;
  // Accepted shapes hold at most 2^40 elements and fit in size_bytes.
  for (const auto& tf : m->tensors()) {
    uint64_t elements = 1;
    for (int64_t d : tf.shape()) {
      if (d < 0) __builtin_trap();
      if (d != 0 && elements > (uint64_t{1} << 40) / static_cast<uint64_t>(d)) __builtin_trap();
      elements *= static_cast<uint64_t>(d);
    }
    if (tf.size_bytes() < 4 * elements) __builtin_trap();
  }
  return 0;
}
