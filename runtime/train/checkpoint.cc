// Checkpoint manifests, crash-safe saves and verified loads (runtime/train/checkpoint.h).
#include "runtime/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include <google/protobuf/text_format.h>

#include "base/file.h"
#include "base/npy.h"
#include "runtime/config/config.h"

namespace moe {
namespace fs = std::filesystem;

std::string CheckpointDirName(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

bool IsCheckpointDirName(const std::string& name) {
  return name.size() > 5 && name.compare(0, 5, "step_") == 0 &&
         std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; });
}

Status PrepareCheckpointDir(const std::string& root, const std::string& final_dir, const std::string& tmp_dir) {
  MOE_RETURN_IF_ERROR(MakeDirs(root));
  std::error_code ec;
  fs::remove_all(tmp_dir, ec);  // left over from a crash during an earlier save
  if (ec) return IoError("cannot remove the unfinished save " + tmp_dir + ": " + ec.message());
  if (fs::exists(final_dir, ec)) {
    StatusOr<checkpoint::Manifest> existing = VerifyCheckpoint(final_dir);
    if (existing.ok()) {
      return FailedPrecondition("checkpoint " + final_dir + " already exists and is complete; not overwriting it");
    }
    std::string aside = final_dir + ".damaged";
    for (int i = 1; fs::exists(aside, ec); ++i) aside = final_dir + ".damaged." + std::to_string(i);
    if (::rename(final_dir.c_str(), aside.c_str()) != 0) {
      return IoError("cannot move the damaged checkpoint " + final_dir + " aside: " + std::strerror(errno));
    }
    std::fprintf(stderr, "warning: moved damaged checkpoint %s to %s (%s)\n", final_dir.c_str(), aside.c_str(),
                 existing.status().message().c_str());
  }
  return MakeDirs(tmp_dir);
}

Status WriteCheckpointTensors(const std::string& dir, const std::map<std::string, const Tensor*>& tensors) {
  MOE_RETURN_IF_ERROR(MakeDirs(dir));
  // Plain writes and one file-system sync: the directory becomes a checkpoint only when its
  // manifest is written and it is renamed, after this returns on every rank.
  for (const auto& [name, t] : tensors) {
    MOE_RETURN_IF_ERROR(WriteFile(dir + "/" + name + ".npy",
                                  EncodeNpy(NpyDtype::kFloat32, {t->rows(), t->cols()}, t->data())));
  }
  return SyncFilesystem(dir);
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

StatusOr<checkpoint::Manifest> ParseCheckpointManifest(const std::string& text, const std::string& where) {
  checkpoint::Manifest m;
  if (Status s = ParseTextProto(text, "manifest.textproto", &m); !s.ok()) {
    return DataLoss("checkpoint " + where + ": " + s.message());
  }
  auto bad = [&](const std::string& what) { return DataLoss("checkpoint " + where + ": manifest " + what); };
  if (m.format() != "moe-checkpoint-v1") return bad("format '" + m.format() + "' is not moe-checkpoint-v1");
  if (m.step() < 0) return bad("step=" + std::to_string(m.step()) + " must be >= 0");
  if (m.optimizer_steps() < 0) return bad("optimizer_steps=" + std::to_string(m.optimizer_steps()) + " must be >= 0");
  if (m.saved_world_size() < 1) {
    return bad("saved_world_size=" + std::to_string(m.saved_world_size()) + " must be >= 1");
  }
  if (!m.has_config()) return bad("has no config");
  if (Status s = ValidateConfig(m.config()); !s.ok()) return bad("config: " + s.message());
  std::set<std::string> names;
  for (const auto& tf : m.tensors()) {
    const std::string& name = tf.name();
    const bool safe = !name.empty() && name.size() <= 200 && name.front() != '.' &&
                      std::all_of(name.begin(), name.end(), [](char c) {
                        return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
                      });
    if (!safe) return bad("tensor name '" + name + "' must be 1-200 characters of [A-Za-z0-9_.-], not starting with '.'");
    if (!names.insert(name).second) return bad("lists tensor " + name + " twice");
    if (tf.file() != name + ".npy") return bad("tensor " + name + ": file '" + tf.file() + "' must be " + name + ".npy");
    if (tf.shape_size() < 1 || tf.shape_size() > 2) {
      return bad("tensor " + name + ": shape has " + std::to_string(tf.shape_size()) + " dimensions, must have 1 or 2");
    }
    uint64_t elements = 1;
    for (int64_t d : tf.shape()) {
      if (d < 0 || d > (int64_t{1} << 40)) return bad("tensor " + name + ": dimension " + std::to_string(d) + " out of range");
      // Checked before multiplying: two dimensions of up to 2^40 would wrap the 64-bit product.
      if (d > 0 && elements > (uint64_t{1} << 40) / static_cast<uint64_t>(d)) {
        return bad("tensor " + name + ": shape has more than 2^40 elements");
      }
      elements *= static_cast<uint64_t>(d);
    }
    if (tf.size_bytes() < 4 * elements) {
      return bad("tensor " + name + ": size_bytes=" + std::to_string(tf.size_bytes()) +
                 " cannot hold its shape as float32");
    }
  }
  return m;
}

StatusOr<checkpoint::Manifest> VerifyCheckpoint(const std::string& dir) {
  StatusOr<std::string> text = ReadFileToString(dir + "/manifest.textproto");
  if (!text.ok()) return DataLoss("checkpoint " + dir + " is incomplete: " + text.status().message());
  MOE_ASSIGN_OR_RETURN(checkpoint::Manifest m, ParseCheckpointManifest(*text, dir));
  for (const auto& tf : m.tensors()) {
    StatusOr<std::string> content = ReadFileToString(dir + "/" + tf.file());
    if (!content.ok()) return DataLoss("checkpoint " + dir + ": " + content.status().message());
    if (content->size() != tf.size_bytes()) {
      return DataLoss("checkpoint " + dir + ": " + tf.file() + " has " + std::to_string(content->size()) +
                      " bytes, the manifest says " + std::to_string(tf.size_bytes()));
    }
    if (Fnv1a64(*content) != tf.checksum()) {
      return DataLoss("checkpoint " + dir + ": " + tf.file() + " checksum does not match the manifest");
    }
    StatusOr<NpyArray> arr =
        ParseNpy(tf.file(), reinterpret_cast<const uint8_t*>(content->data()), content->size());
    if (!arr.ok()) return DataLoss("checkpoint " + dir + ": " + arr.status().message());
    if (arr->dtype != NpyDtype::kFloat32 ||
        !std::equal(arr->shape.begin(), arr->shape.end(), tf.shape().begin(), tf.shape().end())) {
      return DataLoss("checkpoint " + dir + ": " + tf.file() + " is not float32 of the manifest's shape");
    }
  }
  return m;
}

std::vector<std::string> CheckpointDirNames(const std::string& root) {
  std::error_code ec;
  std::vector<std::string> dirs;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::string f = entry.path().filename().string();
    if (entry.is_directory() && IsCheckpointDirName(f)) dirs.push_back(f);
  }
  // Newest first: longer digit strings are larger steps, equal lengths compare as text.
  std::sort(dirs.begin(), dirs.end(), [](const std::string& a, const std::string& b) {
    return a.size() != b.size() ? a.size() > b.size() : a > b;
  });
  return dirs;
}

StatusOr<std::string> FindLatestCheckpoint(const std::string& root) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return NotFound("checkpoint directory " + root + " does not exist");
  const std::vector<std::string> dirs = CheckpointDirNames(root);
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
