#include "runtime/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <google/protobuf/text_format.h>

#include "runtime/base/file.h"
#include "runtime/base/npy.h"

namespace moe {
namespace fs = std::filesystem;

std::string CheckpointDirName(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

Status WriteCheckpointTensors(const std::string& dir, const std::map<std::string, const Tensor*>& tensors) {
  MOE_RETURN_IF_ERROR(MakeDirs(dir));
  for (const auto& [name, t] : tensors) {
    const std::string path = dir + "/" + name + ".npy";
    MOE_RETURN_IF_ERROR(WriteNpy(path, NpyDtype::kFloat32, {t->rows(), t->cols()}, t->data()));
  }
  return Status::Ok();
}

namespace {

Status SyncDirectory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return IoError("cannot open directory " + dir + ": " + std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return IoError("cannot sync directory " + dir + ": " + std::strerror(errno));
  return Status::Ok();
}

}  // namespace

Status FinalizeCheckpoint(const std::string& tmp_dir, const std::string& final_dir,
                          checkpoint::Manifest manifest) {
  std::error_code ec;
  if (fs::exists(final_dir, ec)) return FailedPrecondition("checkpoint " + final_dir + " already exists");
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(tmp_dir, ec)) {
    const std::string f = entry.path().filename().string();
    if (entry.is_regular_file() && f.size() > 4 && f.compare(f.size() - 4, 4, ".npy") == 0) files.push_back(f);
  }
  if (ec) return IoError("cannot list " + tmp_dir + ": " + ec.message());
  std::sort(files.begin(), files.end());
  manifest.clear_tensors();
  for (const std::string& f : files) {
    MOE_ASSIGN_OR_RETURN(std::string content, ReadFileToString(tmp_dir + "/" + f));
    MOE_ASSIGN_OR_RETURN(NpyArray arr, ParseNpy(f, reinterpret_cast<const uint8_t*>(content.data()), content.size()));
    checkpoint::TensorFile* tf = manifest.add_tensors();
    tf->set_name(f.substr(0, f.size() - 4));
    tf->set_file(f);
    for (int64_t d : arr.shape) tf->add_shape(d);
    tf->set_size_bytes(content.size());
    tf->set_checksum(Fnv1a64(content));
  }
  std::string text;
  google::protobuf::TextFormat::PrintToString(manifest, &text);
  MOE_RETURN_IF_ERROR(WriteFileAtomically(tmp_dir + "/manifest.textproto", text));
  MOE_RETURN_IF_ERROR(SyncDirectory(tmp_dir));
  if (::rename(tmp_dir.c_str(), final_dir.c_str()) != 0) {
    return IoError("cannot rename " + tmp_dir + " to " + final_dir + ": " + std::strerror(errno));
  }
  return SyncDirectory(fs::path(final_dir).parent_path().string());
}

StatusOr<checkpoint::Manifest> VerifyCheckpoint(const std::string& dir) {
  MOE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(dir + "/manifest.textproto"));
  checkpoint::Manifest m;
  if (!google::protobuf::TextFormat::ParseFromString(text, &m)) {
    return DataLoss("checkpoint " + dir + ": manifest.textproto does not parse");
  }
  if (m.format() != "moe-checkpoint-v1") {
    return DataLoss("checkpoint " + dir + ": manifest format '" + m.format() + "' is not moe-checkpoint-v1");
  }
  for (const auto& tf : m.tensors()) {
    if (tf.file().find('/') != std::string::npos || tf.file().empty()) {
      return DataLoss("checkpoint " + dir + ": tensor " + tf.name() + " has an invalid file name '" + tf.file() + "'");
    }
    StatusOr<std::string> content = ReadFileToString(dir + "/" + tf.file());
    if (!content.ok()) return DataLoss("checkpoint " + dir + ": " + content.status().message());
    if (content->size() != tf.size_bytes()) {
      return DataLoss("checkpoint " + dir + ": " + tf.file() + " has " + std::to_string(content->size()) +
                      " bytes, the manifest says " + std::to_string(tf.size_bytes()));
    }
    if (Fnv1a64(*content) != tf.checksum()) {
      return DataLoss("checkpoint " + dir + ": " + tf.file() + " checksum does not match the manifest");
    }
  }
  return m;
}

StatusOr<std::string> FindLatestCheckpoint(const std::string& root) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return NotFound("checkpoint directory " + root + " does not exist");
  std::vector<std::string> dirs;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::string f = entry.path().filename().string();
    if (entry.is_directory() && f.rfind("step_", 0) == 0 && f.find(".tmp") == std::string::npos) {
      dirs.push_back(f);
    }
  }
  std::sort(dirs.rbegin(), dirs.rend());
  for (const std::string& d : dirs) {
    const std::string path = root + "/" + d;
    StatusOr<checkpoint::Manifest> m = VerifyCheckpoint(path);
    if (m.ok()) return path;
    std::fprintf(stderr, "warning: skipping checkpoint %s: %s\n", path.c_str(), m.status().message().c_str());
  }
  return NotFound("no complete checkpoint under " + root);
}

Status LoadCheckpointTensor(const std::string& dir, const checkpoint::Manifest& manifest,
                            const std::string& name, Tensor* t) {
  for (const auto& tf : manifest.tensors()) {
    if (tf.name() != name) continue;
    MOE_ASSIGN_OR_RETURN(Tensor read, ReadNpyFloatShaped(dir + "/" + tf.file(), t->rows(), t->cols()));
    std::memcpy(t->data(), read.data(), sizeof(float) * static_cast<size_t>(t->size()));
    return Status::Ok();
  }
  return DataLoss("checkpoint " + dir + " has no tensor " + name);
}

}  // namespace moe
