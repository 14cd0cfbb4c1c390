// Whole-file reads and crash-safe writes.
#pragma once

#include <string>

#include "runtime/base/status.h"

namespace moe {

StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes to "<path>.tmp.<pid>", fsyncs, then renames over `path`: readers see the old or the new file.
Status WriteFileAtomically(const std::string& path, const std::string& content);
// Creates a directory and its parents (like mkdir -p).
Status MakeDirs(const std::string& path);

}  // namespace moe
