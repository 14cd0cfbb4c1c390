// libFuzzer target: the MoeConfig loader (moe::ParseConfig), as used by every launcher for
// --config files. A parsed config is also checked against a few world sizes and written as JSON,
// the two things every job does next with it. Any crash, sanitizer report or hang is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/config/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::StatusOr<moe::MoeConfig> cfg = moe::ParseConfig(text, "fuzz.textproto");
  if (!cfg.ok()) return 0;
  for (int world : {1, 2, 3, 4, 8, 64}) {
    (void)moe::ValidateForWorld(*cfg, world);
  }
  const std::string json = moe::ConfigToJson(*cfg);
  if (json.empty()) __builtin_trap();  // a config that validated must be printable
  return 0;
}
