// Whole-file reads and crash-safe writes.
#pragma once

#include <string>

#include "base/status.h"

namespace moe {

StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes to "<path>.tmp.<pid>", fsyncs, then renames over `path`: readers see the old or the new file.
Status WriteFileAtomically(const std::string& path, const std::string& content);
// Creates or truncates `path` and writes `content`, without syncing (see SyncFilesystem).
Status WriteFile(const std::string& path, const std::string& content);
// Flushes every file of the file system holding `path` to storage (syncfs): one flush for many
// files written with WriteFile, instead of one fsync each.
Status SyncFilesystem(const std::string& path);
// Creates a directory and its parents (like mkdir -p).
Status MakeDirs(const std::string& path);

}  // namespace moe
