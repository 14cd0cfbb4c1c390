// What the NCCL backend's symmetric buffers need from NCCL's device API (nccl_device.h, NCCL 2.28
// or newer), compiled by nvcc in nccl_window.cu: the size of the communicator's load/store team and
// the address of every rank's part of a symmetric window as this process maps it. NCCL 2.28 gives
// peer addresses only in device code (ncclGetPeerPointer); a one-thread kernel reads them for the
// host, once per window.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 27, 0)
typedef void* ncclWindow_t;  // before windows existed: only for the signatures below
#endif

namespace moe::comm {

// A symmetric buffer's memory (ncclMemAlloc) and its registered window. Freed collectively: the
// buffer retires it, the communicator's next allocation (or its destruction) releases it.
struct NcclWindow {
  void* memory = nullptr;
  ncclWindow_t window{};
};

// Ranks of `comm` in its load/store-accessible (LSA) team: every rank of `comm` when they share
// NVLink / P2P on one node; 0 without the device API.
int NcclLoadStoreRanks(ncclComm_t comm);

// peers_out[r] (device memory, `ranks` pointers): rank r's part of `window` at offset 0, as this
// process addresses it. Queued on `stream` (not complete on return).
cudaError_t NcclWindowPeers(ncclWindow_t window, int ranks, void** peers_out, cudaStream_t stream);

}  // namespace moe::comm
