// Tensors: contiguous row-major float32 (and int32) storage and non-owning views.
// Shapes here are at most 2-D (rows x cols); a 1-D tensor has rows == 1 semantics via Vec helpers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "base/check.h"

namespace moe {

// A non-owning view of a rows x cols row-major matrix.
template <typename T>
class MatrixView {
 public:
  MatrixView() = default;
  MatrixView(T* data, int64_t rows, int64_t cols) : data_(data), rows_(rows), cols_(cols) {}

  T* data() const { return data_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t size() const { return rows_ * cols_; }
  T* row(int64_t r) const { return data_ + r * cols_; }
  T& operator()(int64_t r, int64_t c) const { return data_[r * cols_ + c]; }
  std::span<T> span() const { return {data_, static_cast<size_t>(size())}; }
  // To a read-only view (only for a mutable T: a template, so MatrixView<const T> declares none).
  template <typename U = T>
    requires(!std::is_const_v<U>)
  operator MatrixView<const U>() const {  // NOLINT
    return {data_, rows_, cols_};
  }

 private:
  T* data_ = nullptr;
  int64_t rows_ = 0;
  int64_t cols_ = 0;
};

// An owning rows x cols row-major matrix (a vector when rows == 1 or cols == 1).
template <typename T>
class Matrix {
 public:
  Matrix() = default;
  Matrix(int64_t rows, int64_t cols, T fill = T())
      : rows_(rows), cols_(cols), data_(static_cast<size_t>(rows * cols), fill) {
    MOE_CHECK(rows >= 0 && cols >= 0);
  }

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t size() const { return rows_ * cols_; }
  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  T* row(int64_t r) { return data_.data() + r * cols_; }
  const T* row(int64_t r) const { return data_.data() + r * cols_; }
  T& operator()(int64_t r, int64_t c) { return data_[static_cast<size_t>(r * cols_ + c)]; }
  const T& operator()(int64_t r, int64_t c) const { return data_[static_cast<size_t>(r * cols_ + c)]; }
  T& operator[](int64_t i) { return data_[static_cast<size_t>(i)]; }
  const T& operator[](int64_t i) const { return data_[static_cast<size_t>(i)]; }
  std::vector<T>& vec() { return data_; }
  const std::vector<T>& vec() const { return data_; }

  MatrixView<T> view() { return {data_.data(), rows_, cols_}; }
  MatrixView<const T> view() const { return {data_.data(), rows_, cols_}; }
  void Fill(T v) { std::fill(data_.begin(), data_.end(), v); }
  // Resizes without preserving contents (zero-filled).
  void Reset(int64_t rows, int64_t cols) {
    rows_ = rows;
    cols_ = cols;
    data_.assign(static_cast<size_t>(rows * cols), T());
  }
  bool SameShape(const Matrix& o) const { return rows_ == o.rows_ && cols_ == o.cols_; }

 private:
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  std::vector<T> data_;
};

using Tensor = Matrix<float>;
using IntTensor = Matrix<int32_t>;

// Resizes t to rows x cols, keeping the allocation when the shape is unchanged (contents undefined
// then; zero after a shape change).
inline void ResizeTensor(Tensor* t, int64_t rows, int64_t cols) {
  if (t->rows() != rows || t->cols() != cols) t->Reset(rows, cols);
}

// Rows [begin, end) of t.
inline MatrixView<float> RowBlock(Tensor& t, int64_t begin, int64_t end) {
  return {t.data() + begin * t.cols(), end - begin, t.cols()};
}
inline MatrixView<float> RowBlock(MatrixView<float> t, int64_t begin, int64_t end) {
  return {t.data() + begin * t.cols(), end - begin, t.cols()};
}
inline MatrixView<const float> RowBlock(MatrixView<const float> t, int64_t begin, int64_t end) {
  return {t.data() + begin * t.cols(), end - begin, t.cols()};
}

}  // namespace moe
