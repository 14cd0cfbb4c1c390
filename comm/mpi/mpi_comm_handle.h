// RAII owner of an MPI communicator handle (freed with MPI_Comm_free unless MPI is finalized).
#pragma once

#include <mpi.h>

#include <utility>

namespace moe::comm {

class MpiCommHandle {
 public:
  MpiCommHandle() = default;
  explicit MpiCommHandle(MPI_Comm comm) : comm_(comm) {}
  ~MpiCommHandle() { Reset(); }
  MpiCommHandle(MpiCommHandle&& other) noexcept
      : comm_(std::exchange(other.comm_, MPI_COMM_NULL)) {}
  MpiCommHandle& operator=(MpiCommHandle&& other) noexcept {
    if (this != &other) {
      Reset();
      comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
    }
    return *this;
  }
  MpiCommHandle(const MpiCommHandle&) = delete;
  MpiCommHandle& operator=(const MpiCommHandle&) = delete;

  MPI_Comm get() const { return comm_; }
  // Gives up ownership without freeing (for a communicator with operations that never finished:
  // freeing it could block).
  MPI_Comm Release() { return std::exchange(comm_, MPI_COMM_NULL); }

 private:
  void Reset() {
    if (comm_ == MPI_COMM_NULL || comm_ == MPI_COMM_WORLD || comm_ == MPI_COMM_SELF) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
};

}  // namespace moe::comm
