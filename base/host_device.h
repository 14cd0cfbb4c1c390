// MOE_HD marks a function compiled for both the host and the device (nvcc), so the CPU path and
// the GPU kernels run the same per-token code; empty in host-only translation units.
#pragma once

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif
