// Crash-safe checkpoints (docs/ARCHITECTURE.md "Failure handling"). A checkpoint is a directory
// <root>/step_<N>/ holding manifest.textproto and one .npy file per tensor. Every rank writes its own tensors into
// <root>/step_<N>.tmp/; then one rank checksums them, writes the manifest and renames the
// directory. A crash at any moment leaves the last complete checkpoint untouched; a directory
// without a valid manifest is never loaded.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "proto/checkpoint.pb.h"
#include "base/hash.h"
#include "base/status.h"
#include "base/tensor.h"

namespace moe {

std::string CheckpointDirName(int64_t step);  // "step_00000100"

// Readies <root>/<step dir>.tmp for a new save of `final_dir`: creates root, removes a .tmp left by
// a crash, and if final_dir already exists: refuses (kFailedPrecondition) when it is a complete
// checkpoint, else moves the damaged one aside to <final_dir>.damaged[.N] (nothing is deleted).
Status PrepareCheckpointDir(const std::string& root, const std::string& final_dir, const std::string& tmp_dir);

// Whether a directory name is a checkpoint's: "step_" followed by digits only.
bool IsCheckpointDirName(const std::string& name);
// The checkpoint directory names under root (complete or not), newest step first; empty when root
// does not exist.
std::vector<std::string> CheckpointDirNames(const std::string& root);

// Writes each (name -> tensor) as <dir>/<name>.npy (creates dir) and syncs them to storage.
Status WriteCheckpointTensors(const std::string& dir, const std::map<std::string, const Tensor*>& tensors);

// Checksums every .npy file in tmp_dir, writes the manifest (with `manifest`'s other fields),
// syncs, renames tmp_dir to final_dir (replacing nothing: fails if final_dir exists).
Status FinalizeCheckpoint(const std::string& tmp_dir, const std::string& final_dir,
                          checkpoint::Manifest manifest);

// Parses and checks a manifest's text without touching files: format, step >= 0, optimizer_steps
// >= 0, saved_world_size >= 1, a valid config, and per tensor a unique name of [A-Za-z0-9_.-]
// stored as "<name>.npy", at most 2 non-negative dimensions and a size that can hold them.
// `where` (the checkpoint directory) prefixes every message; errors are kDataLoss.
StatusOr<checkpoint::Manifest> ParseCheckpointManifest(const std::string& text, const std::string& where);

// Reads the manifest (ParseCheckpointManifest) and verifies every file's size, checksum and .npy
// header (float32 of the manifest's shape).
StatusOr<checkpoint::Manifest> VerifyCheckpoint(const std::string& dir);

// The newest complete checkpoint under root (by step), or NotFound. Incomplete or damaged ones are
// skipped with a warning on stderr.
StatusOr<std::string> FindLatestCheckpoint(const std::string& root);

// Loads tensor `name` from a verified checkpoint into t (shape must match).
Status LoadCheckpointTensor(const std::string& dir, const checkpoint::Manifest& manifest,
                            const std::string& name, Tensor* t);

}  // namespace moe
