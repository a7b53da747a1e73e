// Asynchronous global -> shared copies (cp.async, sm_80+), shared by the CUDA kernels that stage
// data in shared memory while they compute on something else: a copy is issued, the thread goes
// on, and a later wait makes it visible (to the other threads after a barrier).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lorad::kernels {

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes through L2 only (data read once per block), both addresses 16-byte aligned.
__device__ __forceinline__ void CopyAsync16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dst), "l"(src)
               : "memory");
}
// 4 bytes through L1, both addresses 4-byte aligned.
__device__ __forceinline__ void CopyAsync4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
// Closes the group of the copies this thread issued since the last commit.
__device__ __forceinline__ void CommitCopies() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void WaitCopies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

}  // namespace lorad::kernels
