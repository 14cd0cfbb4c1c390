// KeepStepBuffersOnHeap (base/malloc_tuning.h).
#include "base/malloc_tuning.h"

#include <malloc.h>

namespace moe {

void KeepStepBuffersOnHeap() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
#endif
}

}  // namespace moe
