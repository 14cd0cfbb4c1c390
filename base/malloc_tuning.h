// Process-wide allocator settings for processes that hold one MPI rank (moe_train and
// moe_comm_bench under mpirun).
#pragma once

namespace moe {

// Serves allocations up to 64 MiB from the heap and keeps up to 256 MiB of freed heap memory
// instead of mmap'ing and munmap'ing large buffers. A training step allocates and frees the same
// step-sized buffers every time (gradient flattening, Open MPI's non-blocking collective temporaries);
// glibc's dynamic mmap threshold adapts to that in a plain process, but not under Open MPI, whose
// memory hooks fix the threshold: each step then paid hundreds of page faults per rank (tiny_lm,
// 2 MPI ranks: 410 faults and 8.6 ms per step, 23 faults and 2.9 ms with this). Not for ranks as
// threads: there glibc's per-thread arenas already reuse the memory, and fixing the threshold made
// the 2-thread tiny_lm step ~20% slower (3.05 -> 3.65 ms). Call once, before MPI_Init.
void KeepStepBuffersOnHeap();

}  // namespace moe
