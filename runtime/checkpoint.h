// Crash-safe checkpoints (DESIGN §6). A checkpoint is a directory <root>/step_<N>/ holding
// manifest.textproto and one .npy file per tensor. Every rank writes its own tensors into
// <root>/step_<N>.tmp/; then one rank checksums them, writes the manifest and renames the
// directory. A crash at any moment leaves the last complete checkpoint untouched; a directory
// without a valid manifest is never loaded.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "proto/checkpoint.pb.h"
#include "runtime/base/hash.h"
#include "runtime/base/status.h"
#include "runtime/base/tensor.h"

namespace moe {

std::string CheckpointDirName(int64_t step);  // "step_00000100"

// Writes each (name -> tensor) as <dir>/<name>.npy (creates dir).
Status WriteCheckpointTensors(const std::string& dir, const std::map<std::string, const Tensor*>& tensors);

// Checksums every .npy file in tmp_dir, writes the manifest (with `manifest`'s other fields),
// syncs, renames tmp_dir to final_dir (replacing nothing: fails if final_dir exists).
Status FinalizeCheckpoint(const std::string& tmp_dir, const std::string& final_dir,
                          checkpoint::Manifest manifest);

// Reads the manifest and verifies every file's size and checksum.
StatusOr<checkpoint::Manifest> VerifyCheckpoint(const std::string& dir);

// The newest complete checkpoint under root (by step), or NotFound. Incomplete or damaged ones are
// skipped with a warning on stderr.
StatusOr<std::string> FindLatestCheckpoint(const std::string& root);

// Loads tensor `name` from a verified checkpoint into t (shape must match).
Status LoadCheckpointTensor(const std::string& dir, const checkpoint::Manifest& manifest,
                            const std::string& name, Tensor* t);

}  // namespace moe
