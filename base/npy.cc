// NumPy .npy reading and writing (base/npy.h).
#include "base/npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "base/file.h"

namespace moe {
namespace {

size_t DtypeSize(NpyDtype d) { return d == NpyDtype::kInt64 ? 8 : 4; }
const char* DtypeDescr(NpyDtype d) {
  switch (d) {
    case NpyDtype::kFloat32: return "<f4";
    case NpyDtype::kInt32: return "<i4";
    case NpyDtype::kInt64: return "<i8";
  }
  return "";
}

// Finds the value text after 'key': in a Python dict literal header.
bool FindDictValue(const std::string& header, const std::string& key, std::string* value) {
  const std::string quoted1 = "'" + key + "'";
  const std::string quoted2 = "\"" + key + "\"";
  size_t pos = header.find(quoted1);
  size_t len = quoted1.size();
  if (pos == std::string::npos) {
    pos = header.find(quoted2);
    len = quoted2.size();
  }
  if (pos == std::string::npos) return false;
  pos = header.find(':', pos + len);
  if (pos == std::string::npos) return false;
  ++pos;
  while (pos < header.size() && header[pos] == ' ') ++pos;
  if (pos >= header.size()) return false;
  size_t end;
  if (header[pos] == '(') {
    end = header.find(')', pos);
    if (end == std::string::npos) return false;
    ++end;
  } else if (header[pos] == '\'' || header[pos] == '"') {
    end = header.find(header[pos], pos + 1);
    if (end == std::string::npos) return false;
    ++end;
  } else {
    end = header.find_first_of(",}", pos);
    if (end == std::string::npos) return false;
  }
  *value = header.substr(pos, end - pos);
  return true;
}

}  // namespace

int64_t NpyArray::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

StatusOr<NpyArray> ParseNpy(const std::string& name, const uint8_t* data, size_t size) {
  auto bad = [&](const std::string& what) {
    return InvalidArgument("npy file " + name + ": " + what);
  };
  static const uint8_t kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (size < 10 || std::memcmp(data, kMagic, 6) != 0) return bad("missing the \\x93NUMPY magic");
  const int major = data[6];
  size_t header_len = 0;
  size_t offset = 0;
  if (major == 1) {
    header_len = static_cast<size_t>(data[8]) | (static_cast<size_t>(data[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) return bad("truncated header");
    header_len = static_cast<size_t>(data[8]) | (static_cast<size_t>(data[9]) << 8) |
                 (static_cast<size_t>(data[10]) << 16) | (static_cast<size_t>(data[11]) << 24);
    offset = 12;
  } else {
    return bad("unsupported format version " + std::to_string(major));
  }
  if (header_len > size - offset) return bad("header length exceeds the file size");
  const std::string header(reinterpret_cast<const char*>(data + offset), header_len);
  std::string descr, fortran, shape_text;
  if (!FindDictValue(header, "descr", &descr)) return bad("header has no 'descr'");
  if (!FindDictValue(header, "fortran_order", &fortran)) return bad("header has no 'fortran_order'");
  if (!FindDictValue(header, "shape", &shape_text)) return bad("header has no 'shape'");
  NpyArray arr;
  if (descr == "'<f4'" || descr == "\"<f4\"") {
    arr.dtype = NpyDtype::kFloat32;
  } else if (descr == "'<i4'" || descr == "\"<i4\"") {
    arr.dtype = NpyDtype::kInt32;
  } else if (descr == "'<i8'" || descr == "\"<i8\"") {
    arr.dtype = NpyDtype::kInt64;
  } else {
    return bad("dtype " + descr + " is not supported (need little-endian <f4, <i4 or <i8)");
  }
  if (fortran.rfind("False", 0) != 0) return bad("fortran_order must be False (C order)");
  if (shape_text.size() < 2 || shape_text.front() != '(' || shape_text.back() != ')') {
    return bad("malformed shape " + shape_text);
  }
  std::string inner = shape_text.substr(1, shape_text.size() - 2);
  std::stringstream ss(inner);
  std::string item;
  int64_t count = 1;
  while (std::getline(ss, item, ',')) {
    size_t b = item.find_first_not_of(' ');
    if (b == std::string::npos) continue;  // trailing comma of a 1-tuple
    size_t e = item.find_last_not_of(' ');
    item = item.substr(b, e - b + 1);
    if (item.empty() || item.size() > 15 ||
        item.find_first_not_of("0123456789") != std::string::npos) {
      return bad("malformed shape entry '" + item + "'");
    }
    const int64_t d = std::stoll(item);
    if (d > 0 && count > (int64_t{1} << 40) / d) return bad("shape is too large");
    count *= d;
    arr.shape.push_back(d);
  }
  if (arr.shape.size() > 8) return bad("more than 8 dimensions");
  const size_t data_offset = offset + header_len;
  const size_t need = static_cast<size_t>(count) * DtypeSize(arr.dtype);
  if (size - data_offset != need) {
    return bad("data holds " + std::to_string(size - data_offset) + " bytes, shape " +
               shape_text + " needs " + std::to_string(need));
  }
  arr.bytes.assign(data + data_offset, data + size);
  return arr;
}

StatusOr<NpyArray> ReadNpy(const std::string& path) {
  MOE_ASSIGN_OR_RETURN(std::string content, ReadFileToString(path));
  return ParseNpy(path, reinterpret_cast<const uint8_t*>(content.data()), content.size());
}

StatusOr<Tensor> NpyToTensor(const NpyArray& arr, const std::string& name) {
  if (arr.dtype != NpyDtype::kFloat32) {
    return InvalidArgument("npy file " + name + ": dtype must be float32 (<f4)");
  }
  if (arr.shape.empty() || arr.shape.size() > 2) {
    return InvalidArgument("npy file " + name + ": must have 1 or 2 dimensions, has " +
                           std::to_string(arr.shape.size()));
  }
  const int64_t rows = arr.shape.size() == 2 ? arr.shape[0] : 1;
  const int64_t cols = arr.shape.back();
  Tensor t(rows, cols);
  if (!arr.bytes.empty()) std::memcpy(t.data(), arr.bytes.data(), arr.bytes.size());
  return t;
}

StatusOr<Tensor> ReadNpyFloat(const std::string& path) {
  MOE_ASSIGN_OR_RETURN(NpyArray arr, ReadNpy(path));
  return NpyToTensor(arr, path);
}

StatusOr<Tensor> ReadNpyFloatShaped(const std::string& path, int64_t rows, int64_t cols) {
  MOE_ASSIGN_OR_RETURN(NpyArray arr, ReadNpy(path));
  const std::vector<int64_t> want =
      rows < 0 ? std::vector<int64_t>{cols} : std::vector<int64_t>{rows, cols};
  auto shape_str = [](const std::vector<int64_t>& s) {
    std::string r = "(";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + (s.size() == 1 ? ",)" : ")");
  };
  if (arr.dtype != NpyDtype::kFloat32) {
    return InvalidArgument("npy file " + path + ": dtype must be float32 (<f4)");
  }
  if (arr.shape != want) {
    return InvalidArgument("npy file " + path + ": shape " + shape_str(arr.shape) +
                           " does not match the expected " + shape_str(want));
  }
  Tensor t(rows < 0 ? 1 : rows, cols);
  if (!arr.bytes.empty()) std::memcpy(t.data(), arr.bytes.data(), arr.bytes.size());
  return t;
}

StatusOr<IntTensor> NpyToIntTensor(const NpyArray& arr, const std::string& name) {
  if (arr.dtype != NpyDtype::kInt32) return InvalidArgument("npy file " + name + ": dtype must be int32");
  if (arr.shape.empty() || arr.shape.size() > 2) {
    return InvalidArgument("npy file " + name + ": must have 1 or 2 dimensions");
  }
  IntTensor t(arr.shape.size() == 2 ? arr.shape[0] : 1, arr.shape.back());
  if (!arr.bytes.empty()) std::memcpy(t.data(), arr.bytes.data(), arr.bytes.size());
  return t;
}

StatusOr<IntTensor> ReadNpyInt32(const std::string& path) {
  MOE_ASSIGN_OR_RETURN(NpyArray arr, ReadNpy(path));
  return NpyToIntTensor(arr, path);
}

std::string EncodeNpy(NpyDtype dtype, const std::vector<int64_t>& shape, const void* data) {
  std::string shape_text = "(";
  int64_t count = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    shape_text += (i ? ", " : "") + std::to_string(shape[i]);
    count *= shape[i];
  }
  shape_text += shape.size() == 1 ? ",)" : ")";
  std::string header = std::string("{'descr': '") + DtypeDescr(dtype) +
                       "', 'fortran_order': False, 'shape': " + shape_text + ", }";
  // Pad so that magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::string out;
  out.reserve(10 + header.size() + static_cast<size_t>(count) * DtypeSize(dtype));
  out.append("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(header.size() & 0xff));
  out.push_back(static_cast<char>((header.size() >> 8) & 0xff));
  out.append(header);
  out.append(static_cast<const char*>(data), static_cast<size_t>(count) * DtypeSize(dtype));
  return out;
}

Status WriteNpy(const std::string& path, NpyDtype dtype, const std::vector<int64_t>& shape,
                const void* data) {
  return WriteFileAtomically(path, EncodeNpy(dtype, shape, data));
}

Status WriteNpy(const std::string& path, const Tensor& t) {
  return WriteNpy(path, NpyDtype::kFloat32, {t.rows(), t.cols()}, t.data());
}
Status WriteNpyVector(const std::string& path, const Tensor& t) {
  return WriteNpy(path, NpyDtype::kFloat32, {t.size()}, t.data());
}
Status WriteNpy(const std::string& path, const IntTensor& t) {
  return WriteNpy(path, NpyDtype::kInt32, {t.rows(), t.cols()}, t.data());
}

}  // namespace moe
