// NumPy .npy files (format 1.0/2.0/3.0): little-endian float32, int32 and int64, C order.
// Shapes of 1 or 2 dimensions load into a Matrix (a 1-D array of n loads as 1 x n).
// Malformed files get an error that names the file and what is wrong; nothing crashes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "base/tensor.h"

namespace moe {

enum class NpyDtype { kFloat32, kInt32, kInt64 };

struct NpyArray {
  NpyDtype dtype = NpyDtype::kFloat32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian element data
  int64_t NumElements() const;
};

StatusOr<NpyArray> ReadNpy(const std::string& path);
// Parses an in-memory .npy image (used by ReadNpy and by fuzzing); `name` appears in errors.
StatusOr<NpyArray> ParseNpy(const std::string& name, const uint8_t* data, size_t size);

// Reads a float32 array of rank 1 or 2 (rank 1 of n gives 1 x n).
StatusOr<Tensor> ReadNpyFloat(const std::string& path);
// Reads a float32 array and checks its shape: {rows, cols}, or {cols} when rows < 0 (a vector).
StatusOr<Tensor> ReadNpyFloatShaped(const std::string& path, int64_t rows, int64_t cols);
StatusOr<IntTensor> ReadNpyInt32(const std::string& path);
// The in-memory halves of ReadNpyFloat and ReadNpyInt32: convert a parsed array (ParseNpy) of the
// right dtype and rank 1 or 2; `name` appears in errors.
StatusOr<Tensor> NpyToTensor(const NpyArray& arr, const std::string& name);
StatusOr<IntTensor> NpyToIntTensor(const NpyArray& arr, const std::string& name);

// The .npy file image (format 1.0, header padded to 64 bytes). `shape` must match the element count.
std::string EncodeNpy(NpyDtype dtype, const std::vector<int64_t>& shape, const void* data);

// Writes atomically (temporary file, then rename). `shape` must match the element count.
Status WriteNpy(const std::string& path, NpyDtype dtype, const std::vector<int64_t>& shape,
                const void* data);
Status WriteNpy(const std::string& path, const Tensor& t);       // 2-D rows x cols
Status WriteNpyVector(const std::string& path, const Tensor& t);  // 1-D of t.size()
Status WriteNpy(const std::string& path, const IntTensor& t);

}  // namespace moe
