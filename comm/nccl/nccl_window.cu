// NCCL's device API for the symmetric buffers (comm/nccl/nccl_window.h).
#include "comm/nccl/nccl_window.h"

#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 0)
#include <nccl_device.h>
#define MOE_NCCL_DEVICE_API 1
#else
#define MOE_NCCL_DEVICE_API 0
#endif

namespace moe::comm {
namespace {

#if MOE_NCCL_DEVICE_API
__global__ void WindowPeersKernel(ncclWindow_t window, int ranks, void** peers) {
  for (int r = 0; r < ranks; ++r) peers[r] = ncclGetPeerPointer(window, 0, r);
}
#endif

}  // namespace

int NcclLoadStoreRanks(ncclComm_t comm) {
#if MOE_NCCL_DEVICE_API
  return ncclTeamLsa(comm).nRanks;
#else
  (void)comm;
  return 0;
#endif
}

cudaError_t NcclWindowPeers(ncclWindow_t window, int ranks, void** peers_out,
                            cudaStream_t stream) {
#if MOE_NCCL_DEVICE_API
  WindowPeersKernel<<<1, 1, 0, stream>>>(window, ranks, peers_out);
  return cudaGetLastError();
#else
  (void)window, (void)ranks, (void)peers_out, (void)stream;
  return cudaErrorNotSupported;
#endif
}

}  // namespace moe::comm
